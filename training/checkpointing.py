"""Atomic training checkpoints without pickle: tensors in safetensors, everything else in JSON.

    out/checkpoints/step-000500/{model.safetensors, optimizer.safetensors, state.json}
A checkpoint folder is written under a temporary name and renamed when complete, so a killed run
never leaves a half checkpoint; `latest` picks the highest complete step; older ones are rotated.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from drm_core import DRMError

PREFIX = "step-"


def save_checkpoint(root: Path, step: int, model: nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, state: dict, keep: int = 3) -> Path:
    """Write model (a module or just the tensors to keep, e.g. a LoRA), optimizer and JSON state for `step`;
    keep only the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = model if isinstance(model, dict) else model.state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "model.safetensors")
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, **state}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file())


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint under root (None if there is none); a path -> that folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise DRMError(f"--resume {resume}: not a checkpoint folder (expected {PREFIX}NNNNNNN with state.json)")
    return path


def load_checkpoint(path: Path, model: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model (if given) and optimizer in place; returns the JSON state plus `tensors` (the model file)."""
    state = json.loads((path / "state.json").read_text())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        state["tensors"] = {k: f.get_tensor(k) for k in f.keys()}
    if model is not None:
        model.load_state_dict(state["tensors"])
    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"]))
    return state


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": groups}


def check_writable(folder: str | Path, what: str) -> Path:
    """Create `folder` if needed and write a test file there, or raise naming `what` and the folder."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise DRMError(f"{what} {folder}: cannot write there ({err}); choose a writable folder") from err
    return path
