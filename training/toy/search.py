"""Search beyond the greedy argmax at equal wall time (issue 15), measured against the toy world's ground truth.

Every sampler runs at CFG `world.cfg_scale` and `world.steps` steps from the same start noise. Each method has one
knob matched to a budget: the number of branched steps (the first m steps, ODE steps after, as the nodes' default)
for argmax / smc / beam, the number of steps for plain ODE and for best-of-N. The knob is chosen with a cost model
(seconds per row of a generator call and of a DRM call, timed on this machine at a few batch sizes; the calls a
method makes, counted by running the sampler on stubs), and the time is then measured: each method runs between
two plain SDE runs and its time ratio is its time over their mean (median over `repeats` rounds). Time is the
process's CPU time (`time.process_time`; torch runs on one thread), which equals the wall time on an idle machine
but, unlike it, is not inflated when another job shares the cores; the wall-time ratio is reported next to it.
Every method samples in chunks that keep generator calls at most VELOCITY_ROWS and DRM calls at most DRM_ROWS
rows. Budgets: the nodes' default (k = 4 on the first half, ODE after) and `large_budget` x plain SDE.

    python -m training.toy.search --work demo_out/work --out search_out   # trained demo models, no retraining
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor

from drm_core import (DEFAULT_BRANCH_RANGE, DEFAULT_K, DEFAULT_PLAIN_NOISE_LEVEL, DRM, DRMError, branch_mask,
                      flow_sigmas, load_drm, sde_sample, stepwise_sample)

from .sampling import Batch, best_of_n, generate, reward_fn, velocity_fn
from .world import N_CLASSES, NULL_PROMPT, GroundTruthReward, ToyTextEncoder, decode_model_space, load_digits

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class SearchSection:
    """Search beyond greedy argmax at equal wall time (training/toy/search.py, docs/search.md)."""

    enabled: bool = True
    samples_per_prompt: int = 16  # the demo's short run; docs/search.md used 64 (640 samples) and 2 seeds
    seeds: tuple[int, ...] = (0,)
    repeats: int = 1  # timing rounds; a time ratio is the median of the per-round ratios to plain SDE
    large_budget: float = 2.5  # the second budget, in cost-model units of plain SDE sampling
    drm: str = "shallow"  # the DRM of the nodes' default: "shallow" (1 block) or "base" (3 blocks)
    drm_dtype: str = "float32"  # bfloat16 pays off only on CPUs with bf16 instructions
    temperature: float = 0.02  # smc: weights exp(score / temperature), in DRM score units (best of a sweep)
    ess_threshold: float = 1.0  # smc: resample where ESS / (N k) falls below it (1: always)
    methods: str = "demo"  # "demo" (a short list) or "all"
    agreement_samples: int = 0  # > 0: per-sigma agreement of the DRM's choice with ODE-completed ground truth
    budgets: tuple[str, ...] = ("default", "large")  # which budgets' method families run
    value_steps: int = 0  # > 0: also train a value DRM (train-drm on generator rollouts) from `drm` and measure it
    value_teacher: str = "self"  # what scores the rollouts' images: "self" (`drm` at sigma 0) or "base" (3 blocks)
    value_batch: int = 32  # sibling pairs per step
    value_lr: float = 1e-4
    value_rollout_steps: int = 10  # schedule of the rollouts (siblings at every step but the last)
    value_completion: str = "ode"  # sde labels were noise here (loss stayed at ln 2)


@dataclass(frozen=True)
class Method:
    """One sampler; `scale` is its budget knob: branched steps (argmax, smc, beam) or sampling steps (the rest)."""

    kind: str  # "argmax", "smc", "beam", "best-of-N", "plain ODE", "plain SDE"
    k: int = 1
    particles: int = 1  # smc / beam particles, or N of best-of-N
    scale: int = 0
    temperature: float = 0.0
    ess_threshold: float = 1.0
    budget: str = "reference"

    def params(self) -> str:
        """A short human-readable parameter string for tables."""
        if self.kind in ("argmax", "smc", "beam"):
            size = f"k = {self.k}" if self.kind == "argmax" else f"N = {self.particles} x k = {self.k}"
            extra = f", T = {self.temperature:g}" if self.kind == "smc" else ""
            extra += f", ESS < {self.ess_threshold:g}" if self.kind == "smc" and self.ess_threshold < 1 else ""
            return f"{size}, first {self.scale} steps{extra}"
        if self.kind == "best-of-N":
            return f"N = {self.particles}, {self.scale} ODE steps each"
        return f"{self.scale} steps"


# Per budget; the default itself (argmax k = 4 on the first half) is always measured.
FAMILIES = {  # (kind, k, particles, ess_threshold)
    "demo": {"default": [("argmax", 2, 1, 1.0), ("smc", 2, 2, 1.0), ("beam", 2, 2, 1.0)],
             "large": [("argmax", 12, 1, 1.0), ("smc", 4, 2, 1.0), ("beam", 4, 2, 1.0)]},
    "all": {"default": [("argmax", 2, 1, 1.0), ("argmax", 6, 1, 1.0), ("smc", 2, 2, 1.0), ("beam", 2, 2, 1.0)],
            "large": [("argmax", 6, 1, 1.0), ("argmax", 12, 1, 1.0), ("argmax", 16, 1, 1.0), ("smc", 2, 2, 1.0),
                      ("smc", 4, 2, 1.0), ("smc", 2, 4, 1.0), ("smc", 2, 4, 0.5), ("beam", 2, 2, 1.0),
                      ("beam", 2, 4, 1.0), ("beam", 4, 2, 1.0)]},
}
BEST_OF = {"demo": {"default": (2,), "large": (2,)}, "all": {"default": (2,), "large": (2, 3)}}


@dataclass
class Context:
    """Everything a sampler run needs: models, prompts, start noise, schedule and CFG."""

    generator: SD3Transformer2DModel
    drm: DRM
    text: ToyTextEncoder
    prompts: Tensor
    noise: Tensor
    steps: int
    noise_level: float
    cfg_scale: float
    seed: int


# Rows per call, the same bound for every method: on this CPU (one thread) a generator row costs about 0.9-1.1 ms in
# calls of 128 rows but 1.5 ms in calls of 512, and a DRM row 0.18 ms at 512 but 0.40 ms at 8192, so without a bound
# the chunking alone would favour methods with small batches (particles) and penalise large k.
VELOCITY_ROWS = 128  # rows per generator call (before CFG doubles them)
DRM_ROWS = 512  # candidates per DRM call (the default's k = 4 x 128)


def default_method(steps: int) -> Method:
    """The nodes' default: argmax over DEFAULT_K children on DEFAULT_BRANCH_RANGE, plain ODE steps after."""
    return Method("argmax", DEFAULT_K, 1, sum(branch_mask(steps, DEFAULT_BRANCH_RANGE)), budget="default")


def chunk_of(method: Method) -> int:
    """Prompts per stepwise_sample call: at most VELOCITY_ROWS particles and DRM_ROWS children per call
    (best-of-N's samples are chunked by generate)."""
    n = method.particles if method.kind in ("smc", "beam") else 1
    return max(1, min(VELOCITY_ROWS // n, DRM_ROWS // (n * method.k)))


def call_rows(method: Method, steps: int, samples: int) -> tuple[list[int], list[int]]:
    """Rows of every generator call and every DRM call of one run on `samples` prompts (stubs, nothing computed)."""
    if method.kind in ("plain ODE", "plain SDE", "best-of-N"):
        n = method.particles if method.kind == "best-of-N" else 1
        chunks = _chunks(samples * n, VELOCITY_ROWS)
        return [c for c in chunks for _ in range(method.scale)], ([samples * n] if method.kind == "best-of-N" else [])
    gen, drm = [], []

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        gen.append(x.shape[0])
        return torch.zeros_like(x)

    def score(c: Tensor, sigma: Tensor) -> Tensor:
        drm.append(c.shape[0])
        return torch.zeros(c.shape[0])

    for chunk in _chunks(samples, chunk_of(method)):
        stepwise_sample(velocity, score, torch.zeros(chunk, 1, 1, 1), flow_sigmas(steps),
                        **_sampler_options(method, steps), noise_level=0.5, generator=torch.Generator().manual_seed(0))
    return gen, drm


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - lo) for lo in range(0, n, size)]


def _sampler_options(method: Method, steps: int) -> dict:
    """stepwise_sample keywords of a search method: branch the first `scale` steps, ODE after."""
    options = dict(k=method.k, branch_steps=[i < method.scale for i in range(steps)],
                   plain_noise_level=DEFAULT_PLAIN_NOISE_LEVEL, selection=method.kind, particles=method.particles)
    if method.kind == "smc":
        options.update(temperature=method.temperature, ess_threshold=method.ess_threshold)
    return options


@dataclass(frozen=True)
class CostModel:
    """Seconds per row of a generator call (CFG included) and of a DRM call, at measured batch sizes; linear in
    log2(rows) between them, constant beyond."""

    generator: tuple[tuple[int, float], ...]
    drm: tuple[tuple[int, float], ...]

    def seconds(self, gen_calls: list[int], drm_calls: list[int]) -> float:
        return sum(r * _per_row(self.generator, r) for r in gen_calls) + sum(r * _per_row(self.drm, r)
                                                                             for r in drm_calls)


def _per_row(table: tuple[tuple[int, float], ...], rows: int) -> float:
    """Seconds per row at `rows`, interpolated in log2(rows) within the measured sizes."""
    x = math.log2(max(rows, 1))
    points = [(math.log2(r), t) for r, t in table]
    if x <= points[0][0]:
        return points[0][1]
    for (x0, t0), (x1, t1) in zip(points, points[1:]):
        if x <= x1:
            return t0 + (t1 - t0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def predicted_ratio(method: Method, steps: int, samples: int, cost: CostModel) -> float:
    """Cost-model time of a method / plain SDE sampling's on the same prompts."""
    return cost.seconds(*call_rows(method, steps, samples)) / cost.seconds(*call_rows(Method("plain SDE", scale=steps),
                                                                                      steps, samples))


def match(method: Method, budget: float, steps: int, samples: int, cost: CostModel) -> Method:
    """The method with the knob whose predicted time ratio is nearest the budget (branched steps < steps;
    sampling steps of plain ODE and best-of-N at least 4)."""
    knobs = range(1, steps) if method.kind in ("argmax", "smc", "beam") else range(4, 4 * steps + 1)
    return min((replace(method, scale=s) for s in knobs),
               key=lambda m: abs(predicted_ratio(m, steps, samples, cost) - budget))


def calibrate(ctx: Context, repeats: int = 9) -> CostModel:
    """CPU seconds per row of one CFG velocity call (32 to VELOCITY_ROWS rows) and of one DRM call (64 to DRM_ROWS
    rows): the least over `repeats` rounds through all sizes (contention only ever adds time)."""
    n = len(ctx.prompts)
    null = ctx.text(torch.tensor([NULL_PROMPT]))
    calls = {}
    for kind, sizes in (("generator", (32, 64, VELOCITY_ROWS)), ("drm", (64, 256, DRM_ROWS))):
        for rows in sorted({min(n if kind == "generator" else 16 * n, r) for r in sizes}):
            context, pooled = ctx.text(ctx.prompts[torch.arange(rows) % n])
            fn = (velocity_fn(ctx.generator, context, pooled, ctx.cfg_scale, null) if kind == "generator"
                  else reward_fn(ctx.drm, context, pooled, 1))
            calls[(kind, rows)] = (fn, torch.randn(rows, 16, 4, 4))
    best = {key: math.inf for key in calls}
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # round 0 warms up
            for key, (fn, x) in calls.items():
                start = time.process_time()
                fn(x, torch.tensor(0.5))
                if round_:
                    best[key] = min(best[key], (time.process_time() - start) / key[1])
    return CostModel(*(tuple((rows, t) for (kind, rows), t in best.items() if kind == name)
                       for name in ("generator", "drm")))


def methods_for(section: SearchSection, steps: int, samples: int, cost: CostModel) -> list[Method]:
    """Plain SDE (first: the time reference), plain ODE, the default, and every family matched to the default's and
    to the large budget."""
    if section.methods not in FAMILIES:
        raise DRMError(f"search.methods must be one of {sorted(FAMILIES)}, got {section.methods!r}")
    default = default_method(steps)
    budgets = {"default": predicted_ratio(default, steps, samples, cost), "large": section.large_budget}
    tags = {name: f"{name} ({budget:.2f}x)" for name, budget in budgets.items()}
    unknown = set(section.budgets) - set(budgets)
    if unknown:
        raise DRMError(f"search.budgets: unknown {sorted(unknown)}; known: {sorted(budgets)}")
    out = [Method("plain SDE", scale=steps), Method("plain ODE", scale=steps), replace(default, budget=tags["default"])]
    for name, budget in budgets.items():
        if name not in section.budgets:
            continue
        family = FAMILIES[section.methods][name]
        out += [match(Method(kind, k, n, temperature=section.temperature, ess_threshold=ess, budget=tags[name]),
                      budget, steps, samples, cost) for kind, k, n, ess in family]
        out += [match(Method("best-of-N", particles=n, budget=tags[name]), budget, steps, samples, cost)
                for n in BEST_OF[section.methods][name]]
        if section.methods == "all":
            out.append(match(Method("plain ODE", budget=tags[name]), budget, steps, samples, cost))
    return out


def run_method(method: Method, ctx: Context) -> Batch:
    """Sample one image per prompt with `method` (same start noise and seed for every method)."""
    if method.kind in ("plain ODE", "plain SDE"):
        level = 0.0 if method.kind == "plain ODE" else ctx.noise_level
        return generate(ctx.generator, ctx.text, ctx.prompts, ctx.noise, method.scale, level, ctx.seed + 1,
                        cfg_scale=ctx.cfg_scale, chunk=VELOCITY_ROWS)
    if method.kind == "best-of-N":
        return best_of_n(ctx.generator, ctx.text, ctx.drm, ctx.prompts, method.particles, method.scale, 0.0,
                         ctx.seed + 2, ctx.cfg_scale, chunk=VELOCITY_ROWS)
    return generate(ctx.generator, ctx.text, ctx.prompts, ctx.noise, ctx.steps, ctx.noise_level, ctx.seed + 1,
                    drm=ctx.drm, cfg_scale=ctx.cfg_scale, chunk=chunk_of(method), **_sampler_options(method, ctx.steps))


def search_experiment(generator: SD3Transformer2DModel, drm: DRM, text: ToyTextEncoder, reward: GroundTruthReward,
                      section: SearchSection, steps: int, noise_level: float, cfg_scale: float,
                      drm_name: str = "shallow", cost: CostModel | None = None) -> dict:
    """Every method at both budgets over `section.seeds`: rows {method, params, drm, seed, gt, gt_se, seconds,
    time_ratio, ...} per seed, the same pooled over seeds, and the cost model that matched the budgets (calibrated
    here unless given: pass another run's to get the same methods, e.g. for a DRM of the same architecture)."""
    drm = copy.deepcopy(drm).to(DTYPES[section.drm_dtype]) if section.drm_dtype != "float32" else drm
    prompts = torch.arange(N_CLASSES).repeat_interleave(section.samples_per_prompt)
    if cost is None:
        cost = calibrate(_context(generator, drm, text, prompts, steps, noise_level, cfg_scale, section.seeds[0]))
    methods = methods_for(section, steps, len(prompts), cost)
    log.info("search: %d methods x %d seeds x %d rounds on %d samples; cost model (rows: ms per row) generator %s, "
             "DRM %s", len(methods), len(section.seeds), section.repeats, len(prompts), _ms(cost.generator),
             _ms(cost.drm))
    rows, samples = [], {}
    for seed in section.seeds:
        ctx = _context(generator, drm, text, prompts, steps, noise_level, cfg_scale, seed)
        gt, times = _measure(methods, ctx, reward, max(section.repeats, 1))
        default = methods[2]
        for m in methods:
            diff = gt[m] - gt[default]
            rows.append({"method": m.kind, "params": m.params(), "budget": m.budget, "drm": drm_name, "seed": seed,
                         "default": m == default,
                         "gt": float(gt[m].mean()), "gt_se": _sem(gt[m]), "delta_vs_default": float(diff.mean()),
                         "delta_se": _sem(diff), "seconds": times[m]["cpu"], "wall_seconds": times[m]["wall"],
                         "time_ratio": times[m]["time_ratio"], "wall_ratio": times[m]["wall_ratio"],
                         "predicted_ratio": predicted_ratio(m, steps, len(prompts), cost)})
            samples[f"{m.kind} | {m.params()} | {m.budget} | seed {seed}"] = [round(v, 5) for v in gt[m].tolist()]
    return {"rows": rows, "pooled": pool(rows), "samples": samples, "n_samples": len(prompts),
            "seeds": list(section.seeds), "drm_dtype": section.drm_dtype, "config": asdict(section),
            "cost_model_ms_per_row": {"generator": _ms(cost.generator), "drm": _ms(cost.drm)}}


def versus_reference(result: dict, reference: dict) -> None:
    """Add to every row of `result` (and its pooled rows) its paired ground-truth difference to `reference`'s default
    on the same seed (same prompts and start noise: the two runs' samples pair up): `delta_vs_reference` +-
    `delta_ref_se`."""
    def key(r: dict) -> str:
        return f"{r['method']} | {r['params']} | {r['budget']} | seed {r['seed']}"

    defaults = {r["seed"]: torch.tensor(reference["samples"][key(r)]) for r in reference["rows"] if r["default"]}
    for r in result["rows"]:
        diff = torch.tensor(result["samples"][key(r)]) - defaults[r["seed"]]
        r["delta_vs_reference"], r["delta_ref_se"] = float(diff.mean()), _sem(diff)
    result["pooled"] = pool(result["rows"])


def _measure(methods: list[Method], ctx: Context, reward: GroundTruthReward, repeats: int,
             ) -> tuple[dict[Method, Tensor], dict[Method, dict[str, float]]]:
    """Per-sample ground truth (first round) and, per method, the median over rounds of its CPU and wall seconds and
    of their ratios to the mean of the plain SDE runs just before and after it; methods[0] is plain SDE."""
    gt: dict[Method, Tensor] = {}
    times: dict[Method, list[dict[str, float]]] = {m: [] for m in methods}
    for _ in range(repeats):
        batch, before = _timed(methods[0], ctx)
        gt.setdefault(methods[0], reward(decode_model_space(batch.latents), batch.prompts))
        times[methods[0]].append({**before, "time_ratio": 1.0, "wall_ratio": 1.0})
        for m in methods[1:]:
            batch, spent = _timed(m, ctx)
            _, after = _timed(methods[0], ctx)
            times[m].append({**spent, "time_ratio": spent["cpu"] * 2 / (before["cpu"] + after["cpu"]),
                             "wall_ratio": spent["wall"] * 2 / (before["wall"] + after["wall"])})
            if m not in gt:  # the samples repeat exactly in every round; only the time varies
                gt[m] = reward(decode_model_space(batch.latents), batch.prompts)
                log.info("search seed %d: %s, %s (%s): gt %.3f, %.2fx plain SDE (wall %.2fx)", ctx.seed, m.kind,
                         m.params(), m.budget, float(gt[m].mean()), times[m][-1]["time_ratio"],
                         times[m][-1]["wall_ratio"])
            before = after
    return gt, {m: {key: statistics.median(t[key] for t in v) for key in v[0]} for m, v in times.items()}


def _timed(method: Method, ctx: Context) -> tuple[Batch, dict[str, float]]:
    """One run of `method` with its CPU and wall seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    batch = run_method(method, ctx)
    return batch, {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}


def _ms(table: tuple[tuple[int, float], ...]) -> dict[str, float]:
    return {str(r): round(t * 1e3, 4) for r, t in table}


def _context(generator, drm, text, prompts, steps, noise_level, cfg_scale, seed) -> Context:
    """The run's start noise [N, 16, 4, 4] drawn from `seed`, shared by every method."""
    noise = torch.randn((len(prompts), 16, 4, 4), generator=torch.Generator().manual_seed(seed + 1000))
    return Context(generator, drm, text, prompts, noise, steps, noise_level, cfg_scale, seed)


def _sem(x: Tensor) -> float:
    return float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def pool(rows: list[dict]) -> list[dict]:
    """Per method: the mean over seeds of gt, delta and time ratio; standard errors combined as
    sqrt(sum se^2) / n_seeds (the seeds' samples are independent)."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["method"], r["params"], r["budget"], r["drm"]), []).append(r)
    pooled = []
    for (method, params, budget, drm), group in out.items():
        n = len(group)
        pooled.append({"method": method, "params": params, "budget": budget, "drm": drm, "seed": "mean",
                       "gt": sum(r["gt"] for r in group) / n,
                       "gt_se": math.sqrt(sum(r["gt_se"] ** 2 for r in group)) / n,
                       "delta_vs_default": sum(r["delta_vs_default"] for r in group) / n,
                       "delta_se": math.sqrt(sum(r["delta_se"] ** 2 for r in group)) / n,
                       "seconds": sum(r["seconds"] for r in group) / n,
                       "time_ratio": sum(r["time_ratio"] for r in group) / n,
                       "wall_ratio": sum(r.get("wall_ratio", r["time_ratio"]) for r in group) / n,
                       "predicted_ratio": group[0]["predicted_ratio"],
                       **({"delta_vs_reference": sum(r["delta_vs_reference"] for r in group) / n,
                           "delta_ref_se": math.sqrt(sum(r["delta_ref_se"] ** 2 for r in group)) / n}
                          if "delta_vs_reference" in group[0] else {})})
    return pooled


def table(result: dict) -> list[str]:
    """Markdown table: pooled rows (mean over seeds), then each seed's gt and CPU-time ratio."""
    seeds = result["seeds"]
    per_seed = {(r["method"], r["params"], r["budget"], r["seed"]): r for r in result["rows"]}
    versus = "delta_vs_reference" in result["pooled"][0] and any(r["delta_ref_se"] for r in result["pooled"])
    head = ("| budget | method | params | gt +- se | vs. default (paired) | " +
            ("vs. reference DRM's default | " if versus else "") + "time | wall | model | " +
            " | ".join(f"seed {s}: gt, time" for s in seeds) + " |")
    lines = [head, "|" + "---|" * (8 + versus + len(seeds))]
    for r in result["pooled"]:
        cells = [per_seed[(r["method"], r["params"], r["budget"], s)] for s in seeds]
        delta = "" if r["delta_se"] == 0 else f"{r['delta_vs_default']:+.3f} +- {r['delta_se']:.3f}"
        ref = f"{r['delta_vs_reference']:+.3f} +- {r['delta_ref_se']:.3f} | " if versus else ""
        lines.append(f"| {r['budget']} | {r['method']} | {r['params']} | {r['gt']:.3f} +- {r['gt_se']:.3f} | "
                     f"{delta} | {ref}{r['time_ratio']:.2f}x | {r['wall_ratio']:.2f}x | "
                     f"{r['predicted_ratio']:.2f}x | " +
                     " | ".join(f"{c['gt']:.3f} +- {c['gt_se']:.3f}, {c['time_ratio']:.2f}x" for c in cells) + " |")
    return lines


@torch.inference_mode()
def choice_agreement(generator: SD3Transformer2DModel, drm: DRM, text: ToyTextEncoder, reward: GroundTruthReward,
                     samples_per_prompt: int, steps: int, noise_level: float, cfg_scale: float, k: int = DEFAULT_K,
                     seed: int = 0) -> list[dict]:
    """Per scored step of argmax sampling on every step: how often the DRM's pick among the k candidates is the one
    whose ODE completion has the best ground truth, and the ground truth it gains over a random candidate as a
    fraction of the best candidate's gain (1: oracle, 0: random)."""
    prompts = torch.arange(N_CLASSES).repeat_interleave(samples_per_prompt)
    context, pooled = text(prompts)
    null = text(torch.tensor([NULL_PROMPT]))
    many = prompts.repeat_interleave(k)
    complete = velocity_fn(generator, *text(many), cfg_scale, null)
    sigmas = flow_sigmas(steps)
    score = reward_fn(drm, context, pooled, k)
    out = []

    def judged(candidates: Tensor, sigma: Tensor) -> Tensor:
        s = score(candidates, sigma)
        x0 = sde_sample(complete, candidates, sigmas[len(out) + 1:], 0.0)  # call j scores step j's children
        gt = reward(decode_model_space(x0), many).view(-1, k)
        pick = s.view(-1, k).argmax(1)
        rows = torch.arange(len(gt))
        gained, best = gt[rows, pick] - gt.mean(1), gt.max(1).values - gt.mean(1)
        out.append({"sigma": float(sigma), "agreement": float((pick == gt.argmax(1)).float().mean()),
                    "chance": 1 / k, "gain_fraction": float(gained.mean() / best.mean()),
                    "spearman": _mean_rank_correlation(s.view(-1, k), gt)})
        return s

    noise = torch.randn((len(prompts), 16, 4, 4), generator=torch.Generator().manual_seed(seed + 1000))
    stepwise_sample(velocity_fn(generator, context, pooled, cfg_scale, null), judged, noise, sigmas, k=k,
                    noise_level=noise_level, generator=torch.Generator().manual_seed(seed + 1))
    return out


def _mean_rank_correlation(a: Tensor, b: Tensor) -> float:
    """Mean over rows of the Spearman correlation of a [R, k] and b [R, k] (ties broken by order)."""
    ra, rb = (t.argsort(1).argsort(1).float() for t in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return float(((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean())


def load_world(work: Path, config_path: Path | None, overrides: list[str]):
    """The demo's trained generator and DRMs from `work` (no retraining) and its resolved config."""
    from .demo import DemoConfig
    from ..config import load_config

    config = load_config(DemoConfig, config_path, overrides)
    generator = SD3Transformer2DModel.from_pretrained(work / "generator").eval()
    drms = {name: load_drm(work / f"drm_{name}" / "drm.safetensors") for name in ("shallow", "base")
            if (work / f"drm_{name}" / "drm.safetensors").exists()}
    return config, generator, drms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.toy.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="the demo's work folder (generator/, drm_shallow/, drm_base/)")
    parser.add_argument("--out", required=True, help="output folder for search.json and search.md")
    parser.add_argument("--config", default=None, help="the demo's config.resolved.toml (default: next to --work)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    try:
        return _run(Path(args.work), Path(args.out), args.config, args.overrides)
    except DRMError as err:
        log.error("%s", err)
        return 2


def _run(work: Path, out: Path, config_file: str | None, overrides: list[str]) -> int:
    """Load the demo's models, train the value DRM (if asked), run the agreement (if asked) and the search for each
    DRM, write search.json and search.md."""
    config_path = Path(config_file) if config_file else work.parent / "config.resolved.toml"
    config, generator, drms = load_world(work, config_path if config_path.exists() else None, overrides)
    s, w = config.search, config.world
    if s.drm not in drms:
        log.error("search.drm %r: no %s (have %s)", s.drm, work / f"drm_{s.drm}" / "drm.safetensors", sorted(drms))
        return 2
    images, labels = load_digits()
    reward, text = GroundTruthReward(images, labels), ToyTextEncoder(w.seed)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    judges = {s.drm: drms[s.drm]}
    result: dict = {}
    if s.value_steps:
        tick = time.perf_counter()
        path = train_value_drm(work, config, text)
        judges[f"{s.drm}+value"] = load_drm(path)
        result["value_training"] = {"drm": str(path), "seconds": time.perf_counter() - tick,
                                    "eval": judges[f"{s.drm}+value"].provenance.get("eval_accuracy", {})}
    if s.agreement_samples:
        result["agreement"] = [{"drm": name, **row} for name, drm in judges.items()
                               for row in choice_agreement(generator, drm, text, reward, s.agreement_samples, w.steps,
                                                           w.noise_level, w.cfg_scale)]
        (out / "search.json").write_text(json.dumps(result, indent=2))
    prompts = torch.arange(N_CLASSES).repeat_interleave(s.samples_per_prompt)
    cost = calibrate(_context(generator, drms[s.drm], text, prompts, w.steps, w.noise_level, w.cfg_scale, s.seeds[0]))
    runs = {name: search_experiment(generator, drm, text, reward, s, w.steps, w.noise_level, w.cfg_scale, name, cost)
            for name, drm in judges.items()}
    for name, run in runs.items():
        versus_reference(run, runs[s.drm])
    result.update(runs[s.drm])
    result["by_drm"] = {name: run for name, run in runs.items() if name != s.drm}
    result["rows"] = [r for run in runs.values() for r in run["rows"]]
    result["pooled"] = [r for run in runs.values() for r in run["pooled"]]
    result["seconds"] = time.perf_counter() - start
    (out / "search.json").write_text(json.dumps(result, indent=2))
    lines = [line for name, run in runs.items() for line in ([f"### DRM: {name}", ""] + table(run) + [""])]
    (out / "search.md").write_text("\n".join(lines + _agreement_table(result.get("agreement", []))) + "\n")
    log.info("search done in %.0f s: %s", result["seconds"], out / "search.md")
    return 0


def train_value_drm(work: Path, config, text: ToyTextEncoder, cfg_scale: float | None = None) -> Path:
    """`train-drm` in value mode (training/value.py) on the toy generator's rollouts at `cfg_scale` (default: the
    world's), continuing the search DRM: the same code path as SD3.5. Resumes (or reuses) work/drm_<name>_value
    (..._value_cfg<scale> for another CFG scale)."""
    from safetensors.torch import save_file

    from ..grpo_inputs import EMBEDDINGS_FILE, PromptSection
    from ..train_drm import DataSection, ModelSection, TrainDRMConfig, TrainSection, train
    from ..value import ValueSection

    s, w = config.search, config.world
    cfg_scale = w.cfg_scale if cfg_scale is None else cfg_scale
    out = work / (f"drm_{s.drm}_value" + ("" if cfg_scale == w.cfg_scale else f"_cfg{cfg_scale:g}"))
    if (out / "drm.safetensors").exists():
        log.info("value DRM: reusing %s", out / "drm.safetensors")
        return out / "drm.safetensors"
    if s.value_teacher not in ("self", "base"):
        raise DRMError(f"search.value_teacher must be self or base, got {s.value_teacher!r}")
    prompts = work / "value_prompts"
    prompts.mkdir(exist_ok=True)
    context, pooled = text(torch.arange(N_CLASSES))
    null_context, null_pooled = text(torch.tensor([NULL_PROMPT]))
    negative = PromptSection().negative  # stands for the toy's null prompt, whose conditioning is zero
    save_file({"context": context.contiguous(), "pooled": pooled.contiguous(), "negative_context": null_context,
               "negative_pooled": null_pooled}, prompts / EMBEDDINGS_FILE, {"negative": negative})
    student = work / f"drm_{s.drm}" / "drm.safetensors"
    teacher = student if s.value_teacher == "self" else work / "drm_base" / "drm.safetensors"
    steps = s.value_steps
    run = TrainDRMConfig(
        out=str(out), model=ModelSection(init="drm", base=str(student)),
        data=DataSection(eval_cache=str(work / "cache_eval") if (work / "cache_eval").exists() else "",
                         eval_limit=500, in_memory=True),
        train=TrainSection(steps=steps, batch_size=s.value_batch, lr=s.value_lr, seed=w.seed,
                           eval_every=max(steps // 3, 1), eval_noise_draws=1, checkpoint_every=max(steps // 4, 1),
                           keep_checkpoints=1, log_every=20),
        value=ValueSection(generator=str(work / "generator"), teacher=str(teacher), steps=s.value_rollout_steps,
                           cfg_scale=cfg_scale, noise_level=w.noise_level, completion=s.value_completion,
                           resolution=32, eval_pairs_per_step=0),
        prompts=PromptSection(cache=str(prompts), eval_prompts=0))
    log.info("value DRM: %d steps x %d sibling pairs from %s, teacher %s", steps, s.value_batch, student, teacher)
    return train(run, resume="latest" if (out / "checkpoints").exists() else None)


def _agreement_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    return (["", "| DRM | sigma | DRM pick = best completion | chance | gain fraction | Spearman |",
             "|---|---|---|---|---|---|"]
            + [f"| {r.get('drm', '')} | {r['sigma']:.3f} | {r['agreement']:.2f} | {r['chance']:.2f} | "
               f"{r['gain_fraction']:.2f} | {r['spearman']:.2f} |" for r in rows])


if __name__ == "__main__":
    raise SystemExit(main())
