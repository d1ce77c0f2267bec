"""What a training step of an experiment's recipe spends on the network, the loss and the
metrics.

    python experiments/benchmarks/train_step.py [--config quickstart] [--batch 8]
        [--steps 15] [--set KEY=VALUE] [--out runs/benchmarks/train_step.json]

The experiment's segmenter is compiled three ways on the same random batch (HU slices,
sparse lesion masks): as `tfcovseg.train` compiles it (`tfcovseg.training.recipe`: the
experiment's loss on every output and the per-class Dice / IoU / precision / recall /
lesion-slice Dice on "final"), with the loss but no metrics, and with plain BCE and no
metrics. After warm-up steps (graph tracing) the three alternate step by step, so that
machine drift affects all alike; the medians of wall and process CPU time per step are
reported with their ratios to the recipe's step. The ratios are the figures to compare
across machines.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

# tfcovseg first: its TensorFlow settings (oneDNN off) before Keras loads TensorFlow.
importlib.import_module("tfcovseg")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import alternating_steps, write_figures  # noqa: E402  (experiments/benchmarks/common.py)

from tfcovseg.configs.experiment import load_config  # noqa: E402
from tfcovseg.models import build_model  # noqa: E402
from tfcovseg.training.recipe import compile_segmenter, segmentation_objective  # noqa: E402

VARIANTS = ("recipe", "loss only", "BCE only")


def _compiled(config, variant):
    model = build_model(config.model)
    losses, weights, metrics = segmentation_objective(config, model.output)
    if variant != "recipe":
        metrics = {}
    if variant == "BCE only":
        losses = {name: "binary_crossentropy" for name in losses}
    compile_segmenter(config, model, (losses, weights, metrics), steps_per_epoch=1)
    return model


def random_batch(config, batch):
    """Seeded HU slices at the experiment's input size and sparse lesion masks."""
    size = tuple(config.model.input_size)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1100, 300, (batch, *size, 1)).astype("float32")
    y = (rng.random((batch, *size, config.model.num_classes)) > 0.97).astype("float32")
    return x, y


def run(config_name="quickstart", batch=8, steps=15, warmup=3, overrides=()):
    """Measures the three compilations; returns a dict of the figures."""
    config = load_config(config_name, overrides)
    size = tuple(config.model.input_size)
    x, y = random_batch(config, batch)
    models = {v: _compiled(config, v) for v in VARIANTS}
    targets = {v: {k: y for k in m.output} for v, m in models.items()}
    timed = alternating_steps(models, x, targets, steps, warmup)
    result = {
        "config": config_name,
        "overrides": list(overrides),
        "input_size": list(size),
        "batch": batch,
        "steps": steps,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "backend": keras.backend.backend(),
        "variants": {},
    }
    for v, (wall, cpu) in timed.items():
        result["variants"][v] = {
            "step_wall_s": wall,
            "step_cpu_s": cpu,
            "of_recipe": wall / timed["recipe"][0],
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart", help="experiment (default: quickstart)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the experiment (repeatable)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    r = run(args.config, args.batch, args.steps, args.warmup, args.set)
    h, w = r["input_size"]
    print(
        f"{r['config']}: training step at {h}x{w}, batch {r['batch']}, median of "
        f"{r['steps']} steps, {r['backend']} on {r['machine']}"
    )
    print(f"{'compiled with':<14}{'wall s/step':>13}{'CPU s/step':>12}{'of recipe':>11}")
    for v, m in r["variants"].items():
        print(f"{v:<14}{m['step_wall_s']:>13.3f}{m['step_cpu_s']:>12.3f}{m['of_recipe']:>10.2f}x")
    write_figures(args.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
