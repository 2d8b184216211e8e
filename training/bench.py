"""`bench`: step-wise guidance against its FLOP-model bound, side by side in one run.

For each size, a generator and a DRM with SD3.5-M's proportions (the DRM keeps depth - depth/8 of the
generator's blocks, as 21 of 24; CFG on) are timed for plain sampling and step-wise sampling at each
k. overhead = time(k) / time(plain), median over interleaved rounds; bound = 1 + k * F_drm / (2 * F_gen) with F measured by
torch's FLOP counter for one latent. Also: DRM training throughput with cached latents vs encoding
on the fly, and seconds per optimisation step of Step-GRPO vs GRPO.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import time
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from drm_core import (DEFAULT_BRANCH_RANGE, DEFAULT_K, DEFAULT_PLAIN_NOISE_LEVEL, DRM, branch_mask, drm_from_base,
                      flow_sigmas, read_backbone_config, stepwise_sample)
from drm_core.keys import to_stability

from .memory_model import format_memory_table, memory_model

log = logging.getLogger(__name__)

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
"""diffusers config of SD3.5-Medium's MMDiT (for the FLOP model; no weights needed)."""

SIZES = {  # name: (blocks, heads, latent side, text tokens)
    "S": (8, 1, 16, 77),
    "M": (8, 2, 32, 154),
}


def make_models(blocks: int, heads: int, side: int, seed: int = 0) -> tuple[SD3Transformer2DModel, DRM]:
    torch.manual_seed(seed)
    gen = SD3Transformer2DModel(sample_size=side, patch_size=2, in_channels=16, num_layers=blocks,
                                attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=4096,
                                caption_projection_dim=64 * heads, pooled_projection_dim=2048, out_channels=16,
                                pos_embed_max_size=side, dual_attention_layers=tuple(range(blocks // 2)),
                                qk_norm="rms_norm").eval()
    kept = blocks - max(1, blocks // 8)
    drm = drm_from_base(gen.state_dict(), blocks=kept, conv_channels=(64, 128, 128), groups=32, mlp_hidden=128)
    return gen, drm.eval()


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved(runs: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of each run and its median ratio to runs["plain"] timed in the same round: every run once
    per round, after a warm-up round, so that slow phases of a shared machine hit all of them alike."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return ({name: statistics.median(t) for name, t in times.items()},
            {name: statistics.median(a / b for a, b in zip(t, times["plain"])) for name, t in times.items()})


@torch.inference_mode()
def bench_stepwise(size: str, ks: tuple[int, ...], steps: int, repeats: int,
                   dtype: torch.dtype) -> tuple[list[dict], dict]:
    """Rows per k (full range, as in the paper) and one row for the default branching, each with its bound."""
    blocks, heads, side, tokens = SIZES[size]
    gen, drm = make_models(blocks, heads, side)
    gen, drm = gen.to(dtype), drm.to(dtype)
    ctx, pooled = torch.randn(1, tokens, 4096, dtype=dtype), torch.randn(1, 2048, dtype=dtype)
    x = torch.randn(1, 16, side, side, dtype=dtype)
    ctx2, pooled2 = torch.cat([torch.zeros_like(ctx), ctx]), torch.cat([torch.zeros_like(pooled), pooled])

    def velocity(z, sigma):  # CFG 4.5: one batched call on [uncond, cond]
        t = torch.full((2,), float(sigma) * 1000, dtype=dtype)
        v = gen(torch.cat([z, z]), ctx2, pooled2, t).sample
        return v[:1] + 4.5 * (v[1:] - v[:1])

    prompt = drm.embed_prompt(ctx, pooled)  # once per run, as the samplers do

    def reward(c, sigma):
        return drm(c, torch.full((c.shape[0],), float(sigma)), prompt.rows(c.shape[0]))

    def reward_uncached(c, sigma):  # re-embeds the prompt for every candidate at every step
        return drm(c, torch.full((c.shape[0],), float(sigma)), ctx.expand(c.shape[0], -1, -1),
                   pooled.expand(c.shape[0], -1))

    f_gen = flops(lambda: gen(x, ctx, pooled, torch.tensor([500.0], dtype=dtype)))
    f_drm = flops(lambda: drm(x, torch.tensor([0.5]), ctx, pooled))
    sigmas = flow_sigmas(steps)

    def sample(k, scorer=reward, **branching):
        return lambda: stepwise_sample(velocity, scorer, x, sigmas, k, 0.7, torch.Generator().manual_seed(0),
                                       **branching)

    default = dict(branch_range=DEFAULT_BRANCH_RANGE, plain_noise_level=DEFAULT_PLAIN_NOISE_LEVEL)
    runs = {"plain": sample(1), "default": sample(DEFAULT_K, **default)}
    for k in ks:
        if k > 1:
            runs[f"k{k}"], runs[f"k{k} uncached"] = sample(k), sample(k, reward_uncached)
    seconds, overhead = _interleaved(runs, repeats)
    branched = sum(branch_mask(steps, DEFAULT_BRANCH_RANGE)[:-1])  # the last step never branches
    default_row = {"size": size, "tokens": (side // 2) ** 2, "k": DEFAULT_K, "branch_range": list(DEFAULT_BRANCH_RANGE),
                   "plain_noise_level": DEFAULT_PLAIN_NOISE_LEVEL, "seconds": seconds["default"],
                   "overhead": overhead["default"], "bound": 1 + DEFAULT_K * f_drm * branched / (2 * f_gen * steps)}
    default_row["gap"] = default_row["overhead"] / default_row["bound"] - 1
    log.info("size %s default: overhead %.2fx bound %.2fx", size, default_row["overhead"], default_row["bound"])
    rows = []
    for k in ks:
        name = "plain" if k == 1 else f"k{k}"
        # the last step lands on x0 without branching: steps - 1 scored steps out of `steps`
        bound = 1 + k * f_drm * (steps - 1) / (2 * f_gen * steps) if k > 1 else 1.0
        rows.append({"size": size, "k": k, "seconds": seconds[name], "overhead": overhead[name], "bound": bound,
                     "overhead_prompt_per_call": overhead["plain" if k == 1 else f"k{k} uncached"],
                     "gap": overhead[name] / bound - 1, "drm_to_generator_flops": f_drm / f_gen,
                     "tokens": (side // 2) ** 2, "blocks": blocks, "hidden": 64 * heads,
                     "dtype": str(dtype).replace("torch.", "")})
        log.info("size %s k %d: %.3fs overhead %.2fx bound %.2fx", size, k, seconds[name], overhead[name], bound)
    return rows, default_row


def sd35m_flop_model(steps: int = 40, depths: tuple[int, ...] = (21, 12, 6),
                     sizes_px: tuple[int, ...] = (512, 1024)) -> list[dict]:
    """FLOP-model cost of step-wise sampling on full-size SD3.5-M (meta tensors: shapes only, nothing allocated):
    DRM / generator FLOPs per DRM depth, and 1 + sum over branched steps of k * F_drm / (2 * F_gen) / steps
    for k = 6 on every step (the paper) and for the default branching."""
    with torch.device("meta"):
        gen = SD3Transformer2DModel(**SD35_MEDIUM)
    full = read_backbone_config(gen.state_dict(), blocks=SD35_MEDIUM["num_layers"])[2]
    stability = {f"model.diffusion_model.{k}": v for k, v in to_stability(gen.state_dict(), full).items()}
    default_steps = sum(branch_mask(steps, DEFAULT_BRANCH_RANGE)[:-1])
    rows = []
    for px in sizes_px:
        x = torch.empty(1, 16, px // 8, px // 8, device="meta")
        context, pooled, t = (torch.empty(shape, device="meta") for shape in ((1, 154, 4096), (1, 2048), (1,)))
        f_gen = flops(lambda: gen(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                                  timestep=t))
        for depth in depths:
            drm = drm_from_base(stability, blocks=depth)
            ratio = flops(lambda: drm(x, t, drm.embed_prompt(context, pooled).rows(1))) / f_gen
            rows.append({"px": px, "drm_blocks": depth, "gen_tflops": f_gen / 1e12, "drm_to_generator_flops": ratio,
                         "k6_full_range": 1 + 6 * ratio * (steps - 1) / (2 * steps),
                         "default": 1 + DEFAULT_K * ratio * default_steps / (2 * steps), "steps": steps})
    return rows


def bench_grpo_iteration(repeats: int) -> dict:
    """Seconds per optimisation iteration: Step-GRPO vs GRPO, same prompts, group/k and steps (tiny model)."""
    from .grpo_core import Policy, policy_update, rollout_step_grpo, rollout_terminal
    from .lora import add_lora

    gen, drm = make_models(8, 1, 16)
    model = add_lora(gen, 8, 16.0)
    ctx, pooled = torch.randn(4, 77, 4096), torch.randn(4, 2048)
    policy = Policy(model, ctx, pooled, cfg_scale=4.5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reward = lambda z, s, rows: drm.score(z, s, ctx[rows], pooled[rows])  # noqa: E731
    sigmas, k, rows = flow_sigmas(6), 4, torch.arange(4)

    def step_iteration():
        g = torch.Generator().manual_seed(0)
        _, tr = rollout_step_grpo(policy, reward, torch.randn(4, 16, 16, 16, generator=g), rows, sigmas, k, 0.7, g)
        policy_update(policy, tr, opt, 0.7, 1e-4, 0.0, 1.0)

    def terminal_iteration():
        g = torch.Generator().manual_seed(0)
        r = rows.repeat_interleave(k)
        _, _, tr = rollout_terminal(policy, reward, torch.randn(16, 16, 16, 16, generator=g), r, sigmas, k, 0.7, g)
        policy_update(policy, tr, opt, 0.7, 1e-4, 0.0, 1.0)

    t_step, t_term = _median_time(step_iteration, repeats), _median_time(terminal_iteration, repeats)
    return {"step_grpo_seconds": t_step, "grpo_seconds": t_term, "ratio": t_term / t_step,
            "prompts": 4, "group": k, "steps": 6}


def bench_drm_training(repeats: int) -> dict:
    """Pairs/s of one DRM training step from cached latents vs encoding 128 px images with a VAE on the fly."""
    from diffusers import AutoencoderKL

    gen, drm = make_models(8, 1, 16)
    drm.train()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64, 64, 64),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1).eval()
    opt = torch.optim.AdamW([p for p in drm.parameters() if p.requires_grad], lr=1e-5)
    pairs = 4
    ctx, pooled = torch.randn(2 * pairs, 77, 4096), torch.randn(2 * pairs, 2048)
    latents = torch.randn(2 * pairs, 16, 16, 16)
    images = torch.rand(2 * pairs, 3, 128, 128) * 2 - 1

    def train_step(z):
        s = drm(z, torch.rand(2 * pairs), ctx, pooled)
        loss = -torch.nn.functional.logsigmoid(s[:pairs] - s[pairs:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def on_the_fly():
        with torch.no_grad():
            z = vae.encode(images).latent_dist.sample()
        train_step(z)

    cached = _median_time(lambda: train_step(latents), repeats)
    fly = _median_time(on_the_fly, repeats)
    return {"pairs_per_second_cached": pairs / cached, "pairs_per_second_on_the_fly": pairs / fly,
            "speedup": fly / cached, "image_px": 128}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench_out", help="folder for bench.json")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 6])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one small size, few repeats (for tests)")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.sizes, args.steps, args.repeats = ["S"], 4, 1
    torch.manual_seed(0)
    per_size = [bench_stepwise(size, tuple(args.ks), args.steps, args.repeats, torch.float32) for size in args.sizes]
    result = {"stepwise": [r for rows, _ in per_size for r in rows],
              "stepwise_default": [default for _, default in per_size],
              "sd35m_flop_model": sd35m_flop_model(**({"depths": (21,), "sizes_px": (512,)} if args.quick else {})),
              "grpo_iteration": bench_grpo_iteration(args.repeats),
              "drm_training": bench_drm_training(args.repeats),
              "memory_model": memory_model(quick=args.quick),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"wrote {out / 'bench.json'}")
    return 0


def format_table(result: dict) -> str:
    lines = ["| size | tokens | k | seconds | overhead | FLOP bound | gap | prompt re-embedded per call |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["stepwise"]:
        lines.append(f"| {r['size']} | {r['tokens']} | {r['k']} | {r['seconds']:.3f} | {r['overhead']:.2f}x | "
                     f"{r['bound']:.2f}x | {r['gap']:+.0%} | {r['overhead_prompt_per_call']:.2f}x |")
    for r in result.get("stepwise_default", []):
        after = "ODE" if r["plain_noise_level"] == 0 else "SDE"
        lines.append(f"| {r['size']} | {r['tokens']} | {r['k']}, default: steps {r['branch_range'][0]:g}-"
                     f"{r['branch_range'][1]:g}, {after} after | {r['seconds']:.3f} | {r['overhead']:.2f}x | "
                     f"{r['bound']:.2f}x | {r['gap']:+.0%} | |")
    if result.get("sd35m_flop_model"):
        lines += ["", "FLOP model on full-size SD3.5-M (CFG on, 40 steps):", "",
                  "| px | DRM blocks | DRM / generator FLOPs | k = 6, every step | default |", "|---|---|---|---|---|"]
        lines += [f"| {r['px']} | {r['drm_blocks']} | {r['drm_to_generator_flops']:.2f} | {r['k6_full_range']:.2f}x | "
                  f"{r['default']:.2f}x |" for r in result["sd35m_flop_model"]]
    if result.get("memory_model"):
        m = result["memory_model"]
        lines += ["", f"Memory model, SD3.5-M bf16 + DRM, ComfyUI step-wise sampling (GiB, incl. {m['overhead_gb']} GB "
                  "assumed CUDA/ComfyUI overhead; docs/memory.md):", "", format_memory_table(m["bf16"] + m["fp8_drm"])]
    g, d = result["grpo_iteration"], result["drm_training"]
    lines += ["", f"Step-GRPO {g['step_grpo_seconds']:.2f} s vs GRPO {g['grpo_seconds']:.2f} s per optimisation step "
              f"({g['ratio']:.1f}x), {g['prompts']} prompts x group {g['group']}, {g['steps']} steps",
              f"DRM training: {d['pairs_per_second_cached']:.1f} pairs/s from cached latents vs "
              f"{d['pairs_per_second_on_the_fly']:.1f} pairs/s encoding {d['image_px']} px images on the fly",
              f"peak RSS {result['peak_rss_mib']:.0f} MiB, {result['threads']} threads, torch {result['torch']}"]
    return "\n".join(lines)
