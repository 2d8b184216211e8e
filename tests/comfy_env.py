"""Test helper for the ComfyUI tests: find ComfyUI, import it in-process, build tiny fixture models, run a server.

Nothing here imports ComfyUI at module import time, so the main suite (no ComfyUI) can import it and skip.
ComfyUI is found through COMFYUI_PATH, or because the pack sits in <ComfyUI>/custom_nodes/<pack>/.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = PACK_ROOT / "workflows"

# Tiny SD3-shaped MMDiT that ComfyUI detects as SD3: hidden = 64 * depth, head dim 64, real text dims.
TINY_MMDIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=64, caption_projection_dim=128,
                  dual_attention_layers=(0,))
CHECKPOINT = "sd3.5_medium.safetensors"
DRM_FILE = "drm_sd3.5_medium.safetensors"
DINA_FOLDER = "DiNa-LRM-SD35M-12layers"  # a tiny DiNa-LRM download (tests/dina_fixture.py) in models/drm/
LORA_FILE = "drm_step_grpo_sd3.5_medium.safetensors"
TOKENS = 154  # ComfyUI's SD3 prompt length for a short prompt (CLIP-L+G 77, T5 77)

FIXTURE_PACK = '''"""Test fixtures for the DRM pack: random SD3-shaped CONDITIONING in place of the text encoders."""
import zlib

import torch


class DRMTestConditioning:
    DESCRIPTION = "Random SD3-shaped CONDITIONING seeded by the text (tests only)."
    CATEGORY = "testing"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "tooltip": "prompt"})}}

    def encode(self, text):
        g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        tokens, pooled = torch.randn(1, %(tokens)d, 4096, generator=g), torch.randn(1, 2048, generator=g)
        return ([[tokens, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS = {"DRMTestConditioning": DRMTestConditioning}
''' % {"tokens": TOKENS}


def find_comfyui() -> tuple[Path | None, str]:
    """(ComfyUI folder or None, reason when None)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if (path / "main.py").is_file() and (path / "comfy").is_dir():
            return path, ""
        return None, f"COMFYUI_PATH={env} is not a ComfyUI checkout (no main.py and comfy/)"
    parent = PACK_ROOT.parent
    if parent.name == "custom_nodes" and (parent.parent / "main.py").is_file():
        if any(importlib.util.find_spec(name) is None for name in ("aiohttp", "torchsde", "safetensors")):
            return None, (f"the pack is in {parent}, but this Python lacks ComfyUI's requirements: run pytest "
                          "with ComfyUI's own Python to run the ComfyUI tests")
        return parent.parent, ""
    return None, ("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (and run with its Python) or install "
                  "the pack in ComfyUI/custom_nodes/ to run the ComfyUI tests")


def conditioning(text: str = "a photo", tokens: int = TOKENS) -> list:
    """Random SD3 CONDITIONING seeded by the text (the fixture node's output, in-process)."""
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return [[torch.randn(1, tokens, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]


class V3Call:
    """Calls a V3 node's execute with positional inputs in schema order, as a V1 node's FUNCTION is called."""

    def __init__(self, cls):
        self.cls = cls
        self.last_ui = None

    def __getattr__(self, name: str):
        if hasattr(self.cls, name):  # INPUT_TYPES, DESCRIPTION, ...
            return getattr(self.cls, name)

        def call(*args, **kwargs):
            ids = [i.id for i in self.cls.GET_SCHEMA().inputs]
            out = self.cls.execute(**dict(zip(ids, args)), **kwargs)
            self.last_ui = out.ui
            return out.args
        return call


@dataclass
class ComfyEnv:
    """An in-process ComfyUI with the pack loaded through ComfyUI's own loader."""

    root: Path
    base: Path
    nodes: ModuleType  # ComfyUI's `nodes`
    pack: ModuleType  # the pack, imported by nodes.load_custom_node
    load_ok: bool

    def node(self, node_id: str):
        """A node to call like ComfyUI's V1 nodes: `node.<any name>(*inputs)` returns the output tuple; V3 nodes
        get their inputs by schema order and return their NodeOutput's values (its `ui` in `last_ui`)."""
        cls = self.nodes.NODE_CLASS_MAPPINGS[node_id]
        return V3Call(cls) if hasattr(cls, "define_schema") else cls()

    def pack_module(self, name: str) -> ModuleType:
        return sys.modules[f"{self.pack.__name__}.{name}"]


def start_in_process(root: Path, base: Path) -> ComfyEnv:
    """Import ComfyUI (CPU, models under `base`), write the tiny models, load the pack. Once per process."""
    sys.path.insert(0, str(root))
    if str(PACK_ROOT) not in sys.path:
        sys.path.append(str(PACK_ROOT))  # drm_core for reference computations; after ComfyUI (its `nodes` wins)
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(base)
    import utils.install_util  # noqa: F401  (cache ComfyUI's utils package before nodes.py alters sys.path)
    import comfy.model_management  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy.sd  # noqa: F401
    import folder_paths  # noqa: F401
    import nodes

    write_models(base / "models")
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    ok = asyncio.run(nodes.load_custom_node(str(PACK_ROOT)))
    pack = sys.modules[str(PACK_ROOT).replace(".", "_x_")]
    return ComfyEnv(root, base, nodes, pack, ok)


def tiny_generator():
    """The tiny SD3-shaped diffusers MMDiT (random weights) shared by every fixture."""
    from tiny import tiny_transformer

    return tiny_transformer(seed=0, **TINY_MMDIT)


def write_models(models: Path) -> None:
    """Tiny generator (Stability names), DRM, DiNa-LRM download (for that generator as its base), TAESD3 pair and
    a Step-GRPO-style LoRA under a models/ folder."""
    import torch
    from safetensors.torch import save_file

    from dina_fixture import write_tiny_dina
    from drm_core import drm_from_base, read_backbone_config, save_drm
    from drm_core.keys import to_stability
    from tiny import TINY_HEAD

    for sub in ("diffusion_models", "drm", "vae_approx", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    generator = tiny_generator()
    sd = generator.state_dict()
    full = read_backbone_config(sd, blocks=TINY_MMDIT["num_layers"])[2]
    save_file(to_stability(sd, full), models / "diffusion_models" / CHECKPOINT)
    torch.manual_seed(1)
    save_drm(drm_from_base(sd, blocks=1, **TINY_HEAD), models / "drm" / DRM_FILE, {"base_model": "tiny test MMDiT"})
    write_tiny_dina(models / "drm" / DINA_FOLDER, models / "diffusion_models" / CHECKPOINT)
    from comfy.taesd.taesd import Decoder, Encoder

    g = torch.Generator().manual_seed(2)
    for name, net in (("taesd3_encoder", Encoder(16)), ("taesd3_decoder", Decoder(16))):
        weights = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in net.state_dict().items()}
        save_file(weights, models / "vae_approx" / f"{name}.safetensors")
    lora, rank = {}, 4
    for i in range(TINY_MMDIT["num_layers"]):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            key = f"transformer.transformer_blocks.{i}.attn.{proj}"
            lora[f"{key}.lora_A.weight"] = torch.randn(rank, 128, generator=g) * 0.05
            lora[f"{key}.lora_B.weight"] = torch.randn(128, rank, generator=g) * 0.05
            lora[f"{key}.alpha"] = torch.tensor(8.0)
    save_file(lora, models / "loras" / LORA_FILE)


# ----------------------------------------------------------------------------------------------- workflows

def load_workflow(name: str) -> tuple[dict, dict]:
    """(UI-format workflow, API-format twin) of workflows/<name>.json and workflows/api/<name>.json."""
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    return ui, api


def workflow_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS.glob("*.json"))


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MISSING = object()
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def combo_options(conf: tuple) -> list | None:
    """The choices of a combo input spec: V1 `([choices], {...})` or V3 `("COMBO", {"options": [...]})`."""
    if isinstance(conf[0], list):
        return conf[0]
    if conf[0] == "COMBO":
        return conf[1].get("options", [])
    return None


def ui_to_api(ui: dict, node_classes: dict) -> dict:
    """Convert a UI-format workflow to API format as the front end does (widgets_values in input order; a widget
    the workflow has no value for, e.g. an input added after it was saved, takes its default)."""
    links = {link[0]: (str(link[1]), link[2]) for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) != 0:
            continue
        spec = node_classes[node["type"]].INPUT_TYPES()
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = iter(node.get("widgets_values", []))
        inputs = {}
        for name, conf in [*spec.get("required", {}).items(), *spec.get("optional", {}).items()]:
            kind, opts = conf[0], (conf[1] if len(conf) > 1 else {})
            choices = combo_options(conf)
            if (choices is not None or kind in WIDGET_TYPES) and not opts.get("forceInput"):
                value = next(values, MISSING)
                if value is MISSING:
                    value = opts.get("default", choices[0] if choices else None)
                if opts.get("control_after_generate") or name in ("seed", "noise_seed"):
                    next(values, None)  # the "fixed" / "randomize" control widget
                inputs[name] = list(linked[name]) if name in linked else value
            elif name in linked:
                inputs[name] = list(linked[name])
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def for_tiny_models(api: dict, size: int = 64, steps: int = 3) -> dict:
    """The API graph rewired for the fixtures: checkpoint -> UNETLoader + TAESD3, text encoders -> random
    CONDITIONING (DRMTestConditioning), small images and few steps."""
    graph = copy.deepcopy(api)
    renames: dict[tuple[str, int], list] = {}
    for node_id, node in list(graph.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            graph[node_id] = {"class_type": "UNETLoader", "inputs": {"unet_name": inputs["ckpt_name"],
                                                                      "weight_dtype": "default"}}
            graph[f"{node_id}_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd3"}}
            renames[(node_id, 2)] = [f"{node_id}_vae", 0]
        elif kind == "TripleCLIPLoader":
            del graph[node_id]
        elif kind == "CLIPTextEncode":
            graph[node_id] = {"class_type": "DRMTestConditioning", "inputs": {"text": inputs["text"]}}
        elif kind == "EmptySD3LatentImage":
            inputs.update(width=size, height=size)
        if "steps" in inputs:
            inputs["steps"] = steps
    for node in graph.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and (value[0], value[1]) in renames:
                node["inputs"][name] = renames[(value[0], value[1])]
    return graph


# ------------------------------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI (CPU) over `base`, with the pack and the fixture pack in base/custom_nodes."""

    def __init__(self, root: Path, base: Path, extra_config: Path | None = None):
        custom = base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        link = custom / "drm_pack"
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        fixtures = custom / "drm_test_fixtures"
        fixtures.mkdir(exist_ok=True)
        (fixtures / "__init__.py").write_text(FIXTURE_PACK)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        cmd = [sys.executable, str(root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        if extra_config is not None:
            cmd += ["--extra-model-paths-config", str(extra_config)]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(root), stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"ComfyUI did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, data: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def run(self, graph: dict, timeout: float = 120.0) -> dict:
        """Queue an API-format graph and wait for its history entry."""
        return self.wait(self.post("/prompt", {"prompt": graph, "client_id": "drm-tests"})["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """The history entry of a queued prompt once it has finished."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def check_workflow_run(server: ComfyServer, name: str, result: dict) -> None:
    """A shipped workflow's run succeeded, saved its images and (but the all-in-one) reported auto-sigma scores."""
    assert result["status"]["status_str"] == "success", json.dumps(result["status"], indent=1)[-3000:]
    outputs = result["outputs"]
    saved = [img for out in outputs.values() for img in out.get("images", []) if img["type"] == "output"]
    assert saved, f"{name}: no image saved"
    for img in saved:
        assert (server.log_path.parent / "output" / img["subfolder"] / img["filename"]).is_file()
    texts = [t for out in outputs.values() for t in out.get("text", [])]
    if name != "drm_stepwise_ksampler":  # sigma -1 in the workflows: the DiNa-LRM's recommended sigma
        assert any("DRM scores at sigma" in t and "(model's recommendation" in t for t in texts), texts
