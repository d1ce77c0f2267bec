"""The command-line doors: each parses its arguments before it imports TensorFlow (so
``--help``, ``--version`` and a bad option answer at once), then delegates to the library
module that does the work. Console scripts (``tfcovseg-train``, ``tfcovseg-predict``, ...)
and the ``python -m tfcovseg.<command>`` forms run the same `main`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from data_tools.privacy import printable
from tfcovseg import __version__
from tfcovseg.constants import DISCLAIMER


def parser(command: str, description: str, tool_version=True) -> argparse.ArgumentParser:
    """An argument parser named as it was called (console script or ``python -m``), with
    ``--version`` (unless the command has its own: the export's is the model version); the
    description ends with the disclaimer."""
    called = os.path.basename(sys.argv[0] or "")
    prog = called if called.startswith("tfcovseg-") else f"python -m tfcovseg.{command}"
    p = argparse.ArgumentParser(prog=prog, description=f"{description} ({DISCLAIMER})")
    if tool_version:
        p.add_argument("--version", action="version", version=f"tfcovseg {__version__}")
    return p


def fail(message: str) -> int:
    """The one error path of the doors: the message on stderr, exit code 2 (a file name
    that is not UTF-8 shown with backslash escapes)."""
    print(printable(f"error: {message}"), file=sys.stderr)
    return 2


INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def interruptible(hint: str):
    """A door's `main` that answers Ctrl-C with one line saying what was kept and how to go
    on (`hint`), exit code 130, instead of a traceback from wherever TensorFlow was."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except KeyboardInterrupt:
                print(f"\ninterrupted: {hint}", file=sys.stderr)
                return INTERRUPTED

        return run

    return wrap


def say(message: str) -> None:
    """A console line of a door's library call (its ``log``), printable whatever file
    names it holds (`data_tools.privacy.printable`)."""
    print(printable(message))


def add_set(parser: argparse.ArgumentParser, example: str = "") -> None:
    """``--set KEY=VALUE`` (repeatable): overrides of the experiment's config keys."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value" + (f", {example}" if example else ""),
    )


# The data keys that say which patients a run trained on: its test split follows from them.
_RUN_SPLIT_KEYS = ("data.fold", "data.num_folds", "data.train_split")


def run_overrides_problem(overrides) -> str | None:
    """Why ``--set`` cannot apply to a trained run, or None: the run keeps its network,
    recipe and folds, so only ``data.*`` keys of where and how its records are read (such
    as ``data.records_dir``) may change."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in _RUN_SPLIT_KEYS:  # another fold's test patients trained this run
            return (
                f"--set {item}: a trained run keeps its fold (its other folds' test patients "
                "were its training patients); evaluate the run trained on that fold"
            )
        if not key.startswith("data."):
            return (
                f"--set {item}: only data.* keys can change for a trained run (e.g. "
                "data.records_dir=DIR when its records moved); the network and recipe are "
                "the run's own"
            )
    return None
