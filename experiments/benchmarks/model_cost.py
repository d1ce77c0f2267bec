"""Training-step cost of the coarse-refine network against the SE-ResNet-34 U-Net.

    python experiments/benchmarks/model_cost.py [--size 256] [--batch 2] [--steps 6]
        [--out runs/benchmarks/model_cost.json]

Both networks are built at full width (the paper's configuration) at the given input size,
compiled as they train: the hybrid loss on "coarse" and "final" for coarse-refine (deep
supervision), on "final" for the U-Net, and Adam; both train on the same random batch. The
loss is well under 1 % of a step's FLOPs, so the difference measured is the network.
After warm-up steps (graph tracing), steps alternate between the two models so that
machine drift affects both alike; the medians of wall time and process CPU time per step
are reported with their ratio, next to the forward GFLOPs per slice of each network.

The ratio is the figure to compare across machines; absolute times depend on the CPU.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

# tfcovseg first: its TensorFlow settings (oneDNN off, a quiet start) before TensorFlow loads.
importlib.import_module("tfcovseg")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import alternating_steps, write_figures  # noqa: E402  (experiments/benchmarks/common.py)

from tfcovseg.configs.experiment import ModelConfig  # noqa: E402
from tfcovseg.models import build_model  # noqa: E402
from tfcovseg.models.flops import count_flops  # noqa: E402
from tfcovseg.training.losses import deep_supervision  # noqa: E402

MODELS = {"coarse_refine": "coarse_refine", "seresnet_unet": "seresnet_unet"}


def _compiled(architecture, size, jit_compile):
    model = build_model(ModelConfig(architecture=architecture, input_size=(size, size)))
    losses, weights = deep_supervision(list(model.output), "hybrid")
    model.compile(
        optimizer=keras.optimizers.Adam(3e-4),
        loss=losses,
        loss_weights=weights,
        jit_compile=jit_compile,
    )
    return model


def run(size=256, batch=2, steps=6, warmup=2, jit_compile=False):
    """Measures both models; returns a dict of the figures."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1100, 300, (batch, size, size, 1)).astype("float32")
    y = (rng.random((batch, size, size, 3)) > 0.9).astype("float32")
    models = {name: _compiled(arch, size, jit_compile) for name, arch in MODELS.items()}
    targets = {name: {k: y for k in m.output} for name, m in models.items()}
    timed = alternating_steps(models, x, targets, steps, warmup)
    result = {
        "size": size,
        "batch": batch,
        "steps": steps,
        "jit_compile": jit_compile,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "backend": keras.backend.backend(),
        "models": {},
    }
    for name, model in models.items():
        result["models"][name] = {
            "parameters": int(model.count_params()),
            "forward_gflops_per_slice": count_flops(model) / 1e9,
            "step_wall_s": timed[name][0],
            "step_cpu_s": timed[name][1],
        }
    a, b = result["models"]["coarse_refine"], result["models"]["seresnet_unet"]
    result["ratio_wall"] = a["step_wall_s"] / b["step_wall_s"]
    result["ratio_cpu"] = a["step_cpu_s"] / b["step_cpu_s"]
    result["ratio_gflops"] = a["forward_gflops_per_slice"] / b["forward_gflops_per_slice"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.size % 32:
        parser.error("--size must be a multiple of 32")
    r = run(args.size, args.batch, args.steps, args.warmup, args.jit_compile)
    print(
        f"training step at {r['size']}x{r['size']}, batch {r['batch']}, median of "
        f"{r['steps']} steps, {r['backend']} on {r['machine']}"
    )
    print(
        f"{'model':<16}{'params (M)':>11}{'GFLOP/slice':>13}{'wall s/step':>13}{'CPU s/step':>12}"
    )
    for name, m in r["models"].items():
        print(
            f"{name:<16}{m['parameters'] / 1e6:>11.2f}{m['forward_gflops_per_slice']:>13.2f}"
            f"{m['step_wall_s']:>13.3f}{m['step_cpu_s']:>12.3f}"
        )
    print(
        f"coarse_refine / seresnet_unet: wall x{r['ratio_wall']:.2f}, "
        f"CPU x{r['ratio_cpu']:.2f}, forward GFLOPs x{r['ratio_gflops']:.2f}"
    )
    write_figures(args.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
