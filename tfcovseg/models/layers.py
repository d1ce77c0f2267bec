"""Small registered layers that replace what would otherwise be Lambda layers, and the
config helper shared by the functional model classes."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfcovseg")
class ResizeToMatch(keras.layers.Layer):
    """Resizes the first input spatially to the height and width of the second.

    Used for ASPP's image-pooling branch, whose 1x1 map is broadcast back to the feature
    map's size (bilinear resizing of a 1x1 map is exactly a broadcast).

    Args:
        interpolation: Any `keras.ops.image.resize` interpolation.
    """

    def __init__(self, interpolation="bilinear", **kwargs):
        super().__init__(**kwargs)
        self.interpolation = interpolation

    def call(self, inputs):
        x, reference = inputs
        size = ops.shape(reference)[1:3]
        if tuple(x.shape[1:3]) == (1, 1):  # static 1x1 map: a broadcast, cheaper than resize
            return ops.broadcast_to(x, (ops.shape(x)[0], size[0], size[1], ops.shape(x)[3]))
        return ops.cast(ops.image.resize(x, size, interpolation=self.interpolation), x.dtype)

    def compute_output_shape(self, input_shape):
        x_shape, ref_shape = input_shape
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[3])

    def get_config(self):
        return {**super().get_config(), "interpolation": self.interpolation}


@keras.saving.register_keras_serializable(package="tfcovseg")
class SqueezeAxis(keras.layers.Layer):
    """Removes one axis of size 1, e.g. the classifier's [N, 1] -> [N].

    Args:
        axis: The axis to remove.
    """

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = int(axis)

    def call(self, inputs):
        return ops.squeeze(inputs, axis=self.axis)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        del shape[self.axis]
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


def from_config_keeping_trainable(cls, config):
    """Builds a functional model subclass from its config and restores `trainable`.

    Passing ``trainable=False`` to a functional model's constructor only sets its own flag,
    not its layers'; setting the attribute afterwards freezes every layer, so a frozen
    encoder stays frozen through a ``.keras`` round trip.
    """
    config = dict(config)
    trainable = config.pop("trainable", True)
    model = cls(**config)
    model.trainable = trainable
    return model
