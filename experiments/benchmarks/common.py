"""What the benchmark scripts share (run as `python experiments/benchmarks/X.py`)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def write_figures(out: Path | None, figures: dict) -> None:
    """Writes the figures as JSON to `out` (its folder made) and says so; nothing if None."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"wrote {out}")


def with_autotuner(ds):
    """`ds` with tf.data's autotuning thread on again: the baseline our pipelines
    (`tfcovseg.data.dataset.without_autotuner`) are measured against."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = True
    return ds.with_options(options)


def alternating_steps(models: dict, x, targets: dict, steps: int, warmup: int) -> dict:
    """{name: (median wall s, median process CPU s)} of a training step of each model on
    the same batch, after `warmup` steps each (graph tracing); the models take turns step
    by step, so that machine drift affects all alike."""
    for name, model in models.items():
        for _ in range(warmup):
            model.train_on_batch(x, targets[name])
    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():
            w0, c0 = time.perf_counter(), time.process_time()
            model.train_on_batch(x, targets[name])
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in models}
