"""Package-level behaviour: the TensorFlow extra, and what imports without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code, backend, keras_home=None):
    """Runs code in a subprocess where `import tensorflow` fails, as without the extra."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)
    if backend:
        env["KERAS_BACKEND"] = backend
    if keras_home:
        env["KERAS_HOME"] = str(keras_home)
    return subprocess.run(
        [sys.executable, "-c", "import tests.no_tensorflow\n" + code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_without_tensorflow_names_the_extra():
    proc = _run("import tfcovseg", "tensorflow")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert 'pip install "tfcovseg[cpu]"' in proc.stderr
    assert "tfcovseg[gpu]" in proc.stderr and "KERAS_BACKEND=jax" in proc.stderr


def test_backend_from_keras_json_is_respected(tmp_path):
    (tmp_path / "keras.json").write_text('{"backend": "tensorflow"}')
    proc = _run("import tfcovseg", None, keras_home=tmp_path)
    assert proc.returncode != 0 and 'pip install "tfcovseg[cpu]"' in proc.stderr
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    proc = _run(
        "import tfcovseg.models, keras; print(keras.backend.backend())", None, keras_home=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("jax")


def test_tensorflow_only_features_name_the_extra_under_other_backends():
    code = (
        "import tfcovseg\n"
        "try:\n"
        "    tfcovseg.require_tensorflow('the tf.data pipeline')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    proc = _run(code, "jax")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the tf.data pipeline needs TensorFlow" in proc.stdout
    assert 'pip install "tfcovseg[cpu]"' in proc.stdout


def test_models_package_never_imports_tensorflow():
    sources = (ROOT / "tfcovseg" / "models").rglob("*.py")
    for path in sources:
        text = path.read_text()
        assert "import tensorflow" not in text and "tf." not in text, path


def test_onednn_kernels_are_off_unless_asked_for():
    """TensorFlow 2.21's oneDNN kernels, on by default on CPUs with AVX-512 VNNI/BF16, are
    wrong there (tensorflow/tensorflow#117700: a glibc heap assertion in a rank-4 matrix
    product here, segmentation faults in training and export; a strided convolution of an
    empty batch kept its input's shape). Importing tfcovseg turns them off unless the user
    chose; then both compute what they should."""
    code = (
        "import os, numpy as np, tfcovseg, tensorflow as tf\n"
        "print(os.environ['TF_ENABLE_ONEDNN_OPTS'])\n"
        "rng = np.random.default_rng(0)\n"
        "for _ in range(50):\n"
        "    p = rng.normal(size=(13, 1, 3, 4)).astype('float32')\n"
        "    w = rng.normal(size=(4, 16)).astype('float32')\n"
        "    got = tf.linalg.matmul(p, w).numpy()\n"
        "    np.testing.assert_allclose(got, p @ w, rtol=1e-5, atol=1e-5)\n"
        "empty = tf.nn.conv2d(tf.zeros((0, 64, 64, 8)), tf.ones((1, 1, 8, 16)), 2, 'SAME')\n"
        "print(empty.shape == (0, 32, 32, 16))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "True"]
    env["TF_ENABLE_ONEDNN_OPTS"] = "1"  # the user's own choice stays
    chosen = subprocess.run([sys.executable, "-c", "import os, tfcovseg; print(os.environ["
                             "'TF_ENABLE_ONEDNN_OPTS'])"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert chosen.stdout.strip() == "1"


@pytest.mark.parametrize(
    "env, first, expected, on",
    [
        ({}, "", "oneDNN (train.cpu_kernels)", True),
        ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "", "Eigen (TF_ENABLE_ONEDNN_OPTS set)", False),
        ({}, "import tensorflow\n", "Eigen (TensorFlow was loaded before)", False),
    ],
)
def test_an_experiment_chooses_onednn_before_tensorflow_loads(env, first, expected, on):
    """train.cpu_kernels: onednn turns TensorFlow's oneDNN kernels on for the process
    (`tfcovseg.train` asks before anything loads TensorFlow), unless the user set
    TF_ENABLE_ONEDNN_OPTS or TensorFlow is loaded already: then it says so. TensorFlow
    announces its oneDNN kernels on stderr when it loads them."""
    code = (
        f"import tfcovseg\n{first}"
        "print(tfcovseg.select_cpu_kernels('onednn'))\n"
        "import tensorflow as tf\n"
        "tf.constant(1.0) + 1.0\n"
    )
    base = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "0"}
    for ours in ("TF_ENABLE_ONEDNN_OPTS", "TFCOVSEG_ONEDNN_DEFAULT"):  # a user's shell
        base.pop(ours, None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=base | env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == expected
    assert ("oneDNN custom operations are on" in proc.stderr) is on


def test_cpu_kernels_are_checked_choices():
    import tfcovseg
    from tfcovseg.configs.experiment import ConfigError, load_config

    with pytest.raises(ValueError, match="must be one of"):
        tfcovseg.select_cpu_kernels("mkl")
    with pytest.raises(ConfigError, match="train.cpu_kernels must be one of"):
        load_config(overrides=["train.cpu_kernels=mkl"])
