"""`python -m training import-rm`: turn a published latent reward model into a DRM file.

Kinds (see docs/import_rm.md for downloads and caveats):
- `dina-lrm`: DiNa-LRM (HKUST-C4G/diffusion-rm, weights `DiNa-LRM-SD35M-12layers`). The download
  holds a PEFT LoRA for the first 12 joint blocks (`checkpoint/backbone_lora/`), the reward head
  (`checkpoint/rm_head.pt`, a torch pickle) and `config.json`. The backbone comes from the user's
  SD3.5-M checkpoint (`--base`). The conversion is drm_core.published.convert, the same code
  ComfyUI's DRMLoader runs when such a folder sits in models/drm/ (this command is optional).
- `drm-official`: the DRM paper's own layout (github jjaxonx/DRM): one `model.safetensors` with the
  whole SD3.5 MMDiT under `transformer.` (diffusers names, all blocks, the last 3 unused) and the
  conv head under `reward_output.` (down1..3 = conv/GroupNorm/ReLU, mlp.0/mlp.3 linear).

Inputs are checked before any weights are read: `--out` writable, the source complete, the base
readable and of the shape the LoRA needs. `rm_head.pt` is the only pickle the pack ever reads,
only with `torch.load(weights_only=True)` (drm_core.published); a pickle that would run code is
refused. Missing, extra and mis-shaped tensors are errors that name them.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from drm_core import DRM, DRMError, drm_from_base, save_drm
from drm_core.checkpoint import TensorSource, check_state, read_backbone_config
from drm_core.published import SCHEME, SCORE_NOTE, check_base, check_complete, convert

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Blocks the official code skips at the end ("layer_missing"): 3 of SD3.5-M's 24, 5 of SD3.5-L's 38.
OFFICIAL_LAYER_MISSING = {24: 3, 38: 5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="the downloaded model: DiNa-LRM snapshot folder (or its "
                        "checkpoint/ folder); official DRM model.safetensors (or the folder holding it)")
    parser.add_argument("--kind", required=True, choices=["dina-lrm", "drm-official"], help="published layout")
    parser.add_argument("--out", required=True, type=Path, help="DRM file to write (.safetensors)")
    parser.add_argument("--base", type=Path, help="SD3.5-M base checkpoint, any layout drm_from_base reads "
                        "(required for dina-lrm, whose download holds only a LoRA)")
    parser.add_argument("--config", type=Path, help="dina-lrm: its config.json (default: found in the download)")
    parser.add_argument("--blocks", type=int, help="drm-official: joint blocks the model runs (default: 21 for "
                        "SD3.5-M, 33 for SD3.5-L, as the official code)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="dtype of the written file (default: the weights')")


def run(args: argparse.Namespace) -> int:
    check_out(args.out)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.kind == "dina-lrm":
        if args.base is None:
            raise DRMError("import-rm --kind dina-lrm needs --base: the SD3.5-M checkpoint the LoRA was trained on")
        check_base(check_complete(args.source, args.config), args.base)  # before any weights are read
        drm = import_dina_lrm(args.source, args.base, config=args.config, dtype=dtype)
    else:
        drm = import_drm_official(args.source, blocks=args.blocks, dtype=dtype)
    path = save_drm(drm, args.out)
    log.info("wrote %s (%s head, %d blocks); put it in ComfyUI's models/drm/", path, drm.config.head.kind,
             drm.config.backbone.blocks)
    return 0


def check_out(out: Path) -> None:
    """--out must be a .safetensors file name in a folder that exists (or can be made) and is writable."""
    if out.suffix != ".safetensors":
        raise DRMError(f"--out {out}: a DRM file must end in .safetensors")
    if out.is_dir():
        raise DRMError(f"--out {out}: is a folder; give the file to write, e.g. {out / 'drm.safetensors'}")
    folder = out.parent.resolve()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DRMError(f"--out {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DRMError(f"--out {out}: cannot write in {folder} (permission denied)")


def import_dina_lrm(source: str | Path, base: str | Path, config: str | Path | None = None,
                    dtype: torch.dtype | None = None) -> DRM:
    """DiNa-LRM download + SD3.5-M base -> DRM with a "dina-lrm" head and the LoRA merged in."""
    return convert(source, base, config=config, dtype=dtype)


# ------------------------------------------------------------------------------------------ official DRM

def import_drm_official(source: str | Path, blocks: int | None = None, dtype: torch.dtype | None = None) -> DRM:
    """The official DRM's model.safetensors (whole truncated MMDiT + conv head) -> DRM, tensors unchanged."""
    file = _find_official(Path(source))
    src = TensorSource(file)
    head_keys = {k for k in src.shapes if k.startswith("reward_output.")}
    if not head_keys or not any(k.startswith("transformer.") for k in src.shapes):
        raise DRMError(f"{file}: not an official DRM checkpoint (expected 'transformer.*' and 'reward_output.*' "
                       f"tensors, found e.g. {sorted(src.shapes)[:3]})")
    _, _, full = read_backbone_config(file, blocks=1)
    if blocks is None:
        if full.depth not in OFFICIAL_LAYER_MISSING:
            raise DRMError(f"{file}: MMDiT with {full.depth} blocks is neither SD3.5-M nor SD3.5-L; pass --blocks")
        blocks = full.depth - OFFICIAL_LAYER_MISSING[full.depth]
    convs = [src.shapes.get(f"reward_output.down{i}.0.weight") for i in (1, 2, 3)]
    if any(s is None for s in convs) or "reward_output.mlp.0.weight" not in src.shapes:
        raise DRMError(f"{file}: reward head tensors missing (expected reward_output.down1..3 and mlp.0/mlp.3, "
                       f"found {sorted(head_keys)[:8]})")
    head_options = dict(conv_channels=tuple(s[0] for s in convs), groups=32,
                        mlp_hidden=src.shapes["reward_output.mlp.0.weight"][0], dropout=0.1)
    drm = drm_from_base(file, blocks=blocks, dtype=dtype, **head_options)
    mapped = {}
    for key in head_keys:
        m = re.fullmatch(r"reward_output\.down([123])\.([01])\.(weight|bias)", key)
        if m:
            mapped[f"convs.{3 * (int(m[1]) - 1) + int(m[2])}.{m[3]}"] = key
        elif re.fullmatch(r"reward_output\.mlp\.[03]\.(weight|bias)", key):
            mapped[key[len("reward_output."):]] = key
        else:
            raise DRMError(f"{file}: unexpected head tensor '{key}' (official head: down1..3 conv/GroupNorm, mlp.0/3)")
    head_dtype = next(drm.head.parameters()).dtype
    _load_exact(drm.head, {ours: src.get(theirs).to(head_dtype) for ours, theirs in mapped.items()}, str(file),
                prefix="reward_output -> head.")
    used = set(_backbone_names(drm))
    ignored = sorted(k for k in src.shapes if k.startswith("transformer.") and k[len("transformer."):] not in used)
    stray = sorted(k for k in src.shapes if not k.startswith(("transformer.", "reward_output.")))
    if stray:
        raise DRMError(f"{file}: unexpected tensors {stray[:5]} (neither 'transformer.' nor 'reward_output.')")
    block_of = re.compile(r"transformer\.transformer_blocks\.(\d+)\.")
    unused_blocks = sorted({int(m[1]) for k in ignored if (m := block_of.match(k))})
    other = [k for k in ignored if not k.startswith("transformer.transformer_blocks.")]
    if other:
        raise DRMError(f"{file}: tensors the DRM does not know: {other[:5]}")
    log.info("official DRM: running blocks 0..%d; %d tensors of blocks %s are unused by the official model and "
             "not copied", blocks - 1, len(ignored), unused_blocks)
    drm.provenance.update({
        "imported_from": {"kind": "drm-official", "source": file.name, "unused_blocks_not_copied": unused_blocks},
        "upstream": "jjaxonx/DRM (official DRM code)",
        "text_encoding": {"scheme": SCHEME, "t5_max_length": 512,
                          "note": "the official training and inference default"},
        "score": {"normalisation": "none", "note": SCORE_NOTE},
    })
    return drm.eval()


def _find_official(source: Path) -> Path:
    if source.is_dir():
        source = source / "model.safetensors"
        if not source.is_file():
            raise DRMError(f"{source.parent}: no model.safetensors in it (the official trainer writes one per "
                           "checkpoint-N folder)")
    if source.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise DRMError(f"{source}: pickle weights are not read; use the model.safetensors the official trainer writes")
    return source


def _backbone_names(drm: DRM) -> list[str]:
    return [k for k in drm.state_dict() if not k.startswith("head.")]


def _load_exact(module: torch.nn.Module, state: dict[str, Tensor], name: str, prefix: str) -> None:
    """load_state_dict that names every missing, unexpected and mis-shaped tensor."""
    check_state(module, state, f"{name}: head tensors ({prefix or 'as named in the file'}) do not match the "
                               "architecture")
    dtype = next(module.parameters()).dtype
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
