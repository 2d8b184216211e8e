"""SD3-family MMDiT weight layouts: detection, architecture inference, Stability <-> diffusers names.

Written by hand (not diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`) because that
converter needs the whole checkpoint in memory and pops from it; here every tensor is mapped on its
own so a 2.5 B-parameter file is read lazily, one tensor at a time, and only the kept blocks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import DRMError
from .model import BackboneConfig

STABILITY_PROBE = "joint_blocks.0.context_block.attn.qkv.weight"
DIFFUSERS_PROBE = "transformer_blocks.0.attn.add_q_proj.weight"
SD3_HEAD_DIM = 64

Transform = tuple[str, int] | None  # ("chunk", i): i-th third of a fused qkv; ("swap", 0): shift/scale -> scale/shift


@dataclass(frozen=True)
class Layout:
    """Where an MMDiT sits in a key space: 'stability' or 'diffusers' names behind `prefix`."""

    kind: str
    prefix: str


def detect_layout(keys: list[str], source: str) -> Layout:
    """Find the MMDiT inside a key set, or raise naming what the file looks like instead."""
    for kind, probe in (("stability", STABILITY_PROBE), ("diffusers", DIFFUSERS_PROBE)):
        hits = sorted(k[: -len(probe)] for k in keys if k.endswith(probe))
        if hits:
            return Layout(kind, min(hits, key=len))
    raise DRMError(f"{source}: no SD3-family MMDiT found ({_describe(keys)}); expected keys like "
                   f"'model.diffusion_model.{STABILITY_PROBE}' (Stability/ComfyUI) or '{DIFFUSERS_PROBE}' (diffusers)")


def _describe(keys: list[str]) -> str:
    joined = "\n".join(keys)
    for pattern, what in (("input_blocks.", "a UNet, as in SD1.x/SDXL checkpoints"),
                          ("down_blocks.", "a diffusers UNet (SD1.x/SDXL)"),
                          ("double_blocks.", "a Flux-style double/single-stream transformer"),
                          ("single_transformer_blocks.", "a diffusers Flux transformer"),
                          ("encoder.down.", "a VAE only"),
                          ("text_model.", "a text encoder only")):
        if pattern in joined:
            return f"found {len(keys)} tensors that look like {what}"
    return f"found {len(keys)} tensors, e.g. {keys[:3]}"


def infer_backbone(shapes: Mapping[str, tuple[int, ...]], layout: Layout, source: str,
                   blocks: int | None = None, config: Mapping | None = None) -> BackboneConfig:
    """Architecture from tensor shapes alone (as ComfyUI's model detection does); blocks=None keeps depth - 3."""
    s = {k[len(layout.prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(layout.prefix)}
    names = _STABILITY_PARTS if layout.kind == "stability" else _DIFFUSERS_PARTS
    blk = "joint_blocks" if layout.kind == "stability" else "transformer_blocks"

    def shape(part: str) -> tuple[int, ...]:
        key = names[part]
        if key not in s:
            raise DRMError(f"{source}: SD3 MMDiT tensor '{layout.prefix}{key}' is missing (truncated or partial file?)")
        return s[key]

    hidden, in_channels, patch, _ = shape("patch")
    depth = 1 + max(int(m.group(1)) for k in s if (m := re.match(rf"{blk}\.(\d+)\.", k)))
    dual = tuple(i for i in range(depth) if names["attn2"].format(i) in s)
    qk_key = names["ln_q"].format(0)
    qk_norm = None
    head_dim = SD3_HEAD_DIM
    if qk_key in s:
        has_bias = qk_key.replace(".weight", ".bias") in s
        qk_norm = "layer_norm" if has_bias else "rms_norm"
        head_dim = s[qk_key][0]
    if config and "num_attention_heads" in config:
        heads = int(config["num_attention_heads"])
    else:
        heads = hidden // head_dim
    pos = shape("pos_embed")
    max_size = math.isqrt(pos[1])
    if in_channels != 16 or max_size * max_size != pos[1]:
        raise DRMError(f"{source}: MMDiT with {in_channels} latent channels and {pos[1]} position embeddings is not "
                       "SD3-family (expected 16 channels and a square position grid)")
    context_out, context_dim = shape("context")
    out_features = shape("final")[0]
    keep = depth - 3 if blocks is None else blocks
    if not 1 <= keep <= depth:
        raise DRMError(f"{source}: cannot keep {keep} blocks of an MMDiT with {depth} joint blocks")
    return BackboneConfig(depth=depth, blocks=keep, hidden=hidden, heads=heads, patch_size=patch,
                          pos_embed_max_size=max_size, dual_attention_layers=tuple(i for i in dual if i < keep),
                          qk_norm=qk_norm, in_channels=in_channels, out_channels=out_features // (patch * patch),
                          context_dim=context_dim, caption_projection_dim=context_out,
                          pooled_dim=shape("pooled")[1])


_STABILITY_PARTS = {"patch": "x_embedder.proj.weight", "pos_embed": "pos_embed", "context": "context_embedder.weight",
                    "pooled": "y_embedder.mlp.0.weight", "final": "final_layer.linear.weight",
                    "attn2": "joint_blocks.{}.x_block.attn2.qkv.weight", "ln_q": "joint_blocks.{}.x_block.attn.ln_q.weight"}
_DIFFUSERS_PARTS = {"patch": "pos_embed.proj.weight", "pos_embed": "pos_embed.pos_embed",
                    "context": "context_embedder.weight", "pooled": "time_text_embed.text_embedder.linear_1.weight",
                    "final": "proj_out.weight", "attn2": "transformer_blocks.{}.attn2.to_q.weight",
                    "ln_q": "transformer_blocks.{}.attn.norm_q.weight"}


def stability_names(cfg: BackboneConfig) -> Iterator[tuple[str, str, Transform]]:
    """(diffusers name, Stability name, transform) for every backbone tensor the DRM keeps."""
    wb = (".weight", ".bias")
    top = [("pos_embed.proj", "x_embedder.proj"),
           ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
           ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
           ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
           ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
           ("context_embedder", "context_embedder"), ("proj_out", "final_layer.linear")]
    yield "pos_embed.pos_embed", "pos_embed", None
    for d, st in top:
        for sfx in wb:
            yield d + sfx, st + sfx, None
    for sfx in wb:
        yield "norm_out.linear" + sfx, "final_layer.adaLN_modulation.1" + sfx, ("swap", 0)
    for i in range(cfg.blocks):
        d, st = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        pre_only = i == cfg.depth - 1
        for sfx in wb:
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                yield f"{d}attn.{name}{sfx}", f"{st}x_block.attn.qkv{sfx}", ("chunk", j)
            for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
                yield f"{d}attn.{name}{sfx}", f"{st}context_block.attn.qkv{sfx}", ("chunk", j)
            yield f"{d}attn.to_out.0{sfx}", f"{st}x_block.attn.proj{sfx}", None
            yield f"{d}norm1.linear{sfx}", f"{st}x_block.adaLN_modulation.1{sfx}", None
            yield (f"{d}norm1_context.linear{sfx}", f"{st}context_block.adaLN_modulation.1{sfx}",
                   ("swap", 0) if pre_only else None)
            yield f"{d}ff.net.0.proj{sfx}", f"{st}x_block.mlp.fc1{sfx}", None
            yield f"{d}ff.net.2{sfx}", f"{st}x_block.mlp.fc2{sfx}", None
            if not pre_only:
                yield f"{d}attn.to_add_out{sfx}", f"{st}context_block.attn.proj{sfx}", None
                yield f"{d}ff_context.net.0.proj{sfx}", f"{st}context_block.mlp.fc1{sfx}", None
                yield f"{d}ff_context.net.2{sfx}", f"{st}context_block.mlp.fc2{sfx}", None
            if i in cfg.dual_attention_layers:
                for j, name in enumerate(("to_q", "to_k", "to_v")):
                    yield f"{d}attn2.{name}{sfx}", f"{st}x_block.attn2.qkv{sfx}", ("chunk", j)
                yield f"{d}attn2.to_out.0{sfx}", f"{st}x_block.attn2.proj{sfx}", None
        if cfg.qk_norm:
            norms = [("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                     ("attn.norm_added_q", "context_block.attn.ln_q"), ("attn.norm_added_k", "context_block.attn.ln_k")]
            if i in cfg.dual_attention_layers:
                norms += [("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")]
            sfxs = wb if cfg.qk_norm == "layer_norm" else (".weight",)
            for dn, sn in norms:
                for sfx in sfxs:
                    yield f"{d}{dn}{sfx}", f"{st}{sn}{sfx}", None


def apply_transform(tensor: Tensor, transform: Transform) -> Tensor:
    """Slice a fused qkv or swap the (shift, scale) halves of an AdaLN projection."""
    if transform is None:
        return tensor
    op, index = transform
    if op == "chunk":
        return tensor.chunk(3, dim=0)[index]
    shift, scale = tensor.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def to_stability(diffusers_state: Mapping[str, Tensor], cfg: BackboneConfig, prefix: str = "") -> dict[str, Tensor]:
    """Inverse mapping (diffusers -> Stability names, fused qkv) for a full MMDiT (blocks == depth)."""
    fused: dict[str, list] = {}
    out = {}
    for dname, sname, transform in stability_names(cfg):
        t = diffusers_state[dname]
        if transform is None:
            out[prefix + sname] = t
        elif transform[0] == "swap":
            scale, shift = t.chunk(2, dim=0)
            out[prefix + sname] = torch.cat([shift, scale], dim=0)
        else:
            fused.setdefault(prefix + sname, [None] * 3)[transform[1]] = t
    out.update({k: torch.cat(parts, dim=0) for k, parts in fused.items()})
    return out
