"""Coarse decoder of the segmentation network (Huang et al. 2021, Section 2.1)."""

from __future__ import annotations

from keras import layers

from tfcovseg.models.blocks import apply_conv_bn_relu


def apply_coarse_decoder(
    bridge, skips, filters=(256, 128, 64, 64), convs=3, num_classes=3, name="decoder"
):
    """Decoder symmetric to the encoder; returns coarse logits at the input size.

    Each stage upsamples bilinearly by 2, concatenates the matching encoder feature and
    applies `convs` 3x3 conv + BN + ReLU; a last bilinear x2 brings the stride-2 map to the
    input size and a 3x3 conv gives one logit per class.

    Args:
        bridge: The bridge output at stride 32.
        skips: Encoder features at strides 16, 8, 4, 2 (stage3, stage2, stage1, stem).
        filters: Filters of the four stages, deepest first.
        convs: Convolutions per stage.
        num_classes: Output channels.
        name: Prefix of the layer names.
    """
    if len(skips) != len(filters):
        raise ValueError(f"{len(skips)} skip features but {len(filters)} decoder stages")
    x = bridge
    for stage, (skip, stage_filters) in enumerate(zip(skips, filters), start=1):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}{stage}_up")(x)
        x = layers.Concatenate(name=f"{name}{stage}_concat")([x, skip])
        for conv in range(convs):
            x = apply_conv_bn_relu(x, stage_filters, 3, name=f"{name}{stage}_{conv + 1}")
    x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_out_up")(x)
    return layers.Conv2D(num_classes, 3, padding="same", name=f"{name}_logits")(x)
