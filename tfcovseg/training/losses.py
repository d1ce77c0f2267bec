"""BASNet's hybrid loss (Qin et al. 2019), as used by Huang et al. (2021, Section 2.5).

    loss = BCE + (1 - SSIM) + IoU     per image and channel, averaged over the channels

on probabilities in [0, 1], with

    BCE = mean over pixels of -(w g log p + (1 - g) log(1 - p))    (p clipped to [1e-7, 1-1e-7])
    SSIM = tf.image.ssim(p, g, max_val=1, 11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03)
    IoU = 1 - sum(p g) / (sum(p) + sum(g) - sum(p g) + eps)

w is a positive-pixel weight per channel, 1 in BASNet and the paper (`positive_weights`).
A lesion type that covers a few hundredths of a percent of the pixels (small consolidation
cores, thin fibrotic bands at 128 px) otherwise collapses: its sigmoid saturates at 0 in the
first epochs, where the IoU term's gradient (through p (1 - p)) vanishes and BCE's positives
are outweighed by every other pixel, and it never recovers. A weight > 1 keeps the positives'
gradient alive; IoU and SSIM still punish the false positives it invites. The probabilities
it inflates are corrected at inference (`tfcovseg.models.outputs`).

The three terms pull at different scales: BCE per pixel, SSIM per 11x11 patch (sharp
boundaries), IoU per map (the lesion as a whole). On an empty mask (most CT slices) the IoU
term is the constant 1 with zero gradient, so false positives there are penalised by BCE
and SSIM only; that is BASNet's formula, kept as the paper used it.

Everything is computed in float32, so mixed-precision outputs are safe. SSIM is `ssim`
below, a `keras.ops` twin of `tf.image.ssim` pinned to it within 1e-5 (values and
gradients) by the tests, several times faster on a CPU (separable window as matrix
products) and exact on GPUs, whose TF32 matrix products it avoids there (see `ssim`);
`ssim_impl="tf"` calls `tf.image.ssim` itself.
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
from keras import ops

BCE_EPSILON = 1e-7
IOU_EPSILON = 1e-6
TERMS = ("bce", "ssim", "iou")


def gaussian_weights(filter_size=11, filter_sigma=1.5):
    """The normalised 1-D Gaussian whose outer product is `tf.image.ssim`'s window."""
    coords = [i - (filter_size - 1) / 2.0 for i in range(filter_size)]
    g = [math.exp(-0.5 * c * c / (filter_sigma * filter_sigma)) for c in coords]
    total = sum(g)
    return [v / total for v in g]


def gaussian_kernel(filter_size=11, filter_sigma=1.5):
    """The normalised 2-D Gaussian window of `tf.image.ssim`, as nested Python lists."""
    g = gaussian_weights(filter_size, filter_sigma)
    return [[a * b for b in g] for a in g]


def _band(length, weights):
    """[length, length - k + 1] matrix whose product with a row is its VALID filtering."""
    k = len(weights)
    band = np.zeros((length, length - k + 1), "float32")
    for j in range(length - k + 1):
        band[j : j + k, j] = weights
    return band


FILTERS = ("auto", "matmul", "slices")


@functools.cache
def on_accelerator() -> bool:
    """Whether the backend computes on a GPU or TPU, where float32 matrix products and
    convolutions are rounded by default (TF32 tensor cores on NVIDIA Ampere and newer under
    TensorFlow and JAX, bfloat16 passes on TPUs)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


def _filter_matmul(stats, weights):
    """VALID filtering of the last two axes as two products with banded matrices.

    Both are plain 2-D products (every map's rows, then every map's columns, stacked):
    TensorFlow's oneDNN kernels, on by default on CPUs with AVX-512 VNNI, read past the
    right operand when a matrix is broadcast over a batch of matrices
    (tensorflow/tensorflow#117700), which corrupted the heap in training.
    """
    height, width = stats.shape[-2], stats.shape[-1]
    k = len(weights)
    out_h, out_w = height - k + 1, width - k + 1
    lead = tuple(-1 if d is None else d for d in stats.shape[:-2])
    rows = ops.convert_to_tensor(_band(width, weights))  # [W, W']: filters along W
    cols = ops.convert_to_tensor(_band(height, weights))  # [H, H']: filters along H
    out = ops.matmul(ops.reshape(stats, (-1, width)), rows)  # [maps * H, W']
    out = ops.transpose(ops.reshape(out, (-1, height, out_w)), (0, 2, 1))  # [maps, W', H]
    out = ops.matmul(ops.reshape(out, (-1, height)), cols)  # [maps * W', H']
    out = ops.transpose(ops.reshape(out, (-1, out_w, out_h)), (0, 2, 1))  # [maps, H', W']
    return ops.reshape(out, (*lead, out_h, out_w))


def _filter_slices(stats, weights):
    """The same filtering as weighted sums of shifted slices: elementwise float32 only."""
    k = len(weights)
    n = stats.shape[-1] - k + 1
    out = sum(stats[..., i : i + n] * w for i, w in enumerate(weights))
    n = stats.shape[-2] - k + 1
    return sum(out[..., i : i + n, :] * w for i, w in enumerate(weights))


def ssim(x, y, max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03, filters="auto"):
    """Structural similarity per image, averaged over channels (`tf.image.ssim` in keras.ops).

    Same estimator as TensorFlow: Gaussian-weighted local statistics over VALID windows,
    biased covariance, SSIM map averaged over positions and then over channels. The window
    is separable, so the five local means are filtered along rows, then columns.

    How (`filters`): on a CPU ("auto" there) as two products with banded matrices, about
    9x faster forward and backward than the 11x11 depthwise convolution of
    `tf.image.ssim` and 10x faster than shifted slices (`experiments/benchmarks/loss.py`);
    on a GPU or TPU ("auto" there) as weighted sums of shifted slices. Accelerators round
    float32 matrix products by default (TF32: 10-bit mantissas), and the variances
    E[x^2] - E[x]^2 cancel those errors up to the size of K2's constant: in a COVID-SemiSeg
    fold, training with the matrix products rounded as TF32 rounds them (emulated on a CPU)
    stalled at a loss of 3.5 where exact products reach 2.7 (infection meanDic 0.34 against
    0.57), as on an H200. Elementwise arithmetic is never rounded.

    Args:
        x, y: [N, H, W, C] images with static H, W >= filter_size.
        max_val: Dynamic range of the images.
        filter_size, filter_sigma: The Gaussian window.
        k1, k2: Stability constants.
        filters: "auto" (by device, above), "matmul" or "slices".

    Returns:
        [N] float32 SSIM values.

    Raises:
        ValueError: if the images are smaller than the window or of unknown size.
    """
    if filters not in FILTERS:
        raise ValueError(f"filters must be one of {FILTERS}, got {filters!r}")
    x = ops.cast(x, "float32")
    y = ops.cast(y, "float32")
    height, width = x.shape[1], x.shape[2]
    if height is None or width is None:
        raise ValueError(f"SSIM needs images of a known size, got {height}x{width}")
    if height < filter_size or width < filter_size:
        raise ValueError(
            f"SSIM needs images of at least {filter_size}x{filter_size} pixels, got "
            f"{height}x{width}"
        )
    if filters == "auto":
        filters = "slices" if on_accelerator() else "matmul"
    local_mean = _filter_slices if filters == "slices" else _filter_matmul
    x, y = ops.transpose(x, (0, 3, 1, 2)), ops.transpose(y, (0, 3, 1, 2))  # [N, C, H, W]
    # Local (co)variances from values centred on each map's mean: the same statistics,
    # without float32's cancellation in E[x^2] - E[x]^2 on flat maps (empty masks).
    centre_x = ops.mean(x, axis=(2, 3), keepdims=True)
    centre_y = ops.mean(y, axis=(2, 3), keepdims=True)
    x, y = x - centre_x, y - centre_y
    stats = ops.stack([x, y, x * x, y * y, x * y], axis=0)
    stats = local_mean(stats, gaussian_weights(filter_size, filter_sigma))
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = ops.unstack(stats, axis=0)

    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    lum_x, lum_y = mean_x + centre_x, mean_y + centre_y
    luminance = (2.0 * lum_x * lum_y + c1) / (ops.square(lum_x) + ops.square(lum_y) + c1)
    covariance = mean_xy - mean_x * mean_y
    variances = mean_xx - ops.square(mean_x) + mean_yy - ops.square(mean_y)
    contrast_structure = (2.0 * covariance + c2) / (variances + c2)
    return ops.mean(luminance * contrast_structure, axis=(1, 2, 3))


def _ssim_backend(y_true, y_pred, impl):
    if impl == "tf":
        import tensorflow as tf

        return tf.image.ssim(
            y_pred, y_true, max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03
        )
    return ssim(y_pred, y_true)


def hybrid_loss_terms(y_true, y_pred, ssim_impl="auto", terms=TERMS, positive_weights=None):
    """The terms of the hybrid loss per image, each averaged over channels.

    Args:
        y_true: [N, H, W, C] binary masks.
        y_pred: [N, H, W, C] probabilities.
        ssim_impl: "auto" or "ops" (the keras.ops twin `ssim`, any backend), or "tf"
            (`tf.image.ssim`, TensorFlow backend only).
        terms: Which terms to compute, of "bce", "ssim" (the loss term 1 - SSIM), "iou".
        positive_weights: BCE weight of the positive pixels, one per channel (None: 1).

    Returns:
        dict from term name to [N] float32.
    """
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    values = {}
    if "bce" in terms:
        p = ops.clip(y_pred, BCE_EPSILON, 1.0 - BCE_EPSILON)
        positive = y_true * ops.log(p)
        if positive_weights is not None:
            positive = positive * ops.convert_to_tensor(positive_weights, "float32")
        bce = -(positive + (1.0 - y_true) * ops.log(1.0 - p))
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
        positive_weights: BCE weight of positive pixels per channel (None or empty: 1
            everywhere, the paper's loss); see the module's note on rare lesion types.
        name, reduction, dtype: As `keras.losses.Loss`.
    """

    def __init__(
        self,
        terms=TERMS,
        ssim_impl="auto",
        positive_weights=None,
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
        weights = tuple(float(w) for w in positive_weights or ())
        if any(not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"HybridLoss positive_weights must be finite and > 0, got {weights}")
        self.terms = terms
        self.ssim_impl = ssim_impl
        self.positive_weights = weights or None

    def call(self, y_true, y_pred):
        weights = self.positive_weights
        if weights is not None and y_pred.shape[-1] not in (None, len(weights)):
            raise ValueError(
                f"HybridLoss has {len(weights)} positive_weights for {y_pred.shape[-1]} channels"
            )
        values = hybrid_loss_terms(y_true, y_pred, self.ssim_impl, self.terms, weights)
        total = values[self.terms[0]]
        for term in self.terms[1:]:
            total = total + values[term]
        return total

    def get_config(self):
        return {
            **super().get_config(),
            "terms": list(self.terms),
            "ssim_impl": self.ssim_impl,
            "positive_weights": list(self.positive_weights or ()),
        }


def make_loss(name="hybrid", positive_weights=None):
    """The segmentation loss by config name: "hybrid" or "bce" (Table 7 ablation), with
    optional per-channel positive weights (`HybridLoss`)."""
    if name == "hybrid":
        return HybridLoss(positive_weights=positive_weights)
    if name == "bce":
        return HybridLoss(terms=("bce",), positive_weights=positive_weights, name="bce_loss")
    raise ValueError(f"unknown loss {name!r}; choose 'hybrid' or 'bce'")


def deep_supervision(
    output_names, loss="hybrid", coarse_weight=1.0, final_weight=1.0, positive_weights=None
):
    """Losses and loss weights for `model.compile` on a segmenter's outputs.

    The paper supervises both the coarse and the refined map and sums the losses; models
    without a "coarse" output get the loss on "final" alone.

    Args:
        output_names: The model's output keys, e.g. ("coarse", "final").
        loss: "hybrid" or "bce".
        coarse_weight, final_weight: Weights of the two terms of the sum.
        positive_weights: Per-channel BCE weights of positive pixels (`HybridLoss`).

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
        {n: make_loss(loss, positive_weights) for n in output_names},
        {n: weights[n] for n in output_names},
    )
