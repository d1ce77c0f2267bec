"""tfcovseg.benchmarks.processes: a fold's own process stops with its run, and refuses
other code than the run's."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tfcovseg.benchmarks import processes

ROOT = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie no one has reaped yet has stopped too


def test_an_interrupted_run_stops_its_process():
    # Ctrl-C in the parent (a real SIGINT, as a terminal sends) while it waits. Python's
    # own SIGINT handler, as a command has it: in CI (session 46) a test worker that had
    # run other modules before let the SIGINT pass without a KeyboardInterrupt once.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            processes.run_in_process(time.sleep, (60,), "sleeper")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 30
    assert multiprocessing.active_children() == []  # terminated and joined


def test_a_process_ends_with_its_killed_parent(tmp_path):
    parent = tmp_path / "parent.py"
    parent.write_text(
        textwrap.dedent(
            """
            import multiprocessing, sys, time
            from tests.benchmarks import process_probe
            if __name__ == "__main__":
                context = multiprocessing.get_context("spawn")
                context.Process(target=process_probe.sleep_with_parent, args=(sys.argv[1],)).start()
                time.sleep(120)
            """
        )
    )
    pid_file = tmp_path / "child.pid"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(parent), str(pid_file)], cwd=ROOT, env=env)
    try:
        for _ in range(300):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert not _gone(child)
    finally:
        proc.kill()  # SIGKILL: no Python cleanup runs in the parent
        proc.wait()
    for _ in range(100):
        if _gone(child):
            break
        time.sleep(0.1)
    assert _gone(child), "the fold's process trains on after its parent was killed"


def test_exit_codes_read_as_words():
    assert processes.describe_exit(2) == "exit code 2; its messages are above"
    assert processes.describe_exit(-9) == "killed by SIGKILL (out of memory?)"
    assert processes.describe_exit(-15) == "killed by SIGTERM"


def test_the_digest_follows_the_code_on_disk(tmp_path, monkeypatch):
    package = tmp_path / "tfcovseg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(processes, "PACKAGES", ("tfcovseg",))
    monkeypatch.setitem(sys.modules, "tfcovseg", type(sys)("tfcovseg"))
    sys.modules["tfcovseg"].__file__ = str(package / "__init__.py")
    before = processes.source_digest()
    assert processes.source_digest() == before
    (package / "a.py").write_text("x = 2\n")
    assert processes.source_digest() != before


def test_the_backend_is_named_without_importing_keras_here():
    """A run's parent names the backend its folds' processes will use without loading
    Keras (and so TensorFlow) itself; the name is Keras' own, environment included."""
    code = (
        "import sys; from tfcovseg.benchmarks import processes; "
        "print(processes.keras_backend(), 'keras' in sys.modules, 'tensorflow' in sys.modules)"
    )
    env = os.environ | {"KERAS_BACKEND": "numpy", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["numpy", "False", "False"]
    import keras

    assert processes.keras_backend() == keras.backend.backend()  # imported: asked directly
    # A backend Keras cannot load is named in one line, not a traceback.
    code = "from tfcovseg.benchmarks import processes; processes.keras_backend()"
    env |= {"KERAS_BACKEND": "nope"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "RuntimeError: Keras does not import in a fresh process "
        "(ValueError: Unable to import backend : nope)"
    )
