"""THE image resize of tfcovseg: antialiased bilinear as two small matrix products.

The converter resizes slices with it when it writes records, and the serving graph
(`tfcovseg.data.dataset.resize_image`) resizes any input to the model's size and the masks
back with the same weights, so train and serve see the same images. It equals PIL's
bilinear resize (a triangle filter widened by the scale when shrinking, weights
renormalised at the borders) and TensorFlow's ``tf.image.resize(..., antialias=True)``
(tests pin both). As matrix products it also converts to ONNX, which has no antialiased
resize that tf2onnx maps (``ScaleAndTranslate`` has no ONNX op).

Resizing [H, W] to [h, w] costs h·H·W + h·W·w multiply-adds: about 50 M for 512² to 256²,
nothing beside the network, and one matrix product runs on every accelerator.
"""

from __future__ import annotations

import numpy as np


def bilinear_weights(in_size, out_size, xp=np):
    """The [out_size, in_size] weights that resize one axis from `in_size` to `out_size`.

    Output pixel i is centred at (i + 0.5) · in_size / out_size in input coordinates; input
    pixel j (centred at j + 0.5) weighs max(0, 1 - |distance| / support), support =
    max(1, in_size / out_size) (wider when shrinking: antialiasing), and each row sums to 1.

    Args:
        in_size, out_size: Lengths of the axis (Python ints, or tensors for `xp`).
        xp: The array functions: NumPy, or any namespace with ``float32`` (a cast),
            ``arange``, ``abs``, ``maximum`` and ``sum(x, axis, keepdims)`` (the TensorFlow
            one in `tfcovseg.data.dataset`).
    """
    f32 = xp.float32
    scale = f32(in_size) / f32(out_size)
    support = xp.maximum(scale, f32(1.0))
    centres = (f32(xp.arange(out_size)) + f32(0.5)) * scale
    pixels = f32(xp.arange(in_size)) + f32(0.5)
    distance = xp.abs(pixels[None, :] - centres[:, None])
    weights = xp.maximum(f32(1.0) - distance / support, f32(0.0))
    return weights / xp.sum(weights, axis=1, keepdims=True)


def resize_bilinear(image: np.ndarray, size) -> np.ndarray:
    """`image` [H, W] resized to `size` (height, width): float32, antialiased bilinear."""
    image = np.asarray(image, np.float32)
    if image.ndim != 2:
        raise ValueError(f"resize_bilinear takes one [H, W] slice, got shape {image.shape}")
    height, width = (int(s) for s in size)
    rows = bilinear_weights(image.shape[0], height)
    columns = bilinear_weights(image.shape[1], width)
    return rows @ image @ columns.T
