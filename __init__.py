"""ComfyUI entry point of the DRM node pack: registers the nodes (imports cleanly outside ComfyUI)."""

if __package__:  # imported as a package: by ComfyUI (custom_nodes/<pack>/) or by pytest in an identifier-named folder
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # loaded as a lone file, e.g. pytest collecting a checkout named "drm-stepwise-guidance": no nodes to offer
    NODE_CLASS_MAPPINGS: dict[str, type] = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
