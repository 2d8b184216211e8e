"""ComfyUI entry point of the DRM node pack: a V3 extension (imports cleanly outside ComfyUI)."""

if __package__:  # imported as a package: by ComfyUI (custom_nodes/<pack>/) or by pytest in an identifier-named folder
    from . import nodes as _nodes

    if hasattr(_nodes, "comfy_entrypoint"):  # inside ComfyUI
        comfy_entrypoint = _nodes.comfy_entrypoint
        __all__ = ["comfy_entrypoint"]
