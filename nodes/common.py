"""ComfyUI glue shared by the DRM nodes: input checks with node-named errors, conditioning, device loading.

No math here: scores, SDE steps and the sampling loop live in drm_core. Every error names the node
and what it expected, in ComfyUI style (ValueError / RuntimeError with a readable message).
"""

from __future__ import annotations

import dataclasses
import logging

import comfy.model_base
import comfy.model_patcher
import torch
import numpy as np
from comfy_api.latest import io, ui
from torch import Tensor

from ..drm_core import DRM, DRMError

log = logging.getLogger(__name__)

DRM_TYPE = "DRM_MODEL"
"""ComfyUI socket type of a loaded DRM: a ModelPatcher whose `.model` is a drm_core.DRM."""
DRMModel = io.Custom(DRM_TYPE)

CATEGORY = "DRM"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


def schema(*, aliases: list[str], **fields) -> io.Schema:
    """io.Schema in the DRM category; search aliases go to ComfyUI versions whose schema has them (newer
    than 0.3.64, whose frontend searches node ids and display names only)."""
    if "search_aliases" in SCHEMA_FIELDS:
        fields["search_aliases"] = aliases
    return io.Schema(category=CATEGORY, **fields)


def preview(picture: np.ndarray, text: str) -> dict:
    """Node UI: `picture` ([H, W, 3] uint8) shown on the node (every frontend), plus `text` (frontends that
    show text)."""
    image = torch.from_numpy(picture).float().div(255).unsqueeze(0)  # [1, H, W, 3]
    return {**ui.PreviewImage(image).as_dict(), **ui.PreviewText(text).as_dict()}


def drm_input(tooltip: str = "The reward model from DRMLoader.") -> io.Input:
    return DRMModel.Input("drm", tooltip=tooltip)


def seed_input(tooltip: str) -> io.Input:
    return io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True, tooltip=tooltip)


def unwrap_drm(patcher, node: str) -> DRM:
    """The DRM inside a DRM_MODEL input (loading is the caller's: nodes/memory.py budgets it with ComfyUI)."""
    if not isinstance(patcher, comfy.model_patcher.ModelPatcher) or not isinstance(patcher.model, DRM):
        raise ValueError(f"{node}: the 'drm' input must come from a DRMLoader node, got {type(patcher).__name__}")
    return patcher.model


def drm_conditioning(conditioning, drm: DRM, node: str) -> tuple[Tensor, Tensor]:
    """(context [Bc, N, D], pooled [Bc, P]) from the first CONDITIONING entry, checked against the DRM."""
    b = drm.config.backbone
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{node}: the CONDITIONING input is empty; connect the prompt's CLIPTextEncode output "
                         "(SD3 text encoders: TripleCLIPLoader with clip_l, clip_g and t5xxl)")
    context, extras = conditioning[0][0], conditioning[0][1]
    pooled = extras.get("pooled_output")
    if pooled is None:
        raise ValueError(f"{node}: the CONDITIONING has no 'pooled_output'. The DRM reads SD3 conditioning "
                         f"(tokens [1, N, {b.context_dim}] plus a pooled [1, {b.pooled_dim}] vector): encode the "
                         "prompt with CLIPTextEncode and an SD3 CLIP (TripleCLIPLoader: clip_l, clip_g, t5xxl), not a "
                         "conditioning that was built without pooled output")
    if not isinstance(context, Tensor) or context.ndim != 3 or context.shape[-1] != b.context_dim:
        got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
        raise ValueError(f"{node}: the CONDITIONING tokens must be [B, N, {b.context_dim}] (SD3 CLIP-L+G+T5), "
                         f"got {got}; is it from another model family's text encoder?")
    if pooled.ndim != 2 or pooled.shape[-1] != b.pooled_dim or pooled.shape[0] != context.shape[0]:
        raise ValueError(f"{node}: the CONDITIONING pooled_output must be [{context.shape[0]}, {b.pooled_dim}] "
                         f"(SD3 CLIP-L+G pooled), got {tuple(pooled.shape)}")
    if len(conditioning) > 1:
        log.info("%s: CONDITIONING has %d entries; the DRM scores against the first one", node, len(conditioning))
    warn_if_trained_on_other_padding(drm, context, node)
    return context, pooled


def warn_if_trained_on_other_padding(drm: DRM, context: Tensor, node: str) -> None:
    """Warn once per DRM when its training text encoding padded T5 differently from this CONDITIONING
    (SD3's T5 runs without a mask, so the same prompt gives other embeddings at another length)."""
    t5 = (drm.provenance.get("text_encoding") or {}).get("t5_max_length")
    if not t5 or context.shape[1] == 77 + int(t5) or getattr(drm, "_padding_warned", False):
        return
    drm._padding_warned = True
    log.warning("%s: this DRM was trained on prompts with T5 padded to %d tokens (%d in all); ComfyUI's CONDITIONING "
                "has %d tokens, so its scores may be less reliable than on its training data", node, t5, 77 + int(t5),
                context.shape[1])


def per_image(tensor: Tensor, batch: int, repeats: int = 1) -> Tensor:
    """Conditioning rows for `batch` images (tiled like ComfyUI's repeat_to_batch_size), each repeated `repeats`x."""
    if tensor.shape[0] == 1:
        return tensor
    rows = torch.arange(batch, device=tensor.device) % tensor.shape[0]
    return tensor[rows].repeat_interleave(repeats, dim=0)


def check_latent(samples: Tensor, drm: DRM, node: str, what: str = "LATENT") -> None:
    """A 4-D latent batch with the DRM's channel count (16 for SD3)."""
    channels = drm.config.backbone.in_channels
    if not isinstance(samples, Tensor) or samples.ndim != 4 or samples.shape[1] != channels:
        got = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        hint = " (4 channels is an SD1.x/SDXL latent)" if isinstance(samples, Tensor) and samples.ndim == 4 \
            and samples.shape[1] == 4 else ""
        raise ValueError(f"{node}: the {what} must be an SD3 latent batch [B, {channels}, H/8, W/8], got {got}{hint}; "
                         "make it with EmptySD3LatentImage or an SD3 VAE")


def check_drm_kind(drm: DRM, node: str) -> None:
    kind = drm.config.backbone.kind
    if kind != "sd3-mmdit":
        raise ValueError(f"{node}: this DRM was built for a '{kind}' backbone; these nodes support SD3-family "
                         "DRMs ('sd3-mmdit') only")


def check_model_matches(base_model, drm: DRM, node: str) -> None:
    """The sampling MODEL must be SD3-family and share the DRM's latent channels and text-conditioning dims."""
    if not isinstance(base_model, comfy.model_base.SD3):
        raise ValueError(f"{node}: the MODEL is a {type(base_model).__name__} model; the DRM scores SD3-family "
                         "latents, so sample with an SD3 / SD3.5 model (e.g. sd3.5_medium.safetensors)")
    check_drm_kind(drm, node)
    b = drm.config.backbone
    unet = base_model.model_config.unet_config
    have = {"latent channels": base_model.latent_format.latent_channels,
            "context dim": unet.get("context_embedder_config", {}).get("params", {}).get("in_features"),
            "pooled dim": unet.get("adm_in_channels")}
    want = {"latent channels": b.in_channels, "context dim": b.context_dim, "pooled dim": b.pooled_dim}
    wrong = [f"{k} {have[k]} (DRM expects {want[k]})" for k in want if have[k] is not None and have[k] != want[k]]
    if wrong:
        raise ValueError(f"{node}: the DRM does not fit this MODEL: {', '.join(wrong)}. Use a DRM built from the "
                         "same model family as the generator")


def named(node: str, err: DRMError) -> ValueError:
    """Re-raise a drm_core error with the node's name in front."""
    return ValueError(f"{node}: {err}")
