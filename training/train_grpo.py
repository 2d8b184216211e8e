"""`train-grpo`: Step-GRPO (`--mode step`, DRM paper §3.3) or Flow-GRPO (`--mode terminal`) LoRA training.

Check: every input is opened and validated first (grpo_inputs.check_inputs), so a wrong path fails in
seconds. Build: prompt embeddings and the CFG negative encoded once (then the text encoders are freed),
the SD3 MMDiT (any layout) with a LoRA, the DRM, the VAE for sample grids. Loop: rollout -> DRM rewards
-> advantages -> PPO-clipped update (+ KL to the LoRA-off reference) -> log -> held-out eval (best LoRA
kept, early stop on it; a PNG grid of held-out samples, the base model's at iteration 0) -> checkpoint.
All randomness derives from (seed, iteration), so `--resume latest` repeats an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from drm_core import DRMError, flow_sigmas, load_drm, load_mmdit, sde_sample

from .alignment import AlignmentGuard, prompt_alignment
from .checkpointing import load_checkpoint, resolve_resume, save_checkpoint
from .config import load_config, save_resolved
from .grpo_core import Policy, policy_update, rollout_step_grpo, rollout_terminal
from .grpo_inputs import PromptSection, check_embeddings, check_inputs, embeddings_path, prompt_embeddings
from .lora import DEFAULT_TARGETS, add_lora, export_lora
from .metrics import MetricLogger
from .sample_grid import SampleGrids, load_vae

log = logging.getLogger(__name__)


@dataclass
class PolicySection:
    base: str = ""  # SD3/SD3.5 checkpoint: single file, bare MMDiT, or diffusers transformer folder
    vae: str = ""  # SD3 VAE for sample grids (models/vae/ file or diffusers folder); "": the one inside `base`
    lora_rank: int = 32
    lora_alpha: float = 64.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dtype: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | bf16 | fp32


@dataclass
class RewardSection:
    drm: str = ""  # DRM file that gives the training reward
    holdout_drm: str = ""  # a second reward the policy is not trained on (empty: the training DRM at sigma 0)


@dataclass
class GRPOSection:
    mode: str = "step"  # step (Step-GRPO) | terminal (Flow-GRPO)
    iterations: int = 300
    prompts_per_iteration: int = 4  # per process
    group: int = 8  # k candidates per step (step) / trajectories per prompt (terminal)
    steps: int = 10
    eval_steps: int = 40
    eval_every: int = 20
    eval_noise_level: float = 0.0  # 0: the Euler ODE that ComfyUI users sample with (training uses the SDE)
    eval_images: int = 8  # held-out samples decoded into out/samples/iter_NNNNNN.png (0: no images)
    patience: int = 5  # evaluations without a new best held-out reward before stopping (0: never stop)
    resolution: int = 512
    noise_level: float = 0.7
    cfg_scale: float = 4.5
    lr: float = 1e-4
    clip_range: float = 1e-4
    kl_beta: float = 0.04  # exact per-step Gaussian KL (Flow-GRPO's beta omits the step-size factor)
    grad_clip: float = 1.0
    continue_with: str = "random"  # step mode: random (on-policy) | argmax
    train_sigma_max: float = 0.6  # step mode: train only steps from this noise level down (high-noise steps hack)
    guard_tolerance: float = 0.1  # stop when held-out prompt alignment loses this fraction of the base's (0: off)
    guard_contrast: int = 3  # other held-out prompts each sample's alignment is measured against
    seed: int = 0
    checkpoint_every: int = 20
    keep_checkpoints: int = 3
    log_every: int = 1


@dataclass
class TrainGRPOConfig:
    out: str = "runs/grpo"
    policy: PolicySection = field(default_factory=PolicySection)
    reward: RewardSection = field(default_factory=RewardSection)
    prompts: PromptSection = field(default_factory=PromptSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train(config: TrainGRPOConfig, resume: str | None = None, stop_after: int | None = None) -> Path:
    """Train and write out/lora.safetensors (final) and out/best_lora.safetensors (best held-out reward)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg, out = config.grpo, Path(config.out)
    inputs = check_inputs(config)  # every path opened and validated before any model is built
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    dtype = torch.bfloat16 if config.policy.dtype == "bf16" or (
        config.policy.dtype == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()) else torch.float32
    with accelerator.main_process_first():  # one process encodes (if needed), the others read its file
        emb = prompt_embeddings(config.prompts, out, inputs.prompts)
    check_embeddings(emb, inputs.backbone, config.prompts.eval_prompts, embeddings_path(config.prompts, out))
    n_eval = min(config.prompts.eval_prompts, len(emb.context) // 2)
    train_rows, eval_rows = torch.arange(n_eval, len(emb.context)), torch.arange(n_eval)
    grids = None
    if accelerator.is_main_process and inputs.vae is not None:
        grids = SampleGrids(load_vae(inputs.vae, "cpu", dtype), out, device, cfg.eval_images,
                            emb.texts[:n_eval] if emb.texts else None)
        log.info("sample grids of %d held-out prompts go to %s (VAE: %s)", min(n_eval, cfg.eval_images),
                 out / "samples", inputs.vae_note)
    elif accelerator.is_main_process:
        log.info("sample grids are off: %s", inputs.vae_note)
    torch.manual_seed(cfg.seed)
    model = add_lora(load_mmdit(config.policy.base, dtype=dtype), config.policy.lora_rank,
                     config.policy.lora_alpha, config.policy.targets).to(device)
    for p in trainable_state(model).values():
        p.data = p.data.float()  # LoRA weights in fp32 (master copy), base stays in `dtype`
    drm = load_drm(config.reward.drm, device=device, dtype=dtype)
    holdout = load_drm(config.reward.holdout_drm, device=device, dtype=dtype) if config.reward.holdout_drm else drm
    policy = Policy(model, emb.context.to(device, dtype), emb.pooled.to(device, dtype), cfg.cfg_scale,
                    emb.negative_context.to(device, dtype), emb.negative_pooled.to(device, dtype))
    optimizer = torch.optim.AdamW(list(trainable_state(model).values()), lr=cfg.lr, weight_decay=0.0)
    start, best, stale, base_alignment = 0, float("-inf"), 0, None
    ckpt = resolve_resume(out / "checkpoints", resume)
    if ckpt is not None:
        state = load_checkpoint(ckpt, None, optimizer)
        missing = set(trainable_state(model)) - set(state["tensors"])
        if missing:
            raise DRMError(f"{ckpt}: LoRA tensors missing {sorted(missing)[:3]} (different LoRA settings?)")
        model.load_state_dict(state["tensors"], strict=False)
        start, best, stale = state["step"], state.get("best", float("-inf")), state.get("stale", 0)
        base_alignment = state.get("base_alignment")
        log.info("resumed from %s at iteration %d", ckpt, start)
    if accelerator.is_main_process:
        save_resolved(config, out)
    metrics = MetricLogger(out, enabled=accelerator.is_main_process, truncate_after=start if start else -1)
    latent_side = cfg.resolution // 8
    sigmas = flow_sigmas(cfg.steps)

    def reward_fn(latents: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return drm.score(latents.to(dtype), sigma, policy.context[rows], policy.pooled[rows])

    measure = n_eval >= 2  # prompt alignment contrasts held-out prompts with each other
    if start == 0 or (measure and base_alignment is None):  # the base model: same prompts, same noise
        with policy.reference():
            held, samples = evaluate(policy, holdout, eval_rows.to(device), cfg, latent_side, dtype)
        base_alignment = alignment(policy, samples, eval_rows.to(device), cfg) if measure else None
        if start == 0:
            metrics.log(0, {"eval/holdout_reward": held,
                            **({"eval/prompt_alignment": base_alignment} if measure else {})})
            _write_grid(grids, metrics, 0, samples)
    guard = AlignmentGuard(base_alignment, cfg.guard_tolerance) if cfg.guard_tolerance > 0 and measure else None
    if cfg.guard_tolerance > 0 and not measure:
        log.warning("the prompt-alignment guard is off: %d held-out prompt (at most half of the %d prompts are held "
                    "out); it needs 2 or more to contrast them", n_eval, len(emb.context))
    alarm = False
    end = cfg.iterations if stop_after is None else min(cfg.iterations, stop_after)
    bar = tqdm(total=cfg.iterations, initial=start, disable=not accelerator.is_main_process, desc=f"grpo-{cfg.mode}")
    for it in range(start, end):
        tick = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it * world + rank)
        rows = train_rows[torch.randint(len(train_rows), (cfg.prompts_per_iteration,), generator=g)].to(device)
        model.eval()
        if cfg.mode == "step":
            x = torch.randn((len(rows), 16, latent_side, latent_side), generator=g).to(device, dtype)
            x0, transitions = rollout_step_grpo(policy, reward_fn, x, rows, sigmas, cfg.group, cfg.noise_level, g,
                                                cfg.continue_with)
            rewards = transitions[-1].reward.flatten()  # scores of the last scored step, already computed
        else:
            rows = rows.repeat_interleave(cfg.group)
            x = torch.randn((len(rows), 16, latent_side, latent_side), generator=g).to(device, dtype)
            x0, rewards, transitions = rollout_terminal(policy, reward_fn, x, rows, sigmas, cfg.group,
                                                        cfg.noise_level, g)
        model.train()
        stats = policy_update(policy, transitions, optimizer, cfg.noise_level, cfg.clip_range, cfg.kl_beta,
                              cfg.grad_clip, backward=lambda loss: _backward_synced(loss, model, accelerator))
        done = it + 1
        bar.update(1)
        if done % cfg.log_every == 0:
            metrics.log(done, {"reward": accelerator.reduce(rewards.float().mean().to(device), "mean").item(),
                               "loss": stats.loss, "kl": stats.kl, "clip_fraction": stats.clip_fraction,
                               "seconds": time.perf_counter() - tick})
        if done % cfg.eval_every == 0 or done == cfg.iterations:
            model.eval()
            held, samples = evaluate(policy, holdout, eval_rows.to(device), cfg, latent_side, dtype)
            aligned = alignment(policy, samples, eval_rows.to(device), cfg) if measure else None
            metrics.log(done, {"eval/holdout_reward": held, **({"eval/prompt_alignment": aligned} if measure else {})})
            _write_grid(grids, metrics, done, samples)
            alarm = guard is not None and not guard.ok(aligned)
            if alarm:
                log.warning("divergence alarm at iteration %d: held-out prompt alignment %.4g fell below %.4g (the "
                            "base model's %.4g less %g of it) while the reward model scores %.4g: the policy trades "
                            "prompt fidelity for reward (reward hacking). Stopping; best_lora.safetensors is the last "
                            "evaluation that passed.", done, aligned, guard.floor, guard.base, cfg.guard_tolerance,
                            held)
            elif held > best:
                best, stale = held, 0
                if accelerator.is_main_process:
                    export_lora(accelerator.unwrap_model(model), out / "best_lora.safetensors",
                                {"iteration": done, "holdout_reward": held, "mode": cfg.mode})
            else:
                stale += 1
        if done % cfg.checkpoint_every == 0 or done == end:
            if accelerator.is_main_process:
                save_checkpoint(out / "checkpoints", done, trainable_state(model), optimizer,
                                {"best": best, "stale": stale, "processes": world, "base_alignment": base_alignment},
                                cfg.keep_checkpoints)
        if alarm:
            break
        if cfg.patience and stale >= cfg.patience:
            log.info("early stop at iteration %d: no better held-out reward in %d evaluations", done, stale)
            break
    bar.close()
    metrics.close()
    final = out / "lora.safetensors"
    if (stop_after is None or stop_after >= cfg.iterations or stale >= cfg.patience > 0 or alarm) and \
            accelerator.is_main_process:
        export_lora(accelerator.unwrap_model(model), final, {"mode": cfg.mode, "config": json.dumps(asdict(config))})
        log.info("wrote %s and %s", final, out / "best_lora.safetensors")
    accelerator.wait_for_everyone()
    return final


def _backward_synced(loss: torch.Tensor, model: torch.nn.Module, accelerator) -> None:
    """Backward, then (with several processes) average the LoRA gradients across them."""
    loss.backward()
    if accelerator.num_processes > 1:
        for p in trainable_state(model).values():
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, "mean")


@torch.no_grad()
def evaluate(policy: Policy, reward, rows: torch.Tensor, cfg: GRPOSection, side: int,
             dtype: torch.dtype) -> tuple[float, torch.Tensor]:
    """Mean held-out reward (sigma 0) and the samples [B, 16, side, side] (model space) of the held-out prompts,
    `eval_steps` steps from the same noise every time. `eval_noise_level` defaults to 0, the Euler ODE that
    ComfyUI users sample with (KSampler "euler"), so the number and the grids show what they will get."""
    g = torch.Generator().manual_seed(123_456)
    x = torch.randn((len(rows), 16, side, side), generator=g).to(rows.device, dtype)  # [B, 16, side, side]
    x0 = sde_sample(lambda z, s: policy.velocity(z, s, rows), x, flow_sigmas(cfg.eval_steps), cfg.eval_noise_level,
                    g)
    return float(reward.score(x0, 0.0, policy.context[rows], policy.pooled[rows]).mean()), x0


def alignment(policy: Policy, samples: torch.Tensor, rows: torch.Tensor, cfg: GRPOSection) -> float:
    """Mean prompt alignment of held-out samples, measured by the base model (LoRA off; training/alignment.py)."""
    with policy.reference():
        return float(prompt_alignment(policy.conditional_velocity, samples, rows, cfg.guard_contrast,
                                      seed=cfg.seed).mean())


def _write_grid(grids: SampleGrids | None, metrics: MetricLogger, step: int, samples: torch.Tensor) -> None:
    """Held-out samples as out/samples/iter_NNNNNN.png and a TensorBoard image (main process: others have none)."""
    if grids is None:
        return
    path, grid = grids.write(step, samples)
    metrics.image(step, "eval/samples", grid)
    log.info("wrote %s", path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="TOML config (see training/configs/grpo_sd35m_512.toml)")
    parser.add_argument("--mode", choices=["step", "terminal"], default=None, help="overrides grpo.mode")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")


def run(args: argparse.Namespace) -> int:
    overrides = args.overrides + ([f'grpo.mode="{args.mode}"'] if args.mode else [])
    train(load_config(TrainGRPOConfig, args.config, overrides), resume=args.resume)
    return 0
