"""A training step with TensorFlow's oneDNN kernels on against off (Eigen), on this CPU.

    python experiments/benchmarks/onednn.py [--config quickstart] [--batch 8] [--steps 10]
        [--rounds 2] [--xla] [--set KEY=VALUE] [--out runs/benchmarks/onednn.json]
    python experiments/benchmarks/onednn.py --config semiseg_benchmark --batch 4 --xla
    python experiments/benchmarks/onednn.py --config semiseg_benchmark --batch 4 --xla \
        --set model.architecture=unet --set train.loss=bce   # the benchmark's U-Net row

`import tfcovseg` turns oneDNN off unless TF_ENABLE_ONEDNN_OPTS is set (see
`tfcovseg/__init__.py`), and TensorFlow reads the variable once, at import: the two modes
run in separate processes (`train_step.py`'s recipe step), alternating off, on, off, on...
so that machine drift affects both alike. Reported: the median over rounds of each mode's
median step, and their ratio. ``--xla`` adds both modes with XLA-compiled steps
(``train.jit_compile``; without it, the steps are plain `tf.function`s whatever the
experiment says), each figure also as a ratio to Eigen's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_figures  # experiments/benchmarks/common.py

HERE = Path(__file__).resolve().parent
MODES = {"off (Eigen)": "0", "on (oneDNN)": "1"}


def _step(config, batch, steps, flag, xla=False, overrides=()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        cmd = [sys.executable, str(HERE / "train_step.py"), "--config", config, "--batch",
               str(batch), "--steps", str(steps), "--out", str(out),
               "--set", f"train.jit_compile={'true' if xla else 'false'}"]  # fmt: skip
        cmd += [arg for kv in overrides for arg in ("--set", kv)]
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=flag, TF_CPP_MIN_LOG_LEVEL="3")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["variants"]["recipe"]


def run(config="quickstart", batch=8, steps=10, rounds=2, xla=False, overrides=()) -> dict:
    modes = {(mode, False): flag for mode, flag in MODES.items()}
    if xla:
        modes |= {(mode, True): flag for mode, flag in MODES.items()}
    walls = {mode + (" + XLA" if jit else ""): [] for mode, jit in modes}
    for _ in range(rounds):
        for (mode, jit), flag in modes.items():
            step = _step(config, batch, steps, flag, jit, overrides)
            walls[mode + (" + XLA" if jit else "")].append(step["step_wall_s"])
    median = {mode: statistics.median(w) for mode, w in walls.items()}
    off, on = median["off (Eigen)"], median["on (oneDNN)"]
    return {"config": config, "overrides": list(overrides), "batch": batch, "steps": steps,
            "rounds": rounds,
            "step_wall_s": median, "per_round": walls, "speed_up": off / on,
            "of_eigen": {mode: off / wall for mode, wall in median.items()}}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--xla", action="store_true", help="also with XLA-compiled steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the experiment (repeatable)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    r = run(args.config, args.batch, args.steps, args.rounds, args.xla, args.set)
    name = " ".join([r["config"], *r["overrides"]])
    print(f"{name}: recipe's training step, batch {r['batch']}, {r['rounds']} rounds")
    for mode, wall in r["step_wall_s"].items():
        print(f"  oneDNN {mode:<18} {wall:.3f} s/step, x{r['of_eigen'][mode]:.2f} (rounds: "
              + ", ".join(f"{w:.3f}" for w in r["per_round"][mode]) + ")")  # fmt: skip
    print(f"  speed-up with oneDNN: x{r['speed_up']:.2f}")
    write_figures(args.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
