"""ComfyUI nodes of the DRM pack (V3 schema): thin adapters over drm_core, imported relatively, never as `nodes`.

Inside ComfyUI, `comfy_entrypoint` returns the extension that registers the models/drm folder and the six DRM
nodes. Outside ComfyUI (no `comfy_api` to import) nothing is defined and the reason is logged, so the pack root
still imports and drm_core / training work on their own.
"""

import logging

log = logging.getLogger(__name__)

NODE_IDS = ("DRMLoader", "DRMScoreLatent", "DRMScoreImage", "DRMSelectBest", "DRMStepwiseSampler",
            "DRMStepwiseKSampler")

try:
    from comfy_api.latest import ComfyExtension  # present only inside a ComfyUI process
except ImportError as err:
    log.info("DRM nodes not registered: ComfyUI is not importable here (%s). drm_core and training work without it.",
             err)
else:
    from .loader import DRMLoader, register_drm_folder
    from .sampler import DRMStepwiseKSampler, DRMStepwiseSampler
    from .score import DRMScoreImage, DRMScoreLatent, DRMSelectBest

    class DRMExtension(ComfyExtension):
        """The pack as a ComfyUI V3 extension."""

        async def get_node_list(self) -> list[type]:
            return [DRMLoader, DRMScoreLatent, DRMScoreImage, DRMSelectBest, DRMStepwiseSampler,
                    DRMStepwiseKSampler]

    async def comfy_entrypoint() -> DRMExtension:
        """Called once by ComfyUI's loader: models/drm is registered before the node schemas list it."""
        register_drm_folder()
        return DRMExtension()
