"""The wheel: built from the sources, installed into a fresh virtual environment, run elsewhere.

A plain ``pip install ".[cpu]"`` (not ``-e``) must run the quickstart from any folder: the
built-in experiments (``tfcovseg/configs/experiments/*.yaml``) ship in the wheel and ``--config``
takes their names. The wheel is built offline from a copy of the sources (so the checkout
gets no ``build/`` or ``*.egg-info``) and installed with ``--no-deps`` into a new virtual
environment; its dependencies come from this environment's site-packages through a
``.pth`` path entry (a plain path: the editable install's ``.pth`` hooks there are not
run, so the checkout stays unimportable and only the wheel's copy of tfcovseg is used).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import types
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_MODEL
from tfcovseg.configs.experiment import builtin_experiments

ROOT = Path(__file__).resolve().parents[1]
JUNK = ("build", "dist", "tfcovseg.egg-info")  # what a build in the checkout would leave


def _run(cmd, env, cwd, timeout=600):
    start = time.monotonic()
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    proc.seconds = time.monotonic() - start
    return proc


def _ok(proc):
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """The wheel, and a fresh venv (``python``, ``site``) with it installed, ``work`` folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    junk_before = {name: (ROOT / name).exists() for name in JUNK}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE")
    }
    env.update(
        HOME=str(tmp / "home"),  # pip's cache, Keras' and matplotlib's config: all in tmp
        TF_CPP_MIN_LOG_LEVEL="3",
        KERAS_BACKEND="tensorflow",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
    )
    (tmp / "home").mkdir()

    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("tfcovseg", "data_tools"):
        shutil.copytree(ROOT / package, src / package, ignore=skip)
    for name in ("setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    _ok(
        _run(
            [sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation"]
            + ["--no-index", "-w", tmp / "dist"],
            env,
            tmp,
        )
    )
    (wheel,) = (tmp / "dist").glob("tfcovseg-*.whl")
    assert {name: (ROOT / name).exists() for name in JUNK} == junk_before

    venv = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", venv], env, tmp))
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # Installed before the dependencies become visible, so pip sees an empty environment.
    _ok(
        _run(
            [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps"]
            + ["--no-index", wheel],
            env,
            tmp,
        )
    )
    query = "import json, sysconfig; print(json.dumps(sysconfig.get_paths()['purelib']))"
    site = Path(json.loads(_ok(_run([python, "-c", query], env, tmp)).stdout))
    ours = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    (site / "_tfcovseg_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))

    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    work = tmp / "work"  # outside the source tree
    work.mkdir()
    return types.SimpleNamespace(
        tmp=tmp, wheel=wheel, python=python, site=site.resolve(), env=env, work=work
    )


def test_the_wheel_ships_the_builtin_experiments(wheel_env):
    names = builtin_experiments()
    assert {"paper", "quickstart"} <= set(names)
    with zipfile.ZipFile(wheel_env.wheel) as whl:
        shipped = {
            n: whl.read(n) for n in whl.namelist() if n.startswith("tfcovseg/configs/experiments/")
        }
    expected = {f"tfcovseg/configs/experiments/{name}.yaml" for name in names}
    assert set(shipped) == expected
    for name, data in shipped.items():
        assert data == (ROOT / name).read_bytes(), name


def test_the_fresh_venv_imports_the_wheel_not_the_checkout(wheel_env):
    code = (
        "import json, sys, tfcovseg, data_tools, keras, tensorflow\n"
        "from tfcovseg.configs.experiment import BUILTIN_EXPERIMENTS\n"
        "print(json.dumps([tfcovseg.__file__, data_tools.__file__, str(BUILTIN_EXPERIMENTS),"
        " sys.path]))\n"
    )
    proc = _ok(_run([wheel_env.python, "-c", code], wheel_env.env, wheel_env.work))
    package, tools, experiments, path = json.loads(proc.stdout.splitlines()[-1])
    for file in (package, tools, experiments):
        assert Path(file).resolve().is_relative_to(wheel_env.site), file
    assert str(ROOT) not in [str(Path(p).resolve()) for p in path if p]


def test_the_quickstart_runs_from_the_installed_wheel(wheel_env):
    """No --config (the issue's failure), built-in names, then an unknown name."""
    sets = TINY_MODEL + [
        f"data.records_dir={wheel_env.tmp / 'cache' / 'records'}",
        "data.phantom_patients=10",
        "data.phantom_slices=[4,6]",
        "data.oversample_lesions=1",
        "data.oversample_pneumonia=1",
        "train.epochs=1",
        "train.classifier_epochs=1",
        "train.batch_size=8",
        "train.overlay_images=0",
    ]
    args = [a for s in sets for a in ("--set", s)]
    train = [wheel_env.python, "-m", "tfcovseg.train", "--quiet", "--out", "run"]
    work = wheel_env.work

    first = _ok(_run(train + args, wheel_env.env, work))
    print(f"quickstart from the wheel: {first.seconds:.0f} s")
    run = work / "run"
    for name in (
        "config.yaml",
        "run.json",
        "severity.json",
        "segmenter_best.keras",
        "segmenter_last.keras",
        "classifier_best.keras",
        "metrics.json",
        "logs/segmentation.csv",
        "logs/classification.csv",
    ):
        assert (run / name).is_file(), name
    assert yaml.safe_load((run / "config.yaml").read_text())["name"] == "quickstart"
    # The quickstart trains with oneDNN's CPU kernels (train.cpu_kernels), evaluates and
    # exports under them; the inherited TF_ENABLE_ONEDNN_OPTS=0 is the package's, not ours.
    assert json.loads((run / "run.json").read_text())["cpu_kernels"] == "oneDNN"
    assert "TensorFlow CPU kernels: oneDNN (train.cpu_kernels)" in first.stdout
    assert (work / "saved_models" / "tfcovseg" / "1").is_dir()  # the quickstart exports
    assert (wheel_env.tmp / "cache" / "phantom" / "manifest.csv").is_file()

    # Built-in names resolve inside the installed package, from any folder.
    code = (
        "from tfcovseg.configs.experiment import load_config\n"
        "print(load_config('quickstart').name, load_config('paper.yaml').model.input_size)\n"
    )
    names = _ok(_run([wheel_env.python, "-c", code], wheel_env.env, work))
    assert names.stdout.split("\n")[-2] == "quickstart (512, 512)"

    bad = _run(train[:3] + ["--config", "nosuch"], wheel_env.env, work)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "config file nosuch does not exist" in bad.stderr
    assert "path of a YAML file" in bad.stderr
    assert ", ".join(builtin_experiments()) in bad.stderr
