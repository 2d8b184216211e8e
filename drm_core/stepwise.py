"""Step-wise Sampling (DRM paper §3.2): explore k SDE candidates per step, keep the best-scoring one.

All k candidates of a step share one mean (eq. 6), so one velocity evaluation serves all of them;
only the noise differs. The k candidates of the B images are scored by one `reward_fn` call on
B * k latents at the next sigma. With k = 1 nothing is scored and the result equals `sde_sample`
with the same generator.

Search beyond the greedy argmax (issue 15) keeps N particles per image instead of one path: each
particle draws k children, the N * k children of all B images are scored in one call, and N of each
image's children are kept, either the top N (`beam`) or N resampled in proportion to their
Feynman-Kac weights (`smc`, SMC steering: Singhal et al. 2025, "A General Framework for
Inference-time Scaling and Steering of Diffusion Models"). The N particles exist only from the first
to the last scored step: the first scored step draws all N * k children from the one path per image
(one velocity evaluation on B rows), and the last keeps, per image, the child with the best score,
so steps outside that window run on B rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

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

SELECTIONS = ("argmax", "smc", "beam")
RESAMPLING = ("systematic", "multinomial")


@dataclass
class StepRecord:
    """One step, per image ([B]): the kept child with the best score (index among the image's N * k children,
    parent-major), its score, and its margin over the best other child; for smc also the effective sample size
    of the children's weights (a fraction of N * k) and whether they were resampled."""

    step: int
    sigma: float
    sigma_next: float
    branched: bool
    chosen: Tensor | None = None
    score: Tensor | None = None
    margin: Tensor | None = None
    ess: Tensor | None = None
    resampled: Tensor | None = None


@dataclass
class StepwiseResult:
    """Final latent (x0, model space, x's dtype) and the per-step trace."""

    latent: Tensor
    trace: list[StepRecord] = field(default_factory=list)


@dataclass(frozen=True)
class SearchOptions:
    """How each image's N particles keep N of their N * k children at a scored step (validated)."""

    selection: str = "argmax"
    particles: int = 1
    k: int = 1
    temperature: float = 0.02
    ess_threshold: float = 1.0
    resampling: str = "systematic"

    def __post_init__(self) -> None:
        _check_search(self)

    @property
    def width(self) -> int:
        """Children per image at a scored step: N * k."""
        return self.particles * self.k


def _check_search(s: SearchOptions) -> None:
    """Each option names itself and what it expects when it is wrong."""
    if not isinstance(s.k, int) or s.k < 1:
        raise DRMError(f"k (candidates per step) must be an integer >= 1, got {s.k!r}")
    if s.selection not in SELECTIONS:
        raise DRMError(f"selection must be one of {', '.join(SELECTIONS)}, got {s.selection!r}")
    if not isinstance(s.particles, int) or isinstance(s.particles, bool) or s.particles < 1:
        raise DRMError(f"particles (paths kept per image) must be an integer >= 1, got {s.particles!r}")
    if s.selection == "argmax" and s.particles != 1:
        raise DRMError(f"particles must be 1 with selection 'argmax' (one path per image), got {s.particles}; "
                       "use selection 'beam' or 'smc' for several particles")
    if not isinstance(s.temperature, (int, float)) or not s.temperature >= 0:
        raise DRMError(f"temperature must be a number >= 0 (0: greedy, inf: uniform resampling), got "
                       f"{s.temperature!r}")
    if not isinstance(s.ess_threshold, (int, float)) or not 0 <= s.ess_threshold <= 1:
        raise DRMError(f"ess_threshold must be a fraction in [0, 1] (1: resample at every scored step), got "
                       f"{s.ess_threshold!r}")
    if s.resampling not in RESAMPLING:
        raise DRMError(f"resampling must be one of {', '.join(RESAMPLING)}, got {s.resampling!r}")


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
    selection: str = "argmax",
    particles: int = 1,
    temperature: float = 0.02,
    ess_threshold: float = 1.0,
    resampling: str = "systematic",
) -> StepwiseResult:
    """Explore-and-select sampling: per step, k SDE children per particle from one velocity, then select.

    x: [B, C, H, W] model-space latent at sigmas[0]. Steps outside the branch set take one plain
    step with `plain_noise_level` (default: noise_level, i.e. SDE; 0 gives ODE). `branch_steps`
    (one bool per step) overrides `branch_range` / `branch_every`. callback(i, x_next, denoised), [B] rows
    (with several particles: each image's particle with the best last score). With N = `particles` > 1,
    velocity_fn gets B * N rows inside the particle window and reward_fn B * N * k, image-major (an image's
    particles, then each particle's children, are consecutive), so a prompt's conditioning repeats per row.

    selection: "argmax" keeps each image's best of k children (particles = 1, the paper's sampler);
    "beam" keeps the top `particles` of the N * k children; "smc" resamples N of them with probability
    proportional to w_parent * exp((score_child - score_parent) / temperature) (FK steering's difference
    potential, so the particles target p(x) exp(r(x) / temperature)). temperature is in DRM score units (0.02: the
    best of a sweep in the toy world, docs/search.md; 1 would tilt by the Bradley-Terry preference odds); 0 keeps N
    copies of the best child (greedy, no random draw: equals argmax with N * k candidates); inf resamples uniformly.
    Resampling happens where the effective sample size falls below `ess_threshold` * N * k (1: always);
    elsewhere each particle keeps one of its own k children drawn by weight and carries the weight
    w_parent * mean(exp(increment)). Random numbers come from `generator` ("systematic": one uniform per
    image, "multinomial": N). The result is the child with the best score at the last scored step.
    """
    search = SearchOptions(selection, particles, k, temperature, ess_threshold, resampling)
    if x.ndim != 4:
        raise DRMError(f"x must be a latent batch [B, C, H, W], got shape {tuple(x.shape)}")
    sigmas = check_sigmas(sigmas)
    n_steps = len(sigmas) - 1
    if branch_steps is None:
        branch_steps = branch_mask(n_steps, branch_range, branch_every)
    elif len(branch_steps) != n_steps:
        raise DRMError(f"branch_steps has {len(branch_steps)} entries for {n_steps} steps")
    plain_level = noise_level if plain_noise_level is None else plain_noise_level
    scored = [bool(branch_steps[i]) and search.width > 1 and 0 < sigmas[i + 1] < sigmas[i] for i in range(n_steps)]
    last = max((i for i in range(n_steps) if scored[i]), default=-1)
    batch = x.shape[0]
    rows = torch.arange(batch, device=x.device)
    log_w = prev = torch.zeros(batch, search.particles, device=x.device)  # smc: equal weights, no score yet
    lead = torch.zeros(batch, dtype=torch.long, device=x.device)  # each image's particle with the best score
    trace: list[StepRecord] = []
    for i in range(n_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma == sigma_next:
            continue
        v = velocity_fn(x, sigma)  # [B * particles alive], one evaluation shared by each particle's k children
        denoised = x - float(sigma) * v  # sigmas live on the host: a kernel argument, not a transfer
        lead_denoised = _pick(denoised, batch, lead) if callback is not None else denoised
        record = StepRecord(i, float(sigma), float(sigma_next), branched=False)
        if scored[i]:
            children = _children(x, v, batch, search, sigma, sigma_next, noise_level, generator)
            scores = reward_fn(children, sigma_next).float().view(batch, search.width)  # one call on B * N * k
            keep, log_w, ess, resampled = _keep(scores, log_w, prev, search, generator)  # [B, N] child indices
            prev = scores.gather(1, keep)
            lead = prev.argmax(1)
            chosen = keep[rows, lead]
            by_image = children.view(batch, search.width, *x.shape[1:])
            x = by_image[rows, chosen] if i == last else by_image[rows.unsqueeze(1), keep].flatten(0, 1)
            record = _record(record, scores, chosen, ess, resampled)
        else:
            level = noise_level if (branch_steps[i] or search.width == 1) else plain_level
            x = sde_step(x, v, sigma, sigma_next, level, generator=generator).sample
        trace.append(record)
        if callback is not None:
            callback(i, _pick(x, batch, lead), lead_denoised)
    return StepwiseResult(x, _to_host(trace))


def _children(x: Tensor, v: Tensor, batch: int, search: SearchOptions, sigma: Tensor, sigma_next: Tensor,
              noise_level: float, generator: torch.Generator | None) -> Tensor:
    """N * k SDE children per image (eq. 6), k per particle, all sharing their parent's velocity -> [B*N*k, ...];
    a single path per image (the first scored step) is the parent of all N * k."""
    shape = x.shape[1:]
    alive = x.shape[0] // batch
    noise = torch.randn((batch, search.width, *shape), generator=generator, device=_gen_device(generator, x),
                        dtype=torch.float32)

    def spread(t: Tensor) -> Tensor:
        return t.reshape(batch, alive, 1, *shape).expand(batch, search.particles, search.k, *shape).flatten(0, 2)

    return sde_step(spread(x), spread(v), sigma, sigma_next, noise_level, noise=noise.flatten(0, 1)).sample


def _keep(scores: Tensor, log_w: Tensor, prev: Tensor, search: SearchOptions, generator: torch.Generator | None,
          ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Indices [B, N] of the kept children among each image's N * k, the new log-weights, and (smc) ESS and
    whether each image was resampled."""
    if search.selection != "smc":
        return scores.topk(search.particles, dim=1).indices, log_w, None, None  # argmax is the beam of 1
    return _smc_keep(scores, log_w, prev, search, generator)


def _smc_keep(scores: Tensor, log_w: Tensor, prev: Tensor, search: SearchOptions,
              generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Feynman-Kac step: child log-weight = log w_parent + (s_child - s_parent) / T; resample N of N * k where the
    ESS fraction is below the threshold, else one child per particle by weight with the weight carried."""
    batch, n = log_w.shape
    if search.temperature == 0:  # the limit T -> 0: all weight on the best child, nothing random
        best = scores.argmax(1, keepdim=True).expand(batch, n)
        return best, torch.zeros_like(log_w), scores.new_full((batch,), 1 / search.width), \
            torch.ones(batch, dtype=torch.bool, device=scores.device)
    increment = (scores.view(batch, n, search.k) - prev.unsqueeze(2)) / search.temperature  # log potential
    probs = torch.softmax((log_w.unsqueeze(2) + increment).flatten(1), dim=1)  # [B, N * k]
    ess = 1 / probs.square().sum(1) / search.width
    keep = _resample(probs, n, search.resampling, generator)
    resampled = torch.ones(batch, dtype=torch.bool, device=scores.device)
    new_log_w = torch.zeros_like(log_w)
    if search.ess_threshold < 1:
        resampled = ess < search.ess_threshold
        own = _within_family(increment, generator)
        keep = torch.where(resampled.unsqueeze(1), keep, own)
        carried = torch.log_softmax(log_w + torch.logsumexp(increment, dim=2), dim=1)  # w * mean(G), normalised
        new_log_w = torch.where(resampled.unsqueeze(1), new_log_w, carried)
    return keep, new_log_w, ess, resampled


def _resample(probs: Tensor, n: int, method: str, generator: torch.Generator | None) -> Tensor:
    """n indices per row of probs [B, M] by inverse CDF: systematic (u + i) / n, i < n, or n iid uniforms."""
    device = _gen_device(generator, probs)
    if method == "systematic":
        u = (torch.rand((probs.shape[0], 1), generator=generator, device=device)
             + torch.arange(n, device=device)) / n
    else:
        u = torch.rand((probs.shape[0], n), generator=generator, device=device)
    return _inverse_cdf(probs, u.to(probs.device))


def _within_family(increment: Tensor, generator: torch.Generator | None) -> Tensor:
    """One child per particle drawn with probability proportional to exp(increment) [B, N, k] -> indices [B, N]."""
    batch, n, k = increment.shape
    u = torch.rand((batch, n, 1), generator=generator, device=_gen_device(generator, increment))
    own = _inverse_cdf(torch.softmax(increment, dim=2), u.to(increment.device)).squeeze(2)
    return own + k * torch.arange(n, device=increment.device)


def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Index i with cdf[i - 1] <= u < cdf[i] along the last dimension (the cdf normalised to end at exactly 1)."""
    cdf = probs.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=probs.shape[-1] - 1)


def _record(record: StepRecord, scores: Tensor, chosen: Tensor, ess: Tensor | None,
            resampled: Tensor | None) -> StepRecord:
    """The scored step's record: the best kept child, its score and its margin over the best other child."""
    score = scores.gather(1, chosen.unsqueeze(1)).squeeze(1)
    others = scores.scatter(1, chosen.unsqueeze(1), -math.inf).amax(1)
    return StepRecord(record.step, record.sigma, record.sigma_next, True, chosen, score, score - others, ess,
                      resampled)


def _pick(t: Tensor, batch: int, lead: Tensor) -> Tensor:
    """Each image's lead particle of t [B * n, ...] (t itself when n = 1)."""
    if t.shape[0] == batch:
        return t
    return t.view(batch, -1, *t.shape[1:])[torch.arange(batch, device=t.device), lead]


def _to_host(trace: list[StepRecord]) -> list[StepRecord]:
    """The trace's tensors to the host once, after the loop: nothing waits for the device between steps."""
    for record in trace:
        for f in fields(record):
            value = getattr(record, f.name)
            if isinstance(value, Tensor):
                setattr(record, f.name, value.cpu())
    return trace
