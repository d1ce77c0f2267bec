"""BASNet's hybrid loss (Qin et al. 2019), as used by Huang et al. (2021, Section 2.5).

    loss = BCE + (1 - SSIM) + IoU     per image and channel, averaged over the channels

on probabilities in [0, 1], with

    BCE = mean over pixels of -(g log p + (1 - g) log(1 - p))      (p clipped to [1e-7, 1-1e-7])
    SSIM = tf.image.ssim(p, g, max_val=1, 11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03)
    IoU = 1 - sum(p g) / (sum(p) + sum(g) - sum(p g) + eps)

The three terms pull at different scales: BCE per pixel, SSIM per 11x11 patch (sharp
boundaries), IoU per map (the lesion as a whole). On an empty mask (most CT slices) the IoU
term is the constant 1 with zero gradient, so false positives there are penalised by BCE
and SSIM only; that is BASNet's formula, kept as the paper used it.

Everything is computed in float32, so mixed-precision outputs are safe. Under the TensorFlow
backend SSIM is `tf.image.ssim` itself; under other backends `ssim` below, a `keras.ops`
twin pinned to it within 1e-5 by the tests.
"""

from __future__ import annotations

import math

import keras
from keras import ops

BCE_EPSILON = 1e-7
IOU_EPSILON = 1e-6
TERMS = ("bce", "ssim", "iou")


def gaussian_kernel(filter_size=11, filter_sigma=1.5):
    """The normalised 2-D Gaussian window of `tf.image.ssim`, as nested Python lists."""
    coords = [i - (filter_size - 1) / 2.0 for i in range(filter_size)]
    g = [math.exp(-0.5 * c * c / (filter_sigma * filter_sigma)) for c in coords]
    total = sum(g) ** 2
    return [[a * b / total for b in g] for a in g]


def ssim(x, y, max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03):
    """Structural similarity per image, averaged over channels (`tf.image.ssim` in keras.ops).

    Same estimator as TensorFlow: Gaussian-weighted local statistics over VALID windows,
    biased covariance, SSIM map averaged over positions and then over channels.

    Args:
        x, y: [N, H, W, C] images with H, W >= filter_size.
        max_val: Dynamic range of the images.
        filter_size, filter_sigma: The Gaussian window.
        k1, k2: Stability constants.

    Returns:
        [N] float32 SSIM values.

    Raises:
        ValueError: if the images are smaller than the window.
    """
    x = ops.cast(x, "float32")
    y = ops.cast(y, "float32")
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    if (height is not None and height < filter_size) or (width is not None and width < filter_size):
        raise ValueError(
            f"SSIM needs images of at least {filter_size}x{filter_size} pixels, got "
            f"{height}x{width}"
        )
    window = ops.convert_to_tensor(gaussian_kernel(filter_size, filter_sigma), "float32")
    kernel = ops.tile(ops.reshape(window, (filter_size, filter_size, 1, 1)), (1, 1, channels, 1))

    def local_mean(t):
        return ops.depthwise_conv(t, kernel, strides=1, padding="valid")

    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    mean_x, mean_y = local_mean(x), local_mean(y)
    num0 = mean_x * mean_y * 2.0
    den0 = ops.square(mean_x) + ops.square(mean_y)
    luminance = (num0 + c1) / (den0 + c1)
    num1 = local_mean(x * y) * 2.0
    den1 = local_mean(ops.square(x) + ops.square(y))
    contrast_structure = (num1 - num0 + c2) / (den1 - den0 + c2)
    return ops.mean(luminance * contrast_structure, axis=(1, 2, 3))


def _ssim_backend(y_true, y_pred, impl):
    if impl == "tf" or (impl == "auto" and keras.backend.backend() == "tensorflow"):
        import tensorflow as tf

        return tf.image.ssim(
            y_pred, y_true, max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03
        )
    return ssim(y_pred, y_true)


def hybrid_loss_terms(y_true, y_pred, ssim_impl="auto", terms=TERMS):
    """The terms of the hybrid loss per image, each averaged over channels.

    Args:
        y_true: [N, H, W, C] binary masks.
        y_pred: [N, H, W, C] probabilities.
        ssim_impl: "auto" (tf.image.ssim under TensorFlow, else the keras.ops twin), "tf"
            or "ops".
        terms: Which terms to compute, of "bce", "ssim" (the loss term 1 - SSIM), "iou".

    Returns:
        dict from term name to [N] float32.
    """
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    values = {}
    if "bce" in terms:
        p = ops.clip(y_pred, BCE_EPSILON, 1.0 - BCE_EPSILON)
        bce = -(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
        values["bce"] = ops.mean(bce, axis=(1, 2, 3))
    if "ssim" in terms:
        values["ssim"] = 1.0 - _ssim_backend(y_true, y_pred, ssim_impl)
    if "iou" in terms:
        intersection = ops.sum(y_pred * y_true, axis=(1, 2))
        union = ops.sum(y_pred, axis=(1, 2)) + ops.sum(y_true, axis=(1, 2)) - intersection
        values["iou"] = ops.mean(1.0 - intersection / (union + IOU_EPSILON), axis=-1)
    return values


@keras.saving.register_keras_serializable(package="tfcovseg")
class HybridLoss(keras.losses.Loss):
    """BCE + (1 - SSIM) + IoU on probabilities, per image, averaged over channels (BASNet).

    `terms=("bce",)` gives the plain-BCE ablation of the paper's Table 7.

    Args:
        terms: Which of "bce", "ssim", "iou" to sum.
        ssim_impl: "auto", "tf" or "ops" (see `hybrid_loss_terms`).
        name, reduction, dtype: As `keras.losses.Loss`.
    """

    def __init__(
        self,
        terms=TERMS,
        ssim_impl="auto",
        name="hybrid_loss",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        terms = tuple(terms)
        unknown = [t for t in terms if t not in TERMS]
        if not terms or unknown:
            raise ValueError(f"HybridLoss terms must be a non-empty subset of {TERMS}, got {terms}")
        if ssim_impl not in ("auto", "tf", "ops"):
            raise ValueError(f"ssim_impl must be 'auto', 'tf' or 'ops', got {ssim_impl!r}")
        if ssim_impl == "tf" and keras.backend.backend() != "tensorflow":
            raise ValueError(
                f"ssim_impl='tf' needs the TensorFlow backend, not {keras.backend.backend()!r}"
            )
        self.terms = terms
        self.ssim_impl = ssim_impl

    def call(self, y_true, y_pred):
        values = hybrid_loss_terms(y_true, y_pred, self.ssim_impl, self.terms)
        total = values[self.terms[0]]
        for term in self.terms[1:]:
            total = total + values[term]
        return total

    def get_config(self):
        return {**super().get_config(), "terms": list(self.terms), "ssim_impl": self.ssim_impl}


def make_loss(name="hybrid"):
    """The segmentation loss by config name: "hybrid" or "bce" (Table 7 ablation)."""
    if name == "hybrid":
        return HybridLoss()
    if name == "bce":
        return HybridLoss(terms=("bce",), name="bce_loss")
    raise ValueError(f"unknown loss {name!r}; choose 'hybrid' or 'bce'")


def deep_supervision(output_names, loss="hybrid", coarse_weight=1.0, final_weight=1.0):
    """Losses and loss weights for `model.compile` on a segmenter's outputs.

    The paper supervises both the coarse and the refined map and sums the losses; models
    without a "coarse" output get the loss on "final" alone.

    Args:
        output_names: The model's output keys, e.g. ("coarse", "final").
        loss: "hybrid" or "bce".
        coarse_weight, final_weight: Weights of the two terms of the sum.

    Returns:
        (losses, loss_weights): dicts keyed by output name.
    """
    weights = {"coarse": float(coarse_weight), "final": float(final_weight)}
    unknown = [n for n in output_names if n not in weights]
    if unknown or "final" not in output_names:
        raise ValueError(
            f"segmenter outputs must be 'final' and optionally 'coarse', got {list(output_names)}"
        )
    return (
        {n: make_loss(loss) for n in output_names},
        {n: weights[n] for n in output_names},
    )
