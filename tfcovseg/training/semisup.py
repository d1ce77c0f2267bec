"""Semi-supervised building blocks: test-time augmentation and confidence-filtered
pseudo-labels (self-training). Intensity augmentation and matching, which inference uses
too, are in `tfcovseg.data.intensity`.

Pure NumPy plus a Keras model's `predict_on_batch`, so they run under any backend (the
COVID-SemiSeg benchmark runs them under JAX on a machine without TensorFlow).

Images are 8-bit grey levels as float arrays [N, H, W, 1] in 0-255 (pre-windowed slices,
or HU studies after the model's window layer would map them there).

Research use, not a medical device.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcovseg.data.intensity import match_intensity
from tfcovseg.models.outputs import final_probabilities


def _dihedral(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
    x = np.rot90(x, k, axes=(1, 2))
    return x[:, :, ::-1] if flip else x


def _undo_dihedral(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
    x = x[:, :, ::-1] if flip else x
    return np.rot90(x, -k, axes=(1, 2))


DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


def predict_probabilities(
    model, images: np.ndarray, batch_size=8, tta=DIHEDRAL[:1], positive_weights=None
):
    """The model's "final" probabilities [N, H, W, C] (corrected for the loss's
    `positive_weights`, `tfcovseg.models.outputs`), averaged over the `tta` transforms
    ((k quarter turns, horizontal flip) pairs; `DIHEDRAL` is all eight)."""
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[..., None]
    total = None
    for k, flip in tta:
        view = np.ascontiguousarray(_dihedral(images, k, flip))
        parts = []
        for start in range(0, len(view), batch_size):
            out = model.predict_on_batch(view[start : start + batch_size])
            parts.append(np.asarray(final_probabilities(out, positive_weights), np.float32))
        probs = _undo_dihedral(np.concatenate(parts), k, flip)
        total = probs if total is None else total + probs
    return total / len(tta)


@dataclasses.dataclass(frozen=True)
class PseudoLabels:
    """Hard pseudo-labels of the kept unlabelled slices."""

    index: np.ndarray  # [K] indices into the unlabelled images
    masks: np.ndarray  # [K, H, W, C] float32 0/1
    confidence: np.ndarray  # [K] the slices' confidence (see `confidence`)


def confidence(probs: np.ndarray, low=0.1, high=0.9) -> np.ndarray:
    """Per slice: 1 - (pixels with a probability in (low, high)) / (pixels above `low`).

    1 when the teacher is sure of every pixel it calls lesion; near 0 when most of what it
    sees is undecided. A slice the teacher sees no lesion in scores 1 (a confident
    lesion-free label)."""
    probs = np.asarray(probs, np.float32).reshape(len(probs), -1)
    unsure = ((probs > low) & (probs < high)).sum(1)
    seen = np.maximum((probs > low).sum(1), 1)
    return 1.0 - unsure / seen


def select_pseudo_labels(probs: np.ndarray, keep: float, threshold=0.5) -> PseudoLabels:
    """Keeps the `keep` fraction (0-1] of slices the teacher is surest of, thresholded."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    score = confidence(probs)
    n = max(1, int(round(keep * len(probs))))
    # Stable sort: ties keep slice order, so a seed gives one selection.
    index = np.sort(np.argsort(-score, kind="stable")[:n])
    masks = (np.asarray(probs)[index] >= threshold).astype(np.float32)
    return PseudoLabels(index, masks, score[index])


@dataclasses.dataclass
class Round:
    """One round's pseudo-labelled slices and what was kept."""

    images: np.ndarray  # [K, H, W, 1] grey levels / HU as the model reads them
    masks: np.ndarray  # [K, H, W, C] 0/1
    pool: int
    confidence_min: float


def label_round(
    teacher, images: np.ndarray, views: int, keep: float, reference=None, positive_weights=None
) -> Round:
    """One self-training round's pseudo-labels: the teacher labels `images` (the round's
    pool) averaged over `views` of `DIHEDRAL`, and the surest `keep` of them are kept.
    `tfcovseg.train`'s self-training phase and the COVID-SemiSeg benchmark both use it.

    Args:
        teacher: A segmenter (outputs "final").
        images: [N, H, W, 1] unlabelled images.
        views: Test-time views averaged (1-8).
        keep: Fraction (0, 1] of the pool kept.
        reference: Labelled images to match the unlabelled grey levels to
            (`match_intensity`), or None (already matched).
        positive_weights: The teacher's loss weights (`predict_probabilities`).
    """
    if reference is not None:
        images = match_intensity(images, reference)
    probs = predict_probabilities(
        teacher, images, tta=DIHEDRAL[:views], positive_weights=positive_weights
    )
    kept = select_pseudo_labels(probs, keep)
    return Round(
        np.asarray(images)[kept.index].astype(np.float32),
        kept.masks.astype(np.uint8),
        len(images),
        float(kept.confidence.min()),
    )
