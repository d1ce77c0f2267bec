"""Where a training step's operations spend their time, by part of the network.

    python experiments/benchmarks/step_profile.py [--config quickstart] [--batch 8]
        [--steps 5] [--out runs/benchmarks/step_profile.json]

The recipe's step (`train_step.py`: the experiment's loss and metrics) runs under
TensorFlow's profiler after warm-up; the trace's operation events are summed by the part
of the graph they belong to (encoder, ASPP bridge and decoder, refinement module, loss,
metrics, optimizer), forward and backward apart, and by operation type. Times are
operation time summed over TensorFlow's threads, per step: their shares, not their sum,
compare with a step's wall time.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import sys
import tempfile
from pathlib import Path

# tfcovseg first: its TensorFlow settings (oneDNN off unless set) before Keras loads TF.
importlib.import_module("tfcovseg")

import tensorflow as tf  # noqa: E402
from common import write_figures  # noqa: E402  (experiments/benchmarks/common.py)
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402
from train_step import _compiled, random_batch  # noqa: E402

from tfcovseg.configs.experiment import load_config  # noqa: E402

PARTS = {"encoder": "encoder", "aspp": "bridge + decoder", "decoder": "bridge + decoder",
         "refine": "refinement", "coarse": "outputs", "final": "outputs"}  # fmt: skip


def part_of(op_name: str) -> str:
    """The network part of a graph operation's name ("coarse_refine_1/refine_dec1_...")."""
    path = op_name.removeprefix("gradient_tape/").split("/")
    if path[0].startswith("compile_loss"):
        return "loss"
    if path[0].startswith("compile_metrics"):
        return "metrics"
    if len(path) > 1:
        for prefix, part in PARTS.items():
            if path[1].startswith(prefix):
                return part
    return "optimizer and other"


def _events(logdir: Path):
    """(name, seconds) of every TensorFlow operation event in the trace."""
    xspace = xplane_pb2.XSpace()
    xspace.ParseFromString(next(logdir.rglob("*.xplane.pb")).read_bytes())
    for plane in xspace.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name.startswith("tf_Compute"):  # TensorFlow's executor threads
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    if ":" in name and "::" not in name:  # "op_name:OpType"
                        yield name, event.duration_ps * 1e-12


def run(config_name="quickstart", batch=8, steps=5, warmup=3) -> dict:
    config = load_config(config_name)
    size = tuple(config.model.input_size)
    x, y = random_batch(config, batch)
    model = _compiled(config, "recipe")
    targets = {k: y for k in model.output}
    for _ in range(warmup):
        model.train_on_batch(x, targets)
    parts, types = collections.Counter(), collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        tf.profiler.experimental.start(tmp)
        for _ in range(steps):
            model.train_on_batch(x, targets)
        tf.profiler.experimental.stop()
        for name, seconds in _events(Path(tmp)):
            op_name, op_type = name.rsplit(":", 1)
            way = "backward" if op_name.startswith("gradient_tape/") else "forward"
            parts[(part_of(op_name), way)] += seconds / steps
            types[op_type] += seconds / steps
    total = sum(parts.values())
    return {
        "config": config_name, "input_size": list(size), "batch": batch, "steps": steps,
        "op_s_per_step": total,
        "parts": {f"{p} ({w})": s for (p, w), s in parts.most_common()},
        "op_types": dict(types.most_common(15)),
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    r = run(args.config, args.batch, args.steps)
    h, w = r["input_size"]
    total = r["op_s_per_step"]
    print(f"{r['config']}: training step at {h}x{w}, batch {r['batch']}, {r['steps']} steps "
          f"profiled; {total:.3f} s of operations a step (all threads)")  # fmt: skip
    for label, seconds in r["parts"].items():
        print(f"  {label:<34}{seconds:>8.3f} s {seconds / total:>6.1%}")
    print("  by operation type: " + ", ".join(
        f"{t} {s / total:.0%}" for t, s in list(r["op_types"].items())[:8]))  # fmt: skip
    write_figures(args.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
