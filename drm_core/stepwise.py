"""Step-wise Sampling (DRM paper §3.2): explore k SDE candidates per step, keep the best-scoring one.

All k candidates of a step share one mean (eq. 6), so one velocity evaluation serves all of them;
only the noise differs. The k candidates of the B images are scored by one `reward_fn` call on
B * k latents at the next sigma. With k = 1 nothing is scored and the result equals `sde_sample`
with the same generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import DRMError
from .latents import check_sigmas
from .sde import VelocityFn, sde_step, _gen_device

RewardFn = Callable[[Tensor, Tensor], Tensor]
"""reward_fn(candidates [N, C, H, W] model space, sigma 0-d tensor) -> scores [N]."""

# The measured default of the nodes and the toy world (docs/performance.md): k = 4 candidates on the first
# half of the steps and ODE steps after it kept 95-103% of the gain of k = 6 on every step, at 1.2x (1-block
# DRM) to 1.7x (3-block) the time of plain sampling.
DEFAULT_K = 4
DEFAULT_BRANCH_RANGE = (0.0, 0.5)
DEFAULT_PLAIN_NOISE_LEVEL = 0.0


@dataclass
class StepRecord:
    """What happened at one step: which candidate won, its score, and best-minus-second margin ([B])."""

    step: int
    sigma: float
    sigma_next: float
    branched: bool
    chosen: Tensor | None = None
    score: Tensor | None = None
    margin: Tensor | None = None


@dataclass
class StepwiseResult:
    """Final latent (x0, model space, x's dtype) and the per-step trace."""

    latent: Tensor
    trace: list[StepRecord] = field(default_factory=list)


def branch_mask(
    n_steps: int,
    branch_range: tuple[float, float] = (0.0, 1.0),
    every: int = 1,
) -> list[bool]:
    """Which of n_steps steps branch: those whose fraction i / n_steps lies in [start, end), every m-th."""
    start, end = branch_range
    if not 0.0 <= start <= end <= 1.0:
        raise DRMError(f"branch_range must satisfy 0 <= start <= end <= 1, got {branch_range}")
    if every < 1:
        raise DRMError(f"branch_every must be >= 1, got {every}")
    inside = [i for i in range(n_steps) if start <= i / n_steps < end]
    chosen = set(inside[::every])
    return [i in chosen for i in range(n_steps)]


def stepwise_sample(
    velocity_fn: VelocityFn,
    reward_fn: RewardFn,
    x: Tensor,
    sigmas: Tensor,
    k: int,
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
    *,
    branch_range: tuple[float, float] = (0.0, 1.0),
    branch_every: int = 1,
    branch_steps: Sequence[bool] | None = None,
    plain_noise_level: float | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> StepwiseResult:
    """Explore-and-select sampling: per step, k SDE candidates from one velocity, argmax of reward_fn.

    x: [B, C, H, W] model-space latent at sigmas[0]. Steps outside the branch set take one plain
    step with `plain_noise_level` (default: noise_level, i.e. SDE; 0 gives ODE). `branch_steps`
    (one bool per step) overrides `branch_range` / `branch_every`. callback(i, x_next, denoised).
    """
    if not isinstance(k, int) or k < 1:
        raise DRMError(f"k (candidates per step) must be an integer >= 1, got {k!r}")
    if x.ndim != 4:
        raise DRMError(f"x must be a latent batch [B, C, H, W], got shape {tuple(x.shape)}")
    sigmas = check_sigmas(sigmas)
    n_steps = len(sigmas) - 1
    if branch_steps is None:
        branch_steps = branch_mask(n_steps, branch_range, branch_every)
    elif len(branch_steps) != n_steps:
        raise DRMError(f"branch_steps has {len(branch_steps)} entries for {n_steps} steps")
    plain_level = noise_level if plain_noise_level is None else plain_noise_level
    batch = x.shape[0]
    rows = torch.arange(batch, device=x.device)
    trace: list[StepRecord] = []
    for i in range(n_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma == sigma_next:
            continue
        v = velocity_fn(x, sigma)  # [B, C, H, W], one evaluation shared by all k candidates
        denoised = x - float(sigma) * v  # sigmas live on the host: a kernel argument, not a transfer
        record = StepRecord(i, float(sigma), float(sigma_next), branched=False)
        if sigma_next > 0 and k > 1 and branch_steps[i]:
            noise = torch.randn((batch, k, *x.shape[1:]), generator=generator,
                                device=_gen_device(generator, x), dtype=torch.float32)
            step = sde_step(x.unsqueeze(1).expand(-1, k, *x.shape[1:]).flatten(0, 1),
                            v.unsqueeze(1).expand(-1, k, *v.shape[1:]).flatten(0, 1),
                            sigma, sigma_next, noise_level, noise=noise.flatten(0, 1))
            candidates = step.sample.view(batch, k, *x.shape[1:])  # [B, k, C, H, W]
            scores = reward_fn(step.sample, sigma_next).float().view(batch, k)  # one call on B*k
            top = scores.topk(2, dim=1)
            chosen = top.indices[:, 0]
            x = candidates[rows, chosen]
            record = StepRecord(i, float(sigma), float(sigma_next), True, chosen, top.values[:, 0],
                                top.values[:, 0] - top.values[:, 1])
        else:
            level = noise_level if (branch_steps[i] or k == 1) else plain_level
            x = sde_step(x, v, sigma, sigma_next, level, generator=generator).sample
        trace.append(record)
        if callback is not None:
            callback(i, x, denoised)
    return StepwiseResult(x, _to_host(trace))


def _to_host(trace: list[StepRecord]) -> list[StepRecord]:
    """The trace's tensors to the host once, after the loop: nothing waits for the device between steps."""
    for record in trace:
        if record.branched:
            record.chosen, record.score, record.margin = (t.cpu() for t in (record.chosen, record.score, record.margin))
    return trace
