"""Merge a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into a model's Linear layers.

Written from PEFT's documented file format and module-selection rules, without importing peft:
keys `base_model.model.<module>.lora_A/B.weight`, scale alpha / r (alpha / sqrt(r) with rsLoRA),
`rank_pattern` / `alpha_pattern` overrides, `target_modules` / `exclude_modules` selection.
`check_peft_lora` validates a folder against layer shapes from the safetensors header alone (no
tensor reads), so a wrong base is refused before any weights are loaded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import DRMError

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraPlan:
    """A validated LoRA folder: its config, weights file and per-module (A key, B key, rank, alpha)."""

    config: dict
    weights: Path
    modules: dict[str, tuple[str, str, int, float]]


def linear_shapes(model: torch.nn.Module, skip_prefixes: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear of `model` (works on the meta device), except names under `skip_prefixes`."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.startswith(skip_prefixes)}


def check_peft_lora(lora_dir: Path, linears: dict[str, tuple[int, int]]) -> LoraPlan:
    """Validate a PEFT LoRA folder against Linear shapes {name: (out, in)} from file headers only.

    Every LoRA pair must hit a Linear of the right shape and rank, and every Linear PEFT's
    target/exclude rules select must have a pair: anything else is an error naming the modules.
    """
    cfg_file, weights = lora_dir / ADAPTER_CONFIG, lora_dir / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise DRMError(f"{lora_dir}: no {ADAPTER_CONFIG} (expected a PEFT LoRA folder)")
    if not weights.is_file():
        pickled = lora_dir / "adapter_model.bin"
        hint = f" ({pickled.name} is a pickle; only safetensors adapters are read)" if pickled.exists() else ""
        raise DRMError(f"{lora_dir}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DRMError(f"{cfg_file}: not valid JSON ({err})") from err
    unsupported = {"peft_type": cfg.get("peft_type", "LORA") != "LORA", "use_dora": cfg.get("use_dora"),
                   "lora_bias": cfg.get("lora_bias"), "fan_in_fan_out": cfg.get("fan_in_fan_out"),
                   "layers_to_transform": cfg.get("layers_to_transform"),
                   "layer_replication": cfg.get("layer_replication"),
                   "bias": cfg.get("bias", "none") != "none"}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise DRMError(f"{cfg_file}: unsupported adapter settings {bad} (only plain LoRA can be merged)")
    if "r" not in cfg or "lora_alpha" not in cfg:
        raise DRMError(f"{cfg_file}: no 'r' / 'lora_alpha' (is this a PEFT LoRA config?)")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise DRMError(f"{weights}: not a readable safetensors file ({err})") from err

    pairs: dict[str, dict[str, str]] = {}
    unexpected = []
    for key in shapes:
        m = _LORA_KEY.match(key)
        if m is None:
            unexpected.append(key)
        else:
            pairs.setdefault(m["module"], {})[m["ab"]] = key
    unknown = sorted(n for n in pairs if n not in linears)
    half = sorted(n for n, p in pairs.items() if set(p) != {"A", "B"})
    wanted = sorted(n for n in linears if _peft_targets(n, cfg))
    missing = sorted(set(wanted) - set(pairs))
    if unexpected or unknown or half or missing:
        raise DRMError(f"{weights}: LoRA does not match the {len(linears)} backbone Linear layers: unexpected keys "
                       f"{unexpected[:5]}, modules not in the backbone {unknown[:5]}, incomplete A/B pairs {half[:5]}, "
                       f"targeted modules without LoRA {missing[:5]}")
    wrong, modules = [], {}
    for name, p in sorted(pairs.items()):
        out_dim, in_dim = linears[name]
        a, b = shapes[p["A"]], shapes[p["B"]]
        r = a[0] if a else 0
        if len(a) != 2 or len(b) != 2 or a[1] != in_dim or b != (out_dim, r):
            wrong.append((name, a, b, (out_dim, in_dim)))
            continue
        expected_r = int(_pattern_value(name, cfg.get("rank_pattern") or {}, cfg["r"]))
        if r != expected_r:
            wrong.append((name, f"rank {r}", f"config rank {expected_r}"))
            continue
        alpha = float(_pattern_value(name, cfg.get("alpha_pattern") or {}, cfg["lora_alpha"]))
        modules[name] = (p["A"], p["B"], r, alpha)
    if wrong:
        raise DRMError(f"{weights}: LoRA shapes do not match the backbone (module, A, B, Linear [out, in]): "
                       f"{wrong[:5]}")
    return LoraPlan(cfg, weights, modules)


def merge_peft_lora(model: torch.nn.Module, lora_dir: Path, skip_prefixes: tuple[str, ...] = ()) -> dict:
    """Merge a PEFT LoRA folder into `model` in place (W += scale * B @ A in float32); returns a summary.

    PEFT module names (`base_model.model.<name>`) must be `model`'s own module names; see check_peft_lora.
    """
    plan = check_peft_lora(lora_dir, linear_shapes(model, skip_prefixes))
    rslora = bool(plan.config.get("use_rslora"))
    linears = dict(model.named_modules())
    ranks = set()
    try:
        with safe_open(str(plan.weights), framework="pt", device="cpu") as f, torch.no_grad():
            for name, (key_a, key_b, r, alpha) in plan.modules.items():
                weight = linears[name].weight
                a, b = f.get_tensor(key_a).float(), f.get_tensor(key_b).float()  # [r, in], [out, r]
                scale = alpha / math.sqrt(r) if rslora else alpha / r
                weight.add_((scale * (b @ a)).to(weight.dtype))  # [out, in]
                ranks.add((r, alpha))
    except (SafetensorError, OSError) as err:
        raise DRMError(f"{plan.weights}: not a readable safetensors file ({err})") from err
    return {"applied": True, "modules": len(plan.modules), "rank_alpha": sorted(ranks), "rslora": rslora,
            "merged": "W += scale * B @ A in float32"}


def _peft_match(name: str, spec) -> bool:
    """PEFT's module selection: a string is a full regex match; a list matches a name or a dotted suffix."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _peft_targets(name: str, cfg: dict) -> bool:
    return _peft_match(name, cfg.get("target_modules")) and not _peft_match(name, cfg.get("exclude_modules"))


def _pattern_value(name: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern: the first pattern matching the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default

