"""Slice classifier: the segmenter's SE-ResNet-34 encoder plus a pooling + dense head.

Huang et al. (2021), Section 2.4: after the segmenter converges, the encoder (input layer
and four stages, frozen) with "the remaining parts of SE-ResNet-34" — global average
pooling and a dense layer — classifies each slice as COVID-19 or not; only slices it
passes are segmented.

`head="dense", pooling="avg"` is the paper's head; `norm=True` (the default of
`build_classifier` and of `model.classifier.norm`) batch-normalises the pooled features
before its dense layer, which then trains (see `CovidClassifier`).

Lesions often cover a few percent of a slice, and an average over the whole feature map
dilutes them; "max" (global max pooling) or "avg_max" (both, concatenated) keep a small
lesion's strongest response.

`head="conv"` adds two 3x3 convolutions (ReLU) before the pooling, on the stage-2, -3 and -4
features brought to stride 8 (bilinear upsampling) and concatenated: a segmentation encoder
leaves much of the "is there a lesion here" decision to its decoder, and this head looks for
lesions locally before pooling. On the phantom quickstart neither head generalised to new
patients (docs/results-phantom.md); the conv head is an option for experiments.
The encoder stays frozen and shared either way.
"""

from __future__ import annotations

import keras
from keras import layers

from tfcovseg.models.encoder import SEResNetEncoder
from tfcovseg.models.layers import SqueezeAxis, from_config_keeping_trainable
from tfcovseg.models.preprocessing import DEFAULT_WINDOW, HUWindow

POOLINGS = ("avg", "max", "avg_max")
HEADS = ("dense", "conv")
_CONV_LEVELS = ("stage2", "stage3", "stage4")


class _Head:
    """The head's layers, callable again on other encoder features (a dict of levels)."""

    def __init__(self, pooling, dropout, kind="dense", filters=32, norm=True):
        self.kind = kind
        self.convs = []
        if kind == "conv":
            self.upsample = {
                "stage3": layers.UpSampling2D(2, interpolation="bilinear", name="head_up3"),
                "stage4": layers.UpSampling2D(4, interpolation="bilinear", name="head_up4"),
            }
            self.merge = layers.Concatenate(name="head_concat")
            self.convs = [
                layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"head_conv{i}")
                for i in (1, 2)
            ]
        if pooling == "avg_max":
            self.pool = [
                layers.GlobalAveragePooling2D(name="head_avg_pool"),
                layers.GlobalMaxPooling2D(name="head_max_pool"),
            ]
            self.concat = layers.Concatenate(name="head_pool")
        else:
            pool = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
            self.pool = [pool(name="head_pool")]
            self.concat = None
        # Standardises the pooled features (batch statistics while training, their moving
        # averages after): an affine map, so the head is still a linear classifier on them.
        self.norm = layers.BatchNormalization(momentum=0.9, name="head_norm") if norm else None
        self.dropout = layers.Dropout(dropout, name="head_dropout") if dropout else None
        self.logit = layers.Dense(1, name="head_logit")
        self.sigmoid = layers.Activation("sigmoid", dtype="float32", name="head_sigmoid")
        self.squeeze = SqueezeAxis(-1, dtype="float32", name="covid_probability")

    @property
    def layers(self):
        """The layers with weights, in a fixed order (to copy a head's weights)."""
        return [*self.convs, *([self.norm] if self.norm is not None else []), self.logit]

    def __call__(self, features):
        if self.kind == "conv":
            x = self.merge(
                [
                    self.upsample[k](features[k]) if k in self.upsample else features[k]
                    for k in _CONV_LEVELS
                ]
            )
            for conv in self.convs:
                x = conv(x)
        else:
            x = features["stage4"]
        pooled = [pool(x) for pool in self.pool]
        x = self.concat(pooled) if self.concat is not None else pooled[0]
        if self.norm is not None:
            x = self.norm(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.squeeze(self.sigmoid(self.logit(x)))


@keras.saving.register_keras_serializable(package="tfcovseg")
class CovidClassifier(keras.Model):
    """SE-ResNet encoder + head (global pooling + dense) -> `covid_probability` [N].

    Input: "hu", float32 [N, H, W, 1] Hounsfield units (H, W of the encoder). Output:
    float32 probability per slice that it shows COVID-19 lesions.

    Args:
        encoder: An `SEResNetEncoder`; pass the segmenter's to share its weights.
        hu_window: (low, high) HU window, as the segmenter's.
        pre_windowed: Inputs are already windowed 8-bit images.
        dropout: Dropout rate before the dense head.
        pooling: Global pooling of the last stage: "avg" (the paper), "max" or "avg_max".
        head: "dense" (the paper: pooling + dense on stage 4) or "conv" (two 3x3
            convolutions on stages 2-4 at stride 8 first; see the module docstring).
        head_filters: Filters of the "conv" head's convolutions.
        norm: Batch-normalise the pooled features before the dense layer. The pooled
            features of a segmentation encoder vary little around a large mean (quickstart
            network: mean 0.73, per-feature sd 0.07), and a dense layer on them barely
            trains (training slice AUC 0.51 after 10 epochs); standardised, the same linear
            classifier fits them. False: the paper's bare dense layer (and files saved
            before this option).
    """

    def __init__(
        self,
        encoder,
        hu_window=DEFAULT_WINDOW,
        pre_windowed=False,
        dropout=0.0,
        pooling="avg",
        head="dense",
        head_filters=32,
        norm=False,
        **kwargs,
    ):
        if not isinstance(encoder, SEResNetEncoder):
            raise TypeError(
                f"CovidClassifier needs an SEResNetEncoder, got {type(encoder).__name__}"
            )
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if int(head_filters) < 1:
            raise ValueError(f"head_filters must be positive, got {head_filters}")
        inputs = keras.Input((*encoder.input_size, encoder.input_channels), name="hu")
        window_layer = HUWindow(hu_window, pre_windowed, name="window")
        features = encoder(window_layer(inputs))
        head_layers = _Head(pooling, dropout, head, int(head_filters), bool(norm))
        outputs = head_layers(features)
        kwargs.setdefault("name", "covid_classifier")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self._head = head_layers
        self.head = head
        self.head_filters = int(head_filters)
        self.encoder = encoder
        self.window_layer = window_layer
        self.hu_window = tuple(float(w) for w in hu_window)
        self.pre_windowed = bool(pre_windowed)
        self.dropout = float(dropout)
        self.pooling = pooling
        self.norm = bool(norm)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "hu_window": list(self.hu_window),
            "pre_windowed": self.pre_windowed,
            "dropout": self.dropout,
            "pooling": self.pooling,
            "head": self.head,
            "head_filters": self.head_filters,
            "norm": self.norm,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return from_config_keeping_trainable(cls, config)


HEAD_OPTIONS = ("dropout", "pooling", "head", "head_filters", "norm")


def head_options(source) -> dict:
    """The classifier head's options by keyword (`HEAD_OPTIONS`), from a `ModelConfig`
    (its ``classifier`` component) or from a built `CovidClassifier`: the one place where
    a config reaches the head's builders."""
    head = getattr(source, "classifier", source)
    return {name: getattr(head, name) for name in HEAD_OPTIONS}


def build_classifier(
    segmenter, dropout=0.0, pooling="avg", head="dense", head_filters=32, norm=True
):
    """The slice classifier on a segmenter's encoder, sharing its weights.

    Freeze the encoder for the paper's phase 2 with ``classifier.encoder.trainable = False``.
    The encoder is the same object in both models, so this also freezes it inside the
    segmenter: set it back to True before training the segmenter again.

    Args:
        segmenter: A model with an SE-ResNet `encoder` (architectures coarse_refine,
            seresnet_unet_aspp, seresnet_unet).
        dropout: Dropout before the dense head.
        pooling: "avg" (the paper), "max" or "avg_max"; see the module docstring.
        head: "dense" (the paper) or "conv"; see the module docstring.
        head_filters: Filters of the "conv" head.
        norm: Batch-normalise the pooled features (`CovidClassifier`).

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
        pooling,
        head,
        head_filters,
        norm,
        name=f"{segmenter.name}_classifier",
    )


def copy_head(classifier, source):
    """Copies the head weights of `source` (a `CovidClassifier` like `classifier`)."""
    mine = (classifier.head, classifier.pooling, classifier.norm)
    theirs = (source.head, source.pooling, source.norm)
    if mine != theirs:
        raise ValueError(f"heads differ: {mine} vs {theirs} (head, pooling, norm)")
    for layer, other in zip(classifier._head.layers, source._head.layers):
        layer.set_weights(other.get_weights())


def head_on_features(classifier):
    """(features, head): two models that split a dense-head `CovidClassifier` in two.

    ``features`` maps HU slices to the pooled last-stage features of the (frozen) encoder;
    ``head`` maps those to the probability through the classifier's own head layers
    (normalisation, dropout, dense), so training ``head`` trains ``classifier``. With the
    encoder frozen the features of a slice never change: computed once, they let the head
    train for many epochs at the cost of a few matrix products.
    """
    if classifier.head != "dense":
        raise ValueError(f"only a dense head trains on pooled features, not {classifier.head!r}")
    h = classifier._head
    x = classifier.encoder(classifier.window_layer(classifier.input))["stage4"]
    pooled = [pool(x) for pool in h.pool]
    pooled = h.concat(pooled) if h.concat is not None else pooled[0]
    features = keras.Model(classifier.input, pooled, name=f"{classifier.name}_features")
    inputs = keras.Input((pooled.shape[-1],), name="pooled")
    y = h.norm(inputs) if h.norm is not None else inputs
    if h.dropout is not None:
        y = h.dropout(y)
    head = keras.Model(inputs, h.squeeze(h.sigmoid(h.logit(y))), name=f"{classifier.name}_head")
    return features, head


def with_classifier_head(segmenter, classifier):
    """A training model: the segmenter's outputs plus ``covid_probability`` from its encoder.

    The classifier's head is applied to the encoder features that the segmenter's own
    encoder call produces, so the encoder runs once per step and the segmentation and
    classification losses train it together (``train.classifier_aux_weight``): an
    auxiliary task that makes the encoder features say whether a slice has lesions, which
    the paper's frozen-encoder head (phase 2) then reads. Weights are shared with both
    models: training this trains ``segmenter`` and ``classifier``.

    Args:
        segmenter: A functional segmenter with an SE-ResNet ``encoder`` called once.
        classifier: A `CovidClassifier` on the same encoder (`build_classifier`).
    """
    if classifier.encoder is not getattr(segmenter, "encoder", None):
        raise ValueError("the classifier must share the segmenter's encoder (build_classifier)")
    # The encoder's call in the segmenter's graph (not the classifier's).
    graph = {id(n) for level in segmenter._nodes_by_depth.values() for n in level}
    calls = [n for n in segmenter.encoder._inbound_nodes if id(n) in graph]
    if len(calls) != 1:
        raise ValueError(f"{segmenter.name!r} must call its encoder once in its graph")
    features = keras.tree.pack_sequence_as(segmenter.encoder.output, calls[0].outputs)
    outputs = (
        dict(segmenter.output)
        if isinstance(segmenter.output, dict)
        else {"final": segmenter.output}
    )
    outputs["covid_probability"] = classifier._head(features)
    return keras.Model(segmenter.input, outputs, name=f"{segmenter.name}_with_classifier")
