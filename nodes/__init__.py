"""ComfyUI nodes of the DRM pack: thin adapters over drm_core (imported relatively, never as `nodes`).

Inside ComfyUI this registers the six DRM nodes and the models/drm folder. Outside ComfyUI (no
`comfy` / `folder_paths` to import) the mappings stay empty and the reason is logged, so the pack
root still imports and drm_core / training work on their own.
"""

import logging

log = logging.getLogger(__name__)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

try:
    import comfy.model_management  # noqa: F401  (present only inside a ComfyUI process)
    import folder_paths  # noqa: F401
except ImportError as err:
    log.info("DRM nodes not registered: ComfyUI is not importable here (%s). drm_core and training work without it.",
             err)
else:
    from .loader import DRMLoader, register_drm_folder
    from .sampler import DRMStepwiseKSampler, DRMStepwiseSampler
    from .score import DRMScoreImage, DRMScoreLatent, DRMSelectBest

    register_drm_folder()
    NODE_CLASS_MAPPINGS.update({
        "DRMLoader": DRMLoader,
        "DRMScoreLatent": DRMScoreLatent,
        "DRMScoreImage": DRMScoreImage,
        "DRMSelectBest": DRMSelectBest,
        "DRMStepwiseSampler": DRMStepwiseSampler,
        "DRMStepwiseKSampler": DRMStepwiseKSampler,
    })
    NODE_DISPLAY_NAME_MAPPINGS.update({
        "DRMLoader": "Load DRM (reward model)",
        "DRMScoreLatent": "DRM Score Latent",
        "DRMScoreImage": "DRM Score Image",
        "DRMSelectBest": "DRM Select Best (top-k)",
        "DRMStepwiseSampler": "DRM Step-wise Sampler",
        "DRMStepwiseKSampler": "DRM Step-wise KSampler (all-in-one)",
    })
