"""Training input-pipeline throughput against bare parsing of the same records.

    python experiments/benchmarks/pipeline.py [--size 512] [--patients 5] [--batch 8]
        [--shards 4] [--slices 800] [--rounds 5] [--out runs/benchmarks/pipeline.json]

A phantom cohort (`data_tools.phantom`) is written at the given size and converted into
TFRecords (`data_tools.convert`) under ``--data`` (default runs/benchmarks/pipeline-data/),
once: later runs with the same arguments reuse it. Then, in the same process:

- bare parsing: ``TFRecordDataset`` over the same shards (read in parallel like the
  pipeline's interleave) and ``tf.io.parse_single_example`` with the record spec, nothing
  else: the upper bound of any pipeline over these records;
- the training pipeline as `tfcovseg.train` runs it: ``make_dataset(training=True,
  compact=True)``, i.e. parsing, split filtering, decoding, shuffling, the paper's
  augmentation (random 90-degree rotation and flip of image and lesion masks), batching
  and the "segment" targets, in the stored dtypes (int16 HU, uint8 masks: the model
  casts them on its device);
- four more that locate the cost: evaluation mode (no shuffle, no augmentation),
  training without augmentation, the training pipeline with float32 outputs, and the
  training pipeline with tf.data's autotuning on (`make_dataset` turns it off:
  `tfcovseg.data.dataset.without_autotuner`).

Each dataset is repeated and drained through one iterator inside a `tf.function` loop, so
no Python runs per element. The configurations alternate for ``--rounds`` rounds so that
machine drift affects them alike; each round makes a fresh iterator, pulls ``--warmup``
slices (the first shuffle buffer, autotuning), times ``--slices`` and drops it, and the
median rate of each is reported in slices/s, with the CPU cores it kept busy. (Iterators
kept alive across rounds filled their buffers in the background while the others were
timed, and bare parsing then reported up to 10,000 "slices/s" in late rounds.)

Targets (issue 3): the training pipeline at >= 0.5 of the bare parsing rate, and >= 60
slices/s per CPU core (wall-clock rate divided by the cores this process may use).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# tfcovseg first: its TensorFlow settings (oneDNN off, a quiet start) before TensorFlow loads.
importlib.import_module("tfcovseg")

import tensorflow as tf  # noqa: E402
from common import with_autotuner, write_figures  # noqa: E402  (experiments/benchmarks/common.py)

from data_tools.conversion.pipeline import convert  # noqa: E402
from data_tools.features import feature_spec  # noqa: E402
from data_tools.phantom import make_cohort  # noqa: E402
from tfcovseg.data.dataset import make_dataset, read_manifest  # noqa: E402

TARGET_RATIO = 0.5
TARGET_PER_CORE = 60.0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare(data: Path, size: int, patients: int, seed: int, shards: int, workers: int) -> Path:
    """The records directory of the benchmark cohort, written unless already there."""
    cohort = data / f"phantom-{size}px-{patients}p-seed{seed}"
    records = cohort / f"records-{shards}shards"
    try:
        manifest = read_manifest(records)
        if manifest["size"] == size and manifest["num_patients"] == patients:
            return records
    except FileNotFoundError:
        pass
    if not (cohort / "dicom" / "manifest.csv").is_file():
        make_cohort(cohort / "dicom", patients, seed=seed, size=size)
    convert(
        cohort / "dicom",
        records,
        size=size,
        shards=shards,
        workers=workers,
        salt="benchmark",
        progress=False,
    )
    return records


def bare_parsing(records: Path):
    """TFRecordDataset + parse_single_example of every record: nothing more."""
    manifest = read_manifest(records)
    files = [str(records / s) for s in manifest["shards"]]
    spec = feature_spec()
    ds = tf.data.TFRecordDataset(
        files,
        compression_type=manifest.get("compression") or None,
        buffer_size=8 << 20,
        num_parallel_reads=min(len(files), 8),
    )
    return ds.map(lambda s: tf.io.parse_single_example(s, spec), tf.data.AUTOTUNE)


class Drain:
    """Pulls slices from a repeated dataset through one iterator, in a graph loop."""

    def __init__(self, ds, batched: bool):
        self.iterator = iter(ds.repeat())

        @tf.function
        def pull(n):
            count = tf.constant(0)
            while count < n:
                element = next(self.iterator)
                first = tf.nest.flatten(element)[0]
                count += tf.shape(first)[0] if batched else 1
            return count

        self.pull = pull

    def measure(self, slices: int):
        """(slices pulled, wall seconds, process CPU seconds) of about `slices` slices."""
        w0, c0 = time.perf_counter(), time.process_time()
        n = int(self.pull(tf.constant(slices)))
        return n, time.perf_counter() - w0, time.process_time() - c0


def run(
    records: Path,
    batch=8,
    split="all",
    slices=800,
    warmup=300,
    rounds=5,
    shuffle_buffer=1024,
    stages=True,
):
    """Measures bare parsing and the pipelines on `records`; returns a dict of the figures."""
    manifest = read_manifest(records)
    common = dict(split=split, fold=0, batch_size=batch, seed=0, shuffle_buffer=shuffle_buffer)
    configs = {"bare_parsing": (bare_parsing(records), False)}
    if stages:
        configs["eval_no_augmentation"] = (make_dataset(records, **common, training=False), True)
        configs["train_no_augmentation"] = (
            make_dataset(records, **common, training=True, augment_data=False),
            True,
        )
        configs["training_pipeline_float32"] = (
            make_dataset(records, **common, training=True),
            True,
        )
    configs["training_pipeline"] = (
        make_dataset(records, **common, training=True, compact=True),
        True,
    )
    if stages:
        # make_dataset turns tf.data's autotuning off (`without_autotuner`): what that costs.
        configs["training_pipeline_autotuned"] = (
            with_autotuner(configs["training_pipeline"][0]),
            True,
        )
    figures = {name: {"rate": [], "cores_busy": []} for name in configs}
    for _ in range(rounds):
        for name, (ds, batched) in configs.items():
            # A fresh iterator per round, warmed up, timed and dropped: an idle iterator's
            # background threads keep filling its buffers (autotuning grows them) while the
            # others are timed, and its first slices would then come out of a full buffer.
            drain = Drain(ds, batched)
            drain.measure(warmup)
            n, wall, cpu = drain.measure(slices)
            del drain
            gc.collect()
            figures[name]["rate"].append(n / wall)
            figures[name]["cores_busy"].append(cpu / wall)
    cores = _cores()
    result = {
        "size": int(manifest["size"]),
        "batch": batch,
        "split": split,
        "patients": int(manifest["num_patients"]),
        "record_slices": int(manifest["num_slices"]),
        "shards": len(manifest["shards"]),
        "compression": manifest.get("compression") or "none",
        "slices_per_round": slices,
        "warmup_per_round": warmup,
        "rounds": rounds,
        "shuffle_buffer": shuffle_buffer,
        "cores": cores,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "tensorflow": tf.__version__,
        "configs": {},
    }
    for name, f in figures.items():
        rate = statistics.median(f["rate"])
        result["configs"][name] = {
            "slices_per_s": rate,
            "slices_per_s_per_core": rate / cores,
            "cores_busy": statistics.median(f["cores_busy"]),
            "rates": f["rate"],
        }
    train = result["configs"]["training_pipeline"]
    result["ratio"] = train["slices_per_s"] / result["configs"]["bare_parsing"]["slices_per_s"]
    result["per_core"] = train["slices_per_s_per_core"]
    result["meets_ratio_target"] = result["ratio"] >= TARGET_RATIO
    result["meets_per_core_target"] = result["per_core"] >= TARGET_PER_CORE
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="slice size of the records")
    parser.add_argument("--patients", type=int, default=5, help="phantom patients")
    parser.add_argument("--seed", type=int, default=0, help="phantom cohort seed")
    parser.add_argument("--shards", type=int, default=4, help="TFRecord shards")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--split",
        default="all",
        choices=["all", "train"],
        help="split the pipeline reads (all: exactly the records bare parsing reads)",
    )
    parser.add_argument("--slices", type=int, default=800, help="slices timed per round")
    parser.add_argument(
        "--warmup", type=int, default=300, help="slices pulled untimed before each timed round"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shuffle-buffer", type=int, default=1024)
    parser.add_argument("--no-stages", action="store_true", help="skip the reduced pipelines")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("runs/benchmarks/pipeline-data"),
        help="where the cohort and records are written once and reused",
    )
    parser.add_argument("--workers", type=int, default=min(_cores(), 4), help="converter workers")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.size < 32 or args.patients < 1 or args.slices < args.batch:
        parser.error("need --size >= 32, --patients >= 1 and --slices >= --batch")
    tf.get_logger().setLevel("ERROR")

    t0 = time.perf_counter()
    records = prepare(args.data, args.size, args.patients, args.seed, args.shards, args.workers)
    prepared = time.perf_counter() - t0
    r = run(
        records,
        batch=args.batch,
        split=args.split,
        slices=args.slices,
        warmup=args.warmup,
        rounds=args.rounds,
        shuffle_buffer=args.shuffle_buffer,
        stages=not args.no_stages,
    )
    r["records"] = str(records)
    r["prepare_s"] = prepared
    print(
        f"input pipeline at {r['size']}x{r['size']}, batch {r['batch']}, split {r['split']}: "
        f"{r['record_slices']} slices of {r['patients']} phantom patients in {r['shards']} "
        f"shards ({r['compression']}), median of {r['rounds']} rounds of {r['slices_per_round']} "
        f"slices, TF {r['tensorflow']} on {r['machine']} ({r['cores']} usable cores); "
        f"records ready in {prepared:.1f} s"
    )
    print(f"{'configuration':<28}{'slices/s':>10}{'per core':>10}{'cores busy':>12}")
    for name, c in r["configs"].items():
        print(
            f"{name:<28}{c['slices_per_s']:>10.0f}{c['slices_per_s_per_core']:>10.0f}"
            f"{c['cores_busy']:>12.2f}"
        )
    ok = {True: "met", False: "MISSED"}
    print(
        f"training pipeline / bare parsing: {r['ratio']:.2f} (target >= {TARGET_RATIO}: "
        f"{ok[r['meets_ratio_target']]}); {r['per_core']:.0f} slices/s per core "
        f"(target >= {TARGET_PER_CORE:.0f}: {ok[r['meets_per_core_target']]})"
    )
    write_figures(args.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
