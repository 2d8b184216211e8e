"""`python -m training <command>`: one subcommand per job; each module registers its own arguments."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from drm_core import DRMError

COMMANDS = {
    "cache": ("training.cache", "encode preference images and prompts once into a sharded cache"),
    "train-drm": ("training.train_drm", "train a DRM with the Bradley-Terry loss on a preference cache"),
    "eval-drm": ("training.eval_drm", "pairwise accuracy of a DRM per noise level on a preference cache"),
    "demo": ("training.toy.demo", "run the toy world end to end (the README's main job)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(module=module)
        importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return importlib.import_module(args.module).run(args) or 0
    except DRMError as err:
        logging.getLogger("training").error("%s", err)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
