"""`demo`: the toy world end to end — generator, preference data, DRM training (pretrained and random
init), accuracy per noise level, step-wise sampling per k, and best-of-N at equal compute.

Every stage goes through the same `drm_core` and `training` code as SD3.5-M: the generator is a
diffusers SD3 MMDiT saved as a diffusers folder, the DRM is built from it by `drm_from_base`, the
preference pairs are written with the trainer's cache format, and `train-drm` trains on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from drm_core import DEFAULT_BRANCH_RANGE, DEFAULT_K, DEFAULT_PLAIN_NOISE_LEVEL, DRM, DRMError, branch_mask, load_drm

from ..bench import flops
from ..cache_format import CacheWriter, PreferenceCache
from ..config import load_config, save_resolved
from ..evaluate import pairwise_accuracy
from ..train_drm import DataSection, ModelSection, TrainDRMConfig, TrainSection, train
from .generator import GeneratorConfig, train_generator, velocity
from .grpo_demo import GRPOSection, grpo_experiment
from .report import write_report
from .sampling import Batch, best_of_n, generate
from .search import SearchSection, search_experiment
from .world import (N_CLASSES, GroundTruthReward, ToyTextEncoder, bradley_terry_labels, decode_model_space, encode,
                    load_digits, prompt_text)

log = logging.getLogger(__name__)


@dataclass
class WorldSection:
    seed: int = 0
    steps: int = 20  # sampling steps (SD3 shift 3 schedule)
    noise_level: float = 0.7  # SDE noise level for the pool, plain sampling and step-wise candidates
    cfg_scale: float = 4.5  # CFG of every sampler after the pool (SD3.5's usual value; the nodes' default)
    pool: int = 5000  # generated images for the training pairs
    train_pairs: int = 10000
    eval_pool: int = 1000
    eval_pairs: int = 2000
    label_temperature: float = 0.25  # Bradley-Terry temperature of the simulated annotators


@dataclass
class DRMSection:
    blocks: int = 3
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4
    conv_channels: tuple[int, ...] = (32, 64, 64)
    groups: int = 8
    mlp_hidden: int = 64
    sigma_sampling: str = "uniform"
    sigma_shift: float = 0.33  # < 1 puts more of the training pairs at low noise
    noise_draws: int = 4


@dataclass
class SamplingSection:
    ks: tuple[int, ...] = (1, 2, 4, 6)
    samples_per_prompt: int = 64


@dataclass
class GuidanceSection:
    """Cheaper guidance (issue: cost of step-wise sampling), each measured at k = `k`."""

    enabled: bool = True
    k: int = DEFAULT_K
    shallow_blocks: int = 1  # a DRM with fewer kept blocks, trained with the same budget (0: skip)
    repeats: int = 1  # timing rounds; an option's time ratio is the median of its per-round ratios
    bf16: str = "auto"  # bf16 DRM options: "auto" (only where a bf16 DRM scores faster than fp32 here) | "yes" | "no"


@dataclass
class DemoConfig:
    out: str = "demo_out"
    world: WorldSection = field(default_factory=WorldSection)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    drm: DRMSection = field(default_factory=DRMSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    guidance: GuidanceSection = field(default_factory=GuidanceSection)
    search: SearchSection = field(default_factory=lambda: SearchSection(budgets=("default",)))  # 2.5x: the CLI


QUICK = ["generator.steps=60", "world.pool=400", "world.train_pairs=600", "world.eval_pool=200",
         "world.eval_pairs=200", "world.steps=8", "drm.steps=40", "drm.noise_draws=1",
         "sampling.samples_per_prompt=4", "sampling.ks=[1, 2, 4]", "grpo.seeds=[0]", "grpo.iterations=2",
         "grpo.eval_every=1", "grpo.eval_samples=20", "grpo.steps=6", "grpo.eval_steps=4", "grpo.k_variants=[2]",
         "grpo.hack_iterations=2", "grpo.every_step_iterations=2", "guidance.k=2",
         "guidance.repeats=1", "search.samples_per_prompt=2", "search.large_budget=1.6"]


def make_pairs(latents: torch.Tensor, prompts: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n random (a, b) index pairs of distinct images sharing a prompt -> [n, 2]."""
    by_prompt = [torch.nonzero(prompts == c).flatten() for c in range(N_CLASSES)]
    c = torch.randint(N_CLASSES, (n,), generator=g)
    out = []
    for ci in c.tolist():
        members = by_prompt[ci]
        a, b = torch.randperm(len(members), generator=g)[:2]
        out.append((int(members[a]), int(members[b])))
    return torch.tensor(out)


def write_cache(root: Path, latents: torch.Tensor, prompts: torch.Tensor, text: ToyTextEncoder,
                pairs: torch.Tensor, a_wins: torch.Tensor) -> PreferenceCache:
    """The generated pool as a trainer cache: images, prompts, and (prompt, winner, loser) pairs."""
    writer = CacheWriter(root, shard_size=4096)
    for i, lat in enumerate(latents):
        writer.add_image(i, lat)
    for c in range(N_CLASSES):
        ctx, pooled = text(torch.tensor([c]))
        writer.add_prompt(c, ctx[0], pooled[0])
    win = torch.where(a_wins, pairs[:, 0], pairs[:, 1])
    lose = torch.where(a_wins, pairs[:, 1], pairs[:, 0])
    rows = torch.stack([prompts[pairs[:, 0]], win, lose], 1)
    writer.finish(rows, text={"scheme": "toy-table", "tokens": 4}, extra={"prompts": [prompt_text(c) for c in
                                                                                     range(N_CLASSES)]})
    return PreferenceCache(root, in_memory=True)


def drm_config(config: DemoConfig, work: Path, name: str, init: str, blocks: int) -> TrainDRMConfig:
    """The trainer's own config for one toy DRM (the same `train-drm` code path as SD3.5-M)."""
    d, w = config.drm, config.world
    return TrainDRMConfig(
        out=str(work / f"drm_{name}"),
        model=ModelSection(init=init, base=str(work / "generator"), blocks=blocks, conv_channels=d.conv_channels,
                           groups=d.groups, mlp_hidden=d.mlp_hidden, dropout=0.0),
        data=DataSection(cache=str(work / "cache_train"), eval_fraction=0.0, in_memory=True),
        train=TrainSection(steps=d.steps, batch_size=d.batch_size, lr=d.lr, sigma_sampling=d.sigma_sampling,
                           sigma_shift=d.sigma_shift, seed=w.seed, eval_every=10**9,
                           checkpoint_every=max(d.steps // 2, 1), keep_checkpoints=1, log_every=20))


def sem(x: torch.Tensor) -> float:
    return float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def summary(batch: Batch, reward: GroundTruthReward) -> dict:
    r = reward(decode_model_space(batch.latents), batch.prompts)
    return {"gt_reward_mean": float(r.mean()), "gt_reward_sem": sem(r), "seconds": batch.seconds,
            "n": len(r)}


def run_demo(config: DemoConfig) -> dict:
    """All stages; returns metrics (also written to out/metrics.json with report.md and PNGs)."""
    if 1 not in config.sampling.ks or len(config.sampling.ks) < 2:
        raise DRMError(f"sampling.ks must hold 1 (plain sampling, the baseline of every comparison) and at least "
                       f"one k > 1, got {list(config.sampling.ks)}")
    config.sampling.ks = tuple(sorted(set(config.sampling.ks)))
    out = Path(config.out)
    work = out / "work"
    save_resolved(config, out)
    w = config.world
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(w.seed)
    images, labels = load_digits()
    text = ToyTextEncoder(w.seed)
    reward = GroundTruthReward(images, labels)

    log.info("1/7 training the toy SD3 generator (%d steps)", config.generator.steps)
    tick = time.perf_counter()
    generator = train_generator(encode(images), labels, text, config.generator)
    generator.save_pretrained(work / "generator")
    timings["generator"] = time.perf_counter() - tick

    log.info("2/7 sampling the preference pool without CFG, for a wide range of quality (%d + %d images)",
             w.pool, w.eval_pool)
    tick = time.perf_counter()
    g = torch.Generator().manual_seed(w.seed + 11)
    prompts = torch.arange(N_CLASSES).repeat(math.ceil(w.pool / N_CLASSES))[: w.pool]
    pool = generate(generator, text, prompts, torch.randn((w.pool, 16, 4, 4), generator=g), w.steps,
                    w.noise_level, w.seed + 12)
    eval_prompts = torch.arange(N_CLASSES).repeat(math.ceil(w.eval_pool / N_CLASSES))[: w.eval_pool]
    eval_pool = generate(generator, text, eval_prompts, torch.randn((w.eval_pool, 16, 4, 4), generator=g),
                         w.steps, w.noise_level, w.seed + 13)
    r_pool = reward(decode_model_space(pool.latents), prompts)
    r_eval = reward(decode_model_space(eval_pool.latents), eval_prompts)
    pairs = make_pairs(pool.latents, prompts, w.train_pairs, g)
    a_wins = bradley_terry_labels(r_pool[pairs[:, 0]], r_pool[pairs[:, 1]], w.label_temperature, g)
    label_agreement = float(((r_pool[pairs[:, 0]] > r_pool[pairs[:, 1]]) == a_wins).float().mean())
    write_cache(work / "cache_train", pool.latents, prompts, text, pairs, a_wins)
    eval_pairs = make_pairs(eval_pool.latents, eval_prompts, w.eval_pairs, g)
    gt_a_wins = r_eval[eval_pairs[:, 0]] > r_eval[eval_pairs[:, 1]]  # ground-truth ordering
    eval_cache = write_cache(work / "cache_eval", eval_pool.latents, eval_prompts, text, eval_pairs, gt_a_wins)
    timings["pool"] = time.perf_counter() - tick

    d = config.drm
    sigmas = (0.0, 0.25, 0.5, 0.75)
    drms: dict[str, DRM] = {}
    accuracy: dict[str, dict[str, float]] = {}
    runs = [("base", "base", d.blocks), ("random", "random", d.blocks)]
    if config.guidance.enabled and config.guidance.shallow_blocks:
        runs.append(("shallow", "base", config.guidance.shallow_blocks))
    for name, init, blocks in runs:
        log.info("3/7 training the DRM: %s init, %d blocks (%d steps)", init, blocks, d.steps)
        tick = time.perf_counter()
        drms[name] = load_drm(train(drm_config(config, work, name, init, blocks)))
        acc = pairwise_accuracy(drms[name], eval_cache, sigmas, d.noise_draws)
        accuracy[name] = {str(s): a for s, a in acc.items()}
        timings[f"drm_{name}"] = time.perf_counter() - tick

    log.info("4/7 step-wise sampling at CFG %.1f, k in %s", w.cfg_scale, list(config.sampling.ks))
    s = config.sampling
    slots = torch.arange(N_CLASSES).repeat_interleave(s.samples_per_prompt)
    start_noise = torch.randn((len(slots), 16, 4, 4), generator=torch.Generator().manual_seed(w.seed + 21))
    stepwise: dict[str, dict] = {}
    batches: dict[str, Batch] = {}
    for k in s.ks:
        batch = generate(generator, text, slots, start_noise, w.steps, w.noise_level, w.seed + 22,
                         drm=drms["base"] if k > 1 else None, k=k, cfg_scale=w.cfg_scale)
        stepwise[str(k)] = summary(batch, reward)
        batches[f"k={k}"] = batch

    guidance = {}
    if config.guidance.enabled:
        log.info("5/7 cheaper guidance at k = %d (%d timing rounds)", config.guidance.k, config.guidance.repeats)
        tick = time.perf_counter()
        guidance, default_batch = guidance_options(config, generator, text, reward, drms, slots, start_noise,
                                                   stepwise)
        batches["default"] = default_batch
        timings["guidance"] = time.perf_counter() - tick

    log.info("5b/7 best-of-N (ODE samples) at the compute of each k and of the default")
    base_seconds = stepwise[str(s.ks[0])]["seconds"]
    matched = {str(k): stepwise[str(k)]["seconds"] / base_seconds for k in s.ks[1:]}
    matched.update({"default": v["time_ratio"] for n, v in guidance.items() if n.startswith("default")})
    best: dict[str, dict] = {}
    for k, ratio in matched.items():
        n = max(2, round(ratio))
        if str(n) in best:
            continue
        batch = best_of_n(generator, text, drms["base"], slots, n, w.steps, 0.0, w.seed + 31, w.cfg_scale)
        best[str(n)] = {**summary(batch, reward), "matched_k": k}
        batches[f"best-of-{n}"] = batch

    search = {}
    if config.search.enabled:
        log.info("5c/7 search beyond greedy argmax at the default's time and at %.1fx (%d samples)",
                 config.search.large_budget, N_CLASSES * config.search.samples_per_prompt)
        tick = time.perf_counter()
        name = config.search.drm if config.search.drm in drms else "base"
        search = search_experiment(generator, drms[name], text, reward, config.search, w.steps, w.noise_level,
                                   w.cfg_scale, name)
        timings["search"] = time.perf_counter() - tick

    grpo = {}
    if config.grpo.enabled:
        log.info("6/7 GRPO vs Step-GRPO (%d iterations x %d seeds each)", config.grpo.iterations,
                 len(config.grpo.seeds))
        tick = time.perf_counter()
        grpo = grpo_experiment(generator, drms["base"], text, reward, config.grpo)
        timings["grpo"] = time.perf_counter() - tick

    metrics = {
        "seed": w.seed, "n_prompts": N_CLASSES, "n_samples": len(slots),
        "drm_accuracy": accuracy["base"], "drm_accuracy_random_init": accuracy["random"],
        **({"drm_accuracy_shallow": accuracy["shallow"]} if "shallow" in accuracy else {}),
        "cfg_scale": w.cfg_scale, "stepwise": stepwise, "best_of_n": best, "guidance_options": guidance, **grpo,
        **({"search": search} if search else {}),
        "label_agreement_with_ground_truth": label_agreement,
        "pool_gt_reward_mean": float(r_pool.mean()), "pool_gt_reward_std": float(r_pool.std()),
        "timings_seconds": {**timings, "total": time.perf_counter() - t0},
        "config": asdict(config),
    }
    log.info("7/7 writing the report")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(out, metrics, batches)
    return metrics


def guidance_options(config: DemoConfig, generator, text: ToyTextEncoder, reward: GroundTruthReward,
                     drms: dict[str, DRM], slots: torch.Tensor, start_noise: torch.Tensor,
                     stepwise: dict[str, dict]) -> tuple[dict, Batch]:
    """Step-wise sampling with less work, each option next to plain sampling: branch on part of the trajectory
    or every 2nd step, ODE steps outside the branch range, a shallower DRM, a bf16 DRM, and the default that
    combines them. Same start noise and seed as the k sweep. An option's time is the median over `repeats`
    interleaved rounds of its time / plain SDE time in that round; `flop_ratio` is the FLOP-model cost."""
    w, k = config.world, config.guidance.k
    default = dict(branch_range=DEFAULT_BRANCH_RANGE, plain_noise_level=DEFAULT_PLAIN_NOISE_LEVEL)
    deep = drms["base"]
    shallow = drms.get("shallow", deep)
    scorers = {"deep": deep, "shallow": shallow}
    n_deep, n_shallow = deep.config.backbone.blocks, shallow.config.backbone.blocks
    variants = [("plain SDE", None, 1, {}),
                ("plain ODE", None, 1, dict(noise_level=0.0)),
                (f"k = {k}, first half", "deep", k, dict(branch_range=(0.0, 0.5))),
                (f"k = {k}, every 2nd step", "deep", k, dict(branch_every=2)),
                (f"k = {k}, first half, ODE after", "deep", k, default),
                (f"k = {k}, {n_shallow}-block DRM", "shallow", k, {})]
    bf16, row_ms = use_bf16(config.guidance.bf16, shallow, text)
    if bf16:
        scorers.update({"deep bf16": copy.deepcopy(deep).to(torch.bfloat16),
                        "shallow bf16": copy.deepcopy(shallow).to(torch.bfloat16)})
        variants += [(f"k = {k}, bf16 DRM", "deep bf16", k, {}),
                     (f"k = {k}, {n_deep}-block bf16 DRM, first half, ODE after", "deep bf16", k, default),
                     (f"default: k = {k}, {n_shallow}-block bf16 DRM, first half, ODE after", "shallow bf16", k,
                      default)]
    else:
        variants.append((f"default: k = {k}, {n_shallow}-block DRM, first half, ODE after", "shallow", k, default))
    log.info("DRM ms per candidate row here: %s; bf16 options %s", row_ms, "on" if bf16 else "off")
    cost = _flop_model(generator, scorers, text, w.cfg_scale)
    full = stepwise[str(max(stepwise, key=int))]["gt_reward_mean"]  # the largest k on every step
    seconds: dict[str, list[float]] = {name: [] for name, *_ in variants}
    out, default_batch = {}, None
    for round_ in range(max(config.guidance.repeats, 1)):
        for name, scorer, kk, kwargs in variants:
            kwargs = {"noise_level": w.noise_level, **kwargs}
            batch = generate(generator, text, slots, start_noise, w.steps, kwargs.pop("noise_level"), w.seed + 22,
                             drm=scorers[scorer] if scorer else None, k=kk, cfg_scale=w.cfg_scale, **kwargs)
            seconds[name].append(batch.seconds)
            if round_ == 0:  # the samples are the same in every round (same seeds); only the time varies
                mask = branch_mask(w.steps, kwargs.get("branch_range", (0.0, 1.0)), kwargs.get("branch_every", 1))
                branched = sum(mask[:-1]) if scorer else 0  # the last step (to sigma 0) never branches
                out[name] = {**summary(batch, reward), "k": kk, "drm": scorer or "none",
                             "options": {a: list(b) if isinstance(b, tuple) else b for a, b in kwargs.items()},
                             "flop_ratio": 1 + branched * kk * cost[scorer] / w.steps if scorer else 1.0}
                if name.startswith("default"):
                    default_batch = batch
    sde, ode = out["plain SDE"]["gt_reward_mean"], out["plain ODE"]["gt_reward_mean"]
    out["plain SDE"]["drm_ms_per_row"] = row_ms  # why the bf16 options are on or off
    for name, v in out.items():
        v["seconds"] = statistics.median(seconds[name])
        v["time_ratio"] = statistics.median(a / b for a, b in zip(seconds[name], seconds["plain SDE"]))
        v["gain_vs_sde"] = (v["gt_reward_mean"] - sde) / (full - sde) if full != sde else float("nan")
        v["gain_vs_ode"] = (v["gt_reward_mean"] - ode) / (full - ode) if full != ode else float("nan")
    return out, default_batch


def use_bf16(setting: str, drm: DRM, text: ToyTextEncoder, rows: int = 512) -> tuple[bool, dict[str, float]]:
    """Whether to measure bf16 DRM options: "auto" times a bf16 copy of the DRM against fp32 on `rows` candidates (best
    of 5 calls each); bf16 pays off only on CPUs with bf16 instructions (AVX512-BF16, AMX) and on GPUs."""
    if setting not in ("auto", "yes", "no"):
        raise DRMError(f"guidance.bf16 must be auto, yes or no, got {setting!r}")
    if setting != "auto":
        return setting == "yes", {}
    context, pooled = text(torch.arange(rows) % N_CLASSES)
    x, ms = torch.randn(rows, 16, 4, 4), {}
    with torch.inference_mode():
        for name, model in (("float32", drm), ("bfloat16", copy.deepcopy(drm).to(torch.bfloat16))):
            embedded = model.embed_prompt(context, pooled)
            times = []
            for _ in range(6):
                tick = time.perf_counter()
                model.score_embedded(x.to(model.compute_dtype), torch.tensor(0.5), embedded)
                times.append(time.perf_counter() - tick)
            ms[name] = round(min(times[1:]) / rows * 1e3, 4)
    return ms["bfloat16"] < ms["float32"], ms


def _flop_model(generator, scorers: dict[str, DRM], text: ToyTextEncoder, cfg_scale: float) -> dict[str, float]:
    """FLOPs of one DRM candidate score per FLOPs of one (CFG) generator step, per scorer (REFERENCE §1)."""
    x, sigma = torch.zeros(1, 16, 4, 4), torch.tensor([0.5])
    context, pooled = text(torch.tensor([0]))
    calls = 2 if cfg_scale != 1.0 else 1
    with torch.inference_mode():
        f_gen = calls * flops(lambda: velocity(generator, x, sigma, context, pooled))
        return {name: flops(lambda: drm.score(x.to(next(drm.parameters()).dtype), sigma, context, pooled)) / f_gen
                for name, drm in scorers.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output folder (default demo_out)")
    parser.add_argument("--quick", action="store_true", help="a tiny run of every stage (about a minute; for tests)")
    parser.add_argument("--config", default=None, help="TOML with [world], [generator], [drm], [sampling] tables")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    config = load_config(DemoConfig, args.config, (QUICK if args.quick else []) + args.overrides)
    if args.out:
        config.out = args.out
    metrics = run_demo(config)
    out = Path(config.out).resolve()
    print(f"toy world done in {metrics['timings_seconds']['total']:.0f} s\n"
          f"  report:  {out / 'report.md'}\n  metrics: {out / 'metrics.json'}\n  plots:   {out}/*.png")
    return 0
