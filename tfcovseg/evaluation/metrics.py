"""Segmentation metrics of Huang et al. (2021, Section 3.3), streaming and offline.

From global pixel counts over a data set, per class (a pixel is predicted positive when
its probability is >= the threshold, default 0.5; a mask pixel is positive when >= 0.5):

    Dice = 2 TP / (2 TP + FP + FN)        IoU = TP / (TP + FP + FN)
    precision = TP / (TP + FP)            recall = TP / (TP + FN)

plus the Dice per lesion slice: the Dice of each slice, averaged over the slices that have
the class in the truth or in the prediction. Averaged over every slice instead, the many
slices where both are empty (each scoring 1) would hide a class the model never finds
(0.885 beside a global Dice of 0.000 for the phantom's fibrosis).

Empty cases, one rule for all: when a denominator is 0 the score is 1.0 if prediction and
truth are both empty (TP = FP = FN = 0: nothing to find and nothing claimed), else 0.0.
Hence empty-vs-empty scores 1 for every metric, and every metric scores 0 when exactly one
of prediction and truth is empty (e.g. recall of a non-empty prediction on an empty mask:
TP + FN = 0 but FP > 0, so 0).

The `keras.metrics.Metric` classes are pure Keras (any backend) and plug into
`model.compile(metrics={"final": segmentation_metrics(class_names)})`; they accumulate
counts in float32 (relative error about 1e-7 over thousands of 512x512 slices). The numpy
functions give the same numbers offline from exact integer counts.

Sample weights: per image ([N]) for every metric, or per pixel ([N, H, W]) for the
pixel-count metrics.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


def _ratio(xp, num, den, tp, fp, fn):
    """num / den, with the empty-case rule of the module docstring where den == 0."""
    empty = xp.where((tp + fp + fn) == 0, 1.0, 0.0)
    return xp.where(den > 0, num / xp.maximum(den, 1e-12), empty)


_FORMULAS = {
    "dice": lambda tp, fp, fn: (2 * tp, 2 * tp + fp + fn),
    "iou": lambda tp, fp, fn: (tp, tp + fp + fn),
    "precision": lambda tp, fp, fn: (tp, tp + fp),
    "recall": lambda tp, fp, fn: (tp, tp + fn),
}


# ----------------------------------------------------------------------------- numpy


def confusion_counts(y_true, y_pred, threshold=0.5):
    """Global per-class pixel counts.

    Args:
        y_true: [..., C] masks (positive where >= 0.5).
        y_pred: [..., C] probabilities (positive where >= threshold).
        threshold: Binarisation threshold of the prediction.

    Returns:
        (tp, fp, fn): int64 arrays of shape [C].
    """
    y_true, y_pred = _check_shapes(y_true, y_pred)
    t = y_true >= 0.5
    p = y_pred >= threshold
    axes = tuple(range(t.ndim - 1))
    return (
        np.sum(t & p, axis=axes, dtype=np.int64),
        np.sum(~t & p, axis=axes, dtype=np.int64),
        np.sum(t & ~p, axis=axes, dtype=np.int64),
    )


def scores_from_counts(tp, fp, fn):
    """Dice, IoU, precision and recall from pixel counts (arrays or scalars).

    Returns:
        dict from metric name to float64 arrays of the counts' shape.
    """
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    return {
        name: _ratio(np, *formula(tp, fp, fn), tp, fp, fn) for name, formula in _FORMULAS.items()
    }


def slice_dice(y_true, y_pred, threshold=0.5):
    """Dice of each slice and class, and where the class is on the slice.

    Returns:
        (dice, present): [N, C] float64 Dice (inputs [N, H, W, C]) and [N, C] bool, True
        where the truth or the prediction has the class (the slices that
        `lesion_slice_mean` averages over).
    """
    y_true, y_pred = _check_shapes(y_true, y_pred)
    t = y_true >= 0.5
    p = y_pred >= threshold
    axes = tuple(range(1, t.ndim - 1))
    tp = np.sum(t & p, axis=axes)
    fp = np.sum(~t & p, axis=axes)
    fn = np.sum(t & ~p, axis=axes)
    return scores_from_counts(tp, fp, fn)["dice"], (tp + fp + fn) > 0


def lesion_slice_mean(dice, present):
    """[C] mean Dice over the slices with the class in truth or prediction ([N, C] inputs
    of `slice_dice`); 1.0 for a class on no slice (nothing to find, nothing claimed)."""
    dice, present = np.asarray(dice, np.float64), np.asarray(present, bool)
    count = present.sum(axis=0)
    total = np.where(present, dice, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), 1.0)


def segmentation_scores(y_true, y_pred, class_names, threshold=0.5):
    """All metrics per class: {class: {dice, iou, precision, recall, lesion_slice_dice,
    lesion_slices}}."""
    y_true, y_pred = _check_shapes(y_true, y_pred)
    if y_true.shape[-1] != len(class_names):
        raise ValueError(f"{y_true.shape[-1]} channels but {len(class_names)} class names")
    scores = scores_from_counts(*confusion_counts(y_true, y_pred, threshold))
    dice, present = slice_dice(y_true, y_pred, threshold)
    per_slice = lesion_slice_mean(dice, present)
    return {
        name: {k: float(v[c]) for k, v in scores.items()}
        | {"lesion_slice_dice": float(per_slice[c]), "lesion_slices": int(present[:, c].sum())}
        for c, name in enumerate(class_names)
    }


def _check_shapes(y_true, y_pred):
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true shape {y_true.shape} differs from y_pred shape {y_pred.shape}")
    return y_true, y_pred


# ----------------------------------------------------------------------------- keras


class _ClassMetric(keras.metrics.Metric):
    """Base of the per-class streaming metrics: reads channel `class_index` of [N,H,W,C]."""

    prefix = "metric"

    def __init__(self, class_index=0, class_name=None, threshold=0.5, name=None, dtype=None):
        super().__init__(name=name or f"{self.prefix}_{class_name or class_index}", dtype=dtype)
        self.class_index = int(class_index)
        self.class_name = class_name
        self.threshold = float(threshold)

    def _binary(self, y_true, y_pred, sample_weight):
        t = ops.cast(ops.cast(y_true[..., self.class_index], "float32") >= 0.5, "float32")
        p = ops.cast(
            ops.cast(y_pred[..., self.class_index], "float32") >= self.threshold, "float32"
        )
        w = None
        if sample_weight is not None:
            w = ops.cast(sample_weight, "float32")
            if len(w.shape) == 1:  # one weight per image
                w = ops.reshape(w, (-1,) + (1,) * (len(t.shape) - 1))
            elif len(w.shape) != len(t.shape):
                raise ValueError(
                    f"{self.name}: sample_weight must be per image [N] or per pixel "
                    f"{tuple(t.shape)}, got shape {tuple(w.shape)}"
                )
        return t, p, w

    def get_config(self):
        return {
            "name": self.name,
            "dtype": self.dtype,
            "class_index": self.class_index,
            "class_name": self.class_name,
            "threshold": self.threshold,
        }


def _slice_counts(y_true, y_pred, threshold):
    """[N, C] true-positive, predicted and true pixel counts per slice and class of
    [N, H, W, C] maps binarised at 0.5 (truth) and `threshold` (prediction).

    Every class's metrics call this with the same tensors, so a compiled step computes it
    once (the graph optimiser merges identical ops), where 15 metrics each binarised their
    own channel: a quickstart training step 0.430 -> ~0.41 s on a 2-core CPU
    (`experiments/benchmarks/train_step.py`)."""
    t = ops.cast(ops.cast(y_true, "float32") >= 0.5, "float32")
    p = ops.cast(ops.cast(y_pred, "float32") >= threshold, "float32")
    axes = tuple(range(1, len(t.shape) - 1))
    return ops.sum(t * p, axis=axes), ops.sum(p, axis=axes), ops.sum(t, axis=axes)


class _PixelCountMetric(_ClassMetric):
    """Accumulates TP, FP, FN over every pixel seen since the last reset."""

    formula = "dice"

    def __init__(self, class_index=0, class_name=None, threshold=0.5, name=None, dtype=None):
        super().__init__(class_index, class_name, threshold, name, dtype)
        self.tp = self.add_variable((), initializer="zeros", dtype="float32", name="tp")
        self.fp = self.add_variable((), initializer="zeros", dtype="float32", name="fp")
        self.fn = self.add_variable((), initializer="zeros", dtype="float32", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is None or len(ops.shape(sample_weight)) == 1:
            tp, pred, true = (
                c[:, self.class_index] for c in _slice_counts(y_true, y_pred, self.threshold)
            )
            if sample_weight is not None:  # one weight per image
                w = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
                tp, pred, true = tp * w, pred * w, true * w
            counts = [ops.sum(tp), ops.sum(pred - tp), ops.sum(true - tp)]
        else:  # per pixel
            t, p, w = self._binary(y_true, y_pred, sample_weight)
            counts = [ops.sum(c * w) for c in (t * p, (1.0 - t) * p, t * (1.0 - p))]
        for var, c in zip((self.tp, self.fp, self.fn), counts):
            var.assign_add(c)

    def result(self):
        tp, fp, fn = self.tp.value, self.fp.value, self.fn.value
        return _ratio(ops, *_FORMULAS[self.formula](tp, fp, fn), tp, fp, fn)


@keras.saving.register_keras_serializable(package="tfcovseg")
class DiceScore(_PixelCountMetric):
    """Dice of one class from global pixel counts: 2TP / (2TP + FP + FN).

    Args:
        class_index: Channel of [N, H, W, C] to score.
        class_name: Used in the default name, e.g. "dice_ggo".
        threshold: Probability at which a pixel counts as predicted positive.
    """

    prefix = "dice"
    formula = "dice"


@keras.saving.register_keras_serializable(package="tfcovseg")
class IoUScore(_PixelCountMetric):
    """IoU (Jaccard) of one class from global pixel counts: TP / (TP + FP + FN)."""

    prefix = "iou"
    formula = "iou"


@keras.saving.register_keras_serializable(package="tfcovseg")
class PixelPrecision(_PixelCountMetric):
    """Pixel precision of one class from global pixel counts: TP / (TP + FP)."""

    prefix = "precision"
    formula = "precision"


@keras.saving.register_keras_serializable(package="tfcovseg")
class PixelRecall(_PixelCountMetric):
    """Pixel recall (sensitivity) of one class from global pixel counts: TP / (TP + FN)."""

    prefix = "recall"
    formula = "recall"


@keras.saving.register_keras_serializable(package="tfcovseg")
class LesionSliceDice(_ClassMetric):
    """Dice of each slice for one class, averaged over the slices that have the class in
    the truth or the prediction (sample weights weight slices).

    1 before any such slice is seen: nothing to find and nothing claimed, the empty-case
    rule of the module.
    """

    prefix = "slice_dice"

    def __init__(self, class_index=0, class_name=None, threshold=0.5, name=None, dtype=None):
        super().__init__(class_index, class_name, threshold, name, dtype)
        self.total = self.add_variable((), initializer="zeros", dtype="float32", name="total")
        self.count = self.add_variable((), initializer="zeros", dtype="float32", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None and len(ops.shape(sample_weight)) != 1:
            raise ValueError(f"{self.name}: sample_weight must be one weight per image [N]")
        tp, pred, true = (
            c[:, self.class_index] for c in _slice_counts(y_true, y_pred, self.threshold)
        )
        fp, fn = pred - tp, true - tp
        dice = _ratio(ops, 2 * tp, 2 * tp + fp + fn, tp, fp, fn)
        weights = ops.cast((tp + fp + fn) > 0, "float32")  # lesion slices only
        if sample_weight is not None:
            weights = weights * ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        self.total.assign_add(ops.sum(dice * weights))
        self.count.assign_add(ops.sum(weights))

    def result(self):
        count = self.count.value
        return ops.where(count > 0, self.total.value / ops.maximum(count, 1e-12), 1.0)


@keras.saving.register_keras_serializable(package="tfcovseg")
class SliceAUC(keras.metrics.AUC):
    """Keras' ROC AUC, NaN while the labels seen are all of one kind.

    Keras' AUC reads 0.000 then (no positive: a true positive rate of 0 everywhere), which
    an epoch line showed as a classifier that ranks every slice wrongly; a validation split
    of one kind of slice (all lesion-free, say) has no AUC at all.
    """

    def result(self):
        # At the lowest threshold every example counts as predicted positive.
        positives = self.true_positives[0] + self.false_negatives[0]
        negatives = self.false_positives[0] + self.true_negatives[0]
        both = ops.logical_and(positives > 0, negatives > 0)
        return ops.where(both, super().result(), float("nan"))


METRIC_CLASSES = (DiceScore, IoUScore, PixelPrecision, PixelRecall, LesionSliceDice)


def segmentation_metrics(class_names, threshold=0.5):
    """One instance of every streaming metric per class, named e.g. "dice_ggo"."""
    return [
        cls(class_index=i, class_name=name, threshold=threshold)
        for cls in METRIC_CLASSES
        for i, name in enumerate(class_names)
    ]


# Patient-level classification (Huang et al. 2021, Table 6) ------------------------------


def patient_scores(truth: dict, predicted: dict) -> dict:
    """Accuracy, recall, precision, F1 and confusion counts of patient-level calls.

    Args:
        truth: {patient: bool} (COVID-19 or not).
        predicted: {patient: bool}; must hold every patient of `truth`.
    """
    missing = sorted(set(truth) - set(predicted))
    if missing:
        raise ValueError(f"no prediction for patients {missing[:5]}")
    tp = sum(bool(truth[p] and predicted[p]) for p in truth)
    tn = sum(bool(not truth[p] and not predicted[p]) for p in truth)
    fp = sum(bool(not truth[p] and predicted[p]) for p in truth)
    fn = sum(bool(truth[p] and not predicted[p]) for p in truth)
    precision = tp / (tp + fp) if tp + fp else (1.0 if not fn else 0.0)
    recall = tp / (tp + fn) if tp + fn else (1.0 if not fp else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / max(len(truth), 1),
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "patients": len(truth),
    }


def roc_auc(labels, scores) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); None without both
    classes."""
    labels = np.asarray(labels, bool).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # average ranks (1-based) over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_curve(labels, scores) -> dict:
    """The ROC curve of scores against binary labels: false and true positive rates at
    every distinct score taken as the threshold (highest first), from (0, 0) to (1, 1),
    with the area under it (`roc_auc`). Rates are None without both classes."""
    labels = np.asarray(labels, bool).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    out = {"auc": roc_auc(labels, scores), "positives": n_pos, "negatives": n_neg}
    if n_pos == 0 or n_neg == 0:
        return out | {"fpr": None, "tpr": None, "thresholds": None}
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(ranked))[0], len(ranked) - 1]  # end of each tie
    tpr = np.cumsum(hits)[last] / n_pos
    fpr = np.cumsum(~hits)[last] / n_neg
    return out | {
        "fpr": [0.0] + [float(v) for v in fpr],
        "tpr": [0.0] + [float(v) for v in tpr],
        "thresholds": [float(t) for t in ranked[last]],
    }


def patient_score(slice_probabilities, min_slices=1) -> float:
    """The `min_slices`-th highest slice probability of a patient (0 with fewer slices).

    A patient is positive under the rule "at least k slices >= t" exactly when this score
    with ``min_slices=k`` is >= t; k = 1 is the paper's any-slice rule (the maximum).
    """
    p = np.sort(np.asarray(slice_probabilities, np.float64).reshape(-1))[::-1]
    return float(p[min_slices - 1]) if len(p) >= min_slices else 0.0


def patient_calls(slice_probabilities: dict, threshold=0.5, min_slices=1) -> dict:
    """{patient: bool}: at least `min_slices` slices with probability >= `threshold`."""
    if min_slices < 1:
        raise ValueError(f"min_slices must be >= 1, got {min_slices}")
    return {
        pid: patient_score(p, min_slices) >= threshold for pid, p in slice_probabilities.items()
    }


def _best_cut(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(accuracy, margin, t) of the cut "score >= t" that best separates `labels`.

    t is the middle of the widest score gap among the cuts of highest accuracy; the scores
    are bounded by 0 and 1, so with one class only the gap is open on that side.
    """
    best = None
    cuts = np.unique(np.concatenate([[0.0, 1.0], scores]))
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        t = (lo + hi) / 2
        accuracy = float(np.mean((scores >= t) == labels))
        key = (accuracy, round(hi - lo, 9))
        if best is None or key > best[0]:
            best = (key, (accuracy, float(hi - lo), float(t)))
    return best[1]


def choose_patient_rule(slice_probabilities: dict, truth: dict, max_slices=5) -> dict:
    """The rule "at least k slices >= t" that best separates the given (validation) patients.

    For each k in 1..`max_slices`, patients are ranked by their k-th highest slice
    probability and t is placed in the middle of the widest probability gap that gives the
    highest accuracy. The k with the highest accuracy wins, then the widest gap (the margin,
    a guard against the few patients a validation split has), then the smaller k. With no
    patients of one of the classes the gap is open on that side and t is put halfway
    between the scores and 0 or 1.

    Returns:
        {"min_slices": k, "threshold": t, "accuracy": validation accuracy, "margin": gap}
    """
    if not slice_probabilities:
        raise ValueError("choose_patient_rule needs at least one patient")
    best = None
    pids = sorted(slice_probabilities)
    labels = np.array([bool(truth[p]) for p in pids])
    for k in range(1, max_slices + 1):
        scores = np.array([patient_score(slice_probabilities[p], k) for p in pids])
        accuracy, margin, t = _best_cut(scores, labels)
        key = (accuracy, round(margin, 9), -k)
        if best is None or key > best[0]:
            best = (
                key,
                {"min_slices": k, "threshold": t, "accuracy": accuracy, "margin": margin},
            )
    return best[1]


def choose_burden_threshold(burdens: dict, truth: dict) -> dict:
    """The cut on the predicted lesion burden that best separates the given patients.

    The burden of a patient is the segmenter's lesion volume over its lung volume (any
    lesion type, predicted); a patient is called COVID-19 when it is >= t. t is the middle
    of the widest burden gap among the cuts of highest accuracy, as in
    `choose_patient_rule`.

    Args:
        burdens: {patient: predicted lesion / lung ratio in [0, 1]}.
        truth: {patient: bool} (COVID-19 or not).

    Returns:
        {"threshold": t, "accuracy": accuracy on these patients, "margin": gap}
    """
    if not burdens:
        raise ValueError("choose_burden_threshold needs at least one patient")
    pids = sorted(burdens)
    scores = np.array([float(burdens[p]) for p in pids])
    if np.any((scores < 0) | (scores > 1)) or not np.all(np.isfinite(scores)):
        raise ValueError("lesion burdens must be ratios in [0, 1]")
    accuracy, margin, t = _best_cut(scores, np.array([bool(truth[p]) for p in pids]))
    return {"threshold": t, "accuracy": accuracy, "margin": margin}
