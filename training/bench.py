"""`bench`: step-wise guidance against its FLOP-model bound, side by side in one run.

For each size, a generator and a DRM with SD3.5-M's proportions (the DRM keeps depth - depth/8 of the
generator's blocks, as 21 of 24; CFG on) are timed for plain sampling and step-wise sampling at each
k. overhead = time(k) / time(plain); bound = 1 + k * F_drm / (2 * F_gen) with F measured by
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

from drm_core import DRM, drm_from_base, flow_sigmas, stepwise_sample

log = logging.getLogger(__name__)

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


@torch.inference_mode()
def bench_stepwise(size: str, ks: tuple[int, ...], steps: int, repeats: int, dtype: torch.dtype) -> list[dict]:
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

    def sample(k, scorer=reward):
        return lambda: stepwise_sample(velocity, scorer, x, sigmas, k, 0.7, torch.Generator().manual_seed(0))

    base = _median_time(sample(1), repeats)
    rows = []
    for k in ks:
        t = base if k == 1 else _median_time(sample(k), repeats)
        uncached = base if k == 1 else _median_time(sample(k, reward_uncached), repeats)
        # the last step lands on x0 without branching: steps - 1 scored steps out of `steps`
        bound = 1 + k * f_drm * (steps - 1) / (2 * f_gen * steps) if k > 1 else 1.0
        rows.append({"size": size, "k": k, "seconds": t, "overhead": t / base, "bound": bound,
                     "overhead_prompt_per_call": uncached / base,
                     "gap": t / base / bound - 1, "drm_to_generator_flops": f_drm / f_gen,
                     "tokens": (side // 2) ** 2, "blocks": blocks, "hidden": 64 * heads,
                     "dtype": str(dtype).replace("torch.", "")})
        log.info("size %s k %d: %.3fs overhead %.2fx bound %.2fx", size, k, t, t / base, bound)
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
    rows = [r for size in args.sizes for r in bench_stepwise(size, tuple(args.ks), args.steps, args.repeats,
                                                            torch.float32)]
    result = {"stepwise": rows, "grpo_iteration": bench_grpo_iteration(args.repeats),
              "drm_training": bench_drm_training(args.repeats),
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
    g, d = result["grpo_iteration"], result["drm_training"]
    lines += ["", f"Step-GRPO {g['step_grpo_seconds']:.2f} s vs GRPO {g['grpo_seconds']:.2f} s per optimisation step "
              f"({g['ratio']:.1f}x), {g['prompts']} prompts x group {g['group']}, {g['steps']} steps",
              f"DRM training: {d['pairs_per_second_cached']:.1f} pairs/s from cached latents vs "
              f"{d['pairs_per_second_on_the_fly']:.1f} pairs/s encoding {d['image_px']} px images on the fly",
              f"peak RSS {result['peak_rss_mib']:.0f} MiB, {result['threads']} threads, torch {result['torch']}"]
    return "\n".join(lines)
