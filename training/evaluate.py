"""Pairwise preference accuracy of a DRM per noise level (the paper's Table 2 shape)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from drm_core import DRM, add_noise, load_drm

from .cache_format import PreferenceCache

log = logging.getLogger(__name__)

DEFAULT_SIGMAS = (0.0, 0.25, 0.5, 0.75)


@torch.no_grad()
def pairwise_accuracy(drm: DRM, data: PreferenceCache, sigmas: Sequence[float] = DEFAULT_SIGMAS,
                      noise_draws: int = 1, batch_size: int = 64, seed: int = 1234,
                      device: torch.device | str = "cpu") -> dict[float, float]:
    """Fraction of pairs with s(winner) > s(loser) (ties count 1/2), both noised to the same sigma with
    independent noise, averaged over `noise_draws` draws (a fixed seed, so runs are comparable)."""
    was_training = drm.training
    drm.eval()
    generator = torch.Generator().manual_seed(seed)
    correct = {float(s): 0.0 for s in sigmas}
    total = 0
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        win, lose = batch["win"], batch["lose"]
        n = win.shape[0]
        context = torch.cat([batch["context"]] * 2).to(device)
        pooled = torch.cat([batch["pooled"]] * 2).to(device)
        for sigma in correct:
            draws = noise_draws if sigma > 0 else 1
            for _ in range(draws):
                noise = torch.randn((2 * n, *win.shape[1:]), generator=generator)
                x = add_noise(torch.cat([win, lose]), noise, sigma).to(device)
                scores = drm.score(x, sigma, context, pooled).view(2, n)
                diff = scores[0] - scores[1]
                correct[sigma] += ((diff > 0).float() + 0.5 * (diff == 0).float()).sum().item() / draws
        total += n
    drm.train(was_training)
    return {s: c / max(total, 1) for s, c in correct.items()}


def format_table(acc: dict[float, float], title: str = "pairwise accuracy") -> str:
    head = "| sigma | " + " | ".join(f"{s:g}" for s in acc) + " |"
    rule = "|---|" + "---|" * len(acc)
    row = f"| {title} | " + " | ".join(f"{a:.3f}" for a in acc.values()) + " |"
    return "\n".join([head, rule, row])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drm", required=True, help="DRM .safetensors file")
    parser.add_argument("--cache", required=True, help="preference cache folder (from `cache`) with held-out pairs")
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS))
    parser.add_argument("--noise-draws", type=int, default=4, help="noise draws averaged per pair at sigma > 0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")


def run(args: argparse.Namespace) -> int:
    drm = load_drm(args.drm, device=args.device)
    data = PreferenceCache(args.cache)
    if args.limit:
        data = data.subset(torch.arange(min(args.limit, len(data))))
    acc = pairwise_accuracy(drm, data, args.sigmas, args.noise_draws, args.batch_size, device=args.device)
    table = format_table(acc, Path(args.drm).name)
    log.info("pairwise accuracy on %d pairs of %s\n%s", len(data), args.cache, table)
    print(table)  # the command's result, for the user's terminal
    if args.json:
        Path(args.json).write_text(json.dumps({"drm": args.drm, "cache": args.cache, "pairs": len(data),
                                               "accuracy": {str(k): v for k, v in acc.items()}}, indent=2))
    return 0
