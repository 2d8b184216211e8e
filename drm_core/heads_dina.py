"""The DiNa-LRM reward head as a DRM head kind ("dina-lrm").

DiNa-LRM (HKUST-C4G/diffusion-rm, "Diffusion-Native Latent Reward Modeling") scores an SD3.5-M latent
with the first 12 joint blocks and a head that reads *intermediate* block outputs instead of the
DiT's output layer. Written here from its published description and code structure (module names
match its `rm_head.pt` so the weights load as they are):

1. Taps: the image tokens and the text (context) tokens after blocks n in `visual_taps` /
   `text_taps` (1-based, as DiNa counts: n = 4 is the output of `transformer_blocks[3]`; n = 0 would
   be the embedded inputs), plus the time+pooled embedding `temb` the blocks are conditioned on.
2. One FiLM adapter per tap: tokens -> (optional input projection) -> `x * (1 + gamma) + beta` with
   (gamma, beta) = MLP(temb) -> + a learned per-layer embedding -> linear to width/4. The adapters of
   one stream are concatenated on the channel axis and mixed back to `width` by a linear layer.
3. `num_queries` learned query tokens go through two pre-RMSNorm residual cross-attention blocks:
   the first attends to the image tokens and to the text tokens in two separate softmax attentions
   whose outputs add, each value scaled per token by a sigmoid gate (MLP of that token); the second
   attends to the image tokens only, ungated.
4. A residual GELU MLP (pre-RMSNorm, 4x width), a linear layer to one score per query, mean over queries.

The score is the raw head output: DiNa-LRM's README maps it by `(raw + 10) / 10`, its GRPO scorer by
`raw / 5`; we apply neither (rankings, argmax selection and group-normalised advantages do not
change under a positive affine map) and the importer records this in the DRM metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DRMError


@dataclass(frozen=True)
class DinaHeadConfig:
    """DiNa-LRM head: taps (1-based block outputs), width (None = backbone hidden), queries, heads."""

    visual_taps: tuple[int, ...] = (4, 8, 12)
    text_taps: tuple[int, ...] = (4, 8, 12)
    width: int | None = None
    num_queries: int = 4
    attn_heads: int = 8
    proj_in: bool = False  # force an input projection even when width == backbone hidden
    dropout: float = 0.0
    kind: str = "dina-lrm"

    def __post_init__(self) -> None:
        if self.kind != "dina-lrm":
            raise DRMError(f"DinaHeadConfig is the 'dina-lrm' head, got kind {self.kind!r}")
        for name in ("visual_taps", "text_taps"):
            taps = tuple(int(n) for n in getattr(self, name))
            if any(n < 0 for n in taps) or list(taps) != sorted(set(taps)):
                raise DRMError(f"dina-lrm head {name} must be increasing block indices >= 0, got {taps}")
            object.__setattr__(self, name, taps)
        if not self.visual_taps:
            raise DRMError("dina-lrm head needs at least one visual tap")
        width = self.width
        if width is not None and (width % 4 or width % self.attn_heads):
            raise DRMError(f"dina-lrm head width {width} must be divisible by 4 and by attn_heads={self.attn_heads}")
        if self.num_queries < 1:
            raise DRMError(f"dina-lrm head num_queries must be >= 1, got {self.num_queries}")

    @property
    def taps(self) -> frozenset[int]:
        return frozenset(self.visual_taps) | frozenset(self.text_taps)

    def check_backbone(self, backbone) -> None:
        """Taps must exist in the kept blocks; the base's last block has no text output to tap."""
        bad = sorted(n for n in self.taps if n > backbone.blocks)
        if bad:
            raise DRMError(f"dina-lrm head taps {bad} lie beyond the {backbone.blocks} kept blocks")
        if backbone.blocks == backbone.depth and backbone.depth in self.text_taps:
            raise DRMError(f"dina-lrm head cannot tap text after block {backbone.depth}: the base's last "
                           "block is context-pre-only and has no text output")
        width = self.width or backbone.hidden
        if width % 4 or width % self.attn_heads:
            raise DRMError(f"dina-lrm head width {width} must be divisible by 4 and by attn_heads={self.attn_heads}")


class FiLMAdapter(nn.Module):
    """tokens [B, N, D] -> FiLM by temb [B, E] -> + layer embedding -> [B, N, out_dim]."""

    def __init__(self, in_dim: int, emb_dim: int, width: int, out_dim: int, proj_in: bool):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, width) if proj_in or in_dim != width else nn.Identity()
        self.layer_embed = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.cond_mlp = nn.Sequential(nn.Linear(emb_dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.proj = nn.Linear(width, out_dim)
        nn.init.zeros_(self.cond_mlp[2].weight)  # untrained: identity modulation
        nn.init.zeros_(self.cond_mlp[2].bias)

    def forward(self, tokens: Tensor, temb: Tensor) -> Tensor:
        gamma, beta = self.cond_mlp(temb).unsqueeze(1).chunk(2, dim=-1)  # [B, 1, W] each
        return self.proj(self.proj_in(tokens) * (1 + gamma) + beta + self.layer_embed.to(tokens))


def _gate(dim: int) -> nn.Sequential:
    gate = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
    nn.init.zeros_(gate[2].weight)  # untrained: every gate at sigmoid(0) = 1/2
    nn.init.zeros_(gate[2].bias)
    return gate


class GatedCrossAttention(nn.Module):
    """queries [B, Q, W] attend to image tokens (and text tokens, separately; outputs add), residual."""

    def __init__(self, dim: int, heads: int, text: bool, gated: bool, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_v = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.norm_t = nn.RMSNorm(dim) if text else None
        self.to_q = nn.Linear(dim, dim)
        self.to_k_vis, self.to_v_vis = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_k_text = nn.Linear(dim, dim) if text else None
        self.to_v_text = nn.Linear(dim, dim) if text else None
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.gate_vis = _gate(dim) if gated else None
        self.gate_text = _gate(dim) if gated and text else None

    def _attend(self, q: Tensor, tokens: Tensor, to_k: nn.Linear, to_v: nn.Linear, gate: nn.Module | None) -> Tensor:
        k, v = to_k(tokens), to_v(tokens)  # [B, L, W]
        if gate is not None:
            v = v * torch.sigmoid(gate(tokens))  # [B, L, 1] per-token value gate
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, L, W/H]  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).flatten(2)  # [B, Q, W]

    def forward(self, queries: Tensor, image: Tensor, text: Tensor | None = None) -> Tensor:
        q = self.to_q(self.norm_q(queries))
        h = self._attend(q, self.norm_v(image), self.to_k_vis, self.to_v_vis, self.gate_vis)
        if text is not None and self.norm_t is not None:
            h = h + self._attend(q, self.norm_t(text), self.to_k_text, self.to_v_text, self.gate_text)
        return queries + self.to_out(h)


class DinaRewardHead(nn.Module):
    """Tapped (image, text) token lists + temb -> score [B]; see the module docstring."""

    def __init__(self, hidden: int, config: DinaHeadConfig):
        super().__init__()
        width = config.width or hidden
        feat = width // 4
        film = lambda: FiLMAdapter(hidden, hidden, width, feat, config.proj_in)  # noqa: E731
        self.layer_adapters_visual = nn.ModuleList([film() for _ in config.visual_taps])
        self.layer_adapters_text = nn.ModuleList([film() for _ in config.text_taps])
        self.agg_visual = nn.Linear(len(config.visual_taps) * feat, width)
        self.agg_text = nn.Linear(len(config.text_taps) * feat, width) if config.text_taps else None
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_queries, width) * 0.02)
        self.attn1 = GatedCrossAttention(width, config.attn_heads, text=bool(config.text_taps), gated=True,
                                         dropout=config.dropout)
        self.attn2 = GatedCrossAttention(width, config.attn_heads, text=False, gated=False, dropout=config.dropout)
        self.norm_ff = nn.RMSNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                nn.Dropout(config.dropout))
        self.head = nn.Linear(width, 1)

    def forward(self, image: list[Tensor], text: list[Tensor], temb: Tensor) -> Tensor:
        """image: per visual tap [B, HW/p^2, D]; text: per text tap [B, N, D]; temb [B, D] -> [B]."""
        v = self.agg_visual(torch.cat([a(x, temb) for a, x in zip(self.layer_adapters_visual, image)], dim=-1))
        t = None
        if self.agg_text is not None:
            t = self.agg_text(torch.cat([a(x, temb) for a, x in zip(self.layer_adapters_text, text)], dim=-1))
        q = self.query_tokens.to(v).expand(v.shape[0], -1, -1)  # [B, Q, W]
        q = self.attn2(self.attn1(q, v, t), v)
        q = q + self.ff(self.norm_ff(q))
        return self.head(q).mean(dim=1).squeeze(-1)  # [B]
