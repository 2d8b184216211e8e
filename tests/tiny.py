"""Tiny SD3-family models built in-process for tests (no downloads)."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

# SD3.5-M-shaped: dual attention in the first blocks, qk rms-norm, real text dims; tiny width/depth.
TINY_SD35 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=4096, caption_projection_dim=32,
                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=16,
                 dual_attention_layers=(0, 1), qk_norm="rms_norm")

TINY_HEAD = dict(conv_channels=(16, 16), groups=4, mlp_hidden=16, dropout=0.0)


def tiny_transformer(seed: int = 0, **overrides) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**{**TINY_SD35, **overrides}).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every weight non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def conditioning(batch: int = 1, tokens: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, 4096, generator=g), torch.randn(batch, 2048, generator=g)
