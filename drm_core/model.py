"""The DRM network: an SD3 MMDiT cut after its first N joint blocks, then the paper's reward head.

How the paper's ambiguities are resolved (following the official DRM code, REFERENCE.md §1):
- "Remove the last 3 blocks": blocks 0..N-1 of the base run unchanged (N = 21 of 24 for SD3.5-M).
  A kept block keeps its full context stream (it is not turned into a context-pre-only block), so
  its pretrained weights load as they are; only the base's own last block is context-pre-only.
- "Linear to d_p per token, reshape to h x w x d_p/4": this is the DiT's own pretrained output
  layer, AdaLN-continuous `norm_out` (conditioned on the time + pooled embedding) and `proj_out`
  (hidden -> p*p*16), applied to block N-1's image tokens, then the standard p x p unpatchify to a
  16-channel latent-resolution map (16 x 64 x 64 at 512 px).
- Head: n x [conv 3x3 stride 2 -> GroupNorm -> ReLU] (16 -> 256 -> 512 -> 512), global average
  pooling, MLP 512 -> 512 -> ReLU -> dropout 0.1 -> 1. Everything is trainable.
- Conditioning: prompt tokens go through the joint attention, the pooled vector through the time
  embedding, exactly as in the generator; sigma enters as timestep 1000 * sigma.
Backbone tensors use diffusers' SD3Transformer2DModel names; the head lives under `head.`.

Head kinds (`config.head.kind`): "drm-conv" (above, the default; a header without `kind` is this) and
"dina-lrm" (DiNa-LRM's attention-pooling head on tapped block outputs, `heads_dina.py`), which has no
use for `norm_out`/`proj_out`, so a DRM of that kind does not create them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.normalization import AdaLayerNormContinuous
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import DRMError
from .heads_dina import DinaHeadConfig, DinaRewardHead
from .latents import batch_sigma, is_host_scalar, sigma_to_timestep
from .scoring import ScoringConvention


ACTIVATION_FACTOR = 16
"""Live activation bytes of a DRM forward, per latent, in units of (image + text tokens) x hidden x dtype bytes:
13.1-13.8 measured for SD3.5-M-sized DRMs (6 and 21 blocks, 512 and 1024 px; training/memory_model.py)."""


@dataclass(frozen=True)
class BackboneConfig:
    """Architecture of the (truncated) SD3-family MMDiT, as inferred from a base checkpoint."""

    depth: int  # joint blocks in the base model
    blocks: int  # joint blocks kept (run) by the DRM
    hidden: int
    heads: int
    patch_size: int
    pos_embed_max_size: int
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    in_channels: int = 16
    out_channels: int = 16
    context_dim: int = 4096
    caption_projection_dim: int | None = None
    pooled_dim: int = 2048
    kind: str = "sd3-mmdit"

    def __post_init__(self) -> None:
        if not 1 <= self.blocks <= self.depth:
            raise DRMError(f"blocks must be in [1, depth={self.depth}], got {self.blocks}")
        if self.hidden % self.heads:
            raise DRMError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        if self.caption_projection_dim is None:
            object.__setattr__(self, "caption_projection_dim", self.hidden)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class HeadConfig:
    """Reward head after the unpatchified map: conv stack, pooling, MLP (official DRM sizes by default)."""

    conv_channels: tuple[int, ...] = (256, 512, 512)
    groups: int = 32
    mlp_hidden: int = 512
    dropout: float = 0.1
    kind: str = "drm-conv"

    def __post_init__(self) -> None:
        if self.kind != "drm-conv":
            raise DRMError(f"HeadConfig is the 'drm-conv' head, got kind {self.kind!r}")
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
        bad = [c for c in self.conv_channels if c % self.groups]
        if not self.conv_channels or bad:
            raise DRMError(f"head conv_channels {self.conv_channels} must be non-empty and divisible by "
                           f"groups={self.groups}")


HEAD_KINDS = {"drm-conv": HeadConfig, "dina-lrm": DinaHeadConfig}


def head_config(options: dict | None = None) -> HeadConfig | DinaHeadConfig:
    """Head config from a dict (a DRM header's `head`, or keyword options); no `kind` means "drm-conv"."""
    options = dict(options or {})
    kind = options.get("kind", "drm-conv")
    if kind not in HEAD_KINDS:
        raise DRMError(f"unknown head kind {kind!r} (known: {sorted(HEAD_KINDS)})")
    return HEAD_KINDS[kind](**options)


@dataclass(frozen=True)
class DRMConfig:
    backbone: BackboneConfig
    head: HeadConfig | DinaHeadConfig = field(default_factory=HeadConfig)

    def to_dict(self) -> dict:
        return {"backbone": asdict(self.backbone), "head": asdict(self.head)}

    @classmethod
    def from_dict(cls, d: dict) -> "DRMConfig":
        return cls(BackboneConfig(**d["backbone"]), head_config(d["head"]))

    @property
    def uses_output_layer(self) -> bool:
        """Whether the head reads the DiT's own output layer (norm_out/proj_out + unpatchify)."""
        return self.head.kind == "drm-conv"


def build_head(config: DRMConfig) -> nn.Module:
    """The (untrained) head module for a DRM config, by head kind."""
    if config.head.kind == "dina-lrm":
        return DinaRewardHead(config.backbone.hidden, config.head)
    return RewardHead(config.backbone.out_channels, config.head)


class RewardHead(nn.Module):
    """[B, C, H, W] map -> n x (conv3x3/2, GroupNorm, ReLU) -> global mean pool -> MLP -> [B]."""

    def __init__(self, in_channels: int, config: HeadConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *config.conv_channels), config.conv_channels):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(config.groups, c_out), nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        self.mlp = nn.Sequential(
            nn.Linear(config.conv_channels[-1], config.mlp_hidden), nn.ReLU(),
            nn.Dropout(config.dropout), nn.Linear(config.mlp_hidden, 1),
        )

    def forward(self, feature_map: Tensor) -> Tensor:
        h = self.convs(feature_map).mean(dim=(2, 3))  # [B, C_last]
        return self.mlp(h).squeeze(-1)  # [B]


@dataclass
class PromptEmbedding:
    """A prompt as the DRM embeds it, computed once per sampling run and reused at every step and for every
    candidate: context tokens after `context_embedder` [Bp, N, D] and the pooled projection [Bp, D]."""

    context: Tensor
    pooled: Tensor

    def rows(self, batch: int) -> "PromptEmbedding":
        """Rows for a batch of `batch` latents: Bp = 1 broadcasts; else each prompt row serves batch / Bp
        consecutive latents (the k candidates of one image, image-major as stepwise_sample orders them)."""
        n = self.context.shape[0]
        if n == batch:
            return self
        if n == 1:
            return PromptEmbedding(self.context.expand(batch, -1, -1), self.pooled.expand(batch, -1))
        if batch % n:
            raise DRMError(f"DRM: {n} embedded prompts cannot serve a batch of {batch} latents")
        return PromptEmbedding(self.context.repeat_interleave(batch // n, 0), self.pooled.repeat_interleave(batch // n, 0))


class DRM(nn.Module):
    """Diffusion-based Reward Model: r(x_sigma, sigma, prompt) -> scalar, for model-space SD3 latents."""

    def __init__(self, config: DRMConfig, provenance: dict | None = None, scoring: ScoringConvention | None = None):
        super().__init__()
        b = config.backbone
        self.config = config
        self.provenance = dict(provenance or {})
        self.scoring = scoring or ScoringConvention()  # how to score clean latents (header key `scoring`)
        self.pos_embed = PatchEmbed(height=b.pos_embed_max_size * b.patch_size, width=b.pos_embed_max_size * b.patch_size,
                                    patch_size=b.patch_size, in_channels=b.in_channels, embed_dim=b.hidden,
                                    pos_embed_max_size=b.pos_embed_max_size)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=b.hidden, pooled_projection_dim=b.pooled_dim)
        self.context_embedder = nn.Linear(b.context_dim, b.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(dim=b.hidden, num_attention_heads=b.heads, attention_head_dim=b.head_dim,
                                  context_pre_only=i == b.depth - 1, qk_norm=b.qk_norm,
                                  use_dual_attention=i in b.dual_attention_layers)
            for i in range(b.blocks)
        ])
        if config.uses_output_layer:
            self.norm_out = AdaLayerNormContinuous(b.hidden, b.hidden, elementwise_affine=False, eps=1e-6)
            self.proj_out = nn.Linear(b.hidden, b.patch_size * b.patch_size * b.out_channels)
        else:
            config.head.check_backbone(b)
        self.head = build_head(config)
        self.gradient_checkpointing = False
        self.compute_device: torch.device | None = None  # set by a host that keeps weights elsewhere (partial loads)
        self.compute_dtype: torch.dtype | None = None  # set when weights are stored in another dtype (fp8)
        for name, param in self.named_parameters():
            if name in self.unused_parameter_names():
                param.requires_grad_(False)

    def unused_parameter_names(self) -> set[str]:
        """Parameters that never reach the score, kept in the file for fidelity to the base and frozen so
        optimisers and DDP skip them: the last kept block's context-stream output (to_add_out,
        ff_context) unless a head taps the text tokens after it."""
        last = len(self.transformer_blocks) - 1
        if self.config.backbone.blocks == self.config.backbone.depth:
            return set()
        if self.config.head.kind == "dina-lrm" and last + 1 in self.config.head.text_taps:
            return set()
        prefixes = (f"transformer_blocks.{last}.attn.to_add_out.", f"transformer_blocks.{last}.ff_context.")
        return {n for n, _ in self.named_parameters() if n.startswith(prefixes)}

    def placement(self) -> tuple[torch.device, torch.dtype]:
        """(device, dtype) inputs run in: compute_device / compute_dtype when a host set them, else the weights'."""
        param = next(self.parameters())
        return self.compute_device or param.device, self.compute_dtype or param.dtype

    def embed_prompt(self, context: Tensor, pooled: Tensor) -> PromptEmbedding:
        """The prompt-only part of the forward pass (context_embedder, pooled projection), done once."""
        device, dtype = self.placement()
        context, pooled = context.to(device, dtype), pooled.to(device, dtype)
        return PromptEmbedding(self.context_embedder(context), self.time_text_embed.text_embedder(pooled))

    def run_backbone(self, latents: Tensor, sigma: Tensor, context: Tensor | PromptEmbedding, pooled: Tensor | None,
                     taps: frozenset[int] = frozenset()) -> tuple[Tensor, Tensor, dict[int, tuple[Tensor, Tensor]]]:
        """Embed and run the kept blocks (`context` may be an already embedded PromptEmbedding). Returns the
        last image tokens [B, HW/p^2, D], the time+pooled embedding temb [B, D], and {n: (image tokens,
        text tokens)} after block n (1-based; 0 = the embedded inputs) for every n in `taps`."""
        prompt = context if isinstance(context, PromptEmbedding) else self.embed_prompt(context, pooled)
        h = self.embed_latents(latents)  # [B, HW/p^2, D]
        t = self.time_text_embed.time_proj(sigma_to_timestep(sigma))  # as CombinedTimestepTextProjEmbeddings
        temb = self.time_text_embed.timestep_embedder(t.to(prompt.pooled.dtype)) + prompt.pooled  # [B, D]
        c = prompt.context  # [B, N, D]
        tapped = {0: (h, c)} if 0 in taps else {}
        for i, block in enumerate(self.transformer_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                c, h = checkpoint(block, h, c, temb, use_reentrant=False)
            else:
                c, h = block(hidden_states=h, encoder_hidden_states=c, temb=temb)
            if i + 1 in taps:
                tapped[i + 1] = (h, c)
        return h, temb, tapped

    def embed_latents(self, latents: Tensor) -> Tensor:
        """Patch embedding plus the centre crop of the position table ([B, 16, H, W] -> [B, HW/p^2, D]), as
        diffusers' PatchEmbed, with only the crop moved to the input (the table may sit off the device)."""
        pe = self.pos_embed
        h = pe.proj(latents).flatten(2).transpose(1, 2)  # [B, HW/p^2, D]
        table = pe.cropped_pos_embed(*latents.shape[-2:])  # [1, HW/p^2, D]
        return (h + table.to(h.device)).to(h.dtype).contiguous()

    def features(self, latents: Tensor, sigma: Tensor, context: Tensor | PromptEmbedding,
                 pooled: Tensor | None) -> Tensor:
        """Kept MMDiT blocks + norm_out/proj_out + unpatchify: [B, 16, H, W] -> map [B, 16, H, W]."""
        if not self.config.uses_output_layer:
            raise DRMError(f"DRM.features: a '{self.config.head.kind}' head has no output-layer feature map")
        b = self.config.backbone
        height, width = latents.shape[-2:]
        h, temb, _ = self.run_backbone(latents, sigma, context, pooled)
        h = self.proj_out(self.norm_out(h, temb))  # [B, HW/p^2, p*p*C]
        p, gh, gw = b.patch_size, height // b.patch_size, width // b.patch_size
        fmap = h.reshape(h.shape[0], gh, gw, p, p, b.out_channels)
        return torch.einsum("nhwpqc->nchpwq", fmap).reshape(h.shape[0], b.out_channels, gh * p, gw * p)

    def forward(self, latents: Tensor, sigma: Tensor, context: Tensor | PromptEmbedding,
                pooled: Tensor | None = None) -> Tensor:
        """Scores [B] (float32) for model-space latents [B, 16, H, W] at noise level sigma [B] (no checks)."""
        if self.config.head.kind == "dina-lrm":
            head = self.config.head
            _, temb, tapped = self.run_backbone(latents, sigma, context, pooled, head.taps)
            image = [tapped[n][0] for n in head.visual_taps]
            text = [tapped[n][1] for n in head.text_taps]
            return self.head(image, text, temb).float()
        return self.head(self.features(latents, sigma, context, pooled)).float()

    def score(self, latents: Tensor, sigma: Tensor | float, context: Tensor, pooled: Tensor,
              chunk: int | None = None) -> Tensor:
        """Validated, batched scoring: latents [B, 16, H, W] model space; sigma scalar or [B];
        context [B|1, N, 4096]; pooled [B|1, 2048] -> scores [B] float32, `chunk` latents per forward."""
        latents, sigma, context, pooled = self.prepare_inputs(latents, sigma, context, pooled)
        step = len(latents) if chunk is None else max(1, int(chunk))
        return torch.cat([self(latents[i:i + step], sigma[i:i + step], context[i:i + step], pooled[i:i + step])
                          for i in range(0, len(latents), step)])

    def activation_bytes(self, batch: int, height: int, width: int, text_tokens: int = 154) -> int:
        """Peak activation bytes of one inference forward on `batch` latents [.., height, width] (upper bound:
        ACTIVATION_FACTOR x tokens x width x dtype bytes per latent, from meta-device measurements)."""
        b = self.config.backbone
        tokens = (height // b.patch_size) * (width // b.patch_size) + text_tokens
        return ACTIVATION_FACTOR * batch * tokens * b.hidden * self.placement()[1].itemsize

    def score_embedded(self, latents: Tensor, sigma: Tensor | float, prompt: PromptEmbedding) -> Tensor:
        """`score` with the prompt embedded once by `embed_prompt` (rows broadcast or repeated per candidate)."""
        latents, sigma = self._prepare_latents(latents, sigma)
        return self(latents, sigma, prompt.rows(latents.shape[0]))

    def prepare_inputs(self, latents: Tensor, sigma: Tensor | float, context: Tensor,
                       pooled: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Check shapes against the architecture, broadcast batch-1 conditioning, move to device/dtype."""
        b = self.config.backbone
        latents, sigma = self._prepare_latents(latents, sigma)
        context = _batched(context, latents.shape[0], 3, b.context_dim, "context [B, N, {}]")
        pooled = _batched(pooled, latents.shape[0], 2, b.pooled_dim, "pooled [B, {}]")
        return latents, sigma, context.to(latents.device, latents.dtype), pooled.to(latents.device, latents.dtype)

    def _prepare_latents(self, latents: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        b = self.config.backbone
        if not isinstance(latents, Tensor) or latents.ndim != 4 or latents.shape[1] != b.in_channels:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            hint = " (4 channels is an SD1.x/SDXL latent)" if isinstance(latents, Tensor) and latents.ndim == 4 \
                and latents.shape[1] == 4 else ""
            raise DRMError(f"DRM.score: latents must be model-space SD3 latents [B, {b.in_channels}, H, W], "
                           f"got {shape}{hint}")
        batch, _, height, width = latents.shape
        p, m = b.patch_size, b.pos_embed_max_size
        if height % p or width % p or height // p > m or width // p > m:
            raise DRMError(f"DRM.score: latent size {height}x{width} must be divisible by patch size {p} and at "
                           f"most {m * p} per side (pos_embed_max_size {m})")
        device, dtype = self.placement()
        if is_host_scalar(sigma):  # checked on the host, filled on the device: no transfer, no sync
            sigma = torch.full((batch,), float(batch_sigma(sigma, latents, device="cpu")), device=device)
        else:
            sigma = batch_sigma(sigma, latents).flatten().expand(batch).to(device)
        return latents.to(device, dtype), sigma


def _batched(t: Tensor, batch: int, ndim: int, dim: int, what: str) -> Tensor:
    if not isinstance(t, Tensor) or t.ndim != ndim or t.shape[-1] != dim or t.shape[0] not in (1, batch):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise DRMError(f"DRM.score: {what.format(dim)} expected with B = {batch} or 1, got {got}")
    return t.expand(batch, *t.shape[1:])
