"""Running a piece of a long benchmark in a fresh process of its own.

Keras and TensorFlow keep memory from one model to the next that
`keras.backend.clear_session` does not give back (docs/semiseg.md); a process that ends
gives back all of it. A spawned process imports the package again from disk, so it
checks that the code is the code its run started with (`source_digest`), and it ends
with its parent (`exit_with_parent`) rather than train on alone after a kill.
"""

from __future__ import annotations

import hashlib
import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

PACKAGES = ("tfcovseg", "data_tools")


def run_in_process(target, args, name: str) -> int:
    """Runs ``target(*args)`` in a spawned process; returns its exit code (negative: the
    signal that ended it). Interrupted (Ctrl-C), the process is stopped before this
    returns."""
    sys.stdout.flush()  # the parent's lines come before the child's
    sys.stderr.flush()
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, name=name)
    try:
        process.start()
        process.join()
    finally:
        if process.is_alive():
            process.terminate()
            process.join()
    return process.exitcode


def keras_backend() -> str:
    """The Keras backend of this process, or of a fresh one (as a fold's spawned process
    will have it) when this one has not imported Keras: asked of Keras in a short-lived
    process, since importing it here loads TensorFlow (~0.9 GB) that the parent of
    per-fold processes would hold for the whole run. RuntimeError: Keras does not import."""
    if sys.modules.get("keras") is not None:
        return sys.modules["keras"].backend.backend()
    code = "import keras; print('keras backend:', keras.backend.backend())"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"Keras could not be asked for its backend ({e})") from None
    named = [x for x in done.stdout.splitlines() if x.startswith("keras backend: ")]
    if done.returncode != 0 or not named:
        lines = done.stderr.strip().splitlines()  # the traceback's last line: the error
        why = lines[-1] if lines else f"exit code {done.returncode}"
        raise RuntimeError(f"Keras does not import in a fresh process ({why})")
    return named[-1].split(": ", 1)[1].strip()


def describe_exit(code: int) -> str:
    """A process's exit code in words, for a message."""
    if code >= 0:
        return f"exit code {code}; its messages are above"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")


def exit_with_parent() -> None:
    """In a spawned process: ends it (exit code 143) as soon as its parent is gone, killed
    or crashed, so that no orphan trains on into the same output folder."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(143)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def source_digest() -> str:
    """A digest of the Python and YAML files of `PACKAGES` as they are on disk now."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.yaml")]):
            digest.update(path.relative_to(root.parent).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
