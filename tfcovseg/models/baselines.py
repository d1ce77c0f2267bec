"""Segmentation baselines of the paper's comparison: classic U-Net and U-Net++.

Both take Hounsfield units through the same `HUWindow` layer as the coarse-refine network
and return {"final": [N, H, W, C]} float32 sigmoid probabilities, so every training and
evaluation path treats them alike. Batch norm follows each convolution (not in the 2015
U-Net; it makes training from scratch stable and the comparison fair).
"""

from __future__ import annotations

import keras
from keras import layers

from tfcovseg.constants import LESION_CLASSES
from tfcovseg.models.blocks import apply_conv_bn_relu
from tfcovseg.models.layers import from_config_keeping_trainable
from tfcovseg.models.preprocessing import DEFAULT_WINDOW, HUWindow


def apply_double_conv(x, filters, name):
    """Two 3x3 conv + BN + ReLU, the U-Net unit."""
    x = apply_conv_bn_relu(x, filters, 3, name=f"{name}_1")
    return apply_conv_bn_relu(x, filters, 3, name=f"{name}_2")


def apply_up_conv(x, filters, name):
    """2x2 transposed convolution with stride 2 (the U-Net "up-convolution")."""
    return layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_upconv")(x)


class _SegmentationBaseline(keras.Model):
    """Shared constructor arguments, input and output of the baselines."""

    def _finish(
        self,
        inputs,
        x,
        input_size,
        class_names,
        hu_window,
        pre_windowed,
        filters,
        window_layer,
        **kwargs,
    ):
        logits = layers.Conv2D(len(class_names), 1, name="logits")(x)
        final = layers.Activation("sigmoid", dtype="float32", name="final")(logits)
        super().__init__(inputs=inputs, outputs={"final": final}, **kwargs)
        self.window_layer = window_layer
        self.input_size = input_size
        self.class_names = tuple(class_names)
        self.hu_window = tuple(float(w) for w in hu_window)
        self.pre_windowed = bool(pre_windowed)
        self.filters = tuple(int(f) for f in filters)

    @staticmethod
    def _start(input_size, filters, hu_window, pre_windowed):
        input_size = tuple(int(s) for s in input_size)
        depth = len(filters) - 1
        if depth < 1 or any(s % 2**depth for s in input_size):
            raise ValueError(
                f"input_size {list(input_size)} must be divisible by 2**{depth} for "
                f"{len(filters)} levels of filters"
            )
        inputs = keras.Input((*input_size, 1), name="hu")
        window_layer = HUWindow(hu_window, pre_windowed, name="window")
        return input_size, inputs, window_layer, window_layer(inputs)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "input_size": list(self.input_size),
            "class_names": list(self.class_names),
            "hu_window": list(self.hu_window),
            "pre_windowed": self.pre_windowed,
            "filters": list(self.filters),
        }

    @classmethod
    def from_config(cls, config):
        return from_config_keeping_trainable(cls, config)


@keras.saving.register_keras_serializable(package="tfcovseg")
class UNet(_SegmentationBaseline):
    """Classic U-Net (Ronneberger et al. 2015) with same-padding and batch norm.

    Args:
        input_size: (H, W), divisible by 2**(len(filters) - 1).
        class_names: One output channel per name.
        hu_window, pre_windowed: As `HUWindow`.
        filters: Filters per level, shallowest first (64 ... 1024 in the paper).
    """

    def __init__(
        self,
        input_size=(512, 512),
        class_names=LESION_CLASSES,
        hu_window=DEFAULT_WINDOW,
        pre_windowed=False,
        filters=(64, 128, 256, 512, 1024),
        **kwargs,
    ):
        input_size, inputs, window_layer, x = self._start(
            input_size, filters, hu_window, pre_windowed
        )
        skips = []
        for level, f in enumerate(filters[:-1]):
            x = apply_double_conv(x, f, name=f"down{level}")
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
        x = apply_double_conv(x, filters[-1], name="bottom")
        for level in range(len(filters) - 2, -1, -1):
            x = apply_up_conv(x, filters[level], name=f"up{level}")
            x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
            x = apply_double_conv(x, filters[level], name=f"up{level}")
        kwargs.setdefault("name", "unet")
        self._finish(
            inputs,
            x,
            input_size,
            class_names,
            hu_window,
            pre_windowed,
            filters,
            window_layer,
            **kwargs,
        )


@keras.saving.register_keras_serializable(package="tfcovseg")
class UNetPlusPlus(_SegmentationBaseline):
    """U-Net++ (Zhou et al. 2018): nested, dense skip pathways between encoder and decoder.

    Node X(i, j) at depth i and column j is a double conv over the concatenation of
    X(i, 0..j-1) and the up-convolved X(i+1, j-1); the output is read from X(0, depth).

    Args:
        input_size: (H, W), divisible by 2**(len(filters) - 1).
        class_names: One output channel per name.
        hu_window, pre_windowed: As `HUWindow`.
        filters: Filters per depth, shallowest first.
    """

    def __init__(
        self,
        input_size=(512, 512),
        class_names=LESION_CLASSES,
        hu_window=DEFAULT_WINDOW,
        pre_windowed=False,
        filters=(64, 128, 256, 512, 1024),
        **kwargs,
    ):
        input_size, inputs, window_layer, x = self._start(
            input_size, filters, hu_window, pre_windowed
        )
        depth = len(filters) - 1
        nodes = {}
        for i in range(depth + 1):
            if i > 0:
                x = layers.MaxPooling2D(2, name=f"x{i - 1}_0_pool")(nodes[(i - 1, 0)])
            nodes[(i, 0)] = apply_double_conv(x, filters[i], name=f"x{i}_0")
        for j in range(1, depth + 1):
            for i in range(depth - j + 1):
                up = apply_up_conv(nodes[(i + 1, j - 1)], filters[i], name=f"x{i}_{j}")
                merged = layers.Concatenate(name=f"x{i}_{j}_concat")(
                    [nodes[(i, k)] for k in range(j)] + [up]
                )
                nodes[(i, j)] = apply_double_conv(merged, filters[i], name=f"x{i}_{j}")
        kwargs.setdefault("name", "unet_plus_plus")
        self._finish(
            inputs,
            nodes[(0, depth)],
            input_size,
            class_names,
            hu_window,
            pre_windowed,
            filters,
            window_layer,
            **kwargs,
        )
