"""Reward-trace plot of a step-wise sampling run, drawn with PIL (no matplotlib in a running ComfyUI)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..drm_core import StepRecord

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
BACKGROUND, INK, GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)


def trace_plot(trace: list[StepRecord], n_steps: int, width: int = 768, height: int = 480) -> np.ndarray:
    """[height, width, 3] uint8: chosen score (top) and best-minus-second margin (bottom) per branched step,
    one line per image of the batch, x axis = step index."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    branched = [r for r in trace if r.branched and r.score is not None]
    if not branched:
        draw.text((20, height // 2 - 10), "No branched steps (k = 1 or an empty branch range): nothing was scored.",
                  fill=INK, font=font)
        return np.array(image)
    steps = [r.step for r in branched]
    scores = np.stack([r.score.float().numpy() for r in branched], axis=1)  # [B, S]
    margins = np.stack([r.margin.float().numpy() for r in branched], axis=1)  # [B, S]
    half = height // 2
    _panel(draw, font, (0, 0, width, half), steps, scores, max(n_steps - 1, 1), "chosen DRM score per step")
    _panel(draw, font, (0, half, width, height), steps, margins, max(n_steps - 1, 1),
           "margin: best minus second-best candidate")
    if scores.shape[0] > 1:
        for b in range(min(scores.shape[0], len(COLORS))):
            draw.text((width - 72, 30 + 17 * b), f"image {b}", fill=COLORS[b], font=font)
    return np.array(image)


def trace_summary(trace: list[StepRecord]) -> str:
    """One line per image: how many steps branched, the last chosen score and the mean margin."""
    branched = [r for r in trace if r.branched and r.score is not None]
    if not branched:
        return "No branched steps (k = 1 or an empty branch range): nothing was scored."
    lines = [f"Branched {len(branched)} of {len(trace)} steps (sigma {branched[0].sigma:.3f} to "
             f"{branched[-1].sigma_next:.3f}); per image: last chosen score, mean best-minus-second margin"]
    for b in range(len(branched[0].score)):
        margin = sum(float(r.margin[b]) for r in branched) / len(branched)
        lines.append(f"  image {b}: {float(branched[-1].score[b]):+.4f}, margin {margin:.4f}")
    return "\n".join(lines)


def scores_plot(scores: list[float], kept: list[int] | None = None, width: int = 512, height: int = 240) -> np.ndarray:
    """[height, width, 3] uint8: one bar per batch item (batch order) from the lowest score; the best item, or
    the kept ones, in colour and labelled."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    highlight = set(kept) if kept is not None else {max(range(len(scores)), key=scores.__getitem__)}
    left, top, right, bottom = 56, 28, width - 12, height - 26
    lo, hi = min(scores), max(scores)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo - 0.1 * (hi - lo), hi + 0.15 * (hi - lo))
    title = "DRM scores, batch order" + (f" (kept {len(highlight)})" if kept is not None else " (best in colour)")
    draw.text((left, 6), title, fill=INK, font=font)
    for value in (lo, hi):
        y = bottom - (bottom - top) * (value - lo) / (hi - lo)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((4, y - 7), f"{value:+.3f}", fill=INK, font=font)
    slot = (right - left) / len(scores)
    for i, value in enumerate(scores):
        x0, x1 = left + i * slot + 0.15 * slot, left + (i + 1) * slot - 0.15 * slot
        y = bottom - (bottom - top) * (value - lo) / (hi - lo)
        draw.rectangle([x0, y, max(x1, x0 + 1), bottom], fill=COLORS[0] if i in highlight else GRID)
        if len(scores) <= 32:
            draw.text(((x0 + x1) / 2 - 6, bottom + 5), f"#{i}", fill=INK, font=font)
        if len(scores) <= 12:
            draw.text(((x0 + x1) / 2 - 20, max(y - 16, top + 2)), f"{value:+.3f}", fill=INK, font=font)
    draw.rectangle([left, top, right, bottom], outline=INK)
    return np.array(image)


def _panel(draw: ImageDraw.ImageDraw, font, box, steps: list[int], values: np.ndarray, last_step: int,
           title: str) -> None:
    left, top, right, bottom = box[0] + 64, box[1] + 26, box[2] - 80, box[3] - 30
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (right - left) * step / last_step, bottom - (bottom - top) * (value - lo) / (hi - lo))

    draw.text((left, box[1] + 6), title, fill=INK, font=font)
    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        y = xy(0, value)[1]
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((box[0] + 4, y - 6), f"{value:+.3f}", fill=INK, font=font)
    draw.rectangle([left, top, right, bottom], outline=INK)
    for step in sorted({0, last_step // 2, last_step}):
        x = xy(step, lo)[0]
        draw.text((x - 6, bottom + 4), str(step), fill=INK, font=font)
    draw.text((right + 6, bottom - 8), "step", fill=INK, font=font)
    for b, row in enumerate(values):
        color = COLORS[b % len(COLORS)]
        points = [xy(s, v) for s, v in zip(steps, row)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
