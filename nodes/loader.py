"""DRMLoader: list DRM checkpoints in models/drm/, load one with drm_core.load_drm, wrap it for ComfyUI."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch

from ..drm_core import DRMError, load_drm
from .common import CATEGORY, DRM_TYPE

log = logging.getLogger(__name__)

FOLDER = "drm"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def register_drm_folder() -> None:
    """Register models/drm with ComfyUI, keeping any `drm:` paths already read from extra_model_paths.yaml."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | set(folder_paths.supported_pt_extensions))


class DRMLoader:
    DESCRIPTION = ("Loads a Diffusion-based Reward Model (DRM) from models/drm/. A DRM is an SD3.5 MMDiT cut after "
                   "its first blocks plus a small reward head; it scores noisy or clean SD3 latents against a prompt, "
                   "so it can guide sampling step by step. Connect it to the DRM scoring and sampling nodes.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (DRM_TYPE,)
    RETURN_NAMES = ("drm",)
    OUTPUT_TOOLTIPS = ("The loaded reward model, managed by ComfyUI's memory manager.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "drm_name": (folder_paths.get_filename_list(FOLDER), {
                "tooltip": "DRM checkpoint (.safetensors) in models/drm/ (or a 'drm:' path of extra_model_paths.yaml). "
                           "Train one with `python -m training train-drm`."}),
            "dtype": (["auto", *DTYPES], {
                "default": "auto",
                "tooltip": "Weight precision. auto picks bf16 where the device supports it, else fp16 or fp32 (as "
                           "ComfyUI does for diffusion models). Scores are returned in fp32 either way."}),
        }}

    def load(self, drm_name: str, dtype: str):
        path = folder_paths.get_full_path(FOLDER, drm_name)
        if path is None or not os.path.isfile(path):
            searched = ", ".join(folder_paths.get_folder_paths(FOLDER))
            raise FileNotFoundError(f"DRMLoader: DRM file '{drm_name}' not found in {searched}. Put the DRM checkpoint "
                                    "(.safetensors) in ComfyUI/models/drm/ and refresh (press R) or pick another file")
        load_device = comfy.model_management.get_torch_device()
        offload_device = comfy.model_management.unet_offload_device()
        try:
            drm = load_drm(path, device=offload_device)
        except DRMError as err:
            raise ValueError(f"DRMLoader: {err}") from err
        if dtype == "auto":
            params = sum(p.numel() for p in drm.parameters())
            weight_dtype = comfy.model_management.unet_dtype(
                load_device, params, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
        else:
            weight_dtype = DTYPES[dtype]
        drm = drm.to(weight_dtype).requires_grad_(False)
        log.info("DRMLoader: loaded %s (%d of %d blocks, %s)", drm_name, drm.config.backbone.blocks,
                 drm.config.backbone.depth, weight_dtype)
        return (comfy.model_patcher.ModelPatcher(drm, load_device=load_device, offload_device=offload_device),)
