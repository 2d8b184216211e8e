"""Test helper for the browser tests: the real ComfyUI frontend in headless Chromium, driven by playwright.

Nothing here imports playwright, torch or ComfyUI at module import time, so the main suite can import it and skip.
The browser is the system's Chromium (CHROMIUM_PATH, or `chromium` on PATH); playwright is only the driver (the
python package in ComfyUI's venv): never `playwright install`, which downloads browsers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from comfy_env import PACK_ROOT, WORKFLOWS

if TYPE_CHECKING:
    from playwright.sync_api import Page

WINDOW = (1440, 810)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MISSING_MODELS = "global-missing-models-warning"  # the dialog's key in the frontend (its aria-labelledby)


def find_browser() -> tuple[str | None, str]:
    """(Chromium executable or None, reason when None)."""
    if importlib.util.find_spec("playwright") is None:
        return None, ("playwright is not installed in this Python: `pip install playwright` in ComfyUI's venv (the "
                      "browser is the system Chromium; no `playwright install`)")
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not os.access(path, os.X_OK):
        return None, "no Chromium found: `apt-get install chromium` or set CHROMIUM_PATH"
    return path, ""


def write_models(comfyui: Path, models: Path) -> None:
    """comfy_env's tiny fixture models (generator, DRM, DiNa-LRM download, TAESD3, LoRA), written by a child Python."""
    # A child: ComfyUI's model_management picks its device on first import and must see --cpu before that; the test
    # process itself then never imports torch or ComfyUI.
    script = ("import sys; from pathlib import Path; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
              "from comfy.cli_args import args; args.cpu = True\n"
              "import comfy_env; comfy_env.write_models(Path(sys.argv[3]))\n")
    subprocess.run([sys.executable, "-c", script, str(comfyui), str(Path(__file__).parent), str(models)],
                   check=True, cwd=str(PACK_ROOT))


def post_setting(url: str, key: str, value) -> None:
    """Set one frontend setting on the server (stored per user, read by the page when it loads)."""
    request = urllib.request.Request(f"{url}/settings/{key}", data=json.dumps(value).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def models_listed(ui: dict) -> list[dict]:
    """Every `properties.models[]` entry of a UI-format workflow, in node order."""
    return [m for node in ui["nodes"] for m in node.get("properties", {}).get("models", [])]


# ------------------------------------------------------------------------------------------- the frontend

JS_DROP = """([text, name]) => {
    const data = new DataTransfer();
    data.items.add(new File([text], name, {type: "application/json"}));
    app.canvasEl.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
}"""

JS_DIALOGS = """() => [...document.querySelectorAll(".p-dialog")].map(d => d.getAttribute("aria-labelledby"))"""

JS_MISSING_MODELS = """() => [...document.querySelectorAll(".comfy-missing-models li")].map(li => ({
    label: li.querySelector("span[title]").textContent.trim(),
    url: li.querySelector("span[title]").title,
    errors: [...li.querySelectorAll(".p-message")].map(m => m.textContent.trim()),
    disabled: [...li.querySelectorAll("button")].filter(b => b.disabled).map(b => b.textContent.trim()),
}))"""

# Screen rectangle of every node (title bar included) and the points of it that something else covers: the tab
# bar, the minimap, the zoom controls, a dialog, or the window's edge. A node's own DOM widgets (text boxes, the
# note's markdown) are part of the node.
JS_HIDDEN_NODES = """() => {
    const el = app.canvas.canvas, ds = app.canvas.ds, box = el.getBoundingClientRect();
    const title = LiteGraph.NODE_TITLE_HEIGHT, hidden = [];
    for (const node of app.graph.nodes) {
        const left = box.left + (node.pos[0] + ds.offset[0]) * ds.scale;
        const top = box.top + (node.pos[1] - title + ds.offset[1]) * ds.scale;
        const width = node.size[0] * ds.scale, height = (node.size[1] + title) * ds.scale;
        const covered = [];
        for (const fx of [0, 0.25, 0.5, 0.75, 1]) for (const fy of [0, 0.25, 0.5, 0.75, 1]) {
            const x = left + 2 + fx * (width - 4), y = top + 2 + fy * (height - 4);
            const hit = document.elementFromPoint(x, y);
            if (hit === el || (hit && hit.closest(".dom-widget"))) continue;
            const what = hit ? `${hit.tagName}.${hit.className}` : "outside the window";
            covered.push(`(${Math.round(x)}, ${Math.round(y)}): ${what}`);
        }
        if (covered.length) hidden.push({title: node.title, covered});
    }
    return hidden;
}"""

# Notes whose rendered markdown does not fit in the node (the text would need scrolling).
JS_CLIPPED_NOTES = """() => app.graph.nodes.filter(n => n.type === "MarkdownNote").filter(n => {
    const text = n.widgets[0].element.querySelector(".tiptap");
    return !text || text.scrollHeight > text.clientHeight + 1;
}).map(n => n.title)"""

# The test-only rewiring for the tiny fixture models, done through the frontend's own graph API: the text encoders
# become DRMTestConditioning (random SD3-shaped CONDITIONING seeded by the prompt), the checkpoint becomes the tiny
# MMDiT (UNETLoader) plus TAESD3, images become small and runs short.
JS_USE_TINY_MODELS = """([size, steps]) => {
    const graph = app.graph;
    const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = [...pos]; graph.add(n); return n; };
    const widget = (n, name) => n.widgets.find(w => w.name === name);
    const rewire = (from, slot, to, toSlot) => {
        for (const id of [...(from.outputs[slot].links || [])]) {
            const link = graph.getLink(id);
            to.connect(toSlot, graph.getNodeById(link.target_id), link.target_slot);
        }
    };
    const ofType = type => graph.nodes.filter(n => n.type === type);
    for (const encode of ofType("CLIPTextEncode")) {
        const cond = add("DRMTestConditioning", encode.pos);
        widget(cond, "text").value = widget(encode, "text").value;
        rewire(encode, 0, cond, 0);
        graph.remove(encode);
    }
    for (const type of ["CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader"])
        for (const clip of ofType(type)) graph.remove(clip);
    for (const ckpt of ofType("CheckpointLoaderSimple")) {
        const unet = add("UNETLoader", ckpt.pos), vae = add("VAELoader", [ckpt.pos[0], ckpt.pos[1] + 100]);
        widget(unet, "unet_name").value = widget(ckpt, "ckpt_name").value;
        widget(vae, "vae_name").value = "taesd3";
        rewire(ckpt, 0, unet, 0);
        rewire(ckpt, 2, vae, 0);
        graph.remove(ckpt);
    }
    for (const n of graph.nodes) for (const w of n.widgets || []) {
        if (n.type === "EmptySD3LatentImage" && (w.name === "width" || w.name === "height")) w.value = size;
        if (w.name === "steps") w.value = steps;
    }
    graph.setDirtyCanvas(true, true);
}"""


class Frontend:
    """The ComfyUI frontend in one browser page: load workflows the way a user does, read its dialogs and graph."""

    def __init__(self, page: Page, url: str):
        self.page, self.url = page, url

    def open(self, timeout_ms: int = 120_000) -> None:
        """Load the app and wait until it knows the pack's nodes (the first load compiles a large bundle)."""
        self.page.goto(self.url)
        self.page.wait_for_function("() => window.app && app.graph && window.LiteGraph && "
                                    "LiteGraph.registered_node_types.DRMLoader && app.canvas", timeout=timeout_ms)
        self.page.wait_for_timeout(500)

    def drop(self, path: Path) -> None:
        """Drop a workflow file on the canvas (the frontend's drag-and-drop handler loads it)."""
        self.page.evaluate("() => app.graph.clear()")  # so the wait below sees the new graph, not the old one
        self.page.evaluate(JS_DROP, [path.read_text(), path.name])
        ids = sorted(node["id"] for node in json.loads(path.read_text())["nodes"])
        self.page.wait_for_function("ids => JSON.stringify(app.graph.nodes.map(n => n.id).sort((a, b) => a - b)) "
                                    "=== JSON.stringify(ids)", arg=ids, timeout=30_000)

    def dialogs(self) -> list[str]:
        """Keys of the open dialogs: MISSING_MODELS, "global-load-workflow-warning" (missing nodes), ..."""
        return self.page.evaluate(JS_DIALOGS)

    def wait_for_dialog(self, key: str, timeout_ms: int = 15_000) -> None:
        self.page.wait_for_selector(f'.p-dialog[aria-labelledby="{key}"] .p-dialog-content', timeout=timeout_ms)

    def missing_models(self) -> list[dict]:
        """Rows of the missing-models dialog: label "directory / name", url, error messages, disabled buttons."""
        return self.page.evaluate(JS_MISSING_MODELS)

    def close_dialogs(self) -> None:
        for button in self.page.query_selector_all(".p-dialog .p-dialog-close-button"):
            button.click()
        self.page.wait_for_function("() => !document.querySelector('.p-dialog')", timeout=10_000)

    def hidden_nodes(self) -> list[dict]:
        """Nodes not fully visible in the window (title and points covered by another element or off screen)."""
        return self.page.evaluate(JS_HIDDEN_NODES)

    def clipped_notes(self) -> list[str]:
        """Titles of the notes whose text does not fit in the node."""
        return self.page.evaluate(JS_CLIPPED_NOTES)

    def prompt(self) -> dict:
        """The API-format prompt the frontend would queue (`app.graphToPrompt().output`)."""
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    def use_tiny_models(self, size: int = 64, steps: int = 3) -> None:
        self.page.evaluate(JS_USE_TINY_MODELS, [size, steps])

    def node_images(self, node_ids: list[int], timeout_ms: int = 30_000) -> dict[int, list[str]]:
        """Image URLs the frontend shows on each node (its preview after a run), once every node shows one."""
        js = ("ids => ids.map(id => (app.graph.getNodeById(id)?.imgs ?? []).map(i => i.src))")
        self.page.wait_for_function(f"ids => ({js})(ids).every(urls => urls.length > 0)", arg=node_ids,
                                    timeout=timeout_ms)
        return dict(zip(node_ids, self.page.evaluate(js, node_ids)))

    def run(self) -> str:
        """Click Run; the prompt id the server gave the frontend."""
        with self.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as resp:
            self.page.get_by_role("button", name="Run", exact=True).click()
        body = resp.value.json()
        assert "prompt_id" in body, f"the server refused the frontend's prompt: {json.dumps(body)[:2000]}"
        return body["prompt_id"]


@contextmanager
def frontend(url: str, chromium: str, window: tuple[int, int] = WINDOW) -> Iterator[Frontend]:
    """A fresh headless Chromium on the ComfyUI at `url`, as a returning user (no first-run template browser)."""
    from playwright.sync_api import sync_playwright

    post_setting(url, "Comfy.TutorialCompleted", True)
    with tempfile.TemporaryDirectory(prefix="drm-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": window[0], "height": window[1]})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            ui = Frontend(page, url)
            ui.open()
            yield ui
        finally:
            context.close()


def workflow_path(name: str) -> Path:
    return WORKFLOWS / f"{name}.json"


def workflow_paths() -> list[Path]:
    """Every UI-format workflow the pack ships (workflows/*.json; the API twins are in workflows/api/)."""
    return sorted(WORKFLOWS.glob("*.json"))
