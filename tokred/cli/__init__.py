"""The ``tokred`` command line: ``tokred <command> [options]`` (also ``python -m tokred``,
``python -m tokred.cli``).

Each command is a module of this package with ``add_arguments(parser)`` and ``main(args) -> int``;
register new ones in :data:`COMMANDS`. The commands are reports built on the public API (``tokred``
and its public modules ``tokred.registry``, ``tokred.viz``, ``tokred.reference``), never on the
core's internals (``tests/test_layout.py`` checks it).
"""
from __future__ import annotations

import argparse
import importlib

#: command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("tokred.cli.bench", "FLOPs, measured speed-up, accuracy and agreement of reducers vs the full model"),
    "sweep": ("tokred.cli.sweep", "top-1 and agreement vs FLOPs ratio for each reducer family over a range of strengths"),
    "viz": ("tokred.cli.viz", "PNG of the merge groups / pruned patches per layer for one image and reducer"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokred", description="Visual token reduction for vision transformers.")
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_module=module, _parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._module.main(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        args._parser.exit(2, f"tokred {args.command}: error: {error}\n")
