"""The `vtprune` command line: thin argument parsing over the public API."""

from __future__ import annotations

import argparse
import importlib

import vtprune
from vtprune.registry import option_defaults

FORWARDED = {
    "eval": ("vtprune.eval.runner", "accuracy and cost of policies x budgets x benchmarks (`vtprune eval --help`)"),
    "bench": ("vtprune.eval.bench", "prefill and decode timing, full against each policy (`vtprune bench --help`)"),
    "demo": ("vtprune.demo.app", "the Gradio app: which visual tokens survive and their cost (`vtprune demo --help`)"),
    "lmms-task": ("vtprune.eval.lmms_tasks", "an lmms-eval task reading a benchmark from local parquet files"),
}
"""Commands whose arguments go to a module's `main`: (module, help)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune", description="Training-free visual-token pruning for HF VLMs")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("policies", help="list the registered pruning policies and their options")
    commands.add_parser("models", help="list the model types vtprune can patch")
    for name, (_, help_text) in FORWARDED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command in FORWARDED:
        return importlib.import_module(FORWARDED[args.command][0]).main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    if args.command == "policies":
        for name, description in vtprune.policies().items():
            options = ", ".join(f"{k}={v!r}" for k, v in option_defaults(name).items()) or "no options"
            print(f"{name:16} {description}\n{'':16} options: {options}")
    elif args.command == "models":
        print("\n".join(vtprune.supported_models()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
