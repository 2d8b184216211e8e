"""ComfyUI nodes of the DRM pack: thin adapters over drm_core (imported relatively, never as `nodes`)."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
