"""The ``fastadv`` command line: one subcommand per module in ``fastadv.commands``."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module in fastadv.commands exposing add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "doctor": "Report torch/triton/CUDA versions, the GPU, each backend's state and the built extension.",
    "build": "Compile the C++/CUDA extension ahead of time for target GPU architectures.",
    "bench": "Run the benchmarks (ops, attacks, ...) and print a comparison table.",
    "eval": "Evaluate a model's robustness (AutoAttack and friends) and write a report.",
    "train": "Adversarially train a model.",
    "demo": "Robust training of a small CNN on embedded MNIST, then evaluation: the README's demo.",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastadv", description="Fast adversarial attacks and training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, help_text in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"fastadv.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fastadv.commands.{name}":
                raise
            continue  # not part of this build yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
