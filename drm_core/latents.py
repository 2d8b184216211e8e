"""SD3 conventions: latent spaces, flow-matching noise, shifted sigma schedules, sigma <-> timestep.

sigma is the flow-matching noise fraction: x_sigma = (1 - sigma) * x0 + sigma * noise, velocity
v = noise - x0, so x0 = x - sigma * v. The MMDiT reads timestep = 1000 * sigma.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import DRMError

SD3_LATENT_SHIFT = 0.0609
SD3_LATENT_SCALE = 1.5305
SD3_LATENT_CHANNELS = 16
SD3_SIGMA_SHIFT = 3.0


def to_model_space(raw: Tensor) -> Tensor:
    """Raw SD3 VAE latent (ComfyUI's LATENT) -> model space: (z - 0.0609) * 1.5305."""
    return (raw - SD3_LATENT_SHIFT) * SD3_LATENT_SCALE


def to_raw_space(latent: Tensor) -> Tensor:
    """Model-space latent -> raw SD3 VAE latent: z / 1.5305 + 0.0609."""
    return latent / SD3_LATENT_SCALE + SD3_LATENT_SHIFT


def sigma_to_timestep(sigma: Tensor | float) -> Tensor:
    """MMDiT timestep input: t = 1000 * sigma."""
    return torch.as_tensor(sigma) * 1000.0


def timestep_to_sigma(timestep: Tensor | float) -> Tensor:
    """Inverse of `sigma_to_timestep`: sigma = t / 1000."""
    return torch.as_tensor(timestep) / 1000.0


def shift_sigma(t: Tensor | float, shift: float = SD3_SIGMA_SHIFT) -> Tensor:
    """SD3 time shift: sigma(t) = shift * t / (1 + (shift - 1) * t)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def unshift_sigma(sigma: Tensor | float, shift: float = SD3_SIGMA_SHIFT) -> Tensor:
    """Inverse SD3 time shift: t(sigma) = sigma / (shift - (shift - 1) * sigma)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma / (shift - (shift - 1) * sigma)


def flow_sigmas(steps: int, shift: float = SD3_SIGMA_SHIFT, denoise: float = 1.0) -> Tensor:
    """Shifted schedule of `steps` steps: sigma(t) at t = linspace(denoise, 0); starts at 1 when denoise = 1.

    This is ComfyUI's "simple" SD3 schedule without its 1000-entry table quantisation. Returns
    float32 [steps + 1], ending at exactly 0.
    """
    if steps < 1:
        raise DRMError(f"steps must be >= 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise DRMError(f"denoise must be in (0, 1], got {denoise}")
    t = torch.linspace(denoise, 0.0, steps + 1, dtype=torch.float64)
    return shift_sigma(t, shift).float()


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """Flow-matching forward process: x_sigma = (1 - sigma) * x0 + sigma * noise (sigma scalar or [B])."""
    sigma = batch_sigma(sigma, x0)
    return (1 - sigma) * x0 + sigma * noise


def is_host_scalar(sigma: Tensor | float) -> bool:
    """A Python number or a one-element CPU tensor: usable on any device without a transfer or a sync."""
    return not isinstance(sigma, Tensor) or (sigma.device.type == "cpu" and sigma.numel() == 1)


def batch_sigma(sigma: Tensor | float, x: Tensor, name: str = "sigma", device: torch.device | None = None) -> Tensor:
    """Validate sigma in [0, 1] and shape it [B, 1, ..., 1] (float32, on `device`, default x's) against x."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device if device is None else device)
    if s.ndim > 1 or (s.ndim == 1 and s.shape[0] not in (1, x.shape[0])):
        raise DRMError(f"{name} must be a scalar or have shape [B]={x.shape[0]}, got {tuple(s.shape)}")
    if torch.isnan(s).any() or (s < 0).any() or (s > 1).any():
        raise DRMError(f"{name} must lie in [0, 1] (flow-matching noise fraction), got {s.tolist()}")
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def check_sigmas(sigmas: Tensor) -> Tensor:
    """Validate a sampling schedule: 1-D, at least 2 entries, non-increasing, within [0, 1]."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
    if sigmas.numel() < 2:
        raise DRMError(f"sigmas needs at least 2 entries (one step), got {sigmas.numel()}")
    if (sigmas < 0).any() or (sigmas > 1).any():
        raise DRMError(f"sigmas must lie in [0, 1], got min {sigmas.min():.4g} max {sigmas.max():.4g}")
    if (sigmas[1:] > sigmas[:-1]).any():
        raise DRMError("sigmas must be non-increasing (from noise to clean)")
    return sigmas
