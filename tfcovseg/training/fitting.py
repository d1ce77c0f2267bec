"""What every phase of a training run fits with: the run's shared settings (`Run`), its
datasets, the Keras callbacks that keep the run folder (best checkpoint, backup, CSV log,
early stopping, TensorBoard) and `fit`, under any `tf.distribute` strategy."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import keras

from tfcovseg import require_tensorflow
from tfcovseg.configs.experiment import ExperimentConfig
from tfcovseg.constants import RUN_MODELS
from tfcovseg.data.dataset import make_dataset
from tfcovseg.models import model_file_problem, save_model
from tfcovseg.training.callbacks import (
    AtomicBackupAndRestore,
    AtomicCSVLogger,
    AtomicModelCheckpoint,
)
from tfcovseg.training.distributed import (
    build_training_state,
    fit_distributed,
    is_chief,
    is_multi_worker,
)
from tfcovseg.training.recipe import EMAWeights, early_stopping, keras_verbose
from tfcovseg.training.run_folder import phase_name

tf = require_tensorflow("python -m tfcovseg.train")


@dataclasses.dataclass
class Run:
    """What the phases of one training run share."""

    config: ExperimentConfig
    out: Path
    resume: bool
    verbose: object
    log: object
    strategy: object
    common: dict

    @property
    def eval_drop(self) -> bool:
        # Every replica needs at least one example of the last validation batch.
        return self.strategy.num_replicas_in_sync > 1

    @functools.cached_property
    def inspect_val(self):
        return make_dataset(split="validation", training=False, task="inspect", **self.common)


def _logged(csv_path: Path, monitor="val_loss") -> dict:
    """{epoch: monitored value} from a CSV log of the run (empty without one)."""
    if not csv_path.is_file():
        return {}
    import csv

    with csv_path.open(newline="") as f:
        return {
            int(row["epoch"]): float(row[monitor])
            for row in csv.DictReader(f)
            if row.get(monitor) and row.get("epoch")
        }


def phase_callbacks(
    out: Path, phase: str, patience: int, resume: bool, extra=(), save=None, log=print,
    tag=None, inputs=None,
):  # fmt: skip
    """Evaluation callbacks first (their logs reach the rest), then the bookkeeping.

    ``save``: the model the best checkpoint holds when it is not the model being fit.
    ``tag``: the name of the phase's files when it fits several models (self-training's
    rounds): ``logs/<tag>.csv``, ``backup/<tag>``, ``<tag>_best.keras``. ``inputs``: the
    training dataset, whose order a resume replays (`AtomicBackupAndRestore`).
    """
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    best = out / f"{tag or phase_name(phase)}_best.keras"
    phase = tag or phase
    csv_path = logs / f"{phase}.csv"
    # After --resume, the best checkpoint must stay the best of the whole run (a broken
    # one was removed by `verified_state`: the next epoch writes it again).
    logged = _logged(csv_path) if resume else {}
    best_so_far = min(logged.values()) if logged and best.is_file() else None
    # Every file of the run is replaced atomically: a kill leaves the old or the new one.
    return [
        EMAWeights(),  # first: the rest see the averaged weights (train.ema_momentum)
        *extra,
        AtomicModelCheckpoint(
            filepath=str(best),
            monitor="val_loss",
            save_best_only=True,
            initial_value_threshold=best_so_far,
            target=save,
        ),
        # Counting on from the epochs logged before a resume (its best, its patience).
        early_stopping(patience, logged, best if resume else None, save),
        # After EarlyStopping: its last backup holds the best weights it restored; after
        # the checkpoint: a kill between the two trains an epoch again, never one fewer.
        AtomicBackupAndRestore(str(out / "backup" / phase), log=log, inputs=inputs),
        AtomicCSVLogger(csv_path, append=resume),
        keras.callbacks.TensorBoard(str(logs / "tensorboard" / phase), write_graph=False),
    ]


def fit(model, strategy, train_ds, val_ds, epochs, callbacks, verbose, log=print):
    verbose, callbacks = keras_verbose(verbose, callbacks, epochs, log)
    if is_multi_worker(strategy):
        # Shard by element: a record folder may hold fewer shards than workers.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        train_ds, val_ds = train_ds.with_options(options), val_ds.with_options(options)
        verbose = verbose if is_chief(strategy) else 0
        for callback in callbacks:  # a resume replays the loop's iterators, one an epoch
            if isinstance(callback, AtomicBackupAndRestore):
                callback.iterators_per_epoch = 1
        # model.fit fails under MultiWorkerMirroredStrategy in TF 2.21 / Keras 3.15
        # (keras-team/keras#20585): a distributed custom loop drives the same callbacks.
        return fit_distributed(
            model,
            strategy,
            train_ds,
            epochs,
            validation_data=val_ds,
            callbacks=callbacks,
            verbose=verbose,
        )
    build_training_state(model, strategy, train_ds)  # one trace of the step, not two
    return model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        verbose=verbose,
        shuffle=False,  # the datasets shuffle themselves
        callbacks=callbacks,
    )


def finish_best(model, out: Path, phase: str, log) -> None:
    """Makes sure the phase's best checkpoint loads; writes the model there when not.

    A resumed phase whose epochs were all done before the kill runs no epoch, so the
    checkpoint a kill interrupted is never written again: the weights the phase ends
    with (the best, restored by EarlyStopping, or the backup's) take its place.
    """
    best = out / f"{RUN_MODELS[phase]}_best.keras"
    if model_file_problem(best) is None:
        return
    log(f"{best.name} was not written by this phase's epochs: saving the phase's model")
    save_model(model, best)


def intensity_window(config):
    """The window the intensity jitter works in (None: no jitter): the model's own."""
    if not config.data.intensity_augment:
        return None
    return (0.0, 255.0) if config.model.pre_windowed else tuple(config.model.hu_window)


def segment_train_ds(run: Run, outputs, label_output=None, batch_size=None):
    """The training split's segmentation batches, augmented as the config says."""
    data = run.config.data
    common = run.common if batch_size is None else {**run.common, "batch_size": batch_size}
    return make_dataset(
        split=data.train_split,
        training=True,
        compact=True,  # int16/uint8 batches: the model casts
        outputs=outputs,
        augment_data=data.augment,
        oversample_lesions=data.oversample_lesions,
        oversample_pneumonia=data.oversample_pneumonia,
        shuffle_buffer=data.shuffle_buffer,
        label_output=label_output,
        intensity_window=intensity_window(run.config),
        spatial_augment=data.spatial_augment,
        **common,
    )


def validation_ds(run: Run, outputs, label_output=None):
    return make_dataset(
        split="validation",
        training=False,
        compact=True,  # int16/uint8 batches: the model casts
        outputs=outputs,
        label_output=label_output,
        drop_remainder=run.eval_drop,
        **run.common,
    )


def steps_per_epoch(dataset) -> int:
    """Batches per epoch of a training dataset (`make_dataset` asserts its cardinality)."""
    return int(dataset.cardinality())
