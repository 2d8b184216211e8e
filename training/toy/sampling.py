"""Sampling in the toy world through drm_core: plain SDE, step-wise with a DRM, and best-of-N."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor

from drm_core import DRM, flow_sigmas, stepwise_sample

from .generator import velocity
from .world import NULL_PROMPT, ToyTextEncoder


@dataclass
class Batch:
    """Final model-space latents [N, 16, 4, 4], their prompt ids [N] and the wall time it took."""

    latents: Tensor
    prompts: Tensor
    seconds: float


def velocity_fn(model: SD3Transformer2DModel, context: Tensor, pooled: Tensor, cfg_scale: float = 1.0,
                null: tuple[Tensor, Tensor] | None = None):
    """velocity_fn(x, sigma) for drm_core; with cfg_scale != 1, classifier-free guidance from one batched call
    on [null prompt, prompt] as ComfyUI does. x may hold several rows per prompt, image-major (stepwise_sample's
    particles): each prompt's conditioning is repeated to match, once per row count."""
    guided = cfg_scale != 1.0 and null is not None
    cache: dict[int, tuple[Tensor, Tensor]] = {}

    def conditioning(rows: int) -> tuple[Tensor, Tensor]:
        if rows not in cache:
            reps = rows // len(context)
            c, p = (context, pooled) if reps == 1 else (context.repeat_interleave(reps, 0),
                                                        pooled.repeat_interleave(reps, 0))  # [rows, T, D], [rows, P]
            if guided:
                c, p = torch.cat([null[0].expand_as(c), c]), torch.cat([null[1].expand_as(p), p])  # [2 rows, ...]
            cache[rows] = (c, p)
        return cache[rows]

    if not guided:
        return lambda x, sigma: velocity(model, x, sigma, *conditioning(x.shape[0]))

    def fn(x: Tensor, sigma: Tensor) -> Tensor:
        v_null, v = velocity(model, torch.cat([x, x]), sigma, *conditioning(x.shape[0])).chunk(2)
        return v_null + cfg_scale * (v - v_null)
    return fn


def reward_fn(drm: DRM, context: Tensor, pooled: Tensor, k: int):
    """reward_fn(candidates [B*k, ...], sigma) scoring each image's k candidates with its own prompt,
    embedded once for the whole run (not at every step for every candidate)."""
    prompt = drm.embed_prompt(context, pooled)
    return lambda candidates, sigma: drm.score_embedded(candidates, sigma, prompt)


@torch.inference_mode()
def generate(model: SD3Transformer2DModel, text: ToyTextEncoder, prompts: Tensor, noise: Tensor, steps: int,
             noise_level: float, seed: int, drm: DRM | None = None, k: int = 1, chunk: int = 512,
             cfg_scale: float = 1.0, **branching) -> Batch:
    """Step-wise sampling (plain sampling when k = 1: SDE, or ODE at noise_level 0) of one image per prompt id,
    in chunks; `branching` goes to stepwise_sample (branch_range, branch_every, plain_noise_level)."""
    start = time.perf_counter()
    out = []
    gen = torch.Generator().manual_seed(seed)
    null = text(torch.tensor([NULL_PROMPT]))
    for lo in range(0, len(prompts), chunk):
        p = prompts[lo:lo + chunk]
        context, pooled = text(p)
        scorer = reward_fn(drm, context, pooled, k) if drm is not None else (lambda c, s: torch.zeros(len(c)))
        res = stepwise_sample(velocity_fn(model, context, pooled, cfg_scale, null), scorer, noise[lo:lo + chunk],
                              flow_sigmas(steps), k=k if drm is not None else 1, noise_level=noise_level,
                              generator=gen, **branching)
        out.append(res.latent)
    return Batch(torch.cat(out), prompts, time.perf_counter() - start)


@torch.inference_mode()
def best_of_n(model: SD3Transformer2DModel, text: ToyTextEncoder, drm: DRM, prompts: Tensor, n: int, steps: int,
              noise_level: float, seed: int, cfg_scale: float = 1.0, chunk: int = 512) -> Batch:
    """n plain samples per prompt (noise_level 0: ODE), sampled `chunk` at a time, scored once by the DRM at
    sigma = 0; keep the best."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    many = prompts.repeat_interleave(n)
    noise = torch.randn((len(many), 16, 4, 4), generator=g)
    samples = generate(model, text, many, noise, steps, noise_level, seed + 1, cfg_scale=cfg_scale, chunk=chunk).latents
    context, pooled = text(many)
    scores = drm.score(samples, 0.0, context, pooled).view(len(prompts), n)
    best = samples.view(len(prompts), n, *samples.shape[1:])[torch.arange(len(prompts)), scores.argmax(1)]
    return Batch(best, prompts, time.perf_counter() - start)
