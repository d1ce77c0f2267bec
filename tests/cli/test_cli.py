"""The command-line doors (tfcovseg.cli): --help, --version and bad options answer before
TensorFlow or Keras is imported; console scripts name the doors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tfcovseg import __version__

ROOT = Path(__file__).resolve().parents[2]
DOORS = ("train", "predict", "evaluate", "export", "summary", "semiseg")

PROBE = """
import sys
from tfcovseg.cli import {door} as door
try:
    code = door.main({argv!r})
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("tensorflow", "keras", "jax", "torch") if m in sys.modules)
print("exit", code, "heavy", ",".join(heavy) or "none")
"""


def _probe(door, argv):
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(door=door, argv=list(argv))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    return out.stdout.strip().splitlines()[-1], out.stdout + out.stderr


@pytest.mark.parametrize("door", DOORS)
def test_help_answers_without_tensorflow(door):
    last, text = _probe(door, ["--help"])
    assert last == "exit 0 heavy none"
    assert "usage:" in text and "Research use, not a medical device." in " ".join(text.split())


@pytest.mark.parametrize(
    "door, argv, message",
    [
        ("train", ["--set", "model.nope=1"], "unknown key 'model.nope'"),
        ("train", ["--resume"], "--resume needs --out"),
        ("train", ["--fold", "x"], "--fold must be an integer or 'all'"),
        ("evaluate", ["--run", "/no/such/run"], "is not a run folder"),
        ("export", ["--run", "r", "--gate-threshold", "x"], "--gate-threshold must be"),
        ("export", ["--run", "r", "--set", "model.input_size=[64,64]"], "only data.* keys"),
        # Another fold's test split held this run's training patients (scored, and written
        # over its metrics, as "fold 2").
        ("evaluate", ["--run", "r", "--set", "data.fold=2"], "a trained run keeps its fold"),
        ("export", ["--run", "r", "--set", "data.num_folds=3"], "a trained run keeps its fold"),
        ("predict", ["--model", "m", "--input", "i", "--out", "o", "--batch-size", "0"], ">= 1"),
        # The thresholds were checked after TensorFlow loaded (~6 s on the 2-core machine).
        (
            "predict",
            ["--model", "m", "--input", "i", "--out", "o", "--mask-threshold", "2"],
            "--mask-threshold must be in (0, 1], got 2.0",
        ),
        (
            "predict",
            ["--model", "m", "--input", "i", "--out", "o", "--threshold", "nan"],
            "--threshold must be in [0, 1], got nan",
        ),
        (
            "predict",
            [
                "--model",
                "m",
                "--input",
                "i",
                "--out",
                "o",
                "--runner",
                "direct",
                "--mask-threshold",
                "0",
            ],
            "--mask-threshold must be in (0, 1]",
        ),  # fmt: skip
        ("summary", ["--set", "model.nope=1"], "unknown key 'model.nope'"),
        ("semiseg", ["--train-dir", "d", "--set", "train.nope=1"], "unknown key 'train.nope'"),
        ("semiseg", ["--train-dir", "d", "--config", "quickstart"], "model.class_names must"),
        ("semiseg", ["--train-dir", "d", "--only-folds", "x"], "--only-folds takes fold"),
        # These came after the slices were read (seconds; the 1,600 unlabelled ones too).
        ("semiseg", ["--train-dir", "d", "--models", "foo"], "unknown models ['foo']"),
        ("semiseg", ["--train-dir", "d", "--folds", "1"], "--folds must be at least 2, got 1"),
        (
            "semiseg",
            ["--train-dir", "d", "--models", "unet", "--unlabelled-dir", "u"],
            "include coarse_refine in --models",
        ),
    ],
)
def test_bad_options_answer_without_tensorflow(door, argv, message):
    last, text = _probe(door, argv)
    assert last == "exit 2 heavy none"
    assert message in text


def test_version_and_the_python_m_form(tmp_path):
    last, text = _probe("train", ["--version"])
    assert last == "exit 0 heavy none" and f"tfcovseg {__version__}" in text
    # python -m tfcovseg.train goes through the same door (its error, its exit code).
    out = subprocess.run(
        [sys.executable, "-m", "tfcovseg.train", "--set", "model.nope=1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "unknown key 'model.nope'" in out.stderr


def test_console_scripts_name_importable_doors():
    import importlib
    import re

    setup = (ROOT / "setup.py").read_text()
    scripts = re.findall(r'"(tfcovseg-[\w-]+) = ([\w.]+):(\w+)"', setup)
    names = {name for name, _, _ in scripts}
    script = {"semiseg": "semiseg-benchmark"}
    assert {f"tfcovseg-{script.get(d, d)}" for d in DOORS} <= names
    assert {"tfcovseg-convert", "tfcovseg-phantom", "tfcovseg-compare"} <= names
    for _, module, function in scripts:
        if module.startswith("tfcovseg.cli"):
            assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize(
    "door",
    [
        "train",
        "evaluate",
        "export",
        "predict",
        "compare",
        "serving_client",
        "summary",
        "benchmarks.semiseg",
    ],
)
def test_every_python_m_door_answers_help_without_tensorflow(door, tmp_path):
    """``python -m tfcovseg.<door> --help`` reaches its command before Keras or TensorFlow
    loads (the doors are a few lines; the library behind them is imported later)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['tfcovseg.{door}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('tfcovseg.{door}', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "print('exit', code, 'heavy', ','.join(heavy) or 'none')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.stdout.strip().splitlines()[-1] == "exit 0 heavy none", out.stderr[-1000:]
    assert f"python -m tfcovseg.{door}" in out.stdout  # the usage names the form called


@pytest.mark.parametrize("module", ["data_tools.convert", "data_tools.phantom"])
def test_the_conversion_commands_answer_the_one_version(module):
    """Every command answers --version with the distribution's version, defined once in
    data_tools (setup.py reads it there; tfcovseg re-exports it)."""
    import data_tools

    out = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and out.stdout.strip() == f"tfcovseg {__version__}"
    assert __version__ == data_tools.__version__


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "door, target, argv, kept",
    [
        (
            "predict",
            "tfcovseg.inference.predict.predict",
            ["--model", "m", "--input", "i", "--out", "o"],
            "finished series are kept",
        ),
        ("train", "tfcovseg.training.trainer.train", ["--out", "{tmp}/run"], "--resume goes on"),
        (
            "evaluate",
            "tfcovseg.evaluation.run.evaluate_run",
            ["--run", "{tmp}"],
            "run the command again",
        ),
    ],
)
def test_ctrl_c_says_what_is_kept_instead_of_a_traceback(
    door, target, argv, kept, tmp_path, monkeypatch, capsys
):
    """Ctrl-C printed a traceback from wherever TensorFlow was, and nothing about what was
    kept or how to go on."""
    import importlib

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, _interrupt)
    (tmp_path / "config.yaml").write_text("name: x\n")
    main = importlib.import_module(f"tfcovseg.cli.{door}").main
    assert main([a.format(tmp=tmp_path) for a in argv]) == 130
    err = capsys.readouterr().err
    assert "interrupted:" in err and kept in err and "Traceback" not in err


def test_ctrl_c_during_conversion_leaves_the_output_as_it_was(tmp_path, monkeypatch, capsys):
    from data_tools import convert

    monkeypatch.setattr(convert, "convert", _interrupt)
    assert convert.main(["--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 130
    assert "interrupted: a conversion that did not finish" in capsys.readouterr().err
