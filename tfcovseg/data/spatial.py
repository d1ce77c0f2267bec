"""Spatial augmentation beyond the paper's quarter turns and flips: a small random rotation,
zoom and shift of each slice, its masks moved with it. Pure NumPy and OpenCV, shared by the
trainer's tf.data pipeline (`tfcovseg.data.dataset`) and the COVID-SemiSeg benchmark's
in-memory batches (`tfcovseg.benchmarks.batches`).

Why: the paper's augmentation only permutes the pixel grid, so 32 training slices stay 32
anatomies at one scale; a CT slice of another patient is a chest of another size at a
slightly other angle and position.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

# OpenCV warps at most 4 channels at once.
_CV_CHANNELS = 4


@dataclasses.dataclass(frozen=True)
class SpatialJitter:
    """With `probability`, one random similarity transform per slice about its centre:
    rotation up to +- `degrees`, zoom in `zoom` (drawn log-uniformly: 1.2 magnifies, 0.85
    shrinks), shift up to +- `shift` of each side. The image is resampled bilinearly and
    filled with its own minimum (air around the patient) where the transform uncovers the
    border; the masks are resampled by nearest neighbour (labels stay labels) and filled
    with 0.
    """

    probability: float = 0.5
    degrees: float = 15.0
    zoom: tuple[float, float] = (0.85, 1.2)
    shift: float = 0.05

    def __post_init__(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        low, high = self.zoom
        if not 0.0 < low <= high:
            raise ValueError(f"zoom must be (low, high) with 0 < low <= high, got {self.zoom}")

    def matrix(self, rng: np.random.Generator, height: int, width: int):
        """One slice's forward 2x3 affine matrix (as `cv2.warpAffine` takes it), or None
        for a slice left as it is (four random draws; two more for a moved slice's shift)."""
        u = rng.random(4)  # (u[3] unused: drawn since the first runs, which it reproduces)
        if u[0] >= self.probability:
            return None
        angle = (2.0 * u[1] - 1.0) * self.degrees
        scale = float(np.exp(np.log(self.zoom[0]) + u[2] * np.log(self.zoom[1] / self.zoom[0])))
        m = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle, scale)
        m[:, 2] += (2.0 * rng.random(2) - 1.0) * self.shift * np.array([width, height])
        return m

    def transform(self, rng: np.random.Generator, image: np.ndarray, *masks: np.ndarray):
        """One slice: `image` [H, W(, 1)] and its `masks` [H, W(, C)] moved alike, each in
        its own shape and dtype (the same arrays when the slice is left as it is)."""
        m = self.matrix(rng, *image.shape[:2])
        if m is None:
            return (image, *masks)
        moved = warp(image, m, cv2.INTER_LINEAR, float(image.min()))
        return (moved, *(warp(k, m, cv2.INTER_NEAREST, 0.0) for k in masks))

    def __call__(self, images: np.ndarray, masks: np.ndarray, rng: np.random.Generator):
        """Transforms a batch: images [N, H, W(, 1)], masks [N, H, W(, C)]; returns new
        arrays of the same shapes and dtypes."""
        images, masks = np.array(images), np.array(masks)
        for j in range(len(images)):
            images[j], masks[j] = self.transform(rng, images[j], masks[j])
        return images, masks


def warp(array: np.ndarray, m: np.ndarray, interpolation: int, fill: float) -> np.ndarray:
    """`cv2.warpAffine` of one [H, W(, C)] array of any dtype, any number of channels,
    returned in its own shape and dtype."""
    height, width = array.shape[:2]
    x = array.reshape(height, width, -1)
    work = x.astype(np.float32) if x.dtype not in (np.uint8, np.float32) else x
    out = np.empty_like(work)
    for c in range(0, work.shape[-1], _CV_CHANNELS):
        part = np.ascontiguousarray(work[..., c : c + _CV_CHANNELS])
        warped = cv2.warpAffine(
            part, m, (width, height), flags=interpolation,
            borderMode=cv2.BORDER_CONSTANT, borderValue=(fill,) * _CV_CHANNELS,
        )  # fmt: skip
        out[..., c : c + _CV_CHANNELS] = warped.reshape(height, width, -1)
    if np.issubdtype(array.dtype, np.integer):  # HU in int16: rounded, not cut towards 0
        out = np.rint(out)
    return out.astype(array.dtype, copy=False).reshape(array.shape)
