"""Inf-Net's evaluation protocol for lung-infection segmentation, in NumPy.

Fan et al., "Inf-Net: Automatic COVID-19 Lung Infection Segmentation from CT Images"
(IEEE TMI 2020) score each test image's probability map as their MATLAB toolbox does:

1. the map is read as an 8-bit image, divided by 255 and min-max normalised per image;
   the ground truth is the mask pixels above 128 (of 255);
2. at 256 thresholds t = 1, 254/255, ..., 0 the map is binarised (map >= t) and Dice,
   sensitivity (recall) and specificity are computed; a threshold with no true positive
   scores 0 on all three (their convention, kept for comparability);
3. each measure is averaged over images per threshold; "meanDic" is the mean of that
   curve over the thresholds, "maxDic" its maximum (likewise for sensitivity and
   specificity); MAE is the per-image mean absolute error between the normalised map
   and the ground truth, averaged over images.

`dice_at_half` adds the usual operating point (the probability >= 0.5, not normalised).
Pure NumPy: no TensorFlow, no Keras. Research use, not a medical device.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = np.linspace(1.0, 0.0, 256)  # MATLAB's 1:-1/255:0


def to_uint8(probability) -> np.ndarray:
    """A probability map as the 8-bit image the protocol reads (round half up)."""
    p = np.clip(np.asarray(probability, np.float64), 0.0, 1.0)
    return np.floor(p * 255.0 + 0.5).astype(np.uint8)


def normalise(map8) -> np.ndarray:
    """map / 255, then min-max normalised (a constant map stays as it is)."""
    m = np.asarray(map8, np.float64) / 255.0
    low, high = m.min(), m.max()
    return (m - low) / (high - low) if high > low else m


def image_curves(map8, truth) -> dict:
    """Per-threshold Dice, sensitivity and specificity of one image, and its MAE.

    Args:
        map8: uint8 [H, W] probability map (`to_uint8`).
        truth: [H, W] ground truth: bool, 0/1, or 0-255 (pixels > 128 are positive when
            the maximum is above 1).
    """
    truth = np.asarray(truth)
    gt = truth > 128 if truth.max(initial=0) > 1 else truth > 0
    s = normalise(map8).ravel()
    g = gt.ravel()
    n, positives = s.size, int(g.sum())
    all_sorted = np.sort(s)
    pos_sorted = np.sort(s[g])
    # pixels with map >= t, and those of them in the ground truth, for every threshold
    predicted = n - np.searchsorted(all_sorted, THRESHOLDS, side="left")
    tp = positives - np.searchsorted(pos_sorted, THRESHOLDS, side="left")
    fp = predicted - tp
    fn = positives - tp
    tn = (n - predicted) - fn
    hit = tp > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(hit, 2.0 * tp / (positives + predicted), 0.0)
        sensitivity = np.where(hit, tp / max(positives, 1), 0.0)
        specificity = np.where(hit, tn / np.maximum(tn + fp, 1), 0.0)
    return {
        "dice": dice,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "mae": float(np.abs(s - g).mean()),
    }


def dice_at_half(map8, truth) -> float:
    """Dice of the map at probability >= 0.5 (1.0 when both are empty)."""
    truth = np.asarray(truth)
    gt = truth > 128 if truth.max(initial=0) > 1 else truth > 0
    pred = np.asarray(map8) >= 128  # 0.5 * 255 rounds to 128
    total = int(gt.sum() + pred.sum())
    return 1.0 if total == 0 else float(2.0 * (gt & pred).sum() / total)


def score(maps8, truths) -> dict:
    """The protocol's summary over a set of images (lists of [H, W] arrays, any sizes).

    Returns ``meanDic``, ``maxDic``, ``meanSen``, ``maxSen``, ``meanSpe``, ``maxSpe``,
    ``MAE``, ``Dice@0.5`` (all floats) and ``images``.
    """
    if len(maps8) != len(truths) or not len(maps8):
        raise ValueError(f"need as many maps as truths (>0), got {len(maps8)} and {len(truths)}")
    curves = [image_curves(m, t) for m, t in zip(maps8, truths)]
    out = {"images": len(curves)}
    for key, name in (("dice", "Dic"), ("sensitivity", "Sen"), ("specificity", "Spe")):
        column = np.mean([c[key] for c in curves], axis=0)
        out[f"mean{name}"] = float(column.mean())
        out[f"max{name}"] = float(column.max())
    out["MAE"] = float(np.mean([c["mae"] for c in curves]))
    out["Dice@0.5"] = float(np.mean([dice_at_half(m, t) for m, t in zip(maps8, truths)]))
    return out
