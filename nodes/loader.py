"""DRMLoader: list what loads in models/drm/ (DRM files, published downloads), load it, wrap it for ComfyUI."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch

from ..drm_core import DRMError, load_drm, published
from comfy_api.latest import io

from .common import DRMModel, schema
from .memory import place_drm

log = logging.getLogger(__name__)

FOLDER = "drm"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
NO_BASE = "none"
BASE_FOLDERS = ("checkpoints", "diffusion_models")


def register_drm_folder() -> None:
    """Register models/drm with ComfyUI, keeping any `drm:` paths already read from extra_model_paths.yaml."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | set(folder_paths.supported_pt_extensions))


def drm_entries() -> list[str]:
    """DRM .safetensors files and published-model folders under every drm path (file names only, no reads)."""
    return published.list_entries(folder_paths.get_folder_paths(FOLDER))


def base_choices() -> list[str]:
    """"none", the checkpoints list, then diffusion_models entries not already in it."""
    checkpoints = folder_paths.get_filename_list("checkpoints")
    seen = set(checkpoints)
    return [NO_BASE, *checkpoints, *(n for n in folder_paths.get_filename_list("diffusion_models") if n not in seen)]


def base_path(base: str) -> str:
    """Full path of a `base` choice (checkpoints first, then diffusion_models)."""
    for folder in BASE_FOLDERS:
        path = folder_paths.get_full_path(folder, base)
        if path is not None:
            return path
    raise FileNotFoundError(f"DRMLoader: base '{base}' not found in models/checkpoints or models/diffusion_models; "
                            "pick another checkpoint and refresh (press R)")


def load(drm_name: str, dtype: str, base: str = NO_BASE):
    """The DRM_MODEL (a ModelPatcher) for a drm_name entry, in `dtype` (auto: ComfyUI's pick for the device)."""
    roots = folder_paths.get_folder_paths(FOLDER)
    found = published.resolve_entry(roots, drm_name)
    if found is None:
        raise FileNotFoundError(f"DRMLoader: DRM file '{drm_name}' not found in {', '.join(roots)}. Put the DRM "
                                "checkpoint (.safetensors) or the downloaded model folder in ComfyUI/models/drm/ "
                                "and refresh (press R) or pick another entry")
    path, kind = found
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    try:
        if kind is None:
            drm = load_drm(path, device=offload_device)
        elif base == NO_BASE:
            raise ValueError(f"DRMLoader: {drm_name} holds only a LoRA and a head; choose your SD3.5 Medium "
                             "checkpoint in `base`")
        else:
            drm, converted = published.load_published(path, base_path(base), device=offload_device)
            log.info("DRMLoader: %s on base %s (%s)", drm_name, base,
                     "converted and cached" if converted else "cached conversion")
    except DRMError as err:
        raise ValueError(f"DRMLoader: {err}") from err
    if dtype == "auto":
        params = sum(p.numel() for p in drm.parameters())
        weight_dtype = comfy.model_management.unet_dtype(
            load_device, params, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
    else:
        weight_dtype = DTYPES[dtype]
    drm = place_drm(drm, weight_dtype, load_device)
    log.info("DRMLoader: loaded %s (%d of %d blocks, %s)", drm_name, drm.config.backbone.blocks,
             drm.config.backbone.depth, weight_dtype)
    return comfy.model_patcher.ModelPatcher(drm, load_device=load_device, offload_device=offload_device)


class DRMLoader(io.ComfyNode):
    """Load a DRM file or a published reward-model folder from models/drm/ under ComfyUI's memory manager."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="DRMLoader", display_name="Load DRM (reward model)", aliases=["reward model", "load reward"],
            description=("Loads a Diffusion-based Reward Model (DRM) from models/drm/. A DRM is an SD3.5 MMDiT cut "
                         "after its first blocks plus a small reward head; it scores noisy or clean SD3 latents "
                         "against a prompt, so it can guide sampling step by step. Connect it to the DRM scoring and "
                         "sampling nodes. A published reward model folder (DiNa-LRM, as `hf download` writes it) also "
                         "loads: choose your SD3.5 Medium checkpoint in `base`; the first load converts it once and "
                         "caches the result inside the folder."),
            inputs=[
                io.Combo.Input("drm_name", options=drm_entries(), tooltip=(
                    "A DRM checkpoint (.safetensors) in models/drm/ (or a 'drm:' path of extra_model_paths.yaml), "
                    "trained with `python -m training train-drm`; or a published reward model folder placed there "
                    "as downloaded (e.g. DiNa-LRM-SD35M-12layers), which also needs `base`.")),
                io.Combo.Input("dtype", options=["auto", *DTYPES], default="auto", tooltip=(
                    "Weight precision. auto picks bf16 where the device supports it, else fp16 or fp32 (as ComfyUI "
                    "does for diffusion models; --fp8_e4m3fn-unet makes it fp8). fp8 halves the DRM's memory "
                    "(weight matrices in 8 bits, computed in bf16/fp16/fp32; scores close to, not equal to, full "
                    "precision). Scores are returned in fp32 either way.")),
                io.Combo.Input("base", options=base_choices(), default=NO_BASE, optional=True, tooltip=(
                    "Only for published reward model folders that hold no backbone (DiNa-LRM: a LoRA and a head): "
                    "your SD3.5 Medium checkpoint, from models/checkpoints or models/diffusion_models. The first "
                    "load converts it once and caches the DRM inside the folder. A DRM .safetensors file ignores "
                    "this input.")),
            ],
            outputs=[DRMModel.Output("drm", display_name="drm",
                                     tooltip="The loaded reward model, managed by ComfyUI's memory manager.")],
        )

    @classmethod
    def execute(cls, drm_name: str, dtype: str, base: str = NO_BASE) -> io.NodeOutput:
        return io.NodeOutput(load(drm_name, dtype, base))
