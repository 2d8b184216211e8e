"""GRPO vs Step-GRPO in the toy world (DRM paper Figures 2 and 7): same prompts, group size and steps."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace

import torch
from diffusers import SD3Transformer2DModel

from drm_core import DRM, flow_sigmas, stepwise_sample

from ..alignment import AlignmentGuard, prompt_alignment
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
    eval_samples: int = 100
    alignment_samples: int = 100  # the guard measures prompt alignment on the first of them (every prompt alike)
    noise_level: float = 0.7
    lr: float = 6e-4  # both modes; at 3e-4 GRPO is still far from converged after 40 iterations
    lora_rank: int = 8
    lora_alpha: float = 16.0
    clip_range: float = 1e-4
    kl_beta: float = 0.1
    continue_with: str = "random"
    train_sigma_max: float = 0.6  # Step-GRPO trains only steps from this noise level down
    guard_tolerance: float = 0.1  # alarm when prompt alignment loses this fraction of the base model's
    k_variants: tuple[int, ...] = (2, 6)  # Step-GRPO with other k, over every seed
    variant_eval_every: int = 10  # the k variants' evaluations (each costs about half a run's training time)
    hack_lr: float = 3e-3  # guard check: Step-GRPO at this learning rate, every step trained (0: skip)
    hack_iterations: int = 10
    every_step_iterations: int = 20  # guard check with every step trained (it hacks by iteration 20 at the demo's lr)
    guard_seed: int = 0  # seed of the guard-check runs


def _reward(drm: DRM, text: ToyTextEncoder):
    def fn(latents: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        context, pooled = text(rows)
        return drm.score(latents, sigma, context, pooled)
    return fn


@torch.no_grad()
def evaluate(policy: Policy, drm: DRM, text: ToyTextEncoder, reward: GroundTruthReward, cfg: GRPOSection,
             seed: int) -> tuple[float, float, float]:
    """Ground-truth reward, training-DRM score and the guard's prompt alignment (the base model as a diffusion
    classifier, training/alignment.py) of plain SDE samples of held-out noise with more steps."""
    rows = torch.arange(N_CLASSES).repeat(cfg.eval_samples // N_CLASSES)
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn((len(rows), 16, 4, 4), generator=g)
    res = stepwise_sample(lambda z, s: policy.velocity(z, s, rows), lambda c, s: torch.zeros(len(c)), x,
                          flow_sigmas(cfg.eval_steps), k=1, noise_level=cfg.noise_level, generator=g)
    context, pooled = text(rows)
    gt = reward(decode_model_space(res.latent), rows).mean()
    n = min(cfg.alignment_samples, len(rows))
    with policy.reference():
        alignment = prompt_alignment(policy.conditional_velocity, res.latent[:n], rows[:n], seed=seed).mean()
    return float(gt), float(drm.score(res.latent, 0.0, context, pooled).mean()), float(alignment)


def run_grpo(mode: str, generator: SD3Transformer2DModel, drm: DRM, text: ToyTextEncoder,
             reward: GroundTruthReward, cfg: GRPOSection, seed: int, lr: float | None = None,
             train_sigma_max: float | None = None) -> dict:
    """One training run; curve rows are [iteration, train seconds, gt reward, drm score, prompt alignment].
    The guard's pick is the evaluation with the best DRM score among those whose alignment passes the guard (what
    train-grpo keeps as best_lora.safetensors); the alarm is the first evaluation that fails it (train-grpo stops
    there; here the run goes on, to show what the alarm prevented)."""
    torch.manual_seed(seed)
    model = add_lora(copy.deepcopy(generator), cfg.lora_rank, cfg.lora_alpha)
    null_context, null_pooled = text(torch.tensor([NULL_PROMPT]))  # the toy's empty prompt: zeros
    policy = Policy(model, text.context, text.pooled, cfg_scale=1.0, negative_context=null_context,
                    negative_pooled=null_pooled)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr if lr is None else lr, weight_decay=0.0)
    sigma_max = cfg.train_sigma_max if train_sigma_max is None else train_sigma_max
    reward_fn = _reward(drm, text)
    sigmas = flow_sigmas(cfg.steps)
    g = torch.Generator().manual_seed(seed)
    curve = [[0, 0.0, *evaluate(policy, drm, text, reward, cfg, seed)]]
    guard = AlignmentGuard(curve[0][4], cfg.guard_tolerance)
    alarm = None
    seconds = 0.0
    for it in range(1, cfg.iterations + 1):
        tick = time.perf_counter()
        rows = torch.randperm(N_CLASSES, generator=g)[: cfg.prompts_per_iteration] if \
            cfg.prompts_per_iteration <= N_CLASSES else torch.randint(N_CLASSES, (cfg.prompts_per_iteration,), generator=g)
        model.eval()
        if mode == "step":
            x = torch.randn((len(rows), 16, 4, 4), generator=g)
            _, transitions = rollout_step_grpo(policy, reward_fn, x, rows, sigmas, cfg.group, cfg.noise_level, g,
                                               cfg.continue_with, sigma_max)
        else:
            rows = rows.repeat_interleave(cfg.group)
            x = torch.randn((len(rows), 16, 4, 4), generator=g)
            _, _, transitions = rollout_terminal(policy, reward_fn, x, rows, sigmas, cfg.group, cfg.noise_level, g)
        model.train()
        stats = policy_update(policy, transitions, optimizer, cfg.noise_level, cfg.clip_range, cfg.kl_beta, 1.0)
        seconds += time.perf_counter() - tick
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            model.eval()
            gt, score, alignment = evaluate(policy, drm, text, reward, cfg, seed)
            curve.append([it, seconds, gt, score, alignment])
            if alarm is None and not guard.ok(alignment):
                alarm = it
            log.info("%s seed %d it %d: gt %.3f drm %.3f alignment %.4f kl %.4f (%.1fs)%s", mode, seed, it, gt, score,
                     alignment, stats.kl, seconds, " ALARM" if alarm == it else "")
    allowed = [row for row in curve if guard.ok(row[4]) and (alarm is None or row[0] < alarm)]
    picked = max(allowed, key=lambda row: row[3])
    best = max(curve, key=lambda row: row[2])
    return {"curve": curve, "seconds": seconds, "alarm_iteration": alarm,
            "guard_pick": {"iteration": picked[0], "gt": picked[2]}, "best": {"iteration": best[0], "gt": best[2]},
            "lr": cfg.lr if lr is None else lr, "train_sigma_max": sigma_max if mode == "step" else None}


def grpo_experiment(generator: SD3Transformer2DModel, drm: DRM, text: ToyTextEncoder, reward: GroundTruthReward,
                    cfg: GRPOSection) -> dict:
    """GRPO and Step-GRPO (k = group, the trainer's defaults) over all seeds; Step-GRPO with other k; and the
    guard check: runs that hack (every step trained; a high learning rate) must raise the alarm. Summary: steps and
    seconds for Step-GRPO to reach GRPO's best reward, the guard's picks."""
    out: dict = {}
    for mode, key in (("terminal", "grpo"), ("step", "step_grpo")):
        runs = [run_grpo(mode, generator, drm, text, reward, cfg, s) for s in cfg.seeds]
        out[key] = {"runs": runs, "curve": _mean_curve(runs),
                    "guard_pick_gt": sum(r["guard_pick"]["gt"] for r in runs) / len(runs),
                    "alarms": [r["alarm_iteration"] for r in runs]}
    out["step_grpo_k"] = {str(cfg.group): {"seeds": list(cfg.seeds), "curve": out["step_grpo"]["curve"],
                                           "guard_pick_gt": out["step_grpo"]["guard_pick_gt"],
                                           "alarms": out["step_grpo"]["alarms"]}}
    for k in cfg.k_variants:
        variant = replace(cfg, group=k, eval_every=cfg.variant_eval_every)
        runs = [run_grpo("step", generator, drm, text, reward, variant, s) for s in cfg.seeds]
        out["step_grpo_k"][str(k)] = {"seeds": list(cfg.seeds), "curve": _mean_curve(runs), "runs": runs,
                                      "guard_pick_gt": sum(r["guard_pick"]["gt"] for r in runs) / len(runs),
                                      "alarms": [r["alarm_iteration"] for r in runs]}
    checks = {"every_step_trained": run_grpo("step", generator, drm, text, reward,
                                             replace(cfg, iterations=cfg.every_step_iterations), cfg.guard_seed,
                                             train_sigma_max=1.0)}
    if cfg.hack_lr > 0:
        checks[f"lr_{cfg.hack_lr:g}"] = run_grpo("step", generator, drm, text, reward,
                                                 replace(cfg, iterations=cfg.hack_iterations), cfg.guard_seed,
                                                 lr=cfg.hack_lr, train_sigma_max=1.0)
    out["guard_check"] = {name: {"alarm_iteration": r["alarm_iteration"], "guard_pick": r["guard_pick"],
                                 "best": r["best"], "last_gt": r["curve"][-1][2], "curve": r["curve"]}
                          for name, r in checks.items()}
    out["summary"] = {**_speedup(out["grpo"]["curve"], out["step_grpo"]["curve"]),
                      "step_grpo_guard_pick_gt": out["step_grpo"]["guard_pick_gt"],
                      "grpo_guard_pick_gt": out["grpo"]["guard_pick_gt"],
                      "step_grpo_drop_from_peak_se": _drop_from_peak(out["step_grpo"]["curve"]),
                      "step_grpo_k_drop_from_peak_se": {k: _drop_from_peak(v["curve"])
                                                        for k, v in out["step_grpo_k"].items()}}
    return out


def _drop_from_peak(curve: list[list[float]]) -> float:
    """How far the last mean GT lies below the curve's peak, in standard errors of the last point (0 if above)."""
    peak, last = max(row[2] for row in curve), curve[-1]
    return max(0.0, peak - last[2]) / max(last[5], 1e-9)


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
