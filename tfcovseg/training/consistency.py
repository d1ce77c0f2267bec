"""Consistency training on unlabelled slices, FixMatch-style (Sohn et al. 2020), for
segmentation: the model's own confident predictions on a weakly augmented view of an
unlabelled slice are the targets of its prediction on a strongly augmented view of the
same slice.

Pure Keras (`keras.ops`), so that it trains under any backend; the COVID-SemiSeg
benchmark (`semi.method: fixmatch`) measures it against self-training
(`tfcovseg.training.semisup`). Research use, not a medical device.

Per unlabelled pixel, with p the model's (corrected, `tfcovseg.models.outputs`) final
probability on the weak view, taken as a constant, and q its raw final probability on the
strong view:

    loss = weight * mean over pixels and classes of [max(p, 1 - p) >= confidence]
           * BCE_w(p >= 0.5, q)

BCE_w is the supervised loss's BCE with its positive weights, so that q keeps the scale
the labelled slices train it to. Pixels the model is unsure of contribute nothing; the
mean runs over all pixels, so the term grows as the model grows surer.

The views share their geometry (the same quarter turn and flip), so a pixel of one is the
same pixel of the other; the strong view adds intensity changes (window shift, contrast,
gamma, noise: `tfcovseg.data.intensity.IntensityJitter`).
"""

from __future__ import annotations

import keras
from keras import ops

from tfcovseg.models.outputs import unweighted_probabilities

_EPSILON = 1e-6


def consistency_loss(weak, strong, confidence: float, positive_weights=()):
    """The FixMatch term (see the module) between a segmenter's raw final maps on the weak
    and the strong view, [N, H, W, C] each; gradients flow through `strong` only."""
    p = ops.stop_gradient(unweighted_probabilities(weak, positive_weights))
    sure = ops.cast(ops.maximum(p, 1.0 - p) >= confidence, strong.dtype)
    target = ops.cast(p >= 0.5, strong.dtype)
    q = ops.clip(strong, _EPSILON, 1.0 - _EPSILON)
    weights = tuple(float(w) for w in positive_weights or ()) or (1.0,)
    w = ops.convert_to_tensor(weights, dtype=strong.dtype)
    bce = -(w * target * ops.log(q) + (1.0 - target) * ops.log(1.0 - q))
    return ops.mean(sure * bce)


@keras.saving.register_keras_serializable(package="tfcovseg")
class ConsistencyTrainer(keras.Model):
    """A segmenter trained on labelled batches plus the FixMatch term of unlabelled ones.

    Called on a dict ``{"labelled", "weak", "strong"}`` of image batches in training, it
    returns the segmenter's outputs on ``labelled`` (the compiled losses and metrics score
    them against the masks) and adds `consistency_loss` of ``weak`` and ``strong``
    (``add_loss``). Called on an image batch (validation, prediction), it is the
    segmenter. Only the segmenter holds weights: save or export it, not this wrapper.
    """

    def __init__(self, segmenter, confidence=0.9, weight=1.0, positive_weights=(), **kwargs):
        super().__init__(**kwargs)
        if not 0.5 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
        self.segmenter = segmenter
        self.confidence = float(confidence)
        self.weight = float(weight)
        self.positive_weights = tuple(float(w) for w in positive_weights or ())

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict):
            return self.segmenter(inputs, training=training)
        outputs = self.segmenter(inputs["labelled"], training=training)
        if training:
            # The weak view in inference mode: its batch statistics would tie the targets
            # to the batch; the strong view trains as the labelled batch does.
            weak = self.segmenter(inputs["weak"], training=False)["final"]
            strong = self.segmenter(inputs["strong"], training=True)["final"]
            term = consistency_loss(weak, strong, self.confidence, self.positive_weights)
            self.add_loss(self.weight * term)
        return outputs

    def get_config(self):
        return super().get_config() | {
            "segmenter": keras.saving.serialize_keras_object(self.segmenter),
            "confidence": self.confidence,
            "weight": self.weight,
            "positive_weights": list(self.positive_weights),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["segmenter"] = keras.saving.deserialize_keras_object(config["segmenter"])
        return cls(**config)
