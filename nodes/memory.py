"""The DRM under ComfyUI's memory manager: built from ComfyUI's ops, budgeted with the generator, scored in chunks.

ComfyUI loads `[model] + model.get_nested_additional_models()` before sampling with one activation estimate made
for the generator's CFG batch (`comfy.sampler_helpers._prepare_sampling`). The step-wise samplers attach the DRM
to a clone of the MODEL, so both load together, and raise that estimate, through ComfyUI's own formula, to cover
the DRM's forward on k * B candidates (the two never run at the same time, so the reserve is the larger of the
two). Nothing is loaded inside the sampling loop.
"""

from __future__ import annotations

import logging
import math

import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import torch

from ..drm_core import DRM
from ..drm_core.casting import store_weights, use_casting_layers

log = logging.getLogger(__name__)

ATTACH_KEY = "drm"
"""Key of the DRM among the MODEL clone's additional models and PREPARE_SAMPLING wrappers."""
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def place_drm(drm: DRM, weight_dtype: torch.dtype, load_device: torch.device) -> DRM:
    """Give the DRM ComfyUI's layers (partial low-VRAM loads) and store its weights in `weight_dtype`; weights
    ComfyUI cannot compute in (fp8, or bf16 on a device without it) are cast per layer to a compute dtype."""
    compute_dtype = comfy.model_management.unet_manual_cast(
        weight_dtype, load_device, [torch.bfloat16, torch.float16, torch.float32]) or weight_dtype
    ops = comfy.ops.disable_weight_init if compute_dtype == weight_dtype else comfy.ops.manual_cast
    use_casting_layers(drm, ops)
    if weight_dtype in FP8_DTYPES:
        store_weights(drm.to(compute_dtype), weight_dtype)
    else:
        drm.to(weight_dtype)
    drm.compute_dtype, drm.compute_device = compute_dtype, torch.device(load_device)
    return drm.requires_grad_(False)


def reserve_batch(model_patcher, noise_shape, drm: DRM, k: int, text_tokens: int) -> int:
    """Batch for which ComfyUI's generator estimate also covers the DRM on k * B candidates: the smallest
    B' >= B with memory_required([2B', ...]) >= DRM.activation_bytes(k * B) (linear in the batch)."""
    batch, _, height, width = noise_shape[:4]
    per_image = model_patcher.model.memory_required([2, *noise_shape[1:]])  # CFG: 2 rows per image
    needed = drm.activation_bytes(k * batch, height, width, text_tokens)
    return max(batch, math.ceil(needed / max(per_image, 1)))


def attach_drm(model, drm_patcher, k: int, text_tokens: int):
    """A clone of MODEL that ComfyUI loads together with the DRM, with the DRM's activations in the estimate."""
    drm: DRM = drm_patcher.model

    def prepare_sampling(executor, model_patcher, noise_shape, conds, model_options=None):
        batch = reserve_batch(model_patcher, noise_shape, drm, k, text_tokens)
        if batch > noise_shape[0]:
            log.debug("DRM: memory estimate for %d latents (DRM scores %d candidates)", batch, k * noise_shape[0])
        return executor(model_patcher, [batch, *noise_shape[1:]], conds, model_options=model_options)

    model = model.clone()
    model.set_additional_models(ATTACH_KEY, [drm_patcher])
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, ATTACH_KEY)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, ATTACH_KEY, prepare_sampling)
    return model


def load_with_generator(model_patcher, drm_patcher, noise_shape, k: int, text_tokens: int) -> None:
    """For a SAMPLER (SamplerCustom), which ComfyUI budgets without the DRM: load the DRM next to the already
    loaded generator with the same estimate, once, before the first step (nothing if it was attached)."""
    if any(m is drm_patcher for m in comfy.model_management.loaded_models()):
        return
    batch = reserve_batch(model_patcher, noise_shape, drm_patcher.model, k, text_tokens)
    memory = model_patcher.model.memory_required([2 * batch, *noise_shape[1:]])
    minimum = model_patcher.model.memory_required([batch, *noise_shape[1:]])
    comfy.model_management.load_models_gpu([model_patcher, drm_patcher], memory_required=memory,
                                           minimum_memory_required=minimum)


def load_for_scoring(drm_patcher, batch: int, height: int, width: int, text_tokens: int) -> int:
    """Load the DRM for scoring `batch` latents; returns how many to score per forward given free memory."""
    drm: DRM = drm_patcher.model
    per_latent = drm.activation_bytes(1, height, width, text_tokens)
    comfy.model_management.load_models_gpu([drm_patcher], memory_required=per_latent * batch,
                                           minimum_memory_required=per_latent)
    free = comfy.model_management.get_free_memory(drm_patcher.load_device)
    return max(1, min(batch, int(free // per_latent)))
