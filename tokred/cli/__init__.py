"""The ``tokred`` command line: ``tokred <command> [options]`` (also ``python -m tokred``,
``python -m tokred.cli``).

Each command is a module of this package with ``add_arguments(parser)`` and ``main(args) -> int``;
register new ones in :data:`COMMANDS`. The commands are reports built on the public API (``tokred``
and its public modules ``tokred.registry``, ``tokred.viz``, ``tokred.reference``), never on the
core's internals (``tests/test_layout.py`` checks it). A command's ``--help`` text is its module
docstring, shown as plain text (:func:`plain_text` drops the reST markup).
"""
from __future__ import annotations

import argparse
import importlib
import re

#: command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("tokred.cli.bench", "FLOPs, measured speed-up, accuracy and agreement of reducers vs the full model"),
    "sweep": ("tokred.cli.sweep", "top-1 and agreement vs FLOPs ratio for each reducer family over a range of strengths"),
    "viz": ("tokred.cli.viz", "PNG of the merge groups / pruned patches per layer for one image and reducer"),
    "report": ("tokred.cli.report", "accuracy-vs-FLOPs table and plot of several lmms-eval runs of the tokred model"),
}

#: top-level module an optional extra provides -> (the PyPI package, the extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "sweep"),
    "transformers": ("transformers", "hf"),
    "open_clip": ("open_clip_torch", "clip"),
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> None:
    """Raise :class:`MissingExtra` naming the extra if ``module`` (a key of :data:`EXTRAS`) is not importable."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtra(missing_extra_message(module, purpose))


def missing_extra_message(module: str, purpose: str | None = None) -> str:
    package, extra = EXTRAS[module]
    why = f" ({purpose})" if purpose else ""
    return f"{package} is not installed{why}: pip install 'tokred[{extra}]'"


def plain_text(doc: str) -> str:
    """A docstring without its reST markup, for ``--help``: double backquotes go, roles such as
    :func: / :class: / :data: leave their target (only the last name after a ``~``)."""
    doc = re.sub(r":[a-z]+:`~[\w.]*?\.?(\w+)`", r"\1", doc)   # :class:`~tokred.Thresholds` -> Thresholds
    doc = re.sub(r":[a-z]+:`([^`]+)`", r"\1", doc)            # :func:`tokred.flops` -> tokred.flops
    return re.sub(r"``([^`]+)``", r"\1", doc)


def build_parser() -> argparse.ArgumentParser:
    from tokred import __version__

    parser = argparse.ArgumentParser(prog="tokred", description="Visual token reduction for vision transformers "
                                                                "and vision-language models.")
    parser.add_argument("--version", action="version", version=f"tokred {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=plain_text((module.__doc__ or help_text).strip()),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_module=module, _parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._module.main(args)
    except MissingExtra as error:
        args._parser.exit(2, f"tokred {args.command}: error: {error}\n")
    except ModuleNotFoundError as error:
        root = (error.name or "").partition(".")[0]
        if root not in EXTRAS:
            raise
        args._parser.exit(2, f"tokred {args.command}: error: {missing_extra_message(root)}\n")
    except (ValueError, TypeError, FileNotFoundError) as error:
        args._parser.exit(2, f"tokred {args.command}: error: {error}\n")
