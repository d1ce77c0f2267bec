"""Intensity augmentation and matching of 8-bit grey-level slices, shared by training (the
semi-supervised recipe) and inference (image folders windowed another way). Pure NumPy.

Images are grey levels as float arrays [N, H, W, 1] (or [N, H, W]) in 0-255.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Grey-level percentiles that define an image's intensity scale for matching: low enough
# to sit in aerated lung, high enough to sit in soft tissue of a body-cropped slice.
MATCH_PERCENTILES = (5.0, 95.0)


@dataclasses.dataclass(frozen=True)
class IntensityJitter:
    """Random per-image intensity changes: a window shift (grey levels), a contrast factor
    about mid-grey, a gamma and Gaussian noise, then clipped to 0-255.

    Slices of different sources are windowed differently (COVID-SemiSeg's unlabelled
    coronacases slices put soft tissue at grey level 100, its training slices at 230); a
    model trained on one windowing fails on the other without this.
    """

    shift: float = 30.0  # +- grey levels
    contrast: tuple[float, float] = (0.6, 1.4)
    gamma: tuple[float, float] = (0.7, 1.5)
    noise: float = 6.0  # maximum noise sd (grey levels)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(images, np.float32)
        n = x.shape[0]
        shape = (n,) + (1,) * (x.ndim - 1)
        contrast = rng.uniform(*self.contrast, n).astype(np.float32).reshape(shape)
        shift = rng.uniform(-self.shift, self.shift, n).astype(np.float32).reshape(shape)
        gamma = np.exp(rng.uniform(*np.log(self.gamma), n)).astype(np.float32).reshape(shape)
        x = np.clip((x - 127.5) * contrast + 127.5 + shift, 0.0, 255.0)
        x = 255.0 * (x / 255.0) ** gamma
        sd = rng.uniform(0.0, self.noise, n).astype(np.float32).reshape(shape)
        x = x + sd * rng.standard_normal(x.shape).astype(np.float32)
        return np.clip(x, 0.0, 255.0)


def intensity_scale(images: np.ndarray) -> np.ndarray:
    """Each image's (low, high) grey levels at `MATCH_PERCENTILES`: [N, 2]."""
    flat = np.asarray(images, np.float32).reshape(len(images), -1)
    return np.percentile(flat, MATCH_PERCENTILES, axis=1).T


def reference_scale(reference: np.ndarray) -> np.ndarray:
    """The (low, high) grey levels to match to: the median over `reference`'s slices of
    their `intensity_scale` ([2] float). Exports keep it as ``grey_levels.reference``."""
    return np.median(intensity_scale(reference), axis=0)


def match_to_scale(images: np.ndarray, target) -> np.ndarray:
    """Maps each image linearly so its (low, high) `intensity_scale` lands on `target`
    (low, high), clipped to 0-255: slices windowed another way look like the slices
    `target` was taken from.

    Args:
        images: [N, H, W(, 1)] grey levels 0-255.
        target: (low, high), e.g. `reference_scale` of the training slices.
    """
    low, high = (float(t) for t in target)
    scale = intensity_scale(images)
    span = np.maximum(scale[:, 1] - scale[:, 0], 1.0)
    gain = (high - low) / span
    shape = (len(images),) + (1,) * (np.ndim(images) - 1)
    out = (np.asarray(images, np.float32) - scale[:, 0].reshape(shape)) * gain.reshape(shape) + low
    return np.clip(out, 0.0, 255.0).astype(np.float32)


def match_intensity(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`match_to_scale` onto `reference_scale(reference)`: [N, H, W(, 1)] grey levels
    mapped to look like the reference slices [M, H', W'(, 1)]."""
    return match_to_scale(images, reference_scale(reference))
