"""What an epoch's new iterator costs: the training pipeline as `make_dataset` builds it
(without tf.data's autotuning thread) against the same pipeline with the thread.

    python experiments/benchmarks/epoch_start.py [--config quickstart] [--epochs 6] [--rounds 2]
        [--work 6] [--out runs/benchmarks/epoch_start.json]
    python experiments/benchmarks/epoch_start.py --pipeline slices [--work 80]

Keras' `fit` makes a new iterator of the training dataset every epoch and drops the old
one, after exactly the epoch's batches (the iterator is never exhausted). In TensorFlow
2.21 dropping an iterator waits for its autotuning thread to wake from a sleep that grows
with the iterator's age; with the CPU busy between batches (as a training step keeps it)
that took seconds to tens of seconds at the start of some epochs.

The experiment's training split (the quickstart's phantom cohort at 128x128 in its cache,
written first if not there, as `python -m tfcovseg.train` does) through its pipeline
(cache, oversampling, shuffle, augmentation): each epoch pulls its batches and runs
``--work`` 1024x1024 matrix products after each batch as a stand-in for a training step,
then drops the iterator and times that. Each round runs ``--epochs`` epochs of one variant,
then of the other (fresh datasets each round); the rounds repeat so that machine drift
affects both alike. Reported per variant: the seconds spent dropping iterators, the
largest single drop, and the median epoch.

``--pipeline slices``: the COVID-SemiSeg benchmark's batches instead
(`tfcovseg.benchmarks.batches.SliceBatches`: 32 slices at 256x256 held in memory, random
ones here, batch 4, two augmented passes, intensity jitter), as `fit_input` hands them to
`model.fit` against Keras' own adapter of the `PyDataset` (``prefetch(AUTOTUNE)``, tf.data
autotuning on); ``--work`` defaults to 80 products a batch there (~30 s epochs on the
2-core CPU, as the benchmark's students'). Each variant's iterator is dropped after every
epoch here, as Keras did with its adapter's; `model.fit` keeps `fit_input`'s for the whole
fit (`steps_per_epoch`), so that pipeline drops none there.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

# tfcovseg first: its TensorFlow settings before TensorFlow loads.
importlib.import_module("tfcovseg")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import with_autotuner, write_figures  # noqa: E402  (experiments/benchmarks/common.py)

from tfcovseg.configs.experiment import builtin_experiment, load_config  # noqa: E402
from tfcovseg.data.dataset import make_dataset  # noqa: E402
from tfcovseg.training.inputs import prepare_records  # noqa: E402


def _datasets(config) -> dict:
    data, t = config.data, config.train
    ours = make_dataset(
        prepare_records(config), "train", data.fold, batch_size=t.batch_size, training=True,
        compact=True, cache=data.cache, oversample_lesions=data.oversample_lesions,
        oversample_pneumonia=data.oversample_pneumonia, shuffle_buffer=data.shuffle_buffer,
        seed=t.seed, image_size=config.model.input_size,
    )  # fmt: skip
    return {"make_dataset (no autotuning thread)": ours,
            "same, with tf.data autotuning": with_autotuner(ours)}  # fmt: skip


def _slice_datasets(_config) -> dict:
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    from tfcovseg.benchmarks.batches import SliceBatches, fit_input
    from tfcovseg.data.intensity import IntensityJitter

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, 256, 256)).astype(np.float32)
    masks = (rng.random((32, 256, 256, 2)) > 0.9).astype(np.float32)

    def batches():
        return SliceBatches(images, masks, ("coarse", "final"), 4, 2, 0, jitter=IntensityJitter())

    # Keras' private adapter: what `model.fit` builds of a PyDataset under TensorFlow (its
    # length told to tf.data here, as Keras' epoch loop knows it).
    keras_ds = PyDatasetAdapter(batches()).get_tf_dataset()
    keras_ds = keras_ds.apply(tf.data.experimental.assert_cardinality(len(batches())))
    return {"fit_input (no autotuning thread)": fit_input(batches()),
            "Keras' PyDataset adapter": keras_ds}  # fmt: skip


PIPELINES = {"records": _datasets, "slices": _slice_datasets}
DEFAULT_WORK = {"records": 6, "slices": 80}


def _epoch(ds, work: int, a) -> tuple[float, float]:
    """(epoch seconds, seconds to drop its iterator)."""
    start = time.perf_counter()
    iterator = iter(ds)
    for _ in range(int(ds.cardinality())):
        next(iterator)
        product = a
        for _ in range(work):
            product = tf.linalg.matmul(a, a)
        product.numpy()  # wait for the work, as a training step's logs do
    dropped = time.perf_counter()
    del iterator
    end = time.perf_counter()
    return end - start, end - dropped


def run(config_name="quickstart", epochs=6, rounds=2, work=None, pipeline="records") -> dict:
    config = load_config(builtin_experiment(config_name)) if pipeline == "records" else None
    work = DEFAULT_WORK[pipeline] if work is None else work
    datasets = PIPELINES[pipeline]
    a = tf.random.normal([1024, 1024], seed=0)
    epoch_s, drop_s = {}, {}
    for _ in range(rounds):
        for name, ds in datasets(config).items():  # fresh datasets (and caches) each round
            for _ in range(epochs):
                e, d = _epoch(ds, work, a)
                epoch_s.setdefault(name, []).append(e)
                drop_s.setdefault(name, []).append(d)
    batches = int(next(iter(datasets(config).values())).cardinality())
    return {
        "pipeline": pipeline, "config": config_name if config else None,
        "batches_per_epoch": batches, "epochs": epochs,
        "rounds": rounds, "work_matmuls": work,
        "variants": {
            name: {
                "drop_total_s": round(sum(drop_s[name]), 2),
                "drop_max_s": round(max(drop_s[name]), 2),
                "epoch_median_s": round(statistics.median(epoch_s[name]), 2),
                "drops_s": [round(d, 2) for d in drop_s[name]],
            }
            for name in epoch_s
        },
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart", help="built-in experiment")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pipeline", choices=sorted(PIPELINES), default="records")
    parser.add_argument("--work", type=int, help="matrix products after each batch "
                        "(default: 6 for records, 80 for slices)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    r = run(args.config, args.epochs, args.rounds, args.work, args.pipeline)
    print(f"{r['batches_per_epoch']} batches an epoch, {r['epochs']} epochs x {r['rounds']} "
          f"rounds each, {r['work_matmuls']} matrix products after each batch")  # fmt: skip
    for name, v in r["variants"].items():
        print(f"  {name}: dropping iterators {v['drop_total_s']:.1f} s in all (largest "
              f"{v['drop_max_s']:.1f} s), median epoch {v['epoch_median_s']:.1f} s")  # fmt: skip
    write_figures(args.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
