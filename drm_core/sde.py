"""The Flow-GRPO SDE step (DRM paper eq. 6) and the log-probability of one transition.

From sigma to sigma_next (dt = sigma_next - sigma < 0) with noise level a:
    std_t = a * sqrt(sigma / (1 - s)),  s = sigma, or sigma_next when sigma == 1 (Flow-GRPO uses
            the schedule's second sigma there; clamping sigma to 0.999 instead injects ~22x the noise)
    mean  = x * (1 + std_t^2 dt / (2 sigma)) + v * (1 + std_t^2 (1 - sigma) / (2 sigma)) * dt
    x'    = mean + std_t * sqrt(-dt) * xi,   xi ~ N(0, I)
a = 0 is exactly the Euler ODE step; a step to sigma_next = 0 returns x0 = x - sigma * v.
Everything is computed in float32 (bf16 overflows in the mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import DRMError
from .latents import batch_sigma, check_sigmas, is_host_scalar

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""velocity_fn(x [B, C, H, W] model space, sigma 0-d tensor) -> v [B, C, H, W]."""


@dataclass
class SDEStep:
    """One transition: the sample, its Gaussian mean and its std (std_t * sqrt(-dt), [B, 1, 1, 1])."""

    sample: Tensor
    mean: Tensor
    std: Tensor
    std_t: Tensor


def sde_step(
    x: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """Flow-GRPO SDE step (DRM eq. 6) from sigma to sigma_next; float32 inside, sample in x's dtype.

    Scalar sigmas on the host (floats, CPU tensors: what samplers pass) are validated and turned into
    coefficients on the host, so a step on an accelerator neither copies to nor waits for the device.
    Per-sample sigmas [B] are used where they live."""
    if noise_level < 0:
        raise DRMError(f"noise_level must be >= 0, got {noise_level}")
    if velocity.shape != x.shape:
        raise DRMError(f"velocity shape {tuple(velocity.shape)} differs from x shape {tuple(x.shape)}")
    xf, v = x.float(), velocity.float()
    on_host = is_host_scalar(sigma) and is_host_scalar(sigma_next)
    where = torch.device("cpu") if on_host else xf.device
    sigma = batch_sigma(sigma, xf, device=where)  # [B|1, 1, 1, 1]
    sigma_next = batch_sigma(sigma_next, xf, "sigma_next", device=where)
    if (sigma_next > sigma).any() or (sigma == 0).any():
        raise DRMError(f"sde_step needs 0 < sigma and sigma_next <= sigma, got {sigma.flatten().tolist()} -> "
                       f"{sigma_next.flatten().tolist()}")
    dt = sigma_next - sigma
    s = torch.where(sigma >= 1, sigma_next, sigma)
    std_t = noise_level * torch.sqrt(sigma / (1 - s))
    keep_x = 1 + std_t**2 / (2 * sigma) * dt
    keep_v = 1 + std_t**2 * (1 - sigma) / (2 * sigma)
    std = std_t * torch.sqrt(-dt)
    last = sigma_next <= 0
    if on_host:  # Python floats: kernel arguments, no transfer; identical float32 values
        sigma_f, dt_f, keep_x_f, keep_v_f = (float(c) for c in (sigma, dt, keep_x, keep_v))
        is_last = bool(last)
        mean = xf - sigma_f * v if is_last else xf * keep_x_f + v * keep_v_f * dt_f
        std_f = 0.0 if is_last else float(std)
        std_t = torch.full((1, 1, 1, 1), float(std_t), device=xf.device)
        std = torch.full((1, 1, 1, 1), std_f, device=xf.device)
        sample = mean if is_last else mean + std_f * _noise(x, noise, generator)
    else:
        mean = xf * keep_x + v * keep_v * dt
        if last.any():  # the last step lands on x0 exactly
            mean = torch.where(last, xf - sigma * v, mean)
            std = torch.where(last, torch.zeros_like(std), std)
        # deterministic when every row is last: draw nothing, so the generator stream is not consumed
        sample = mean if last.all() else mean + std * _noise(x, noise, generator)
    return SDEStep(sample.to(x.dtype), mean, std.expand(x.shape[0], *std.shape[1:]), std_t)


def _noise(x: Tensor, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """The step's standard normal noise in float32 on x's device (drawn on the generator's device)."""
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=_gen_device(generator, x), dtype=torch.float32)
    return noise.to(x.device, torch.float32)


def sde_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(sample; mean, std^2), averaged over non-batch dimensions (as Flow-GRPO) -> [B] float32."""
    std = std.float()
    if (std <= 0).any():
        raise DRMError("sde_log_prob: std must be > 0 (a deterministic step, e.g. the last one, has no density)")
    diff = sample.float() - mean.float()
    log_prob = -(diff**2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def sde_sample(
    velocity_fn: VelocityFn,
    x: Tensor,
    sigmas: Tensor,
    noise_level: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Plain SDE sampling (ODE when noise_level = 0) along `sigmas`; one noise draw [B, ...] per step."""
    sigmas = check_sigmas(sigmas)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if sigma == sigma_next:
            continue
        v = velocity_fn(x, sigma)
        x = sde_step(x, v, sigma, sigma_next, noise_level, generator=generator).sample
    return x


def _gen_device(generator: torch.Generator | None, x: Tensor) -> torch.device:
    return generator.device if generator is not None else x.device
