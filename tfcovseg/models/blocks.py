"""Convolution blocks shared by the encoder, decoders and baselines."""

from __future__ import annotations

from keras import layers

# PyTorch-style batch norm (the paper's framework): moving statistics settle within a few
# hundred steps, which matters for the small CT training sets this model sees.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def apply_conv_bn_relu(x, filters, kernel_size=3, strides=1, dilation_rate=1, name="conv"):
    """3x3 (by default) convolution without bias, batch norm, ReLU."""
    x = layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        dilation_rate=dilation_rate,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)
