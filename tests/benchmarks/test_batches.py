"""The COVID-SemiSeg benchmark's in-memory batches and what `model.fit` reads of them."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tfcovseg.benchmarks.batches import ConsistencyBatches, SliceBatches, fit_input
from tfcovseg.data.intensity import IntensityJitter

OUTPUTS = ("final",)
tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the tf.data pipeline of the TF backend"
)


def _batches(seed=3, cls=SliceBatches, **kw):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 16, 16)).astype(np.float32)
    masks = (rng.random((6, 16, 16, 2)) > 0.7).astype(np.float32)
    if kw.pop("extra", False):
        kw["extra"] = (images[:3] / 2, masks[:3])
    return cls(images, masks, OUTPUTS, 4, passes=2, seed=seed, jitter=IntensityJitter(), **kw)


def _expected(twin, epochs):
    """`twin`'s batches epoch after epoch, the next permutation between epochs."""
    out = []
    for e in range(epochs):
        if e:
            twin.on_epoch_end()
        out.append([twin[i] for i in range(len(twin))])
    return out


def _assert_same(want, have):
    for a, b in zip(keras.tree.flatten(want), keras.tree.flatten(have), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@tensorflow_only
@pytest.mark.parametrize("extra", [False, True])
def test_fit_input_reads_the_batches_epoch_after_epoch_without_autotuning(extra):
    batches, twin = _batches(extra=extra), _batches(extra=extra)
    ds = fit_input(batches)
    assert ds.options().autotune.enabled is False
    assert len(twin) == (6 if extra else 3)
    expected = _expected(twin, 3)
    iterator = iter(ds)  # one for the whole fit, as Keras keeps it with steps_per_epoch
    got = [[next(iterator) for _ in range(len(twin))] for _ in range(3)]
    for want_epoch, got_epoch in zip(expected, got, strict=True):
        for want, have in zip(want_epoch, got_epoch, strict=True):
            _assert_same(want, have)
    # Each epoch reshuffles and augments anew.
    assert not np.array_equal(got[0][0][0], got[1][0][0])


@tensorflow_only
def test_fit_input_carries_dict_inputs_of_consistency_batches():
    unlabelled = np.random.default_rng(1).uniform(0, 255, (5, 16, 16)).astype(np.float32)
    kw = dict(cls=ConsistencyBatches, unlabelled=unlabelled, strong=IntensityJitter())
    batches, twin = _batches(**kw), _batches(**kw)
    x, y = next(iter(fit_input(batches)))
    assert sorted(x) == ["labelled", "strong", "weak"] and list(y) == list(OUTPUTS)
    _assert_same(twin[0], (x, y))


def _model():
    keras.utils.set_random_seed(0)
    x = keras.Input((16, 16, 1))
    out = keras.layers.Conv2D(2, 3, padding="same", activation="sigmoid", name="final")(x)
    model = keras.Model(x, {"final": out})
    model.compile(keras.optimizers.Adam(1e-2), {"final": "binary_crossentropy"})
    return model


@tensorflow_only
def test_fit_on_fit_input_trains_on_the_batches_in_turn():
    """Three epochs of `fit` (with validation, as `semiseg._fit` calls it) step through
    the batches as a loop over them does. (Keras' own adapters read a batch
    ahead for its shapes, under JAX too: other random draws.)"""
    model = _model()
    history = model.fit(
        fit_input(_batches()), validation_data=fit_input(_batches(training=False)), epochs=3,
        shuffle=False, steps_per_epoch=3, validation_steps=2, verbose=0,
    )  # fmt: skip
    assert len(history.history["val_loss"]) == 3
    by_hand = _model()
    for epoch in _expected(_batches(), 3):
        for x, y in epoch:
            by_hand.train_on_batch(x, y)
    for a, b in zip(model.get_weights(), by_hand.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_spatial_jitter_moves_labelled_and_extra_slices_with_their_masks():
    """`spatial`: after the quarter turn and flip, some slices of every kind (labelled and
    pseudo-labelled) are rotated, zoomed and shifted with their masks; validation batches
    are left alone; the draws are reproducible for a seed."""
    from tfcovseg.data.spatial import SpatialJitter

    images = np.full((8, 24, 24), 5.0, np.float32)
    masks = np.zeros((8, 24, 24, 2), np.float32)
    for j in range(8):  # each slice its own rectangle: a pairing mistake shows
        images[j, 6 + j // 2 : 14 + j // 2, 4 : 12 + j] = 250.0
        masks[j, 6 + j // 2 : 14 + j // 2, 4 : 12 + j, 0] = 1.0
    extra = (images[:4].copy(), masks[:4].copy())
    spatial = SpatialJitter(probability=1.0)
    a = SliceBatches(images, masks, OUTPUTS, 4, 2, 7, extra=extra, spatial=spatial)
    b = SliceBatches(images, masks, OUTPUTS, 4, 2, 7, extra=extra, spatial=spatial)
    moved = seen = 0
    for i in range(len(a)):
        (x, y), (x2, y2) = a[i], b[i]
        _assert_same((x, y), (x2, y2))
        y = y["final"]
        assert set(np.unique(y)) <= {0.0, 1.0}
        for j in range(len(x)):  # the labelled ones first, then the pseudo-labelled
            assert np.mean((x[j, ..., 0] > 120) != (y[j, ..., 0] == 1)) < 0.03
            # A quarter turn or flip keeps the area of one of the rectangles; a zoom not.
            moved += y[j, ..., 0].sum() not in masks[..., 0].sum(axis=(1, 2))
            seen += 1
    assert moved > seen * 0.7
    val = SliceBatches(images, masks, OUTPUTS, 4, 1, 7, training=False, spatial=spatial)
    x, y = val[1]
    np.testing.assert_array_equal(x[..., 0], images[4:])
    np.testing.assert_array_equal(y["final"], masks[4:])
