"""Published latent reward models as they are downloaded: recognise the folder, check it, convert it to a DRM.

Kind "dina-lrm": DiNa-LRM (HKUST-C4G/diffusion-rm), Hugging Face `liuhuohuo/DiNa-LRM-SD35M-12layers`:

    <folder>/config.json                                    settings (optional: the published 12-layer defaults)
    <folder>/checkpoint/backbone_lora/adapter_config.json   PEFT LoRA (r 64) on SD3.5-M's first 12 joint blocks
    <folder>/checkpoint/backbone_lora/adapter_model.safetensors
    <folder>/checkpoint/rm_head.pt                          the reward head's state dict (a torch pickle)

It holds no backbone: the user's SD3.5-M checkpoint (the "base", any layout drm_from_base reads)
supplies the first 12 blocks, the LoRA is merged into them (W += scale * B @ A, scale = alpha / r,
or alpha / sqrt(r) with rsLoRA) and the head becomes a "dina-lrm" head (heads_dina.py).

`rm_head.pt` is the only pickle the pack ever reads, here and only with
`torch.load(weights_only=True)`: a pickle that would run code is refused. Every check that needs no
tensor (folder complete, no unknown weight files, base readable and of the shape the LoRA needs)
runs before any weights are loaded; missing, extra and mis-shaped tensors are errors naming them.

`load_published` converts a download once per base and caches the DRM file inside the download
(`<folder>/converted/<base stem>.drm.safetensors`, written atomically); its provenance records the
base's file name and size and the download files' sizes and mtimes, and a change of either converts
again. `list_entries` lists what a DRM loader can load under some folders: DRM `.safetensors`
files and recognised download folders (never the files inside them); it reads file names only.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import check_state, drm_from_base, load_drm, read_backbone_config, read_drm_header, save_drm
from .errors import DRMError
from .model import DRM, DRMConfig, build_head, head_config
from .peft_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_peft_lora, linear_shapes, merge_peft_lora
from .scoring import ScoringConvention, SigmaTable

log = logging.getLogger(__name__)

DINA = "dina-lrm"
DINA_REPO = "liuhuohuo/DiNa-LRM-SD35M-12layers"
HEAD_FILE = "rm_head.pt"
LORA_DIR = "backbone_lora"
CONVERTED_DIR = "converted"
CONVERTER_VERSION = 1  # bump when the conversion's output changes: cached files are then converted again
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pkl", ".pickle", ".gguf", ".sft")

# DiNa-LRM-SD35M-12layers (config/sd3m/thurstone-12layer.yaml), used where the download has no config.json.
DINA_SD35M_DEFAULTS = {"num_transformer_layers": 12, "visual_head_idx": [4, 8, 12], "text_head_idx": [4, 8, 12],
                       "use_lora": True, "freeze_backbone": False, "use_logistic": False,
                       "reward_head": {"use_proj_in": False, "width": -1, "out_dim": 1, "num_queries": 4,
                                       "num_attn_heads": 8, "dropout": 0.0}}
# SD3 text conditioning as diffusers' SD3 pipeline builds it: CLIP-L/G penultimate states (77 tokens each,
# concatenated and zero-padded to 4096) followed by T5 padded to t5_max_length without an attention mask.
SCHEME = "diffusers-sd3"
DINA_SIGMA_HINT = {"generated_latents": 0.4, "encoded_images": 0.1}
# DiNa-LRM's scorer noises clean latents to u (default 0.1) after snapping u to the nearest sigma of its noise
# scheduler, SD3.5-M's FlowMatchEulerDiscreteScheduler (1000 training steps, shift 3): 0.1 -> 0.100746.
DINA_SCORING = ScoringConvention(
    sigma=0.1, sigma_table=SigmaTable(steps=1000, shift=3.0),
    note="DiNa-LRM scores clean latents at u = 0.1 (its default, for VAE-encoded images; it suggests 0.4 for "
         "sampler outputs), snapped to its 1000-entry shift-3 timestep table; the noise is seeded here")
SCORE_NOTE = ("raw head output, no normalisation applied (a positive affine map changes neither rankings, "
              "step-wise selection nor group-normalised advantages)")


def recognise(folder: str | Path) -> str | None:
    """The kind of published download `folder` is laid out as ("dina-lrm": it has a checkpoint/ folder), else None.

    File names only, no reads: a recognised folder may still be incomplete (see check_complete)."""
    return DINA if Path(folder, "checkpoint").is_dir() else None


@dataclass(frozen=True)
class DinaDownload:
    """A complete DiNa-LRM download: where its files are and the settings its config.json gives."""

    root: Path  # the download folder
    checkpoint: Path  # the folder holding rm_head.pt (root/checkpoint, or root itself)
    config_file: Path | None
    settings: dict

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def head_file(self) -> Path:
        return self.checkpoint / HEAD_FILE

    @property
    def lora_dir(self) -> Path | None:
        """The LoRA folder, None when the settings say the backbone was frozen / has no LoRA."""
        return None if _frozen(self.settings) else self.checkpoint / LORA_DIR

    def sources(self) -> list[Path]:
        """Every file the conversion reads."""
        files = [self.head_file] + ([self.config_file] if self.config_file else [])
        if self.lora_dir is not None:
            files += [self.lora_dir / ADAPTER_CONFIG, self.lora_dir / ADAPTER_WEIGHTS]
        return files


def check_complete(folder: str | Path, config: str | Path | None = None) -> DinaDownload:
    """The DiNa-LRM download in `folder` (or its checkpoint/ folder) if complete; else a DRMError naming the
    missing or unknown files. `config` overrides the config.json found in the download."""
    source = Path(folder)
    if not source.is_dir():
        raise DRMError(f"{source}: expected the DiNa-LRM download folder (holding checkpoint/{HEAD_FILE})")
    if (source / "checkpoint").is_dir():
        root, ckpt = source, source / "checkpoint"
    elif (source / HEAD_FILE).is_file() or (source / LORA_DIR).is_dir():
        root, ckpt = (source.parent if source.name == "checkpoint" else source), source  # its checkpoint/ folder
    else:
        raise DRMError(f"{source}: no checkpoint/ folder in it: not a DiNa-LRM download (expected config.json and "
                       f"checkpoint/{HEAD_FILE}, checkpoint/{LORA_DIR}/ as `hf download {DINA_REPO}` writes them)")
    if config is not None:
        config_file = Path(config)
        if not config_file.is_file():
            raise DRMError(f"config file {config_file}: no such file")
    else:
        config_file = next((c for c in (ckpt / "config.json", root / "config.json") if c.is_file()), None)
    settings = _dina_settings(config_file)
    download = DinaDownload(root, ckpt, config_file, settings)
    known = {download.head_file, *download.sources()}
    if download.lora_dir is None and (ckpt / LORA_DIR).exists():
        raise DRMError(f"{ckpt / LORA_DIR}: config says the backbone was frozen / has no LoRA, yet a LoRA is present")
    unknown = sorted(_rel(p, root) for p in _files(ckpt) if p not in known and p.name.lower().endswith(WEIGHT_SUFFIXES)
                     and root / CONVERTED_DIR not in p.parents)
    missing = [_rel(p, root) for p in download.sources() if p != config_file and not p.is_file()]
    if unknown:
        raise DRMError(f"{root}: {', '.join(unknown)} is not part of the DiNa-LRM layout (config.json, "
                       f"checkpoint/{HEAD_FILE}, checkpoint/{LORA_DIR}/{ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}); this "
                       "folder holds another model or variant, which the pack cannot load"
                       + (f" (also missing: {', '.join(missing)})" if missing else ""))
    if missing:
        raise DRMError(f"{root}: the DiNa-LRM download is incomplete: missing {', '.join(missing)}. Download it "
                       f"again: hf download {DINA_REPO} --local-dir {root}")
    return download


def check_base(download: DinaDownload, base: str | Path) -> DRMConfig:
    """The DRM architecture `base` gives this download; raises naming the base if it is unreadable or is not
    the model the LoRA was trained on. Reads file headers only (no tensors)."""
    blocks = int(download.settings["num_transformer_layers"])
    try:
        depth = read_backbone_config(base, blocks=1)[2].depth
        if blocks > depth:
            raise DRMError(f"{base}: {download.name} runs the first {blocks} joint blocks, this MMDiT has {depth}; "
                           "use the SD3.5 Medium checkpoint the LoRA was trained on")
        backbone = read_backbone_config(base, blocks=blocks)[2]
    except DRMError as err:
        raise DRMError(f"base checkpoint: {err}") from err
    try:
        config = DRMConfig(backbone, head_config(_dina_head_options(download)))
        with torch.device("meta"):
            meta = DRM(config)
    except DRMError as err:
        raise DRMError(f"{download.name} on base {base}: {err}") from err
    if download.lora_dir is not None:
        try:
            check_peft_lora(download.lora_dir, linear_shapes(meta, skip_prefixes=("head.",)))
        except DRMError as err:
            raise DRMError(f"{err}. Is {Path(base).name} the SD3.5 Medium checkpoint {download.name}'s LoRA was "
                           f"trained on (its MMDiT here: {backbone.depth} blocks, hidden {backbone.hidden})?") from err
    return config


def convert(folder: str | Path, base: str | Path, config: str | Path | None = None,
            dtype: torch.dtype | None = None) -> DRM:
    """DiNa-LRM download + SD3.5-M base -> DRM with a "dina-lrm" head, the LoRA merged in (file dtype: the
    base's unless `dtype`)."""
    download = check_complete(folder, config)
    if download.config_file is None:
        log.warning("%s: no config.json: assuming DiNa-LRM-SD35M-12layers (12 blocks, taps 4/8/12)", download.root)
    drm_config = check_base(download, base)
    head_state = load_head_pickle(download.head_file)
    with torch.device("meta"):
        head = build_head(drm_config)
    check_state(head, head_state, f"{download.head_file}: head tensors (as named in the file) do not match the "
                                  "architecture")
    options = _dina_head_options(download)
    blocks = drm_config.backbone.blocks
    drm = drm_from_base(base, blocks=blocks, **options)
    out_dtype = dtype or next(drm.parameters()).dtype
    drm = drm.float()  # merge and load in float32, cast once at the end

    merged: dict = {"applied": False}
    if download.lora_dir is not None:
        merged = merge_peft_lora(drm, download.lora_dir, skip_prefixes=("head.",))
    drm.head.load_state_dict({k: v.float() for k, v in head_state.items()}, strict=True)
    drm = drm.to(out_dtype).eval()
    score = {"normalisation": "none", "note": SCORE_NOTE,
             "upstream": {"readme": "(raw + 10) / 10", "grpo_scorer": "raw / 5"}}
    if download.settings.get("use_logistic"):
        log.warning("%s enables a logistic output transform whose parameters are not in the published files; "
                    "it is not applied (it is monotone: rankings are unchanged)", download.config_file)
        score["upstream"]["logistic"] = "enabled in config, parameters unpublished, not applied"
    config_name = download.config_file.name if download.config_file else "built-in defaults"
    drm.provenance.update({
        "imported_from": {"kind": DINA, "source": Path(folder).name, "head": HEAD_FILE, "lora": merged,
                          "config": config_name},
        "upstream": "HKUST-C4G/diffusion-rm (DiNa-LRM)",
        "text_encoding": {"scheme": SCHEME, "t5_max_length": 256,
                          "note": "as DiNa-LRM's published scoring examples encode prompts; its training code "
                                  "(SD3RewardModel.encode_prompt) pads T5 to 128"},
        "score": score,
        "sigma": {"input": "sigma of the given latents, timestep = 1000 * sigma",
                  "upstream_grid": "DiNa-LRM snaps sigma to the nearest of 1000 shift-3 training sigmas",
                  "clean_latent_hint": DINA_SIGMA_HINT,
                  "clean_latent_noise": "noise clean latents to the hinted sigma with a seeded generator"},
    })
    drm.scoring = DINA_SCORING
    log.info("converted DiNa-LRM %s: %d blocks, taps image %s text %s, LoRA on %d modules", download.name, blocks,
             options["visual_taps"], options["text_taps"], merged.get("modules", 0))
    return drm


def load_head_pickle(path: Path) -> dict[str, Tensor]:
    """Read a published head state dict (a torch pickle) with weights_only=True: tensors only, no code."""
    if not path.is_file():
        raise DRMError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise DRMError(f"{path}: refused: this pickle holds more than tensors and could run code when loaded "
                       f"({first}). Re-download it from the official source.") from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise DRMError(f"{path}: not a readable torch state dict ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise DRMError(f"{path}: expected a state dict of named tensors, got {type(state).__name__}")
    return state


# ------------------------------------------------------------------------------------------- convert once

def converted_path(folder: str | Path, base: str | Path) -> Path:
    """Where the DRM converted from `folder` on `base` is cached: <folder>/converted/<base stem>.drm.safetensors."""
    return Path(folder, CONVERTED_DIR, f"{Path(base).stem}.drm.safetensors")


def conversion_stamp(download: DinaDownload, base: str | Path) -> dict:
    """What a cached conversion depends on: the base's name and size, the download files' sizes and mtimes."""
    base = Path(base)
    size = sum(f.stat().st_size for f in _files(base)) if base.is_dir() else base.stat().st_size
    sources = {}
    for file in download.sources():
        st = file.stat()
        sources[_rel(file, download.root)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"converter_version": CONVERTER_VERSION, "kind": DINA, "base": {"name": base.name, "size": size},
            "sources": sources}


def load_published(folder: str | Path, base: str | Path, device: torch.device | str | None = None,
                   ) -> tuple[DRM, bool]:
    """(DRM, converted) for a published download on `base`: reads the cached conversion when it matches the
    current files, else converts and caches it (atomically). If the folder is read-only, converts every time."""
    download = check_complete(folder)
    target = converted_path(download.root, base)
    current = conversion_stamp(download, base)
    if target.is_file():
        try:
            cached = read_drm_header(target).get("provenance", {}).get("converted_from")
        except DRMError as err:
            log.warning("%s: unreadable (%s); converting again", target, err)
            cached = None
        if cached == current:
            log.info("%s: using the conversion cached in %s", download.name, target)
            return load_drm(target, device=device), False
        if cached is not None:
            log.info("%s: the base or the download changed since %s was written; converting again", download.name,
                     target)
    log.info("%s: converting with base %s (once; cached in %s)", download.name, Path(base).name, target)
    drm = convert(download.root, base)
    drm.provenance["converted_from"] = current
    try:
        save_drm(drm, target)
    except OSError as err:
        log.warning("%s: cannot write the converted DRM (%s); it will be converted again on the next load. "
                    "Convert it once with `python -m training import-rm` instead.", target, err)
    return drm.to(device or "cpu"), True


# ------------------------------------------------------------------------------------------------ listing

def list_entries(roots: list[str | Path]) -> list[str]:
    """Loadable entries under `roots` (relative paths, first root wins): DRM .safetensors files and recognised
    published folders; never hidden files (half-written temporaries) nor anything inside a recognised folder."""
    entries: dict[str, None] = {}
    for root in map(os.path.normpath, map(str, roots)):
        if not os.path.isdir(root):
            continue
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if folder != root and recognise(folder):
                entries.setdefault(os.path.relpath(folder, root), None)
                dirs.clear()
                continue
            for name in sorted(files):
                if name.endswith(".safetensors") and not name.startswith("."):
                    entries.setdefault(os.path.relpath(os.path.join(folder, name), root), None)
    return sorted(entries)


def resolve_entry(roots: list[str | Path], name: str) -> tuple[Path, str | None] | None:
    """(path, published kind or None for a DRM file) of a `list_entries` entry, or None if it is not there."""
    relative = os.path.relpath(os.path.join(os.sep, name), os.sep)  # no escaping the roots with ".."
    for root in roots:
        path = Path(root, relative)
        if path.is_file() and path.name.endswith(".safetensors"):
            return path, None
        if path.is_dir() and recognise(path):
            return path, recognise(path)
    return None


# ------------------------------------------------------------------------------------------------ helpers

def _frozen(settings: dict) -> bool:
    return bool(settings.get("freeze_backbone")) or not settings.get("use_lora", True)


def _dina_settings(config_file: Path | None) -> dict:
    if config_file is None:
        return DINA_SD35M_DEFAULTS
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DRMError(f"{config_file}: not valid JSON ({err})") from err
    model = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        raise DRMError(f"{config_file}: no 'model' section")
    settings = {**DINA_SD35M_DEFAULTS, **model}
    settings["reward_head"] = {**DINA_SD35M_DEFAULTS["reward_head"], **(model.get("reward_head") or {})}
    if int(settings["reward_head"].get("out_dim", 1)) != 1:
        raise DRMError(f"{config_file}: reward_head.out_dim {settings['reward_head']['out_dim']} is not 1 "
                       "(a scalar reward)")
    return settings


def _dina_head_options(download: DinaDownload) -> dict:
    s, rh = download.settings, download.settings["reward_head"]
    width = int(rh.get("width", -1))
    return dict(kind=DINA, visual_taps=tuple(s["visual_head_idx"]), text_taps=tuple(s["text_head_idx"]),
                width=None if width == -1 else width, num_queries=int(rh.get("num_queries", 4)),
                attn_heads=int(rh.get("num_attn_heads", 8)), proj_in=bool(rh.get("use_proj_in", False)),
                dropout=float(rh.get("dropout", 0.0)))


def _files(folder: Path) -> list[Path]:
    """Every non-hidden file under `folder` (following links), hidden folders skipped."""
    out = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(parent, f) for f in files if not f.startswith(".")]
    return out


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()
