"""Screenshots of the shipped workflows as they open in the real ComfyUI frontend.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python docs/capture_workflows.py

writes workflows/<name>.jpg (the template browser's card picture, 700 px wide) and docs/img/<name>.png (the
README's pictures) for every workflows/*.json. It starts a headless ComfyUI (CPU) over a temporary folder whose
model files are empty placeholders with the names the workflows use (nothing runs, so no model is read and no
missing-models dialog opens), and drives the system Chromium with playwright (CHROMIUM_PATH or `chromium`; never
`playwright install`) in a 1440x810 window. The minimap, zoom controls and canvas statistics are hidden for the
pictures; the graph, its note and the view are exactly what a user gets on dropping the file.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import comfy_env  # noqa: E402  (tests/ helpers: the headless server and the browser)
import frontend_env  # noqa: E402

log = logging.getLogger("capture_workflows")

CANVAS = (40, 78, 1400, 732)  # x, y, width, height of the graph below frontend 1.27's side bar, top bar and tabs
THUMBNAIL_WIDTH, JPEG_QUALITY = 700, 85
PICTURE_SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasMenu": False, "Comfy.Graph.CanvasInfo": False}


def write_placeholders(models: Path) -> None:
    """Empty files (and the DRM folder) under every name the workflows load, so the frontend finds them all."""
    for path in frontend_env.workflow_paths():
        ui = json.loads(path.read_text())
        for model in frontend_env.models_listed(ui):
            (models / model["directory"]).mkdir(parents=True, exist_ok=True)
            (models / model["directory"] / model["name"]).touch()
        for node in ui["nodes"]:
            if node["type"] == "DRMLoader":
                (models / "drm" / node["widgets_values"][0]).mkdir(parents=True, exist_ok=True)
            elif node["type"] == "LoraLoaderModelOnly":
                (models / "loras").mkdir(parents=True, exist_ok=True)
                (models / "loras" / node["widgets_values"][0]).touch()


def capture(ui: frontend_env.Frontend, path: Path, thumbnail: Path, picture: Path) -> None:
    """Drop one workflow on the canvas and save its thumbnail (JPEG) and README picture (PNG)."""
    from PIL import Image

    ui.drop(path)
    ui.page.wait_for_timeout(1500)  # DOM widgets (the note, the prompts) settle after the first frames
    if ui.dialogs():
        raise RuntimeError(f"{path.name}: the frontend opened {ui.dialogs()} on load")
    hidden, clipped = ui.hidden_nodes(), ui.clipped_notes()
    if hidden or clipped:
        raise RuntimeError(f"{path.name}: nodes not fully in view: {hidden}; notes that need scrolling: {clipped}")
    x, y, w, h = CANVAS
    shot = Image.open(io.BytesIO(ui.page.screenshot(clip={"x": x, "y": y, "width": w, "height": h}))).convert("RGB")
    shot.save(picture, optimize=True)
    small = shot.resize((THUMBNAIL_WIDTH, round(h * THUMBNAIL_WIDTH / w)), Image.LANCZOS)
    small.save(thumbnail, quality=JPEG_QUALITY, optimize=True, progressive=True)
    log.info("%s: %s (%d KB), %s (%d KB)", path.stem, thumbnail.relative_to(ROOT), thumbnail.stat().st_size // 1024,
             picture.relative_to(ROOT), picture.stat().st_size // 1024)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: every workflows/*.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfyui, why = comfy_env.find_comfyui()
    chromium, no_browser = frontend_env.find_browser()
    if comfyui is None or chromium is None:
        sys.exit(why or no_browser)
    paths = [frontend_env.workflow_path(n) for n in args.names] or frontend_env.workflow_paths()
    (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="drm-capture-") as base:
        write_placeholders(Path(base) / "models")
        server = comfy_env.ComfyServer(comfyui, Path(base))
        try:
            server.wait_ready()
            for key, value in PICTURE_SETTINGS.items():
                frontend_env.post_setting(server.url, key, value)
            with frontend_env.frontend(server.url, chromium) as ui:
                for path in paths:
                    capture(ui, path, path.with_suffix(".jpg"), ROOT / "docs" / "img" / f"{path.stem}.png")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
