"""tfcovseg: coarse-refine COVID-19 lesion segmentation for chest CT.

A Keras 3 / TensorFlow reimplementation of Huang et al., "A coarse-refine segmentation
network for COVID-19 CT images", IET Image Processing (2021). Research use, not a medical
device.

The network, losses and metrics are pure Keras 3 and run under any Keras backend; the data
pipeline, training utilities, export and serving need TensorFlow, which is installed through
the ``cpu`` or ``gpu`` extra (``pip install "tfcovseg[cpu]"``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from data_tools import __version__ as __version__  # the distribution's, defined once

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probes) off unless the user asked for it:
# set here, once, before any room of the package imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's oneDNN kernels off unless the user asked for them: TensorFlow turns them on
# by default only on CPUs with AVX-512 VNNI/BF16 or AMX, and 2.21's are wrong there. On an
# AMD EPYC (Zen 4) they corrupted the heap in matrix products that broadcast a matrix over
# a batch (tensorflow/tensorflow#117700; the SSIM loss's and the served resize's, plain 2-D
# products since): training and export crashed; a strided convolution of an empty batch
# returned its input's shape (the served graphs never run one since); the same slices in
# batches of other sizes differed by up to 0.009 in probability. With them off, TensorFlow
# computes as on other CPUs (Eigen), where this project's figures were measured. Set
# TF_ENABLE_ONEDNN_OPTS yourself to choose; an experiment chooses for `tfcovseg.train`
# (train.cpu_kernels, `select_cpu_kernels`). TFCOVSEG_ONEDNN_DEFAULT keeps the value the
# package chose, so that a child process, which inherits both, tells it from the user's.
_ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
_ONEDNN_OURS = "TFCOVSEG_ONEDNN_DEFAULT"
if _ONEDNN not in os.environ:
    os.environ[_ONEDNN] = os.environ[_ONEDNN_OURS] = "0"
_ONEDNN_CHOSEN_BY_USER = os.environ[_ONEDNN] != os.environ.get(_ONEDNN_OURS)

CPU_KERNELS = ("eigen", "onednn")


def cpu_kernels() -> str:
    """The CPU kernels TensorFlow runs in this process: "oneDNN" or "Eigen"."""
    chosen = os.environ.get(_ONEDNN, "").strip().lower()
    return "oneDNN" if chosen in ("1", "true", "yes", "on") else "Eigen"


def select_cpu_kernels(kernels: str) -> str:
    """Chooses TensorFlow's CPU kernels ("eigen" or "onednn") for this process, for a
    command that reads its experiment before TensorFlow loads (`tfcovseg.train`, from
    ``train.cpu_kernels``). Returns what runs and why: the user's TF_ENABLE_ONEDNN_OPTS
    wins, and once TensorFlow is loaded its kernels are fixed.

    oneDNN trains the quickstart's network 1.6x faster on an AVX2 CPU
    (experiments/benchmarks/onednn.py); the bugs of 2.21's kernels that this package met
    (above) are out of its graphs: no matrix is broadcast over a batch, and the served
    graphs never run an empty batch.
    """
    if kernels not in CPU_KERNELS:
        raise ValueError(f"CPU kernels must be one of {CPU_KERNELS}, got {kernels!r}")
    if _ONEDNN_CHOSEN_BY_USER:
        why = "TF_ENABLE_ONEDNN_OPTS set"
    elif "tensorflow" in sys.modules:
        why = "TensorFlow was loaded before"
    else:
        os.environ[_ONEDNN] = os.environ[_ONEDNN_OURS] = "1" if kernels == "onednn" else "0"
        why = "train.cpu_kernels"
    return f"{cpu_kernels()} ({why})"


_EXTRA_HINT = (
    'install it with the package extra: pip install "tfcovseg[cpu]" '
    '(or "tfcovseg[gpu]" for NVIDIA GPUs)'
)


def _requested_backend() -> str:
    """The Keras backend that `import keras` will pick, read without importing Keras."""
    backend = os.environ.get("KERAS_BACKEND")
    if backend:
        return backend
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(keras_home, "keras.json"), encoding="utf-8") as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def require_tensorflow(feature: str = "this part of tfcovseg"):
    """Imports and returns TensorFlow, or raises an ImportError that names the extra.

    Args:
        feature: What needs TensorFlow, for the message (e.g. "the tf.data pipeline").
    """
    if not tensorflow_available():
        raise ImportError(f"{feature} needs TensorFlow, which is not installed; {_EXTRA_HINT}.")
    import tensorflow as tf

    return tf


if _requested_backend() == "tensorflow" and not tensorflow_available():
    raise ImportError(
        "tfcovseg uses Keras with the TensorFlow backend by default, but TensorFlow is not "
        f"installed; {_EXTRA_HINT}. To use only the pure-Keras network, losses and metrics "
        "without TensorFlow, set KERAS_BACKEND=jax (or torch) before importing tfcovseg."
    )
