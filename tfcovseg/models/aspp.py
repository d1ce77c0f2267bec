"""Atrous spatial pyramid pooling bridge (Chen et al., DeepLab v3; Huang et al. 2021, 2.2)."""

from __future__ import annotations

from keras import layers

from tfcovseg.models.blocks import apply_conv_bn_relu
from tfcovseg.models.layers import ResizeToMatch


def apply_aspp(x, filters=64, rates=(3, 6, 9), name="aspp"):
    """ASPP: a 1x1 conv, image pooling and one 3x3 atrous conv per rate, concat, 1x1 project.

    Every branch is conv + BN + ReLU with `filters` filters; the projection keeps `filters`.

    Args:
        x: Feature map [N, h, w, c].
        filters: Filters of each branch and of the projection (the paper: 64).
        rates: Dilation rates of the atrous branches (the paper: 3, 6, 9).
        name: Prefix of the layer names.
    """
    branches = [apply_conv_bn_relu(x, filters, 1, name=f"{name}_1x1")]
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    pooled = apply_conv_bn_relu(pooled, filters, 1, name=f"{name}_pool_1x1")
    branches.append(ResizeToMatch(name=f"{name}_pool_broadcast")([pooled, x]))
    for rate in rates:
        branches.append(
            apply_conv_bn_relu(x, filters, 3, dilation_rate=rate, name=f"{name}_rate{rate}")
        )
    y = layers.Concatenate(name=f"{name}_concat")(branches)
    return apply_conv_bn_relu(y, filters, 1, name=f"{name}_project")
