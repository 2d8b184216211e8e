"""Peak GPU memory of step-wise guidance in ComfyUI, computed (no GPU): SD3.5-M + a DRM of 21/12/6 blocks.

Weights: exact element counts of the full-size models built on the meta device (parameters and buffers; SD3.5-M's
`pos_embed` table is a buffer here and a tensor in the checkpoint) times bytes per element. Activations: the peak of
live tensor bytes during ONE inference forward on the meta device, recorded by `LiveBytes` (every op output counted
once per storage, released when its last tensor dies). Attention: `scaled_dot_product_attention` reaches the mode as
one op whose only output is [B, H, N, D] -- the N x N score matrix is never counted, as on GPUs where ComfyUI uses
flash / memory-efficient SDPA or xformers (their O(B*H*N) softmax statistics are left out); `math_attention_bytes`
gives what the math kernel would add. Peak of a step = resident weights (generator + DRM, budgeted together by
ComfyUI) + max(generator activations at batch 2 for CFG, DRM activations at batch k) + k candidate latents + a fixed
allowance for the CUDA context and ComfyUI (an assumption, `OVERHEAD_GB`). Text encoders are assumed offloaded
during sampling; the VAE decode runs after sampling and is reported separately.
"""

from __future__ import annotations

import logging
import weakref
from functools import lru_cache

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

log = logging.getLogger(__name__)

GB = 1024 ** 3
"""Bytes per GB in this model (GiB: what nvidia-smi and ComfyUI report)."""
OVERHEAD_GB = 0.8
"""Assumed CUDA context + cuDNN/cuBLAS workspaces + ComfyUI's own allocations (not measured here)."""
CARDS_GB = (8, 12, 16, 24)
TEXT_TOKENS = 154  # ComfyUI's SD3 conditioning: 77 CLIP + 77 T5 tokens
DRM_DEPTHS = (21, 12, 6)
SIZES_PX = (512, 1024)
KS = (2, 4, 6)


class LiveBytes(TorchDispatchMode):
    """Records the peak of live bytes of tensors created under it (views and in-place results are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage id -> [tracked tensors alive, nbytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._track(t, fresh=_storage_id(t) not in inputs)
        return out

    def _track(self, t: Tensor, fresh: bool) -> None:
        key = _storage_id(t)
        entry = self._refs.get(key)
        if entry is None:
            if not fresh:  # a view of a tensor made outside the mode (a weight, an input): not an allocation
                return
            entry = self._refs[key] = [0, t.untyped_storage().nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]


def _storage_id(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def peak_activation_bytes(fn, *shapes: tuple[tuple[int, ...], torch.dtype], device: str = "meta") -> int:
    """Peak live bytes of `fn(*inputs)` under inference mode, the inputs (of the given shapes) included."""
    with torch.inference_mode(), LiveBytes() as mode:
        inputs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes]
        fn(*inputs)
        del inputs
    return mode.peak


def weight_bytes(module: nn.Module, bytes_per_weight: float = 2, bytes_per_other: float = 2) -> int:
    """Resident bytes of a module's parameters and buffers: matrices / conv kernels (>= 2-D parameters) at
    `bytes_per_weight` (1 for fp8), everything else (biases, norms, the pos_embed table) at `bytes_per_other`."""
    total = sum(p.numel() * (bytes_per_weight if p.ndim >= 2 else bytes_per_other) for p in module.parameters())
    return int(total + sum(b.numel() * bytes_per_other for b in module.buffers()))


def math_attention_bytes(batch: int, heads: int, tokens: int, bytes_per_element: int = 2) -> int:
    """What the math SDPA kernel adds per attention call: scores and softmax, two [B, H, N, N] tensors."""
    return 2 * batch * heads * tokens * tokens * bytes_per_element


@lru_cache(maxsize=1)
def sd35m_generator() -> nn.Module:
    """Full-size SD3.5-M MMDiT (diffusers), bf16 on the meta device: shapes only, nothing allocated."""
    from diffusers import SD3Transformer2DModel

    from .bench import SD35_MEDIUM

    with torch.device("meta"):
        return SD3Transformer2DModel(**SD35_MEDIUM).to(torch.bfloat16).eval()


@lru_cache(maxsize=None)
def sd35m_drm(depth: int) -> nn.Module:
    """A DRM of `depth` blocks cut from the meta SD3.5-M (official head sizes), bf16 on the meta device."""
    from drm_core import drm_from_base, read_backbone_config
    from drm_core.keys import to_stability

    state = sd35m_generator().state_dict()
    full = read_backbone_config(state, blocks=24)[2]
    stability = {f"model.diffusion_model.{k}": v for k, v in to_stability(state, full).items()}
    return drm_from_base(stability, blocks=depth).eval()


def parameter_counts(depths: tuple[int, ...] = DRM_DEPTHS) -> dict[str, int]:
    """Exact element counts: generator parameters, its pos_embed buffer, and each DRM (parameters + buffers)."""
    gen = sd35m_generator()
    counts = {"generator_parameters": sum(p.numel() for p in gen.parameters()),
              "generator_buffers": sum(b.numel() for b in gen.buffers())}
    for depth in depths:
        drm = sd35m_drm(depth)
        counts[f"drm{depth}_parameters"] = sum(p.numel() for p in drm.parameters())
        counts[f"drm{depth}_buffers"] = sum(b.numel() for b in drm.buffers())
    return counts


def generator_activation_bytes(px: int, batch: int = 2) -> int:
    """Peak activation bytes of one SD3.5-M forward at `px` pixels, batch 2 (CFG: uncond + cond), bf16."""
    gen, side, bf16 = sd35m_generator(), px // 8, torch.bfloat16

    def forward(x, context, pooled, t):
        gen(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t)

    return peak_activation_bytes(forward, ((batch, 16, side, side), bf16), ((batch, TEXT_TOKENS, 4096), bf16),
                                 ((batch, 2048), bf16), ((batch,), bf16))


def drm_activation_bytes(px: int, depth: int, k: int) -> int:
    """Peak activation bytes of one DRM forward on k candidates at `px` pixels (prompt embedded once), bf16."""
    drm, side, bf16 = sd35m_drm(depth), px // 8, torch.bfloat16

    def forward(x, context, pooled, sigma):
        drm(x, sigma, drm.embed_prompt(context, pooled).rows(k))

    return peak_activation_bytes(forward, ((k, 16, side, side), bf16), ((1, TEXT_TOKENS, 4096), bf16),
                                 ((1, 2048), bf16), ((k,), torch.float32))


def vae_decode_bytes(px: int) -> dict[str, int]:
    """SD3 VAE decoder (16-channel latents, diffusers config of SD3's VAE): weights and one-image decode peak, bf16."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)
    vae = vae.to(torch.bfloat16).eval()
    side = px // 8
    activations = peak_activation_bytes(lambda z: vae.decode(z), ((1, 16, side, side), torch.bfloat16))
    return {"weights": weight_bytes(vae.decoder), "activations": activations}


def memory_table(drm_dtype: str = "bf16", sizes_px: tuple[int, ...] = SIZES_PX,
                 depths: tuple[int, ...] = DRM_DEPTHS, ks: tuple[int, ...] = KS,
                 overhead_gb: float = OVERHEAD_GB) -> list[dict]:
    """One row per (px, DRM blocks, k): weights, activations, peak (GB) and which cards of CARDS_GB it fits.
    The generator is bf16; `drm_dtype` "bf16" or "fp8" (DRMLoader's fp8 options: 1 byte per weight matrix,
    biases, norms and the position table in the bf16 compute dtype)."""
    if drm_dtype not in ("bf16", "fp8"):
        raise ValueError(f"memory_table: drm_dtype must be 'bf16' or 'fp8', got {drm_dtype!r}")
    gen_weights = weight_bytes(sd35m_generator())
    rows = []
    for px in sizes_px:
        gen_act = _generator_activations(px)
        for depth in depths:
            drm_weights = weight_bytes(sd35m_drm(depth), 1 if drm_dtype == "fp8" else 2)
            for k in ks:
                drm_act = _drm_activations(px, depth, k)
                latents = k * 16 * (px // 8) ** 2 * 2  # the k candidate latents, bf16
                weights = (gen_weights + drm_weights) / GB
                activation = max(gen_act, drm_act) / GB
                peak = weights + activation + latents / GB + overhead_gb
                rows.append({"px": px, "drm_blocks": depth, "k": k, "drm_dtype": drm_dtype,
                             "weights_gb": weights, "generator_activation_gb": gen_act / GB,
                             "drm_activation_gb": drm_act / GB, "activation_gb": activation, "peak_gb": peak,
                             "fits": {card: peak <= card for card in CARDS_GB}})
    return rows


@lru_cache(maxsize=None)
def _generator_activations(px: int) -> int:
    return generator_activation_bytes(px)


@lru_cache(maxsize=None)
def _drm_activations(px: int, depth: int, k: int) -> int:
    return drm_activation_bytes(px, depth, k)


def memory_model(quick: bool = False) -> dict:
    """Everything `bench` records under `memory_model`: assumptions, counts, both tables, VAE decode."""
    sizes, depths, ks = ((512,), (21,), (2, 6)) if quick else (SIZES_PX, DRM_DEPTHS, KS)
    result = {"overhead_gb": OVERHEAD_GB, "gb": "GiB (1024^3 bytes)", "text_tokens": TEXT_TOKENS,
              "assumptions": ["generator bf16, batch 2 per step (CFG)", "text encoders offloaded during sampling",
                              "attention: fused SDPA (flash / memory-efficient / xformers), no N x N matrix",
                              f"{OVERHEAD_GB} GB fixed for the CUDA context and ComfyUI (assumed)",
                              "VAE decode after sampling, reported separately"],
              "parameter_counts": parameter_counts(depths),
              "bf16": memory_table("bf16", sizes, depths, ks),
              "fp8_drm": memory_table("fp8", sizes, depths, ks)}
    log.info("memory model: %d rows per DRM dtype, %.1f-%.1f GB peak", len(result["bf16"]),
             min(r["peak_gb"] for r in result["bf16"]), max(r["peak_gb"] for r in result["bf16"]))
    result["vae_decode"] = {px: {k: v / GB for k, v in vae_decode_bytes(px).items()} for px in sizes}
    result["math_attention_extra_gb"] = {px: math_attention_bytes(2, 24, (px // 16) ** 2 + TEXT_TOKENS) / GB
                                         for px in sizes}
    return result


def format_memory_table(rows: list[dict]) -> str:
    """Markdown table of `memory_table` rows."""
    cards = " | ".join(f"{c} GB" for c in CARDS_GB)
    lines = [f"| px | DRM blocks | k | DRM dtype | weights GB | activations GB | peak GB | {cards} |",
             "|---|---|---|---|---|---|---|" + "---|" * len(CARDS_GB)]
    for r in rows:
        dtype = r["drm_dtype"]
        fits = " | ".join("yes" if r["fits"][c] else "no" for c in CARDS_GB)
        lines.append(f"| {r['px']} | {r['drm_blocks']} | {r['k']} | {dtype} | {r['weights_gb']:.2f} | "
                     f"{r['activation_gb']:.2f} | {r['peak_gb']:.2f} | {fits} |")
    return "\n".join(lines)
