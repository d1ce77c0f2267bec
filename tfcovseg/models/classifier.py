"""Slice classifier: the segmenter's SE-ResNet-34 encoder plus a pooling + dense head.

Huang et al. (2021), Section 2.4: after the segmenter converges, the encoder (input layer
and four stages, frozen) with "the remaining parts of SE-ResNet-34" — global average
pooling and a dense layer — classifies each slice as COVID-19 or not; only slices it
passes are segmented.
"""

from __future__ import annotations

import keras
from keras import layers

from tfcovseg.models.encoder import SEResNetEncoder
from tfcovseg.models.layers import SqueezeAxis, from_config_keeping_trainable
from tfcovseg.models.preprocessing import DEFAULT_WINDOW, HUWindow


@keras.saving.register_keras_serializable(package="tfcovseg")
class CovidClassifier(keras.Model):
    """SE-ResNet encoder + global average pooling + dense -> `covid_probability` [N].

    Input: "hu", float32 [N, H, W, 1] Hounsfield units (H, W of the encoder). Output:
    float32 probability per slice that it shows COVID-19 lesions.

    Args:
        encoder: An `SEResNetEncoder`; pass the segmenter's to share its weights.
        hu_window: (low, high) HU window, as the segmenter's.
        pre_windowed: Inputs are already windowed 8-bit images.
        dropout: Dropout rate before the dense head.
    """

    def __init__(
        self, encoder, hu_window=DEFAULT_WINDOW, pre_windowed=False, dropout=0.0, **kwargs
    ):
        if not isinstance(encoder, SEResNetEncoder):
            raise TypeError(
                f"CovidClassifier needs an SEResNetEncoder, got {type(encoder).__name__}"
            )
        inputs = keras.Input((*encoder.input_size, encoder.input_channels), name="hu")
        window_layer = HUWindow(hu_window, pre_windowed, name="window")
        features = encoder(window_layer(inputs))
        x = layers.GlobalAveragePooling2D(name="head_pool")(features["stage4"])
        if dropout:
            x = layers.Dropout(dropout, name="head_dropout")(x)
        x = layers.Dense(1, name="head_logit")(x)
        x = layers.Activation("sigmoid", dtype="float32", name="head_sigmoid")(x)
        outputs = SqueezeAxis(-1, dtype="float32", name="covid_probability")(x)
        kwargs.setdefault("name", "covid_classifier")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.encoder = encoder
        self.window_layer = window_layer
        self.hu_window = tuple(float(w) for w in hu_window)
        self.pre_windowed = bool(pre_windowed)
        self.dropout = float(dropout)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "hu_window": list(self.hu_window),
            "pre_windowed": self.pre_windowed,
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return from_config_keeping_trainable(cls, config)


def build_classifier(segmenter, dropout=0.0):
    """The slice classifier on a segmenter's encoder, sharing its weights.

    Freeze the encoder for the paper's phase 2 with ``classifier.encoder.trainable = False``.
    The encoder is the same object in both models, so this also freezes it inside the
    segmenter: set it back to True before training the segmenter again.

    Args:
        segmenter: A model with an SE-ResNet `encoder` (architectures coarse_refine,
            seresnet_unet_aspp, seresnet_unet).
        dropout: Dropout before the dense head.

    Raises:
        ValueError: if the segmenter has no SE-ResNet encoder (U-Net baselines).
    """
    encoder = getattr(segmenter, "encoder", None)
    if not isinstance(encoder, SEResNetEncoder):
        raise ValueError(
            f"build_classifier needs a segmenter with an SE-ResNet encoder (architectures "
            f"coarse_refine, seresnet_unet_aspp, seresnet_unet); {segmenter.name!r} "
            f"({type(segmenter).__name__}) has none"
        )
    return CovidClassifier(
        encoder,
        segmenter.hu_window,
        segmenter.pre_windowed,
        dropout,
        name=f"{segmenter.name}_classifier",
    )
