"""Keras callbacks for segmentation and patient-level evaluation during `fit`.

Add them to your own ``model.fit(..., callbacks=[...])``: their metrics go into ``logs``,
so EarlyStopping, ModelCheckpoint, CSVLogger and TensorBoard placed after them in the list
see them. `tfcovseg.train` uses these same classes.

- `SegmentationEvaluation`: Table 4 of Huang et al. (2021) per lesion type — Dice, IoU,
  pixel precision and recall from global pixel counts, and the per-image mean Dice —
  computed with the numpy functions of `tfcovseg.metrics`.
- `PatientEvaluation`: patient-level accuracy, recall, precision and F1 of a slice
  classifier under the any-slice rule.
- `OverlayImages`: a few slices with ground truth and prediction as TensorBoard images
  (red GGO, green consolidation, blue fibrosis, as in the paper's figures).
"""

from __future__ import annotations

import numpy as np

from data_tools.lung import lesions_in_lung
from tfcovseg import require_tensorflow
from tfcovseg.metrics import (
    confusion_counts,
    patient_calls,
    patient_scores,
    per_image_dice,
    scores_from_counts,
)

__all__ = [
    "OverlayImages",
    "PatientEvaluation",
    "SegmentationEvaluation",
    "overlay",
    "patient_scores",
    "slice_probabilities",
]

tf = require_tensorflow("tfcovseg.callbacks")

import keras  # noqa: E402

from tfcovseg.models.baselines import DEFAULT_CLASSES  # noqa: E402
from tfcovseg.viz import overlay_rgb  # noqa: E402


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
        dice = []
        for x, y in self.validation_data:
            pred = np.asarray(_select(self.model.predict_on_batch(x), self.output))
            true = np.asarray(_select(y, self.output))
            counts += np.stack(confusion_counts(true, pred, self.threshold))
            dice.append(per_image_dice(true, pred, self.threshold))
        scores = scores_from_counts(*counts)
        image_dice = np.concatenate(dice).mean(0) if dice else np.ones(len(self.class_names))
        out = {}
        for c, name in enumerate(self.class_names):
            for metric, values in scores.items():
                out[f"{self.prefix}{metric}_{name}"] = float(values[c])
            out[f"{self.prefix}image_dice_{name}"] = float(image_dice[c])
        return out

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and (epoch + 1) % self.every_n_epochs == 0:
            logs.update(self.compute())


def slice_probabilities(classifier, dataset) -> tuple[dict, dict]:
    """{patient: [slice probabilities]} and {patient: diagnosis} of a slice classifier.

    Args:
        classifier: A model mapping [N, H, W, 1] HU slices to [N] probabilities.
        dataset: A `make_dataset(..., task="inspect")` dataset.
    """
    probs, diagnosis = {}, {}
    for batch in dataset:
        p = np.asarray(classifier.predict_on_batch(batch["hu"][..., None])).reshape(-1)
        for pid, d, value in zip(
            batch["patient/id"].numpy(), batch["patient/diagnosis"].numpy(), p
        ):
            probs.setdefault(pid.decode(), []).append(float(value))
            diagnosis[pid.decode()] = d.decode()
    return probs, diagnosis


def in_lung(lesions, lung, spacing_mm) -> np.ndarray:
    """`lesions_in_lung` of a batch of slices [N, H, W], each with its own spacing [N, 3]."""
    return np.stack(
        [lesions_in_lung(f, g, tuple(s[:2]))[0] for f, g, s in zip(lesions, lung, spacing_mm)]
    )


def lesion_burdens(segmenter, dataset, threshold=0.5) -> tuple[dict, dict]:
    """{patient: predicted lesion volume / lung volume} and {patient: diagnosis}.

    The lesion volume counts voxels of any predicted lesion type (``"final"`` >=
    `threshold`) in the lung (`data_tools.lung.lesions_in_lung`: the record's lung mask
    and a margin for pleural lesions); the lung is the record's lung mask joined with
    them, as in `tfcovseg.evaluate`'s area ratios and `tfcovseg.predict`'s measures.

    Args:
        segmenter: A segmenter returning {"final": [N, H, W, C] probabilities}.
        dataset: A `make_dataset(..., task="inspect")` dataset.
    """
    lesion, lung, diagnosis = {}, {}, {}
    for batch in dataset:
        out = segmenter.predict_on_batch(batch["hu"][..., None])
        found = np.asarray(out["final"] if isinstance(out, dict) else out) >= threshold
        found = in_lung(found.any(-1), batch["lung"].numpy() > 0, batch["spacing_mm"].numpy())
        region = found | (batch["lung"].numpy() > 0)
        for i, (pid, d) in enumerate(
            zip(batch["patient/id"].numpy(), batch["patient/diagnosis"].numpy())
        ):
            pid = pid.decode()
            lesion[pid] = lesion.get(pid, 0) + int(found[i].sum())
            lung[pid] = lung.get(pid, 0) + int(region[i].sum())
            diagnosis[pid] = d.decode()
    return {p: lesion[p] / max(lung[p], 1) for p in lesion}, diagnosis


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
    """

    def __init__(
        self,
        validation_data,
        every_n_epochs=1,
        threshold=0.5,
        min_slices=1,
        prefix="val_patient_",
    ):
        super().__init__()
        self.validation_data = validation_data
        self.every_n_epochs = int(every_n_epochs)
        self.threshold = float(threshold)
        self.min_slices = int(min_slices)
        if self.min_slices < 1:
            raise ValueError(f"min_slices must be >= 1, got {min_slices}")
        self.prefix = prefix

    def slice_probabilities(self):
        """{patient: [slice probabilities]} and {patient: diagnosis}."""
        return slice_probabilities(self.model, self.validation_data)

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

    Colours by class name as in `tfcovseg.viz` (default names: ggo, consolidation,
    fibrosis, in channel order).
    """
    masks = np.asarray(masks, np.float32)
    names = list(class_names) if class_names is not None else list(DEFAULT_CLASSES)
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
