"""GRPO rollouts and the policy update, for terminal rewards (Flow-GRPO) and step-wise DRM rewards (Step-GRPO).

A `Policy` gives the CFG velocity v(x, sigma | prompt) with its LoRA on, and `reference()` turns the
LoRA off (for the KL term). Both modes produce `Transition`s (a parent x_t, k children, their old
log-probabilities and advantages) and share one update: one policy forward per parent gives the
mean of eq. 6, hence the log-probabilities of all k children at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from drm_core import DRMError, candidate_log_probs, clipped_policy_loss, gaussian_kl, group_advantages, sde_step

RewardFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""reward_fn(latents [N, ...], sigma, prompt_rows [N]) -> scores [N]."""


class Policy:
    """CFG velocity of an SD3 transformer with a LoRA; conditioning rows index `context` / `pooled`.

    `negative_context` [1, N, 4096] / `negative_pooled` [1, 2048] are the CFG negative, broadcast over the
    batch: the encoded negative prompt, as ComfyUI's workflows feed it. None keeps zeroed conditioning.
    """

    def __init__(self, transformer: torch.nn.Module, context: Tensor, pooled: Tensor, cfg_scale: float = 4.5,
                 negative_context: Tensor | None = None, negative_pooled: Tensor | None = None):
        self.transformer, self.context, self.pooled, self.cfg_scale = transformer, context, pooled, cfg_scale
        if (negative_context is None) != (negative_pooled is None):
            raise DRMError("Policy: give both negative_context and negative_pooled, or neither")
        if negative_context is None:
            negative_context = torch.zeros_like(context[:1])  # [1, N, 4096]
            negative_pooled = torch.zeros_like(pooled[:1])  # [1, 2048]
        if negative_context.shape[0] != 1 or negative_context.shape[1:] != context.shape[1:]:
            raise DRMError(f"Policy: negative_context must be [1, {', '.join(map(str, context.shape[1:]))}] like "
                           f"the prompts' context, got {list(negative_context.shape)}")
        if negative_pooled.shape != (1, *pooled.shape[1:]):
            raise DRMError(f"Policy: negative_pooled must be [1, {pooled.shape[-1]}], got "
                           f"{list(negative_pooled.shape)}")
        self.negative_context, self.negative_pooled = negative_context, negative_pooled

    def velocity(self, x: Tensor, sigma: Tensor | float, rows: Tensor) -> Tensor:
        """v = v_neg + cfg * (v_cond - v_neg), one batched call on [negative, prompt]."""
        ctx, pooled = self.context[rows].to(x), self.pooled[rows].to(x)  # [B, N, 4096], [B, 2048]
        t = torch.full((x.shape[0],), float(sigma) * 1000.0, device=x.device, dtype=x.dtype)
        if self.cfg_scale == 1.0:
            return self.transformer(x, ctx, pooled, t).sample
        neg_ctx = self.negative_context.to(x).expand_as(ctx)  # [B, N, 4096]
        neg_pooled = self.negative_pooled.to(x).expand_as(pooled)  # [B, 2048]
        both = self.transformer(torch.cat([x, x]), torch.cat([neg_ctx, ctx]), torch.cat([neg_pooled, pooled]),
                                torch.cat([t, t])).sample
        v_neg, v_cond = both.chunk(2)
        return v_neg + self.cfg_scale * (v_cond - v_neg)

    def conditional_velocity(self, x: Tensor, sigma: Tensor | float, rows: Tensor) -> Tensor:
        """v(x, sigma | prompt rows) without guidance (what the prompt-alignment guard measures)."""
        t = torch.full((x.shape[0],), float(sigma) * 1000.0, device=x.device, dtype=x.dtype)
        return self.transformer(x, self.context[rows].to(x), self.pooled[rows].to(x), t).sample

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen base policy (LoRA disabled) inside the block."""
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()


@dataclass
class Transition:
    """Parent x_t [B, ...], k children [B, k, ...], old log-probs and advantages [B, k], prompt rows [B]."""

    x: Tensor
    children: Tensor
    log_prob: Tensor
    advantage: Tensor
    sigma: float
    sigma_next: float
    rows: Tensor
    reward: Tensor | None = None  # raw scores [B, k] behind the advantages (step mode)


@torch.no_grad()
def rollout_step_grpo(policy: Policy, reward_fn: RewardFn, x: Tensor, rows: Tensor, sigmas: Tensor, k: int,
                      noise_level: float, generator: torch.Generator, continue_with: str = "random",
                      train_sigma_max: float = 1.0) -> tuple[Tensor, list[Transition]]:
    """Step-GRPO rollout: at every step from sigma <= train_sigma_max on, k SDE children of x_t, DRM scores at
    sigma_next, advantages within the k, then continue from one child: a random one (on-policy: the trajectory
    stays a sample of the policy) or the argmax (greedy, like step-wise sampling). Earlier (noisier) steps take
    one plain SDE step: no DRM call and no update there."""
    transitions = []
    b = x.shape[0]
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        v = policy.velocity(x, sigma, rows)
        if sigma_next == 0:
            x = x - sigma * v
            break
        if sigma > train_sigma_max:
            x = sde_step(x, v, sigma, sigma_next, noise_level, generator=generator).sample
            continue
        parent = sde_step(x, v, sigma, sigma_next, noise_level, noise=torch.zeros_like(x))
        noise = torch.randn((b, k, *x.shape[1:]), generator=generator).to(x)
        children = (parent.mean.unsqueeze(1) + parent.std.unsqueeze(1) * noise).to(x.dtype)  # [B, k, ...]
        log_prob = candidate_log_probs(children, parent.mean, parent.std)  # [B, k]
        scores = reward_fn(children.flatten(0, 1), torch.tensor(sigma_next), rows.repeat_interleave(k)).view(b, k)
        transitions.append(Transition(x, children, log_prob, group_advantages(scores), sigma, sigma_next, rows,
                                      scores))
        if continue_with == "argmax":
            pick = scores.argmax(1)
        else:
            pick = torch.randint(k, (b,), generator=generator).to(x.device)
        x = children[torch.arange(b, device=x.device), pick]
    return x, transitions


@torch.no_grad()
def rollout_terminal(policy: Policy, reward_fn: RewardFn, x: Tensor, rows: Tensor, sigmas: Tensor, group: int,
                     noise_level: float, generator: torch.Generator) -> tuple[Tensor, Tensor, list[Transition]]:
    """Flow-GRPO rollout: `group` SDE trajectories per prompt, one terminal reward each, advantages within
    the group shared by every transition of a trajectory. x: [B * group, ...] (prompt-major)."""
    steps = []
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        v = policy.velocity(x, sigma, rows)
        if sigma_next == 0:
            x = x - sigma * v
            break
        step = sde_step(x, v, sigma, sigma_next, noise_level, generator=generator)
        log_prob = candidate_log_probs(step.sample.unsqueeze(1), step.mean, step.std)  # [N, 1]
        steps.append((x, step.sample.unsqueeze(1), log_prob, sigma, sigma_next))
        x = step.sample
    rewards = reward_fn(x, torch.tensor(0.0), rows)  # [N]
    adv = group_advantages(rewards.view(-1, group)).view(-1, 1)  # [N, 1]
    transitions = [Transition(px, ch, lp, adv, s, sn, rows) for px, ch, lp, s, sn in steps]
    return x, rewards, transitions


@dataclass
class UpdateStats:
    loss: float
    kl: float
    clip_fraction: float


def policy_update(policy: Policy, transitions: list[Transition], optimizer: torch.optim.Optimizer,
                  noise_level: float, clip_range: float, kl_beta: float, grad_clip: float,
                  backward: Callable[[Tensor], None] = lambda loss: loss.backward()) -> UpdateStats:
    """PPO-clipped update over all transitions (gradients accumulated, one optimizer step): one policy
    forward per parent gives the log-probabilities of its k children; KL to the LoRA-off reference."""
    optimizer.zero_grad(set_to_none=True)
    n = len(transitions)
    total_loss = total_kl = total_clip = 0.0
    for t in transitions:
        v = policy.velocity(t.x, t.sigma, t.rows)
        step = sde_step(t.x, v, t.sigma, t.sigma_next, noise_level, noise=torch.zeros_like(t.x))
        log_prob = candidate_log_probs(t.children, step.mean, step.std)  # [B, k]
        out = clipped_policy_loss(log_prob, t.log_prob, t.advantage, clip_range)
        loss = out.loss
        if kl_beta > 0:
            with torch.no_grad(), policy.reference():
                v_ref = policy.velocity(t.x, t.sigma, t.rows)
                ref = sde_step(t.x, v_ref, t.sigma, t.sigma_next, noise_level, noise=torch.zeros_like(t.x))
            kl = gaussian_kl(step.mean, ref.mean, step.std).mean()
            loss = loss + kl_beta * kl
            total_kl += kl.item()
        backward(loss / n)
        total_loss += loss.item()
        total_clip += out.clip_fraction.item()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return UpdateStats(total_loss / max(n, 1), total_kl / max(n, 1), total_clip / max(n, 1))
