"""`python -m training <command> [--help]`: one module per command, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from drm_core import DRMError

COMMANDS = {
    "cache": ("training.cache", "encode preference images and prompts once into a sharded cache"),
    "train-drm": ("training.train_drm", "train a DRM with the Bradley-Terry loss on a preference cache"),
    "eval-drm": ("training.evaluate", "pairwise accuracy of a DRM per noise level on a preference cache"),
    "train-grpo": ("training.train_grpo", "Step-GRPO (--mode step) or Flow-GRPO (--mode terminal) LoRA training"),
    "export-lora": ("training.export_lora", "write a train-grpo checkpoint as a LoRA file for ComfyUI and diffusers"),
    "verify-lora": ("training.lora", "check that a LoRA file loads in ComfyUI and diffusers: skipped keys and each loader's scale"),
    "import-rm": ("training.import_rm", "turn a published latent reward model (DiNa-LRM, official DRM) into a DRM file"),
    "bench": ("training.bench", "time step-wise guidance against its FLOP bound (writes bench.json)"),
    "demo": ("training.toy.demo", "run the toy world end to end (the README's main job)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="commands:\n" + "\n".join(f"  {n:<11} {h}" for n, (_, h) in COMMANDS.items()))
    top.add_argument("command", choices=list(COMMANDS), metavar="command")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        top.parse_args(argv[:1])  # prints help or a clear "invalid choice" error and exits
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m training {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return module.run(args) or 0
    except DRMError as err:
        logging.getLogger("training").error("%s", err)
        return 2
