"""GRPO pieces shared by Flow-GRPO-style and Step-GRPO training (DRM paper §3.3, Flow-GRPO).

Step-GRPO forms a group from the k candidates of one step (one parent); terminal GRPO forms it
from the images of one prompt. The maths is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, dim: int = -1, eps: float = 1e-6) -> Tensor:
    """A_i = (r_i - mean(r)) / std(r) within each group along `dim`; 0 where the group's std < eps."""
    rewards = rewards.float()
    mean = rewards.mean(dim=dim, keepdim=True)
    std = rewards.std(dim=dim, keepdim=True, unbiased=False)
    safe = std > eps
    return torch.where(safe, (rewards - mean) / torch.where(safe, std, torch.ones_like(std)),
                       torch.zeros_like(rewards))


@dataclass
class PolicyLoss:
    """PPO-clipped loss (scalar) and diagnostics: mean ratio and fraction of clipped samples."""

    loss: Tensor
    ratio_mean: Tensor
    clip_fraction: Tensor


def clipped_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                        clip_range: float = 1e-4, adv_clip: float | None = 5.0) -> PolicyLoss:
    """PPO: mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))), r = exp(logp - logp_old)."""
    if adv_clip is not None:
        advantages = advantages.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    clip_fraction = ((ratio - 1).abs() > clip_range).float().mean()
    return PolicyLoss(loss, ratio.detach().mean(), clip_fraction.detach())


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) = (mean - ref_mean)^2 / (2 std^2), averaged per sample -> [B].

    Pass the transition std (std_t * sqrt(-dt)) for the exact KL of one step; Flow-GRPO passes
    std_t alone, which scales the penalty by 1 / -dt (so its beta values are not directly comparable).
    """
    kl = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def candidate_log_probs(candidates: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(candidate_j; mean, std^2) for the k candidates of each parent, from ONE mean: [B, k, ...] -> [B, k].

    In Step-GRPO all k candidates of a step share their parent x_t, so one policy forward (the mean of
    eq. 6) gives all k log-probabilities; averaged over non-batch dimensions like `sde_log_prob`.
    """
    mean = mean.float().unsqueeze(1)  # [B, 1, ...]
    std = std.float().unsqueeze(1)
    diff = candidates.float() - mean
    log_prob = -(diff**2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(2, log_prob.ndim)))
