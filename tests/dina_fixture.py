"""A tiny DiNa-LRM download, written in its published layout with the project's own code (no peft, no downloads).

    write_tiny_dina(folder: Path, base_checkpoint: Path) -> None

writes into `folder` (created if needed) what `hf download liuhuohuo/DiNa-LRM-SD35M-12layers` writes:

    folder/config.json                                    {"model": {num_transformer_layers, visual/text_head_idx,
                                                          use_lora, reward_head: {...}}}
    folder/checkpoint/backbone_lora/adapter_config.json   PEFT LoRA config (r 4, alpha 8, attention projections)
    folder/checkpoint/backbone_lora/adapter_model.safetensors   keys base_model.model.<module>.lora_A/B.weight
    folder/checkpoint/rm_head.pt                          DinaRewardHead state dict (torch.save)

`base_checkpoint` is the tiny SD3-family MMDiT the download is "for" (any layout drm_from_base reads:
Stability-named file, diffusers folder). The DiNa model runs its first `min(3, depth - 1)` blocks and
taps the image and text tokens after each of them; weights are seeded random values (LoRA B and the
head's gates not at their zero init), so the same call writes the same files. Works in ComfyUI's venv
(only torch, safetensors and drm_core); tests/test_import_rm.py loads the LoRA with PEFT itself to check
that the files are what PEFT writes and reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from drm_core import DRM, DRMConfig, read_backbone_config
from drm_core.heads_dina import DinaHeadConfig, DinaRewardHead
from drm_core.model import head_config

LORA_RANK, LORA_ALPHA, HEADS = 4, 8, 4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def tiny_dina_blocks(depth: int) -> int:
    """Joint blocks the tiny DiNa model runs on a base of `depth` blocks (its text taps need a block after)."""
    return max(1, min(3, depth - 1))


def write_tiny_dina(folder: Path, base_checkpoint: Path) -> None:
    """Write a tiny DiNa-LRM download for `base_checkpoint` into `folder` (see the module docstring)."""
    folder, ckpt = Path(folder), Path(folder) / "checkpoint"
    depth = read_backbone_config(base_checkpoint, blocks=1)[2].depth
    blocks = tiny_dina_blocks(depth)
    backbone = read_backbone_config(base_checkpoint, blocks=blocks)[2]
    taps = tuple(range(1, blocks + 1))
    with torch.device("meta"):  # module names and shapes only
        meta = DRM(DRMConfig(backbone, head_config(dict(kind="dina-lrm", visual_taps=taps, text_taps=taps,
                                                            attn_heads=HEADS))))
    g = torch.Generator().manual_seed(2)
    lora = {}
    for name, module in meta.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.") and \
                any(name.endswith("." + t) for t in TARGETS):
            out_dim, in_dim = module.weight.shape
            lora[f"base_model.model.{name}.lora_A.weight"] = torch.randn(LORA_RANK, in_dim, generator=g) / in_dim ** 0.5
            lora[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_dim, LORA_RANK, generator=g) * 0.05
    (ckpt / "backbone_lora").mkdir(parents=True, exist_ok=True)
    save_file(lora, ckpt / "backbone_lora" / "adapter_model.safetensors", {"format": "pt"})
    (ckpt / "backbone_lora" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "target_modules": TARGETS,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "modules_to_save": None, "task_type": None, "base_model_name_or_path": None},
        indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        head = DinaRewardHead(backbone.hidden, DinaHeadConfig(visual_taps=taps, text_taps=taps, attn_heads=HEADS))
        with torch.no_grad():
            for p in head.parameters():  # trained gates and FiLM are not at their zero init
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    torch.save({k: v.clone() for k, v in head.state_dict().items()}, ckpt / "rm_head.pt")
    (folder / "config.json").write_text(json.dumps({"model": {
        "num_transformer_layers": blocks, "visual_head_idx": list(taps), "text_head_idx": list(taps),
        "use_lora": True, "freeze_backbone": False, "use_logistic": False,
        "lora_config": {"r": LORA_RANK, "lora_alpha": LORA_ALPHA},
        "reward_head": {"use_proj_in": False, "width": -1, "out_dim": 1, "num_queries": 4, "num_attn_heads": HEADS,
                        "dropout": 0.0}}}, indent=2))
