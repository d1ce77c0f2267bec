"""A spawned process's target for tests/benchmarks/test_processes.py (importable by the
child, unlike a test function)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tfcovseg.benchmarks.processes import exit_with_parent


def sleep_with_parent(pid_file: str) -> None:
    exit_with_parent()
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(120)
