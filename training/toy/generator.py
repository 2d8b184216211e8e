"""The toy generator: a diffusers SD3Transformer2DModel (SD3.5-M block design, tiny) trained by flow matching."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor

from drm_core import shift_sigma, sigma_to_timestep, to_model_space

from .world import NULL_PROMPT, ToyTextEncoder

log = logging.getLogger(__name__)


@dataclass
class GeneratorConfig:
    blocks: int = 4
    heads: int = 1  # head dim 64 as in SD3, so hidden = 64 * heads
    steps: int = 500
    batch_size: int = 128
    lr: float = 1e-3
    cfg_dropout: float = 0.1  # share of training prompts replaced by the empty prompt
    seed: int = 0


def make_generator(cfg: GeneratorConfig) -> SD3Transformer2DModel:
    """16-channel 4x4 latents, patch 1 (16 image tokens), dual attention + qk rms-norm like SD3.5-M."""
    torch.manual_seed(cfg.seed)
    return SD3Transformer2DModel(sample_size=4, patch_size=1, in_channels=16, num_layers=cfg.blocks,
                                 attention_head_dim=64, num_attention_heads=cfg.heads, joint_attention_dim=4096,
                                 caption_projection_dim=64 * cfg.heads, pooled_projection_dim=2048, out_channels=16,
                                 pos_embed_max_size=4, dual_attention_layers=(0, 1), qk_norm="rms_norm")


def velocity(model: SD3Transformer2DModel, x: Tensor, sigma: Tensor, context: Tensor, pooled: Tensor) -> Tensor:
    """v(x, sigma | prompt) from the MMDiT (timestep = 1000 sigma), x in model space."""
    t = sigma_to_timestep(sigma).to(x).expand(x.shape[0])
    return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample


def train_generator(raw_latents: Tensor, labels: Tensor, text: ToyTextEncoder, cfg: GeneratorConfig,
                    progress=None) -> SD3Transformer2DModel:
    """Rectified-flow training: minimise |v(x_sigma) - (noise - x0)|^2, sigma = shift3(U(0, 1))."""
    model = make_generator(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x0_all = to_model_space(raw_latents)
    for step in range(cfg.steps):
        idx = torch.randint(len(x0_all), (cfg.batch_size,), generator=g)
        x0 = x0_all[idx]
        prompts = torch.where(torch.rand(cfg.batch_size, generator=g) < cfg.cfg_dropout, NULL_PROMPT, labels[idx])
        context, pooled = text(prompts)
        sigma = shift_sigma(torch.rand(cfg.batch_size, generator=g)).float()
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        x = (1 - s) * x0 + s * noise
        loss = (velocity(model, x, sigma, context, pooled) - (noise - x0)).pow(2).mean()  # eq. of rectified flow
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, loss.item())
    return model.eval()
