"""Hybrid loss: known answers on 4x4 arrays, tf.image.ssim parity, stability."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcovseg.training.losses import (
    HybridLoss,
    deep_supervision,
    gaussian_kernel,
    hybrid_loss_terms,
    make_loss,
    ssim,
)

from ..helpers import broadcast_products

C1, C2 = 0.01**2, 0.03**2

# A 4x4 mask with a 2x2 lesion, and a prediction that finds half of it with confidence.
G = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], "float32")
P = np.array([[0.8, 0.8, 0.2, 0.2], [0.4, 0.4, 0.2, 0.2], [0.2] * 4, [0.2] * 4], "float32")


def _img(a):
    return a[None, :, :, None]


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_bce_known_answer():
    terms = hybrid_loss_terms(_img(G), _img(P), terms=("bce",))
    # Two lesion pixels at 0.8 and twelve background pixels at 0.2 cost -ln 0.8 each;
    # two lesion pixels at 0.4 cost -ln 0.4.
    expected = (14 * -math.log(0.8) + 2 * -math.log(0.4)) / 16
    np.testing.assert_allclose(_np(terms["bce"]), [expected], rtol=1e-6)


def test_iou_known_answer():
    terms = hybrid_loss_terms(_img(G), _img(P), terms=("iou",))
    # sum(pg) = 2.4, sum(p) = 4.8, sum(g) = 4: 1 - 2.4 / (4.8 + 4 - 2.4) = 0.625
    np.testing.assert_allclose(_np(terms["iou"]), [0.625], rtol=1e-6)


def test_ssim_known_answer_pointwise_window():
    # A 1x1 window makes every local variance zero: SSIM is the mean over pixels of the
    # luminance term (2 p g + C1) / (p^2 + g^2 + C1).
    lum = (2 * P * G + C1) / (P**2 + G**2 + C1)
    np.testing.assert_allclose(_np(ssim(_img(P), _img(G), filter_size=1)), [lum.mean()], rtol=1e-5)


def test_ssim_known_answer_constant_images():
    a, b = np.full((1, 4, 4, 1), 0.3, "float32"), np.full((1, 4, 4, 1), 0.7, "float32")
    expected = (2 * 0.3 * 0.7 + C1) / (0.3**2 + 0.7**2 + C1)  # contrast-structure is 1
    np.testing.assert_allclose(_np(ssim(a, b, filter_size=4)), [expected], rtol=1e-5)
    # At 64x64 float32 cancellation costs tf.image.ssim 2e-4 here; centred statistics do not.
    a, b = np.full((1, 64, 64, 1), 0.3, "float32"), np.full((1, 64, 64, 1), 0.7, "float32")
    np.testing.assert_allclose(_np(ssim(a, b)), [expected], rtol=1e-5)
    np.testing.assert_allclose(_np(ssim(_img(P), _img(P), filter_size=3)), [1.0], rtol=1e-6)


def test_gaussian_window_matches_tensorflow():
    from tensorflow.python.ops.image_ops_impl import _fspecial_gauss

    w = np.array(gaussian_kernel(11, 1.5))
    reference = _fspecial_gauss(11, tf.constant(1.5)).numpy()[:, :, 0, 0]
    np.testing.assert_allclose(w, reference, atol=1e-8)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("filters", ["matmul", "slices"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ops_ssim_matches_tf_image_ssim(seed, filters):
    rng = np.random.default_rng(seed)
    p = rng.random((3, 32, 40, 3)).astype("float32")
    g = (rng.random((3, 32, 40, 3)) > 0.6).astype("float32")
    g[0] = 0.0  # an empty mask
    g[1, ..., 1] = 1.0  # an all-ones channel
    for a, b in ((p, g), (p, p**2), (g, g)):
        ours = _np(ssim(a, b, filters=filters))
        ref = tf.image.ssim(
            a, b, max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03
        ).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("filters", ["matmul", "slices"])
def test_ops_ssim_gradient_matches_tf_image_ssim(filters):
    rng = np.random.default_rng(3)
    p = tf.Variable(rng.random((2, 24, 24, 2)).astype("float32"))
    g = (rng.random((2, 24, 24, 2)) > 0.5).astype("float32")
    grads = []
    for fn in (lambda: ssim(p, g, filters=filters), lambda: tf.image.ssim(p, g, 1.0)):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(fn())
        grads.append(tape.gradient(value, p).numpy())
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-6)


def _tf32(t):
    """float32 rounded to TF32's 10-bit mantissa, as NVIDIA tensor cores round it."""
    bits = tf.bitcast(tf.cast(t, tf.float32), tf.int32)
    return tf.bitcast(tf.bitwise.bitwise_and(bits + 0x1000, ~0x1FFF), tf.float32)


def _sum_to(t, shape):
    extra = len(t.shape) - len(shape)
    return tf.reduce_sum(t, axis=list(range(extra))) if extra > 0 else t


@tf.custom_gradient
def _tf32_matmul(a, b):
    """A matrix product whose operands are rounded to TF32, forward and backward."""

    def grad(g):
        return (
            _sum_to(_tf32_matmul(g, tf.linalg.matrix_transpose(b)), a.shape),
            _sum_to(_tf32_matmul(tf.linalg.matrix_transpose(a), g), b.shape),
        )

    return tf.matmul(_tf32(a), _tf32(b)), grad


def test_ssim_on_accelerators_avoids_rounded_matrix_products(monkeypatch):
    from tfcovseg.training import losses

    # Lesion blobs on flat background, predicted confidently: as late in training.
    yy, xx = np.mgrid[:64, :64]
    g = np.zeros((2, 64, 64, 2), "float32")
    g[0, ..., 0] = (yy - 20) ** 2 + (xx - 24) ** 2 < 100
    g[1, ..., 0] = (yy - 40) ** 2 + (xx - 30) ** 2 < 60
    g[0, 10:20, 40:56, 1] = 1
    logits = (2 * g - 1) * 4 + np.random.default_rng(6).normal(0, 0.3, g.shape)
    p = tf.Variable((1 / (1 + np.exp(-logits))).astype("float32"))

    def value_and_grad(**kw):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(ssim(p, g, **kw))
        return value.numpy(), tape.gradient(value, p).numpy()

    def error(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    exact = {f: value_and_grad(filters=f) for f in ("matmul", "slices")}
    assert error(exact["slices"][1], exact["matmul"][1]) < 1e-5
    # Matrix products as a GPU's TF32 tensor cores compute them (the default for float32
    # under TensorFlow and JAX on Ampere and newer): the gradient of SSIM by products is
    # wrong (the variances' cancellation), SSIM by slices does not use products at all.
    monkeypatch.setattr(keras.ops, "matmul", lambda a, b: _tf32_matmul(tf.convert_to_tensor(a), b))
    rounded = {f: value_and_grad(filters=f) for f in ("matmul", "slices")}
    assert error(rounded["matmul"][1], exact["matmul"][1]) > 0.5
    np.testing.assert_array_equal(rounded["slices"][1], exact["slices"][1])
    # "auto" picks the slices on an accelerator and the (faster) products on a CPU.
    monkeypatch.setattr(losses, "on_accelerator", lambda: True)
    np.testing.assert_array_equal(value_and_grad()[1], exact["slices"][1])
    monkeypatch.setattr(losses, "on_accelerator", lambda: False)
    np.testing.assert_array_equal(value_and_grad()[1], rounded["matmul"][1])
    with pytest.raises(ValueError, match="filters must be one of"):
        ssim(p, g, filters="conv")


def test_ssim_products_broadcast_no_matrix_over_a_batch():
    """The training step's SSIM (forward and backward, batch size unknown as in a compiled
    step) as plain 2-D products: TensorFlow's oneDNN kernels read past a matrix broadcast
    over a batch of matrices (tensorflow/tensorflow#117700)."""
    spec = tf.TensorSpec((None, 32, 32, 3), tf.float32)

    @tf.function
    def value_and_grad(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = tf.reduce_sum(ssim(x, y, filters="matmul"))
        return value, tape.gradient(value, x)

    graph = value_and_grad.get_concrete_function(spec, spec).graph
    assert broadcast_products(graph) == []
    rng = np.random.default_rng(0)
    x, y = (rng.random((2, 32, 32, 3)).astype("float32") for _ in range(2))
    value, _ = value_and_grad(x, y)
    expected = tf.reduce_sum(tf.image.ssim(x, y, 1.0, filter_size=11, filter_sigma=1.5))
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)


def test_ssim_rejects_images_of_unknown_size():
    spec = keras.KerasTensor((None, None, None, 1))
    with pytest.raises(ValueError, match="known size"):
        ssim(spec, spec)


def test_ssim_rejects_images_smaller_than_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((1, 8, 8, 1), "float32"), np.zeros((1, 8, 8, 1), "float32"))


def test_hybrid_loss_is_sum_of_terms_per_image_and_channel_average():
    rng = np.random.default_rng(4)
    g = (rng.random((2, 16, 16, 2)) > 0.7).astype("float32")
    p = rng.random((2, 16, 16, 2)).astype("float32")
    terms = hybrid_loss_terms(g, p)
    per_image = _np(terms["bce"] + terms["ssim"] + terms["iou"])
    np.testing.assert_allclose(_np(HybridLoss()(g, p)), per_image.mean(), rtol=1e-6)
    # Per channel averaged: the loss of a 2-channel map is the mean of the channels' losses.
    per_channel = [_np(HybridLoss()(g[..., c : c + 1], p[..., c : c + 1])) for c in range(2)]
    np.testing.assert_allclose(_np(HybridLoss()(g, p)), np.mean(per_channel), rtol=1e-5)


def test_only_tf_impl_calls_tf_image_ssim_and_twin_agrees(monkeypatch):
    # "auto" is the keras.ops twin under every backend (faster than tf.image.ssim).
    rng = np.random.default_rng(5)
    g = (rng.random((2, 16, 16, 3)) > 0.5).astype("float32")
    p = rng.random((2, 16, 16, 3)).astype("float32")
    calls = []
    real_ssim = tf.image.ssim

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_ssim(*args, **kwargs)

    monkeypatch.setattr(tf.image, "ssim", spy)
    values = {}
    for impl in ("auto", "tf", "ops"):
        before = len(calls)
        values[impl] = _np(HybridLoss(ssim_impl=impl)(g, p))
        assert (len(calls) > before) == (impl == "tf"), impl
    assert calls[0] == {
        "max_val": 1.0,
        "filter_size": 11,
        "filter_sigma": 1.5,
        "k1": 0.01,
        "k2": 0.03,
    }
    assert values["auto"] == values["ops"]
    np.testing.assert_allclose(values["ops"], values["tf"], atol=1e-5)


def test_perfect_predictions():
    lesion = np.zeros((1, 16, 16, 1), "float32")
    lesion[:, 4:10, 4:10] = 1.0
    t = hybrid_loss_terms(lesion, lesion)
    assert _np(t["bce"])[0] < 1e-6 and abs(_np(t["ssim"])[0]) < 1e-6 and _np(t["iou"])[0] < 1e-6
    empty = np.zeros_like(lesion)
    t = hybrid_loss_terms(empty, empty)
    # BASNet's IoU term is the constant 1 on an empty mask (see the module docstring).
    assert _np(t["bce"])[0] < 1e-6 and abs(_np(t["ssim"])[0]) < 1e-6
    np.testing.assert_allclose(_np(t["iou"]), [1.0])


@pytest.mark.parametrize("impl", ["tf", "ops"])
@pytest.mark.parametrize("mask", ["empty", "full"])
@pytest.mark.parametrize("pred", ["zeros", "ones", "half"])
def test_finite_loss_and_gradients_on_degenerate_masks(impl, mask, pred):
    g = (
        np.zeros((2, 16, 16, 3), "float32")
        if mask == "empty"
        else np.ones((2, 16, 16, 3), "float32")
    )
    value = {"zeros": 0.0, "ones": 1.0, "half": 0.5}[pred]
    p = tf.Variable(np.full((2, 16, 16, 3), value, "float32"))
    with tf.GradientTape() as tape:
        loss = HybridLoss(ssim_impl=impl)(g, p)
    grad = tape.gradient(loss, p)
    assert np.isfinite(loss.numpy())
    assert np.isfinite(grad.numpy()).all()


def test_mixed_precision_predictions():
    rng = np.random.default_rng(6)
    g = np.zeros((2, 16, 16, 3), "float32")
    g[0, 3:9, 3:9, 0] = 1.0
    p32 = rng.random((2, 16, 16, 3)).astype("float32")
    p32[1] = 1.0  # saturated float16 sigmoid outputs
    p16 = tf.Variable(tf.cast(p32, tf.float16))
    with tf.GradientTape() as tape:
        loss16 = HybridLoss()(g, p16)
    grad = tape.gradient(loss16, p16)
    assert np.isfinite(loss16.numpy()) and np.isfinite(grad.numpy().astype("float32")).all()
    np.testing.assert_allclose(
        loss16.numpy(), HybridLoss()(g, tf.cast(p16, tf.float32)).numpy(), rtol=1e-6
    )


def test_bce_switch_and_config():
    rng = np.random.default_rng(7)
    g = (rng.random((2, 16, 16, 1)) > 0.5).astype("float32")
    p = rng.random((2, 16, 16, 1)).astype("float32")
    bce = make_loss("bce")
    np.testing.assert_allclose(
        _np(bce(g, p)), _np(hybrid_loss_terms(g, p)["bce"]).mean(), rtol=1e-6
    )
    expected = keras.losses.BinaryCrossentropy()(g, p)
    np.testing.assert_allclose(_np(bce(g, p)), _np(expected), rtol=1e-4)
    clone = HybridLoss.from_config(bce.get_config())
    assert clone.terms == ("bce",) and clone.name == "bce_loss"
    with pytest.raises(ValueError, match="terms"):
        HybridLoss(terms=("dice",))
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("focal")


def test_deep_supervision_weights():
    losses, weights = deep_supervision(("coarse", "final"), "hybrid", 0.5, 1.0)
    assert set(losses) == {"coarse", "final"} and weights == {"coarse": 0.5, "final": 1.0}
    assert all(isinstance(v, HybridLoss) for v in losses.values())
    losses, weights = deep_supervision(["final"], "bce")
    assert weights == {"final": 1.0} and losses["final"].terms == ("bce",)
    with pytest.raises(ValueError, match="'final'"):
        deep_supervision(["coarse"])


def test_positive_weights_scale_the_lesion_pixels_bce_per_channel():
    # Channel 0 is G/P as in test_bce_known_answer, channel 1 the same with weight 5 on
    # its four lesion pixels (two at 0.8, two at 0.4).
    g, p = np.stack([G, G], -1)[None], np.stack([P, P], -1)[None]
    terms = hybrid_loss_terms(g, p, terms=("bce",), positive_weights=(1.0, 5.0))
    plain = (14 * -math.log(0.8) + 2 * -math.log(0.4)) / 16
    weighted = (12 * -math.log(0.8) + 5 * (2 * -math.log(0.8) + 2 * -math.log(0.4))) / 16
    np.testing.assert_allclose(_np(terms["bce"]), [(plain + weighted) / 2], rtol=1e-6)
    # The weights reach the loss through the config path and survive a save.
    losses, _ = deep_supervision(("coarse", "final"), "bce", positive_weights=(1.0, 5.0))
    clone = HybridLoss.from_config(losses["final"].get_config())
    assert clone.positive_weights == (1.0, 5.0) and clone.terms == ("bce",)
    np.testing.assert_allclose(_np(clone(g, p)), (plain + weighted) / 2, rtol=1e-6)
    assert HybridLoss.from_config(make_loss("bce").get_config()).positive_weights is None


def test_positive_weights_keep_a_saturated_rare_class_learning():
    # A channel whose sigmoid has collapsed to ~0 on a rare lesion: the paper's loss
    # barely moves its logits (IoU's gradient passes through p (1 - p)); a weight of 10
    # gives the lesion pixels a gradient ten times larger.
    g = np.zeros((1, 32, 32, 1), "float32")
    g[0, 10:13, 10:13, 0] = 1.0
    logits = tf.Variable(np.full(g.shape, -7.0, "float32"))

    def lesion_gradient(loss):
        with tf.GradientTape() as tape:
            value = loss(g, tf.sigmoid(logits))
        return -float(tf.reduce_sum(tape.gradient(value, logits) * g))

    plain, weighted = (
        lesion_gradient(HybridLoss()),
        lesion_gradient(HybridLoss(positive_weights=(10.0,))),
    )
    assert plain > 0 and weighted > 8 * plain


def test_positive_weights_rejected_when_wrong():
    with pytest.raises(ValueError, match="positive_weights"):
        HybridLoss(positive_weights=(1.0, 0.0))
    with pytest.raises(ValueError, match="2 positive_weights for 1 channels"):
        HybridLoss(positive_weights=(1.0, 2.0))(_img(G), _img(P))
