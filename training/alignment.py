"""Prompt alignment measured by the frozen base model (a diffusion classifier): the guard of (Step-)GRPO.

For a sample x0 of prompt c, how much better the base model denoises it under c than under other prompts:

    A(x0, c) = E_{sigma, eps} [ mean_{c' != c} |v(x_sigma, c') - u|^2 - |v(x_sigma, c) - u|^2 ],
    x_sigma = (1 - sigma) x0 + sigma eps,  u = eps - x0  (the flow-matching target),

a weighted estimate of log p(c | x0) - log p(c' | x0) (Li et al. 2023, "Your Diffusion Model is Secretly a
Zero-Shot Classifier"). No reward model is involved, so a policy that buys reward with prompt fidelity lowers
it, where a second DRM trained on the same kind of preferences rises with the hack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from drm_core import DRMError

log = logging.getLogger(__name__)

VelocityFn = Callable[[Tensor, float, Tensor], Tensor]
"""velocity(x [B, ...], sigma, prompt rows [B]) -> v [B, ...]: the base model's conditional velocity (no CFG)."""

SIGMAS = (0.2, 0.4, 0.6, 0.8)


def contrast_rows(rows: Tensor, n_contrast: int) -> Tensor:
    """[n_contrast, B]: for each sample, the next n_contrast distinct prompts of `rows` (cyclically)."""
    unique = torch.unique(rows)
    if len(unique) < 2:
        raise DRMError("prompt alignment needs samples of at least 2 different prompts to contrast them")
    position = torch.searchsorted(unique, rows)
    n = min(n_contrast, len(unique) - 1)
    return torch.stack([unique[(position + j) % len(unique)] for j in range(1, n + 1)])


@torch.no_grad()
def prompt_alignment(velocity: VelocityFn, x0: Tensor, rows: Tensor, n_contrast: int = 3,
                     sigmas: Sequence[float] = SIGMAS, draws: int = 2, seed: int = 0) -> Tensor:
    """A(x0, c) per sample [B] (float32), with fixed noise (same seed, same draws) so values compare across
    evaluations of the same prompts."""
    others = contrast_rows(rows, n_contrast).to(rows.device)  # [n, B]
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(rows), device=x0.device)
    for sigma in sigmas:
        for _ in range(draws):
            eps = torch.randn(x0.shape, generator=g).to(x0)
            x_sigma, target = (1 - sigma) * x0 + sigma * eps, eps - x0  # [B, ...]
            error = _sq_error(velocity(x_sigma, sigma, rows), target)  # [B]
            contrast = torch.stack([_sq_error(velocity(x_sigma, sigma, o), target) for o in others]).mean(0)
            total += contrast - error
    return total / (len(sigmas) * draws)


def _sq_error(v: Tensor, target: Tensor) -> Tensor:
    return (v.float() - target.float()).pow(2).flatten(1).mean(1)


class AlignmentGuard:
    """Alarm when the policy's mean prompt alignment falls below the base model's by more than `tolerance` times
    the base's margin over contrast prompts (its mean alignment): 0.1 = a tenth of it lost."""

    def __init__(self, base_alignment: float, tolerance: float = 0.1):
        if base_alignment <= 0:
            log.warning("alignment guard: the base model's samples are not aligned with their prompts (%.4g <= 0); "
                        "the guard compares against 0", base_alignment)
        self.base, self.tolerance = base_alignment, tolerance
        self.floor = base_alignment - tolerance * abs(base_alignment)

    def ok(self, alignment: float) -> bool:
        return alignment >= self.floor
