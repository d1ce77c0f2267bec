"""SE-ResNet-34 encoder (Hu et al., squeeze-and-excitation networks; He et al., ResNet).

Huang et al. (2021), Section 2.1: the input layer and four stages of SE basic residual
blocks (3, 4, 6, 3 blocks; 64, 128, 256, 512 filters; reduction 16) form the encoder of the
coarse segmentation network and, with a pooling + dense head, the slice classifier.
"""

from __future__ import annotations

import keras
from keras import layers

from tfcovseg.models.blocks import BN_EPSILON, BN_MOMENTUM, apply_conv_bn_relu
from tfcovseg.models.layers import from_config_keeping_trainable

PYRAMID_LEVELS = ("stem", "stage1", "stage2", "stage3", "stage4")
PYRAMID_STRIDES = {"stem": 2, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32}


def apply_squeeze_excite(x, filters, reduction, name):
    """Channel attention: global pooling, bottleneck MLP, sigmoid gates on the channels."""
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_pool")(x)
    s = layers.Dense(max(filters // reduction, 1), activation="relu", name=f"{name}_se_reduce")(s)
    s = layers.Dense(filters, activation="sigmoid", name=f"{name}_se_expand")(s)
    return layers.Multiply(name=f"{name}_se_scale")([x, s])


def apply_se_basic_block(x, filters, strides, reduction, name):
    """ResNet basic block (two 3x3 convs) with squeeze-excitation before the residual add."""
    y = apply_conv_bn_relu(x, filters, 3, strides=strides, name=f"{name}_1")
    y = layers.Conv2D(
        filters,
        3,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_2_conv",
    )(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_2_bn")(y)
    y = apply_squeeze_excite(y, filters, reduction, name)
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(
            filters,
            1,
            strides=strides,
            use_bias=False,
            kernel_initializer="he_normal",
            name=f"{name}_shortcut_conv",
        )(x)
        shortcut = layers.BatchNormalization(
            momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_shortcut_bn"
        )(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


@keras.saving.register_keras_serializable(package="tfcovseg")
class SEResNetEncoder(keras.Model):
    """SE-ResNet encoder returning its feature pyramid as a dict.

    Input: windowed images [N, H, W, channels] in [0, 1]. Output: a dict with keys
    `PYRAMID_LEVELS`: "stem" (the 7x7/2 conv output, stride 2, before max-pooling) and
    "stage1".."stage4" (strides 4, 8, 16, 32).

    Args:
        input_size: (H, W) of the input; multiples of 32.
        input_channels: Channels of the input image.
        stem_filters: Filters of the 7x7/2 input convolution.
        stage_filters: Filters of the four stages.
        stage_blocks: SE basic blocks per stage; (3, 4, 6, 3) is SE-ResNet-34.
        se_reduction: Squeeze-excitation reduction ratio.
    """

    def __init__(
        self,
        input_size=(512, 512),
        input_channels=1,
        stem_filters=64,
        stage_filters=(64, 128, 256, 512),
        stage_blocks=(3, 4, 6, 3),
        se_reduction=16,
        **kwargs,
    ):
        if len(stage_filters) != 4 or len(stage_blocks) != 4:
            raise ValueError(
                f"SEResNetEncoder needs four stages, got stage_filters={stage_filters}, "
                f"stage_blocks={stage_blocks}"
            )
        inputs = keras.Input((*input_size, input_channels), name="image")
        stem = apply_conv_bn_relu(inputs, stem_filters, 7, strides=2, name="stem")
        x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(stem)
        features = {"stem": stem}
        for stage, (filters, blocks) in enumerate(zip(stage_filters, stage_blocks), start=1):
            for block in range(blocks):
                strides = 2 if (stage > 1 and block == 0) else 1
                x = apply_se_basic_block(
                    x, filters, strides, se_reduction, name=f"stage{stage}_block{block + 1}"
                )
            features[f"stage{stage}"] = x
        kwargs.setdefault("name", "encoder")
        super().__init__(inputs=inputs, outputs=features, **kwargs)
        self.input_size = tuple(int(s) for s in input_size)
        self.input_channels = int(input_channels)
        self.stem_filters = int(stem_filters)
        self.stage_filters = tuple(int(f) for f in stage_filters)
        self.stage_blocks = tuple(int(b) for b in stage_blocks)
        self.se_reduction = int(se_reduction)

    @property
    def pyramid_channels(self):
        """Channels of each pyramid level, by name."""
        return {"stem": self.stem_filters} | {
            f"stage{i}": f for i, f in enumerate(self.stage_filters, start=1)
        }

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "input_size": list(self.input_size),
            "input_channels": self.input_channels,
            "stem_filters": self.stem_filters,
            "stage_filters": list(self.stage_filters),
            "stage_blocks": list(self.stage_blocks),
            "se_reduction": self.se_reduction,
        }

    @classmethod
    def from_config(cls, config):
        return from_config_keeping_trainable(cls, config)
