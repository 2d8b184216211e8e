"""Weights in and out: build a DRM from an SD3-family base checkpoint; save and load DRM files.

Base checkpoints are read lazily (safetensors, one tensor at a time, only the kept blocks) into a
DRM built on the meta device, so a 2.5 B-parameter base never exists twice in memory. Accepted:
a single-file checkpoint (`model.diffusion_model.*`, Stability names, fused qkv, possibly with text
encoders and VAE), a bare Stability-named MMDiT, a diffusers transformer folder (single or sharded
safetensors, with config.json) or file, or an in-memory state dict (meta tensors allowed).

A DRM file's `drm` header holds `format_version`, `backbone`, `head`, `latent`, `provenance`
(free-form) and `scoring`: how to score clean latents, e.g. `{"sigma": 0.1, "sigma_table":
{"kind": "flow-shift", "steps": 1000, "shift": 3.0}}` (drm_core/scoring.py). A file without
`scoring` scores clean latents at sigma 0.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import DRMError
from .keys import apply_transform, detect_layout, infer_backbone, stability_names
from .latents import SD3_LATENT_CHANNELS, SD3_LATENT_SCALE, SD3_LATENT_SHIFT
from .model import DRM, DRMConfig, build_head, head_config
from .scoring import ScoringConvention

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)


class TensorSource:
    """Lazy view of tensors in safetensors files (or a dict): names, shapes, and one tensor at a time."""

    def __init__(self, path: str | Path | Mapping[str, Tensor]):
        self.config: dict = {}
        self._files: dict[str, Path] = {}
        self._dict: Mapping[str, Tensor] | None = None
        if isinstance(path, Mapping):
            self.name, self._dict = "state dict", path
            self._shapes = {k: tuple(v.shape) for k, v in path.items()}
            return
        path = Path(path)
        self.name = str(path)
        files = _safetensors_files(path)
        if path.is_dir() and (path / "config.json").is_file():
            self.config = json.loads((path / "config.json").read_text())
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with _open(file) as f:
                for key in f.keys():
                    self._shapes[key] = tuple(f.get_slice(key).get_shape())
                    self._files[key] = file

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def get(self, key: str) -> Tensor:
        if self._dict is not None:
            return self._dict[key]
        with _open(self._files[key]) as f:
            return _aligned(f.get_tensor(key))

    def is_meta(self) -> bool:
        return self._dict is not None and any(t.is_meta for t in self._dict.values())


def _aligned(tensor: Tensor) -> Tensor:
    """Fresh, aligned storage: tensors read at odd file offsets can take different SIMD paths (1e-8 drift)."""
    return tensor.clone(memory_format=torch.contiguous_format)


def _safetensors_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DRMError(f"{path}: no such file or folder")
    if path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            weight_map = json.loads(index[0].read_text())["weight_map"]
            return [path / f for f in sorted(set(weight_map.values()))]
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise DRMError(f"{path}: folder holds no .safetensors weights (expected a diffusers transformer folder)")
        return files
    if path.suffix != ".safetensors":
        raise DRMError(f"{path}: only .safetensors files are accepted (pickle formats such as {path.suffix} can run "
                       "code when loaded); convert it to safetensors first")
    return [path]


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise DRMError(f"{file}: not a readable safetensors file ({err}); is it truncated or corrupt?") from err


def read_backbone_config(checkpoint: str | Path | Mapping[str, Tensor], blocks: int | None = None):
    """Detect the layout and infer the MMDiT architecture without reading any weights."""
    source = TensorSource(checkpoint)
    layout = detect_layout(list(source.shapes), source.name)
    return source, layout, infer_backbone(source.shapes, layout, source.name, blocks, source.config)


def drm_from_base(checkpoint: str | Path | Mapping[str, Tensor], blocks: int | None = None,
                  dtype: torch.dtype | None = None, **head_options) -> DRM:
    """Untrained DRM from an SD3-family MMDiT checkpoint (any supported layout); blocks=None keeps depth - 3.
    `head_options` configure the head; `kind="dina-lrm"` selects the DiNa-LRM head (default "drm-conv")."""
    source, layout, backbone = read_backbone_config(checkpoint, blocks)
    config = DRMConfig(backbone, head_config(head_options))
    kept = [(d, s, t) for d, s, t in stability_names(backbone)
            if config.uses_output_layer or not d.startswith(("norm_out.", "proj_out."))]
    if layout.kind == "stability":
        names = [(d, layout.prefix + s, t) for d, s, t in kept]
    else:
        names = [(d, layout.prefix + d, None) for d, _, _ in kept]
    state: dict[str, Tensor] = {}
    for dname, sname, transform in names:
        if sname not in source.shapes:
            raise DRMError(f"{source.name}: tensor '{sname}' is missing (needed for block layout {backbone})")
        tensor = apply_transform(source.get(sname), transform)
        state[dname] = tensor if dtype is None else tensor.to(dtype)
    dtype = dtype or state["pos_embed.proj.weight"].dtype
    device = "meta" if source.is_meta() else "cpu"
    with torch.device(device):
        head = build_head(config).to(dtype)
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    base = source.name if isinstance(checkpoint, (str, Path)) else "state dict"
    return _assemble(config, state, source.name, {"base_model": os.path.basename(base), "base_layout": layout.kind})


def mmdit_module_names(checkpoint: str | Path | Mapping[str, Tensor]) -> set[str]:
    """diffusers names of every weight-bearing module of the whole MMDiT (for checking LoRA keys)."""
    source, layout, b = read_backbone_config(checkpoint)
    full = infer_backbone(source.shapes, layout, source.name, b.depth, source.config)
    return {d.rsplit(".", 1)[0] for d, _, _ in stability_names(full)}


def load_mmdit(checkpoint: str | Path | Mapping[str, Tensor], dtype: torch.dtype | None = None):
    """The whole SD3-family MMDiT as a diffusers SD3Transformer2DModel, from any supported layout (lazily)."""
    from diffusers import SD3Transformer2DModel

    source, layout, b = read_backbone_config(checkpoint)
    b = infer_backbone(source.shapes, layout, source.name, b.depth, source.config)  # every block
    names = [(d, layout.prefix + (s if layout.kind == "stability" else d), t if layout.kind == "stability" else None)
             for d, s, t in stability_names(b)]
    state = {}
    for dname, sname, transform in names:
        if sname not in source.shapes:
            raise DRMError(f"{source.name}: tensor '{sname}' is missing (truncated or partial checkpoint?)")
        tensor = apply_transform(source.get(sname), transform)
        state[dname] = tensor if dtype is None else tensor.to(dtype)
    with torch.device("meta"):
        model = SD3Transformer2DModel(
            sample_size=b.pos_embed_max_size, patch_size=b.patch_size,
            in_channels=b.in_channels, num_layers=b.depth, attention_head_dim=b.head_dim,
            num_attention_heads=b.heads, joint_attention_dim=b.context_dim,
            caption_projection_dim=b.caption_projection_dim, pooled_projection_dim=b.pooled_dim,
            out_channels=b.out_channels, pos_embed_max_size=b.pos_embed_max_size,
            dual_attention_layers=b.dual_attention_layers, qk_norm=b.qk_norm)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise DRMError(f"{source.name}: cannot build the MMDiT, tensors missing: {missing[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def check_state(module: torch.nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Raise naming every missing, unexpected and mis-shaped tensor of `state` against `module`."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [(k, tuple(state[k].shape), v) for k, v in expected.items() if k in state and tuple(state[k].shape) != v]
    if missing or unexpected or wrong:
        raise DRMError(f"{what}: missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shapes {wrong[:8]}")


def _assemble(config: DRMConfig, state: dict[str, Tensor], name: str, provenance: dict,
              scoring: ScoringConvention | None = None) -> DRM:
    with torch.device("meta"):
        drm = DRM(config, provenance, scoring)
    check_state(drm, state, f"{name}: tensors do not match the architecture {config.backbone}")
    drm.load_state_dict(state, strict=True, assign=True)
    return drm.eval()


def save_drm(drm: DRM, path: str | Path, metadata: Mapping | None = None) -> Path:
    """Write a DRM checkpoint (one safetensors file, `drm` JSON metadata) atomically; `metadata` adds to the
    provenance, `drm.scoring` becomes the header's `scoring`."""
    path = Path(path)
    provenance = {**drm.provenance, **(metadata or {})}
    header = {"format_version": FORMAT_VERSION, **drm.config.to_dict(),
              "latent": {"space": "sd3-model", "channels": SD3_LATENT_CHANNELS, "shift": SD3_LATENT_SHIFT,
                         "scale": SD3_LATENT_SCALE},
              "provenance": provenance, "scoring": drm.scoring.to_dict()}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in drm.state_dict().items()}
    atomic_save_file(tensors, path, {"drm": json.dumps(header)})
    return path


def atomic_save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """save_file to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_drm_header(path: str | Path) -> dict:
    """The parsed `drm` metadata of a DRM file, validated; raises naming the file on any problem."""
    path = Path(path)
    _safetensors_files(path)
    if path.is_dir():
        raise DRMError(f"{path}: a folder, not a DRM file; expected one .safetensors file written by train-drm or "
                       "import-rm")
    with _open(path) as f:
        meta = f.metadata() or {}
    if "drm" not in meta:
        raise DRMError(f"{path}: not a DRM checkpoint (no 'drm' metadata). To build a DRM from an SD3.5 "
                       "checkpoint use drm_from_base.")
    try:
        header = json.loads(meta["drm"])
    except json.JSONDecodeError as err:
        raise DRMError(f"{path}: 'drm' metadata is not valid JSON ({err})") from err
    version = header.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise DRMError(f"{path}: DRM format_version {version!r} is not supported (this version reads "
                       f"{list(SUPPORTED_FORMAT_VERSIONS)}); upgrade the pack or re-export the file")
    for key in ("backbone", "head"):
        if key not in header:
            raise DRMError(f"{path}: DRM metadata lacks '{key}'")
    try:
        ScoringConvention.from_dict(header.get("scoring"))
    except DRMError as err:
        raise DRMError(f"{path}: DRM metadata: {err}") from err
    return header


def load_drm(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DRM:
    """Load a DRM checkpoint written by `save_drm` (eval mode); dtype/device default to the file's / CPU."""
    path = Path(path)
    header = read_drm_header(path)
    try:
        config = DRMConfig.from_dict(header)
    except (TypeError, DRMError) as err:
        raise DRMError(f"{path}: DRM metadata describes an invalid architecture ({err})") from err
    with _open(path) as f:
        state = {k: _aligned(f.get_tensor(k)) for k in f.keys()}
    drm = _assemble(config, state, str(path), header.get("provenance", {}),
                    ScoringConvention.from_dict(header.get("scoring")))
    return drm.to(device=device or "cpu", dtype=dtype)
