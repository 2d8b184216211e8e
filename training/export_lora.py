"""`export-lora`: turn a train-grpo checkpoint into a LoRA file for ComfyUI and diffusers."""

from __future__ import annotations

import argparse
from pathlib import Path

from drm_core import DRMError, load_mmdit

from .checkpointing import load_checkpoint, resolve_resume
from .config import load_config
from .lora import add_lora, describe_scales, export_lora, verify_lora
from .train_grpo import TrainGRPOConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a train-grpo output folder")
    parser.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint folder inside the run")
    parser.add_argument("--out", required=True, help="LoRA .safetensors to write")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    resolved = run_dir / "config.resolved.toml"
    if not resolved.is_file():
        raise DRMError(f"{run_dir}: not a train-grpo run (no config.resolved.toml)")
    config = load_config(TrainGRPOConfig, resolved)
    ckpt = resolve_resume(run_dir / "checkpoints", args.checkpoint)
    if ckpt is None:
        raise DRMError(f"{run_dir}: no checkpoint found")
    model = add_lora(load_mmdit(config.policy.base), config.policy.lora_rank, config.policy.lora_alpha,
                     config.policy.targets)
    state = load_checkpoint(ckpt, None, _NoOptimizer())
    model.load_state_dict(state["tensors"], strict=False)
    path = export_lora(model, args.out, {"checkpoint": str(ckpt)})
    check = verify_lora(path, config.policy.base)
    print(f"wrote {path}: {check['modules']} modules, {describe_scales(check)}, "
          f"problems: {'; '.join(check['problems']) or 'none'}")
    return 0


class _NoOptimizer:
    def load_state_dict(self, _state: dict) -> None:
        """Exporting needs the LoRA only."""
