"""Analytical forward-pass cost of a functional Keras model (pure Keras, any backend).

Convention: 2 FLOPs per multiply-accumulate, counted for convolutions (plain, dilated,
transposed, depthwise) and dense layers; batch norm, activations, pooling, resizing and
element-wise layers are omitted (they add well under 1 % to the networks here and fold
into the convolutions at inference). Biases are not counted. Costs are per input image.
"""

from __future__ import annotations

import math
import re

import keras
from keras import layers


def _spatial(shape):
    return math.prod(int(s) for s in shape[1:-1])


def layer_flops(layer) -> int:
    """Forward FLOPs of one (non-model) layer for one image; 0 for layers not counted."""
    if isinstance(layer, layers.Conv2DTranspose):
        kh, kw, cout, cin = layer.kernel.shape
        return 2 * _spatial(layer.input.shape) * kh * kw * cin * cout
    if isinstance(layer, layers.DepthwiseConv2D):
        kh, kw, cin, mult = layer.kernel.shape
        return 2 * _spatial(layer.output.shape) * kh * kw * cin * mult
    if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)):
        *window, cin_per_group, cout = layer.kernel.shape
        return 2 * _spatial(layer.output.shape) * math.prod(window) * cin_per_group * cout
    if isinstance(layer, layers.Dense):
        cin, cout = layer.kernel.shape
        return 2 * _spatial(layer.output.shape) * cin * cout
    return 0


def _walk(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from ((layer.name, sub) for _, sub in _walk(layer))
        else:
            yield re.match(r"[A-Za-z]*", layer.name).group(0) or layer.name, layer


def flops_by_part(model) -> dict[str, int]:
    """Forward FLOPs per image, grouped by part: a nested model's name (e.g. "encoder") or
    the alphabetic prefix of a layer name ("aspp", "decoder", "refine", ...)."""
    parts: dict[str, int] = {}
    for part, layer in _walk(model):
        flops = layer_flops(layer)
        if flops:
            parts[part] = parts.get(part, 0) + flops
    return parts


def count_flops(model) -> int:
    """Total forward FLOPs per image of a functional model (see the module docstring)."""
    return sum(flops_by_part(model).values())
