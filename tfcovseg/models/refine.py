"""Residual refinement module (Qin et al., BASNet RRM; Huang et al. 2021, Section 2.3)."""

from __future__ import annotations

from keras import layers

from tfcovseg.models.aspp import apply_aspp
from tfcovseg.models.blocks import apply_conv_bn_relu


def apply_refinement(
    coarse_logits, filters=64, stages=4, aspp_rates=(3, 6, 9), aspp_filters=64, name="refine"
):
    """Predicts residual logits that correct the coarse map; returns them (not the sum).

    A small U-Net on the coarse logits: `stages` encoder stages of one 3x3 conv + BN + ReLU
    followed by 2x2 max-pooling, an ASPP bridge, `stages` decoder stages of bilinear x2 +
    skip concat + one 3x3 conv + BN + ReLU, and a 3x3 conv to one residual logit per class.
    The caller adds the residual to the coarse logits before the sigmoid.

    Args:
        coarse_logits: [N, H, W, C] logits of the coarse decoder.
        filters: Filters of every convolution (the paper: 64).
        stages: Pooling stages (the paper: 4; H and W must be divisible by 2**stages).
        aspp_rates: Dilation rates of the bridge.
        aspp_filters: Filters of the bridge.
        name: Prefix of the layer names.
    """
    num_classes = coarse_logits.shape[-1]
    x = coarse_logits
    skips = []
    for stage in range(1, stages + 1):
        x = apply_conv_bn_relu(x, filters, 3, name=f"{name}_enc{stage}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"{name}_enc{stage}_pool")(x)
    x = apply_aspp(x, aspp_filters, aspp_rates, name=f"{name}_aspp")
    for stage in range(stages, 0, -1):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_dec{stage}_up")(x)
        x = layers.Concatenate(name=f"{name}_dec{stage}_concat")([x, skips[stage - 1]])
        x = apply_conv_bn_relu(x, filters, 3, name=f"{name}_dec{stage}")
    return layers.Conv2D(num_classes, 3, padding="same", name=f"{name}_residual")(x)
