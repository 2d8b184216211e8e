"""LoRA on the SD3 MMDiT: attach (PEFT through diffusers), export for ComfyUI + diffusers, verify.

The exported file holds `transformer.<module>.lora_A.weight` and `.lora_B.weight` only, with PEFT's
scale alpha / rank folded into lora_B (B' = B * alpha / rank, in float32), and diffusers'
`lora_adapter_metadata` header with `lora_alpha = r`. Both loaders then apply scale 1.0 at strength
1.0, which is the trained strength: ComfyUI uses strength * alpha / rank only when a `<module>.alpha`
tensor exists, else strength * 1.0, and ignores header metadata (REFERENCE §3); diffusers'
`load_lora_weights` refuses any key without "lora" in it, so `.alpha` tensors cannot be used, and
scales by the header's lora_alpha / r (REFERENCE §6). The `drm_lora` header records the trained rank,
alpha and scale and that the scale is folded. `verify-lora` reports the scale each loader applies.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from drm_core import DRMError
from drm_core.checkpoint import atomic_save_file

log = logging.getLogger(__name__)

# Both streams' attention projections, and SD3.5-M's second (image-only) attention `attn2` by suffix.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header: flat JSON, "transformer.<LoraConfig field>": value
DRM_KEY = "drm_lora"
SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha")


def add_lora(transformer: nn.Module, rank: int = 32, alpha: float = 64.0,
             targets: tuple[str, ...] = DEFAULT_TARGETS, adapter: str = "default") -> nn.Module:
    """Attach a trainable LoRA (scale alpha / rank) to every matching Linear; freeze everything else."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                       init_lora_weights="gaussian"), adapter_name=adapter)
    return transformer


def lora_state(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights as `<module>.lora_A.weight` / `.lora_B.weight` (no adapter name, no prefix)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def export_lora(transformer: nn.Module, path: str | Path, extra_metadata: dict | None = None) -> Path:
    """Write the LoRA as one safetensors file that ComfyUI and diffusers load at the trained strength."""
    config = transformer.peft_config["default"]
    if config.rank_pattern or config.alpha_pattern or config.use_rslora:
        raise DRMError(f"export_lora({path}): the LoRA uses rank_pattern/alpha_pattern/rsLoRA; expected one rank "
                       "and alpha for every module (as add_lora makes)")
    rank, alpha = int(config.r), float(config.lora_alpha)
    scale = alpha / rank  # PEFT's scaling, folded into lora_B so every loader applies 1.0
    tensors = {}
    for key, value in lora_state(transformer).items():
        value = value.float()
        if key.endswith(".lora_B.weight"):
            value = value * scale  # [out, r]
        tensors[f"transformer.{key}"] = value.contiguous()
    adapter = {"transformer.r": rank, "transformer.lora_alpha": rank,
               "transformer.target_modules": sorted(config.target_modules), "transformer.lora_dropout": 0.0}
    record = {**(extra_metadata or {}), "rank": rank, "alpha": alpha, "trained_scale": scale, "scale_folded": True}
    meta = {"format": "pt", METADATA_KEY: json.dumps(adapter, sort_keys=True), DRM_KEY: json.dumps(record)}
    path = Path(path)
    atomic_save_file(tensors, path, meta)
    return path


def _header_json(header: dict[str, str], key: str, problems: list[str]) -> dict | None:
    """One JSON object from the safetensors header, or None (a broken one is a problem)."""
    if key not in header:
        return None
    try:
        value = json.loads(header[key])
    except json.JSONDecodeError as err:
        problems.append(f"header '{key}' is not valid JSON ({err})")
        return None
    if not isinstance(value, dict):
        problems.append(f"header '{key}' is not a JSON object")
        return None
    return value


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(default)


def _diffusers_scale(adapter: dict | None, module: str, rank: int) -> tuple[float | None, str | None]:
    """Scale diffusers applies to one `transformer.` module at strength 1.0, or None and why it cannot load it."""
    if adapter is None:  # diffusers builds LoraConfig(r=rank, lora_alpha=rank): scale 1.0 for SD3
        return 1.0, None
    config = {k.removeprefix("transformer."): v for k, v in adapter.items() if k.startswith("transformer.")}
    if "r" not in config:
        return None, "lora_adapter_metadata has no 'transformer.r'; diffusers builds a default LoraConfig"
    r = _pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))  # LoraConfig's default
    if int(r) != rank:
        return None, f"metadata r = {r:g} but the tensors have rank {rank}; load_lora_weights fails"
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r), None


def _read_lora_file(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict[str, float]]:
    """Header metadata, every tensor's shape, and the value of every `.alpha` tensor of a safetensors file."""
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            alphas = {k: float(f.get_tensor(k)) for k in shapes if k.endswith(".alpha")}
            return f.metadata() or {}, shapes, alphas
    except (OSError, SafetensorError) as err:
        raise DRMError(f"{path}: not a readable .safetensors LoRA file ({err})") from err


def verify_lora(path: str | Path, base: str | Path | None = None) -> dict:
    """Per module: the scale ComfyUI and diffusers apply at strength 1.0; keys either loader skips; problems."""
    from drm_core.checkpoint import mmdit_module_names

    path = Path(path)
    header, shapes, alphas = _read_lora_file(path)
    keys = list(shapes)
    problems: list[str] = []
    adapter = _header_json(header, METADATA_KEY, problems)
    record = _header_json(header, DRM_KEY, problems)
    modules: dict[str, dict] = {}
    for key in keys:
        for suffix in SUFFIXES:
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[suffix] = shapes[key]
                break
        else:
            problems.append(f"{key}: not a LoRA tensor (ignored by ComfyUI)")
    refused = [k for k in keys if "lora" not in k]
    if refused:
        problems.append(f"diffusers' load_lora_weights refuses this file: {len(refused)} key(s) without 'lora' "
                        f"in the name (e.g. '{refused[0]}'); fold alpha / rank into lora_B instead")
    known = mmdit_module_names(base) if base is not None else None
    report = []
    failures: Counter[str] = Counter()
    for module, parts in sorted(modules.items()):
        prefix, _, name = module.partition(".")
        rank = parts.get(".lora_A.weight", parts.get(".lora_down.weight", (0,)))[0]
        if prefix not in ("transformer", "diffusion_model", "base_model"):
            problems.append(f"{module}: prefix '{prefix}.' is not one ComfyUI maps for SD3 (use 'transformer.')")
        if known is not None and prefix == "transformer" and name not in known:
            problems.append(f"{module}: no module '{name}' in the base model")
        alpha_key = f"{module}.alpha"
        comfyui = (alphas[alpha_key] / rank if rank else float("nan")) if alpha_key in alphas else 1.0
        diffusers = None  # None: diffusers does not load this module
        if not refused and prefix == "transformer":
            diffusers, why = _diffusers_scale(adapter, name, rank)
            if why:
                failures[why] += 1
        report.append({"module": module, "rank": rank, "comfyui_scale": comfyui, "diffusers_scale": diffusers})
    problems += [f"{count} module(s): {why}" for why, count in sorted(failures.items())]
    skipped = [e["module"] for e in report if not e["module"].startswith("transformer.")]
    if skipped and not refused:
        problems.append(f"{len(skipped)} module(s) not under 'transformer.' (e.g. '{skipped[0]}'): diffusers' "
                        "load_lora_weights does not apply them to the SD3 transformer")
    problems += _scale_problems(report, record)
    notes = []
    if _expected_scale(record) is None and not alphas and adapter is None and report:
        notes.append("no record of the trained scale (no '.alpha' tensors, no lora_adapter_metadata, no drm_lora): "
                     "both loaders apply 1.0, right only if it was trained with lora_alpha = r or saved with "
                     "alpha / r folded into lora_B")
    return {"file": str(path), "modules": len(report), "problems": problems, "notes": notes,
            "expected_scale": _expected_scale(record), "record": record, "entries": report}


def _expected_scale(record: dict | None) -> float | None:
    """The loader scale at strength 1.0 that reproduces the trained LoRA, from our `drm_lora` record."""
    if record is None or not all(isinstance(record.get(k), (int, float)) for k in ("rank", "alpha")):
        return None
    return 1.0 if record.get("scale_folded") else float(record["alpha"]) / float(record["rank"])


def _describe_record(record: dict) -> str:
    """`drm_lora: rank 4, alpha 8, scale folded into lora_B`: where the expected loader scale comes from."""
    folded = ", scale folded into lora_B" if record.get("scale_folded") else ""
    return f"drm_lora: rank {record['rank']}, alpha {float(record['alpha']):g}{folded}"


def _scale_problems(report: list[dict], record: dict | None) -> list[str]:
    """Loaders that disagree with each other or with the recorded trained scale (one line per disagreement)."""
    problems = []
    expected = _expected_scale(record)
    pairs = Counter((round(e["comfyui_scale"], 6), None if e["diffusers_scale"] is None
                     else round(e["diffusers_scale"], 6)) for e in report)
    for (comfyui, diffusers), count in sorted(pairs.items(), key=str):
        where = f"{count} module(s)"
        if diffusers is not None and not math.isclose(comfyui, diffusers, rel_tol=1e-6):
            problems.append(f"{where} load at {comfyui:g} in ComfyUI and {diffusers:g} in diffusers (strength 1.0)")
        if expected is None:
            continue
        for loader, scale in (("ComfyUI", comfyui), ("diffusers", diffusers)):
            if scale is not None and not math.isclose(scale, expected, rel_tol=1e-6):
                problems.append(f"{where} load at the wrong strength in {loader}: scale {scale:g}, expected "
                                f"{expected:g} ({_describe_record(record)})")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora", help="LoRA .safetensors file")
    parser.add_argument("--base", default=None, help="SD3/SD3.5 checkpoint whose module names the LoRA must match")


def describe_scales(result: dict) -> str:
    """One line: the scale each loader applies at strength 1.0 (and the trained one when recorded)."""
    comfyui = sorted({round(e["comfyui_scale"], 6) for e in result["entries"]})
    diffusers = sorted({round(e["diffusers_scale"], 6) for e in result["entries"] if e["diffusers_scale"] is not None})
    text = f"scale at strength 1.0: ComfyUI {comfyui}, diffusers {diffusers or 'not loaded'}"
    if result["expected_scale"] is not None:
        text += f", expected {result['expected_scale']:g} ({_describe_record(result['record'])})"
    return text


def run(args: argparse.Namespace) -> int:
    result = verify_lora(args.lora, args.base)
    print(f"{result['file']}: {result['modules']} LoRA modules, {describe_scales(result)}")
    for note in result["notes"]:
        print(f"  note: {note}")
    for problem in result["problems"]:
        print(f"  problem: {problem}")
    print("OK: loads in ComfyUI and diffusers at the same strength" if not result["problems"]
          else f"{len(result['problems'])} problem(s)")
    return 0 if not result["problems"] else 1
