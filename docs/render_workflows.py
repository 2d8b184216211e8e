"""Draw each UI-format workflow in workflows/ as a PNG thumbnail for the README (docs/img/).

    python docs/render_workflows.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"DRM": "#2d6a4f", "default": "#3a3f4b"}


def render(workflow: Path, out: Path) -> None:
    data = json.loads(workflow.read_text())
    nodes = {n["id"]: n for n in data["nodes"]}
    fig, ax = plt.subplots(figsize=(12, 5.5))
    ax.set_facecolor("#202124")
    for n in nodes.values():
        (x, y), (w, h) = n["pos"], n.get("size", [300, 100])
        ours = n["type"].startswith("DRM")
        ax.add_patch(FancyBboxPatch((x, -y - h), w, h, boxstyle="round,pad=4",
                                    fc=COLORS["DRM"] if ours else COLORS["default"], ec="#9aa0a6", lw=0.8))
        ax.text(x + 8, -y - 18, n.get("title") or n["type"], color="white", fontsize=7, va="top",
                fontweight="bold" if ours else "normal")
    for _, src, _, dst, _, kind in data["links"]:
        a, b = nodes[src], nodes[dst]
        x0, y0 = a["pos"][0] + a.get("size", [300])[0], -a["pos"][1] - 30
        x1, y1 = b["pos"][0], -b["pos"][1] - 30
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color="#8ab4f8", lw=0.7,
                                                             connectionstyle="arc3,rad=0.1"))
    xs = [n["pos"][0] for n in nodes.values()] + [n["pos"][0] + n.get("size", [300])[0] for n in nodes.values()]
    ys = [-n["pos"][1] for n in nodes.values()] + [-n["pos"][1] - n.get("size", [0, 100])[1] for n in nodes.values()]
    ax.set_xlim(min(xs) - 40, max(xs) + 40)
    ax.set_ylim(min(ys) - 40, max(ys) + 40)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(workflow.stem, color="white", fontsize=10)
    fig.patch.set_facecolor("#202124")
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
    for wf in sorted((ROOT / "workflows").glob("*.json")):
        render(wf, ROOT / "docs" / "img" / f"{wf.stem}.png")
