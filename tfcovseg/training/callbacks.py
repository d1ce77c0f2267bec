"""Keras callbacks for segmentation and patient-level evaluation during `fit`.

Add them to your own ``model.fit(..., callbacks=[...])``: their metrics go into ``logs``,
so EarlyStopping, ModelCheckpoint, CSVLogger and TensorBoard placed after them in the list
see them. `tfcovseg.train` uses these same classes.

- `SegmentationEvaluation`: Table 4 of Huang et al. (2021) per lesion type — Dice, IoU,
  pixel precision and recall from global pixel counts, and the per-image mean Dice —
  computed with the numpy functions of `tfcovseg.evaluation.metrics`.
- `PatientEvaluation`: patient-level accuracy, recall, precision and F1 of a slice
  classifier under the any-slice rule.
- `OverlayImages`: a few slices with ground truth and prediction as TensorBoard images
  (red GGO, green consolidation, blue fibrosis, as in the paper's figures).
- `AtomicModelCheckpoint`, `AtomicBackupAndRestore`, `AtomicCSVLogger`: Keras'
  checkpoint, backup and CSV log, written so that a kill leaves the old file or the new
  one, never half of one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from data_tools.files import atomic_write_json, atomic_write_text
from tfcovseg import require_tensorflow
from tfcovseg.evaluation.burden import by_patient, slice_scores
from tfcovseg.evaluation.metrics import (
    confusion_counts,
    lesion_slice_mean,
    patient_calls,
    patient_scores,
    scores_from_counts,
    slice_dice,
)

__all__ = [
    "AtomicBackupAndRestore",
    "AtomicCSVLogger",
    "AtomicModelCheckpoint",
    "OverlayImages",
    "PatientEvaluation",
    "SegmentationEvaluation",
    "overlay",
    "patient_scores",
]


import keras

from tfcovseg.constants import LESION_CLASSES
from tfcovseg.models import save_model, save_weights
from tfcovseg.reporting.figures import overlay_rgb

tf = require_tensorflow("tfcovseg.training.callbacks")


def _select(value, output):
    return value[output] if isinstance(value, dict) else value


class SegmentationEvaluation(keras.callbacks.Callback):
    """Per-class segmentation metrics on a dataset, every `every_n_epochs` epochs.

    Args:
        validation_data: A dataset of (images, targets) batches, as `make_dataset`'s
            "segment" task gives; targets may be a dict keyed by output name.
        class_names: Channel names, in order.
        every_n_epochs: Evaluate after every n-th epoch.
        output: Which model output to score ("final").
        threshold: Probability at which a pixel counts as lesion.
        prefix: Prefix of the log keys, e.g. "val_seg_dice_ggo".
    """

    def __init__(
        self,
        validation_data,
        class_names,
        every_n_epochs=1,
        output="final",
        threshold=0.5,
        prefix="val_seg_",
    ):
        super().__init__()
        self.validation_data = validation_data
        self.class_names = list(class_names)
        self.every_n_epochs = int(every_n_epochs)
        self.output = output
        self.threshold = float(threshold)
        self.prefix = prefix

    def compute(self) -> dict:
        """The metrics of the current model as a flat dict of floats."""
        counts = np.zeros((3, len(self.class_names)), np.int64)
        dice, present = [], []
        for x, y in self.validation_data:
            pred = np.asarray(_select(self.model.predict_on_batch(x), self.output))
            true = np.asarray(_select(y, self.output))
            counts += np.stack(confusion_counts(true, pred, self.threshold))
            d, on = slice_dice(true, pred, self.threshold)
            dice.append(d)
            present.append(on)
        scores = scores_from_counts(*counts)
        per_slice = (
            lesion_slice_mean(np.concatenate(dice), np.concatenate(present))
            if dice
            else np.ones(len(self.class_names))
        )
        out = {}
        for c, name in enumerate(self.class_names):
            for metric, values in scores.items():
                out[f"{self.prefix}{metric}_{name}"] = float(values[c])
            out[f"{self.prefix}slice_dice_{name}"] = float(per_slice[c])
        return out

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and (epoch + 1) % self.every_n_epochs == 0:
            logs.update(self.compute())


class PatientEvaluation(keras.callbacks.Callback):
    """Patient-level metrics of a slice classifier, every n epochs.

    A patient is called COVID-19 when at least `min_slices` of their slices have a
    probability >= `threshold` (1: the paper's any-slice rule); the truth is the patient's
    diagnosis.

    Args:
        validation_data: A `make_dataset(..., task="inspect")` dataset (batches with "hu",
            "patient/id" and "patient/diagnosis").
        every_n_epochs: Evaluate after every n-th epoch.
        threshold: Slice probability at which a slice counts as positive.
        min_slices: Positive slices that make a patient positive.
        prefix: Prefix of the log keys, e.g. "val_patient_accuracy".
        classifier: The classifier to evaluate when it is not the model being fit (a head
            trained on pooled features: `tfcovseg.models.classifier.head_on_features`).
    """

    def __init__(
        self,
        validation_data,
        every_n_epochs=1,
        threshold=0.5,
        min_slices=1,
        prefix="val_patient_",
        classifier=None,
    ):
        super().__init__()
        self.classifier = classifier
        self.validation_data = validation_data
        self.every_n_epochs = int(every_n_epochs)
        self.threshold = float(threshold)
        self.min_slices = int(min_slices)
        if self.min_slices < 1:
            raise ValueError(f"min_slices must be >= 1, got {min_slices}")
        self.prefix = prefix

    def slice_probabilities(self):
        """{patient: [slice probabilities]} and {patient: diagnosis}."""
        model = self.classifier or self.model
        scores = slice_scores(
            lambda hu: model.predict_on_batch(hu[..., None]), self.validation_data
        )
        return by_patient(scores), scores["diagnosis"]

    def compute(self) -> dict:
        probs, diagnosis = self.slice_probabilities()
        truth = {pid: diagnosis[pid] == "covid" for pid in probs}
        predicted = patient_calls(probs, self.threshold, self.min_slices)
        scores = patient_scores(truth, predicted)
        return {
            f"{self.prefix}{k}": float(scores[k]) for k in ("accuracy", "recall", "precision", "f1")
        }

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and (epoch + 1) % self.every_n_epochs == 0:
            logs.update(self.compute())


def overlay(hu, masks, window=(-1250.0, 250.0), alpha=0.45, class_names=None):
    """RGB overlays [N, H, W, 3] in [0, 1] of windowed slices and lesion masks [N,H,W,C].

    Colours by class name as in `tfcovseg.reporting.figures` (default names: ggo, consolidation,
    fibrosis, in channel order).
    """
    masks = np.asarray(masks, np.float32)
    names = list(class_names) if class_names is not None else list(LESION_CLASSES)
    if len(names) < masks.shape[-1]:
        names += [f"class{c}" for c in range(len(names), masks.shape[-1])]
    return overlay_rgb(hu, masks, names[: masks.shape[-1]], window, 0.5, alpha)


class OverlayImages(keras.callbacks.Callback):
    """Writes ground truth | prediction overlays of a few slices to TensorBoard.

    Args:
        images: [K, H, W, 1] slices in HU.
        masks: [K, H, W, C] ground-truth masks.
        log_dir: TensorBoard folder (a subfolder "overlays" is used).
        every_n_epochs: Write after every n-th epoch.
        output: Which model output to show.
        window: HU window of the display.
        class_names: Channel names, for the colours (default ggo, consolidation, fibrosis).
    """

    def __init__(
        self,
        images,
        masks,
        log_dir,
        every_n_epochs=1,
        output="final",
        window=(-1250.0, 250.0),
        class_names=None,
    ):
        super().__init__()
        self.images = np.asarray(images, np.float32)
        self.masks = np.asarray(masks, np.float32)
        self.every_n_epochs = int(every_n_epochs)
        self.output = output
        self.window = window
        self.class_names = class_names
        self.writer = tf.summary.create_file_writer(str(log_dir) + "/overlays")

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        pred = np.asarray(_select(self.model.predict_on_batch(self.images), self.output))
        truth = overlay(self.images[..., 0], self.masks, self.window, class_names=self.class_names)
        guess = overlay(self.images[..., 0], pred, self.window, class_names=self.class_names)
        with self.writer.as_default():
            tf.summary.image(
                "truth_vs_prediction",
                np.concatenate([truth, guess], axis=2),
                step=epoch,
                max_outputs=len(self.images),
            )
        self.writer.flush()


# ----------------------------------------------------------------------------- run files


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint` that never leaves a half-written ``.keras`` file.

    Keras writes checkpoints in place: a kill during the write leaves a truncated (often
    0-byte) file under the checkpoint's name, which a resumed run takes for the best model.
    Here each save goes to a temporary file beside it, renamed over the old one when
    complete (`tfcovseg.models.save_model`).

    Args:
        target: The model the checkpoint holds when it is not the model being fit (a
            segmenter fit together with a classifier head, sharing its weights).
    """

    def __init__(self, *args, target=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._target = target

    def set_model(self, model):
        super().set_model(_AtomicSaver(self._target if self._target is not None else model))


class _AtomicSaver:
    """A model whose ``save`` / ``save_weights`` write atomically; all else is the model's."""

    def __init__(self, model):
        self._wrapped = model

    def save(self, filepath, overwrite=True, **kwargs):
        save_model(self._wrapped, filepath, **kwargs)

    def save_weights(self, filepath, overwrite=True, **kwargs):
        save_weights(self._wrapped, filepath, **kwargs)

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose backup (weights and epoch) is replaced atomically, and
    kept when training ends.

    Keras deletes the backup as `fit` ends, before the phase saves its last model and the
    run records the phase as completed: a kill in between (seconds for a large model)
    lost the whole phase, which a resume trained again from its first epoch. Here the end
    writes a last backup, the weights the phase ends with (after `EarlyStopping` restored
    the best, so this callback goes after it) marked ``finished``; a resume restores them
    and runs no epoch. The run deletes the backup once the phase is recorded
    (`remove_backup`).

    A backup that still does not load (written by an older version, a full disk) is set
    aside with a warning and the phase starts again from its first epoch, rather than
    failing or resuming from a broken state.

    `inputs`, the training dataset: a resume at epoch k first makes and drops the
    iterators the unkilled run made before epoch k. Its shuffles and random streams draw
    new seeds with every iterator, so the resumed epochs see the batches the unkilled run
    saw; without this the first resumed epoch saw the first epoch's again. Keras' `fit`
    makes two an epoch (3.15, for a dataset of known length: the next epoch's as one
    ends, then another as it begins) after the first epoch's; our distributed loop one
    (`iterators_per_epoch`, which `fitting.fit` sets).
    """

    iterators_per_epoch = 2

    def __init__(self, backup_dir, log=print, inputs=None, **kwargs):
        super().__init__(backup_dir, delete_checkpoint=False, **kwargs)
        self._log = log
        self._finished = False
        self._inputs = inputs

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
            finished = self._read_metadata().get("finished", False)
        except (OSError, json.JSONDecodeError, KeyError) as e:  # the files, not the model
            shutil.rmtree(self.backup_dir, ignore_errors=True)
            self.model._initial_epoch = 0
            self._log(
                f"warning: the backup in {self.backup_dir} does not load "
                f"({type(e).__name__}: {e}); this phase counts its epochs from the first "
                "again (with whatever weights the backup had restored)"
            )
            return
        if finished:  # the kill came after fit: its weights are back, nothing to train
            self.model._initial_epoch = max(
                self.model._initial_epoch or 0, self.params.get("epochs", 0)
            )
            self._current_epoch = self.model._initial_epoch
            self._log(f"the phase had finished its epochs before the kill ({self.backup_dir})")
        elif self._inputs is not None:
            for _ in range(self.iterators_per_epoch * (self.model._initial_epoch or 0)):
                iter(self._inputs)  # dropped at once: only its seeds were drawn

    def _read_metadata(self) -> dict:
        path = Path(self._training_metadata_path)
        return json.loads(path.read_text()) if path.is_file() else {}

    def on_train_end(self, logs=None):
        self._finished = True
        self._save_model()

    def _save_model(self):
        # Weights first, then the epoch: a kill between the two resumes one epoch early,
        # which trains that epoch again, never one fewer.
        os.makedirs(self.backup_dir, exist_ok=True)
        save_weights(self.model, self._weights_path)
        atomic_write_json(
            self._training_metadata_path,
            {"epoch": self._current_epoch, "batch": self._last_batch_seen}
            | ({"finished": True} if self._finished else {}),
        )


def remove_backup(out: Path, name: str) -> None:
    """Deletes ``backup/<name>`` once the run has recorded its phase (or round) as done."""
    shutil.rmtree(Path(out) / "backup" / name, ignore_errors=True)


class AtomicCSVLogger(keras.callbacks.Callback):
    """`CSVLogger`'s file (one row per epoch), rewritten atomically after every epoch.

    An appended line cut by a kill would leave a malformed row that the next run appends
    after; here the file always holds whole rows. With `append`, the rows of an earlier
    run (a resumed one) are kept.
    """

    def __init__(self, filename, append=False):
        super().__init__()
        self.filename = Path(filename)
        self.append = append
        self.rows: list[dict] = []

    def on_train_begin(self, logs=None):
        self.rows = []
        if self.append and self.filename.is_file():
            with self.filename.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if r.get("epoch")]

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": str(epoch)} | {k: _csv_value(v) for k, v in sorted((logs or {}).items())}
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.filename, text.getvalue())


def _csv_value(value) -> str:
    try:
        return repr(float(np.asarray(value)))
    except (TypeError, ValueError):
        return str(value)
