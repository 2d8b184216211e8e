"""LoRA on the SD3 MMDiT: attach (PEFT through diffusers), export for ComfyUI + diffusers, verify.

The exported file holds `transformer.<module>.lora_A.weight`, `.lora_B.weight` and an explicit
`transformer.<module>.alpha` tensor per module: ComfyUI ignores header metadata and applies
strength * alpha / rank only when that tensor exists (REFERENCE §3), while diffusers reads the
adapter config from the `lora_adapter_metadata` header. One file, the same strength in both.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from drm_core import DRMError
from drm_core.checkpoint import atomic_save_file

log = logging.getLogger(__name__)

# Both streams' attention projections, and SD3.5-M's second (image-only) attention `attn2` by suffix.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
METADATA_KEY = "lora_adapter_metadata"


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
    rank, alpha = int(config.r), float(config.lora_alpha)
    tensors = {}
    for key, value in lora_state(transformer).items():
        tensors[f"transformer.{key}"] = value.float()
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            tensors[f"transformer.{module}.alpha"] = torch.tensor(alpha)
    adapter = {"transformer.r": rank, "transformer.lora_alpha": alpha,
               "transformer.target_modules": sorted(config.target_modules), "transformer.lora_dropout": 0.0}
    meta = {"format": "pt", METADATA_KEY: json.dumps(adapter, sort_keys=True),
            "drm_lora": json.dumps({"rank": rank, "alpha": alpha, **(extra_metadata or {})})}
    path = Path(path)
    atomic_save_file(tensors, path, meta)
    return path


def verify_lora(path: str | Path, base: str | Path | None = None) -> dict:
    """Which keys ComfyUI would skip, the effective scale of each module, and files without alpha tensors."""
    from drm_core.checkpoint import mmdit_module_names

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        alphas = {k: float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    modules: dict[str, dict] = {}
    problems: list[str] = []
    for key in keys:
        for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha"):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[suffix] = shapes[key]
                break
        else:
            problems.append(f"{key}: not a LoRA tensor (ignored by ComfyUI)")
    known = mmdit_module_names(base) if base is not None else None
    report = []
    for module, parts in sorted(modules.items()):
        prefix, _, name = module.partition(".")
        rank = parts.get(".lora_A.weight", parts.get(".lora_down.weight", (0,)))[0]
        if prefix not in ("transformer", "diffusion_model", "base_model"):
            problems.append(f"{module}: prefix '{prefix}.' is not one ComfyUI maps for SD3 (use 'transformer.')")
        if known is not None and prefix == "transformer" and name not in known:
            problems.append(f"{module}: no module '{name}' in the base model")
        alpha_key = f"{module}.alpha"
        if alpha_key not in alphas:
            problems.append(f"{module}: no '.alpha' tensor; ComfyUI applies scale 1.0 instead of alpha/rank")
            scale = 1.0
        else:
            scale = alphas[alpha_key] / rank if rank else float("nan")
        report.append({"module": module, "rank": rank, "comfyui_scale": scale})
    return {"file": str(path), "modules": len(report), "problems": problems, "entries": report}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora", help="LoRA .safetensors file")
    parser.add_argument("--base", default=None, help="SD3/SD3.5 checkpoint whose module names the LoRA must match")


def run(args: argparse.Namespace) -> int:
    result = verify_lora(args.lora, args.base)
    scales = sorted({round(e["comfyui_scale"], 6) for e in result["entries"]})
    print(f"{result['file']}: {result['modules']} LoRA modules, ComfyUI scale at strength 1.0: {scales}")
    for problem in result["problems"]:
        print(f"  problem: {problem}")
    print("OK: every key loads in ComfyUI" if not result["problems"] else f"{len(result['problems'])} problem(s)")
    return 0 if not result["problems"] else 1
