"""The lung mask as it was computed before it was made fast: scipy and NumPy, step by step.

`data_tools.lung.lung_mask` must give these masks (issue 22: Dice >= 0.99; they are
identical on the phantom, pydicom's CTs and COVID-SemiSeg's slices). The test and
``experiments/benchmarks/lung.py`` (its baseline) use it. Slow on purpose: no OpenCV, no
cropping, no shortcuts.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from data_tools.lung import AIR_THRESHOLD_HU, OUTSIDE_AIR_HU, OUTSIDE_AIR_WINDOWED

_CROSS = ndimage.generate_binary_structure(2, 1)
_SQUARE = ndimage.generate_binary_structure(2, 2)


def _grow(mask: np.ndarray, radius: int, erode: bool) -> np.ndarray:
    """Dilation (or erosion) by an octagon of about `radius` pixels: ceil(radius / 2) 3x3
    crosses and floor(radius / 2) 3x3 squares, step by step (scipy; outside the image is
    background)."""
    op = ndimage.binary_erosion if erode else ndimage.binary_dilation
    crosses, squares = (radius + 1) // 2, radius // 2
    if crosses:
        mask = op(mask, structure=_CROSS, iterations=crosses)
    if squares:
        mask = op(mask, structure=_SQUARE, iterations=squares)
    return mask


def otsu_threshold(image: np.ndarray) -> float:
    """Otsu's threshold by hand (256 bins, between-class variance): a bin centre."""
    hist, edges = np.histogram(image, bins=256, range=(0, 256))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    mean0 = np.cumsum(hist * centers) / np.maximum(weight0, 1)
    mean1 = ((hist * centers).sum() - np.cumsum(hist * centers)) / np.maximum(weight1, 1)
    return float(centers[int(np.argmax(weight0 * weight1 * (mean0 - mean1) ** 2))])


def _largest(mask):
    labels, n = ndimage.label(mask)
    if not n:
        return mask
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def _inside(air, image, outside_level):
    body = ndimage.binary_fill_holes(_largest(~air))
    labels, n = ndimage.label(air & ~body)
    inside = air & body
    if n:
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        sums = np.bincount(labels.ravel(), weights=image.ravel(), minlength=n + 1)
        lung_like = sums / np.maximum(counts, 1) > outside_level
        lung_like[0] = False
        inside |= lung_like[labels]
    return inside


def _cleanup(mask, radius, min_pixels):
    pad = radius + 1
    grown = _grow(_grow(np.pad(mask, pad), radius, erode=False), radius, erode=True)
    s = ndimage.binary_fill_holes(mask | grown[pad:-pad, pad:-pad])
    labels, n = ndimage.label(s)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes < min_pixels
    small[0] = False
    s[small[labels]] = False
    return s


def reference_lung_mask(image, spacing_mm=(1.0, 1.0), pre_windowed=False):
    """`lung_mask` (defaults, no lesions) of a slice [H, W] or a volume [Z, H, W]."""
    image = np.asarray(image)
    volume = image[None] if image.ndim == 2 else image
    if pre_windowed:
        air = np.stack([s < otsu_threshold(s) for s in volume])
    else:
        air = volume < AIR_THRESHOLD_HU
    level = OUTSIDE_AIR_WINDOWED if pre_windowed else OUTSIDE_AIR_HU
    inside = np.stack([_inside(a, v, level) for a, v in zip(air, volume)])
    labels, n = ndimage.label(inside)
    keep = np.zeros_like(inside)
    if n:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        order = np.argsort(sizes)[::-1]
        for label in order[:2]:
            if label and sizes[label] >= 0.1 * sizes[order[0]]:
                keep |= labels == label
    radius = int(round(4.0 / min(spacing_mm)))
    min_pixels = 20.0 / float(spacing_mm[0] * spacing_mm[1])
    for z in range(len(keep)):
        if keep[z].any():
            keep[z] = _cleanup(keep[z], radius, min_pixels)
    return keep[0] if image.ndim == 2 else keep
