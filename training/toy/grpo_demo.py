"""GRPO vs Step-GRPO in the toy world (DRM paper Figures 2 and 7): same prompts, group size and steps."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from diffusers import SD3Transformer2DModel

from drm_core import DRM, flow_sigmas, stepwise_sample

from ..grpo_core import Policy, policy_update, rollout_step_grpo, rollout_terminal
from ..lora import add_lora
from .world import N_CLASSES, NULL_PROMPT, GroundTruthReward, ToyTextEncoder, decode_model_space

log = logging.getLogger(__name__)


@dataclass
class GRPOSection:
    enabled: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    iterations: int = 40
    prompts_per_iteration: int = 10
    group: int = 4  # trajectories per prompt (GRPO) = candidates per step (Step-GRPO)
    steps: int = 10  # sampling steps while training (Flow-GRPO samples few)
    eval_steps: int = 20
    eval_every: int = 5
    eval_samples: int = 200
    noise_level: float = 0.7
    lr: float = 3e-4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    clip_range: float = 1e-4
    kl_beta: float = 0.1
    continue_with: str = "random"


def _reward(drm: DRM, text: ToyTextEncoder):
    def fn(latents: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        context, pooled = text(rows)
        return drm.score(latents, sigma, context, pooled)
    return fn


@torch.no_grad()
def evaluate(policy: Policy, drm: DRM, monitor: DRM, text: ToyTextEncoder, reward: GroundTruthReward,
             cfg: GRPOSection, seed: int) -> tuple[float, float, float]:
    """Ground-truth reward, training-DRM score and held-out monitor score (a second DRM the policy is not
    trained on) of plain SDE samples of held-out noise with more steps."""
    rows = torch.arange(N_CLASSES).repeat(cfg.eval_samples // N_CLASSES)
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn((len(rows), 16, 4, 4), generator=g)
    res = stepwise_sample(lambda z, s: policy.velocity(z, s, rows), lambda c, s: torch.zeros(len(c)), x,
                          flow_sigmas(cfg.eval_steps), k=1, noise_level=cfg.noise_level, generator=g)
    context, pooled = text(rows)
    gt = reward(decode_model_space(res.latent), rows).mean()
    return (float(gt), float(drm.score(res.latent, 0.0, context, pooled).mean()),
            float(monitor.score(res.latent, 0.0, context, pooled).mean()))


def run_grpo(mode: str, generator: SD3Transformer2DModel, drm: DRM, monitor: DRM, text: ToyTextEncoder,
             reward: GroundTruthReward, cfg: GRPOSection, seed: int) -> dict:
    """One training run; curve rows are [iteration, train seconds, gt reward, drm score, monitor score].
    The guard's pick is the evaluation with the best monitor score (what best_lora.safetensors holds)."""
    torch.manual_seed(seed)
    model = add_lora(copy.deepcopy(generator), cfg.lora_rank, cfg.lora_alpha)
    null_context, null_pooled = text(torch.tensor([NULL_PROMPT]))  # the toy's empty prompt: zeros
    policy = Policy(model, text.context, text.pooled, cfg_scale=1.0, negative_context=null_context,
                    negative_pooled=null_pooled)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    reward_fn = _reward(drm, text)
    sigmas = flow_sigmas(cfg.steps)
    g = torch.Generator().manual_seed(seed)
    curve = [[0, 0.0, *evaluate(policy, drm, monitor, text, reward, cfg, seed)]]
    seconds = 0.0
    for it in range(1, cfg.iterations + 1):
        tick = time.perf_counter()
        rows = torch.randperm(N_CLASSES, generator=g)[: cfg.prompts_per_iteration] if \
            cfg.prompts_per_iteration <= N_CLASSES else torch.randint(N_CLASSES, (cfg.prompts_per_iteration,), generator=g)
        model.eval()
        if mode == "step":
            x = torch.randn((len(rows), 16, 4, 4), generator=g)
            _, transitions = rollout_step_grpo(policy, reward_fn, x, rows, sigmas, cfg.group, cfg.noise_level, g,
                                               cfg.continue_with)
        else:
            rows = rows.repeat_interleave(cfg.group)
            x = torch.randn((len(rows), 16, 4, 4), generator=g)
            _, _, transitions = rollout_terminal(policy, reward_fn, x, rows, sigmas, cfg.group, cfg.noise_level, g)
        model.train()
        stats = policy_update(policy, transitions, optimizer, cfg.noise_level, cfg.clip_range, cfg.kl_beta, 1.0)
        seconds += time.perf_counter() - tick
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            model.eval()
            gt, score, held = evaluate(policy, drm, monitor, text, reward, cfg, seed)
            curve.append([it, seconds, gt, score, held])
            log.info("%s seed %d it %d: gt %.3f drm %.3f kl %.4f (%.1fs)", mode, seed, it, gt, score, stats.kl, seconds)
    picked = max(curve, key=lambda row: row[4])
    return {"curve": curve, "seconds": seconds, "guard_pick": {"iteration": picked[0], "gt": picked[2]}}


def grpo_experiment(generator: SD3Transformer2DModel, drm: DRM, monitor: DRM, text: ToyTextEncoder,
                    reward: GroundTruthReward, cfg: GRPOSection) -> dict:
    """Both modes over all seeds; summary: steps and seconds for Step-GRPO to reach GRPO's best reward."""
    out: dict = {}
    for mode, key in (("terminal", "grpo"), ("step", "step_grpo")):
        runs = [run_grpo(mode, generator, drm, monitor, text, reward, cfg, s) for s in cfg.seeds]
        out[key] = {"runs": runs, "curve": _mean_curve(runs),
                    "guard_pick_gt": sum(r["guard_pick"]["gt"] for r in runs) / len(runs)}
    out["summary"] = {**_speedup(out["grpo"]["curve"], out["step_grpo"]["curve"]),
                      "step_grpo_guard_pick_gt": out["step_grpo"]["guard_pick_gt"],
                      "grpo_guard_pick_gt": out["grpo"]["guard_pick_gt"]}
    return out


def _mean_curve(runs: list[dict]) -> list[list[float]]:
    """Mean over seeds of [it, seconds, gt, drm, monitor] plus the gt standard error."""
    rows = []
    for i in range(len(runs[0]["curve"])):
        vals = torch.tensor([r["curve"][i] for r in runs])  # [S, 5]
        se = float(vals[:, 2].std() / len(runs) ** 0.5) if len(runs) > 1 else 0.0
        rows.append([*vals.mean(0).tolist(), se])
    return rows


def _speedup(grpo: list[list[float]], step: list[list[float]]) -> dict:
    best = max(row[2] for row in grpo)
    best_row = next(row for row in grpo if row[2] == best)
    reach = next((row for row in step if row[2] >= best), None)
    return {"grpo_best_gt": best, "grpo_best_at_iteration": best_row[0], "grpo_best_at_seconds": best_row[1],
            "step_grpo_reaches_it_at_iteration": reach[0] if reach else None,
            "step_grpo_reaches_it_at_seconds": reach[1] if reach else None,
            "untuned_gt": grpo[0][2], "step_grpo_final_gt": step[-1][2], "grpo_final_gt": grpo[-1][2]}
