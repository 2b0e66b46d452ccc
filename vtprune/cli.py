"""The `vtprune` command line: thin argument parsing over the public API."""

from __future__ import annotations

import argparse

import vtprune
from vtprune.registry import option_defaults


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune", description="Training-free visual-token pruning for HF VLMs")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("policies", help="list the registered pruning policies and their options")
    commands.add_parser("models", help="list the model types vtprune can patch")
    args = parser.parse_args(argv)

    if args.command == "policies":
        for name, description in vtprune.policies().items():
            options = ", ".join(f"{k}={v!r}" for k, v in option_defaults(name).items()) or "no options"
            print(f"{name:16} {description}\n{'':16} options: {options}")
    elif args.command == "models":
        print("\n".join(vtprune.supported_models()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
