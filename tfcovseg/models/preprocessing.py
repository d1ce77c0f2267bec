"""HU windowing: the one preprocessing function shared by training and the exported graph."""

from __future__ import annotations

import keras
from keras import ops

DEFAULT_WINDOW = (-1250.0, 250.0)


def window_hu(x, window=DEFAULT_WINDOW, pre_windowed=False):
    """Maps CT intensities to [0, 1] (float32).

    Args:
        x: Hounsfield units, any shape and numeric dtype (a backend tensor or array).
        window: (low, high) HU mapped linearly to (0, 1); values outside are clipped. The
            default [-1250, 250] covers air-filled lung up to soft tissue (Huang et al. 2021).
        pre_windowed: The input is an already windowed 8-bit image (0-255, as in PNG/JPEG
            datasets such as COVID-SemiSeg); it is only rescaled by 1/255.

    Returns:
        float32 tensor of the input's shape with values in [0, 1].
    """
    x = ops.cast(x, "float32")
    if pre_windowed:
        return ops.clip(x / 255.0, 0.0, 1.0)
    low, high = float(window[0]), float(window[1])
    return ops.clip((x - low) / (high - low), 0.0, 1.0)


def grey_from_hu(x, window=DEFAULT_WINDOW):
    """HU to the grey levels (0-255, float32) of an 8-bit image windowed at `window`: how
    HU studies reach a model trained on windowed PNG/JPEG slices."""
    return window_hu(x, window) * 255.0


def hu_from_grey(x, window=DEFAULT_WINDOW):
    """Grey levels 0-255 of an image windowed at `window` back to HU (the inverse of
    `grey_from_hu` inside the window): how such images reach a model that takes HU."""
    low, high = float(window[0]), float(window[1])
    grey = ops.clip(ops.cast(x, "float32"), 0.0, 255.0)
    return low + grey / 255.0 * (high - low)


@keras.saving.register_keras_serializable(package="tfcovseg")
class HUWindow(keras.layers.Layer):
    """Layer form of `window_hu`, the first layer of every tfcovseg network.

    It always computes in float32 (HU values lose precision in float16), whatever the
    global mixed-precision policy; the next layer casts to its own compute dtype.

    Args:
        window: (low, high) Hounsfield window mapped to [0, 1].
        pre_windowed: Inputs are 8-bit windowed images, only rescaled to [0, 1].
    """

    def __init__(self, window=DEFAULT_WINDOW, pre_windowed=False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        window = tuple(float(w) for w in window)
        if len(window) != 2 or window[0] >= window[1]:
            raise ValueError(f"HUWindow window must be (low, high) with low < high, got {window}")
        self.window = window
        self.pre_windowed = bool(pre_windowed)

    def call(self, inputs):
        return window_hu(inputs, self.window, self.pre_windowed)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "window": list(self.window),
            "pre_windowed": self.pre_windowed,
        }
