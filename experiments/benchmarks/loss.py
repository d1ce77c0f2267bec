"""Cost of the hybrid loss's SSIM: our keras.ops twin against `tf.image.ssim`.

    python experiments/benchmarks/loss.py [--size 256] [--batch 4] [--steps 5]
        [--out runs/benchmarks/loss.json]

Two measurements, each alternating between the SSIM implementations step by step so
that machine drift affects all alike (medians of wall time reported with their ratios):

1. the hybrid loss alone, forward and backward, on a [batch, size, size, 2] map, with
   `tf.image.ssim`, with `tfcovseg.training.losses.ssim` filtering by matrix products (its choice on
   a CPU) and by shifted slices (its choice on a GPU, where matrix products are rounded);
2. a whole training step of the COVID-SemiSeg benchmark's network (quarter-width
   coarse-refine, two classes, the hybrid loss on "coarse" and "final", Adam), with
   `tf.image.ssim` and with `tfcovseg.training.losses.ssim` as it runs here.

`tf.image.ssim` filters with an 11x11 depthwise convolution, whose backward pass is slow on
CPUs (one channel in, one out); `tfcovseg.training.losses.ssim` filters the same separable window as
two products with banded matrices on a CPU. The loss is a tiny share of a step's FLOPs, but
with `tf.image.ssim` it was about 60 % of the benchmark network's training step at 256x256.

The ratios are the figures to compare across machines; absolute times depend on the CPU.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# tfcovseg first: its TensorFlow settings (oneDNN off, a quiet start) before TensorFlow loads.
importlib.import_module("tfcovseg")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import write_figures  # noqa: E402  (experiments/benchmarks/common.py)

from tfcovseg.benchmarks.semiseg import benchmark_config  # noqa: E402
from tfcovseg.models import build_model  # noqa: E402
from tfcovseg.training.losses import HybridLoss, hybrid_loss_terms, ssim  # noqa: E402

IMPLS = ("tf", "ops")


def _alternate(calls: dict, steps: int, warmup: int) -> dict:
    """Median wall seconds per call of each callable, run in turn `steps` times."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    wall = {name: [] for name in calls}
    for _ in range(steps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            wall[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in wall.items()}


def _slices_loss(truth, pred):
    """The hybrid loss with SSIM filtered by shifted slices (its GPU path)."""
    terms = hybrid_loss_terms(truth, pred, terms=("bce", "iou"))
    return tf.reduce_mean(terms["bce"] + (1.0 - ssim(pred, truth, filters="slices")) + terms["iou"])


def _loss_step(impl, truth, pred):
    loss = _slices_loss if impl == "slices" else HybridLoss(ssim_impl=impl)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = loss(truth, pred)
        return tape.gradient(value, pred)

    return step


def _train_step(impl, size, x, y):
    keras.utils.set_random_seed(0)
    model = build_model(benchmark_config(size=size).model)  # the benchmark's network
    outputs = list(model.output)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss={name: HybridLoss(ssim_impl=impl) for name in outputs},
    )
    targets = {name: y for name in outputs}
    return lambda: model.train_on_batch(x, targets)


def run(size=256, batch=4, steps=5, warmup=2) -> dict:
    rng = np.random.default_rng(0)
    truth = tf.constant((rng.random((batch, size, size, 2)) > 0.9).astype("float32"))
    pred = tf.Variable(rng.random((batch, size, size, 2)).astype("float32"))
    loss = _alternate({i: _loss_step(i, truth, pred) for i in (*IMPLS, "slices")}, steps, warmup)
    x = rng.uniform(0, 255, (batch, size, size, 1)).astype("float32")
    y = truth.numpy()
    train = _alternate({i: _train_step(i, size, x, y) for i in IMPLS}, steps, warmup)
    return {
        "size": size,
        "batch": batch,
        "steps": steps,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "loss_forward_backward_s": loss,
        "train_step_s": train,
        "speedup_loss": loss["tf"] / loss["ops"],
        "matmul_over_slices_loss": loss["slices"] / loss["ops"],
        "speedup_train_step": train["tf"] / train["ops"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.size % 32:
        parser.error("--size must be a multiple of 32")
    r = run(args.size, args.batch, args.steps, args.warmup)
    print(
        f"hybrid loss at {r['size']}x{r['size']}, batch {r['batch']}, median of {r['steps']} "
        f"steps on {r['machine']}"
    )
    for what, key in (("loss forward+backward", "loss"), ("training step", "train_step")):
        times = r[f"{key}_forward_backward_s" if key == "loss" else "train_step_s"]
        print(
            f"{what:<22} tf.image.ssim {times['tf']:.3f} s, tfcovseg.training.losses.ssim "
            f"{times['ops']:.3f} s: x{r[f'speedup_{key}']:.2f}"
        )
    slices = r["loss_forward_backward_s"]["slices"]
    print(
        f"{'':<22} SSIM by shifted slices (the GPU path) {slices:.3f} s: the products "
        f"x{r['matmul_over_slices_loss']:.2f} faster here"
    )
    write_figures(args.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
