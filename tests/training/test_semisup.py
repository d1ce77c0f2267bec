"""Semi-supervised building blocks: TTA, pseudo-labels."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tfcovseg.data import intensity
from tfcovseg.training import semisup


def _pixelwise_model():
    """A model that scores each pixel alone: its maps turn with the image."""
    x = keras.Input((16, 16, 1))
    y = keras.layers.Conv2D(2, 1, activation="sigmoid", name="final")(x)
    return keras.Model(x, {"final": y})


def test_tta_views_undo_their_transform():
    keras.utils.set_random_seed(0)
    model = _pixelwise_model()
    images = np.random.default_rng(0).uniform(0, 1, (3, 16, 16)).astype(np.float32)
    plain = semisup.predict_probabilities(model, images)
    every = semisup.predict_probabilities(model, images, tta=semisup.DIHEDRAL)
    assert plain.shape == (3, 16, 16, 2)
    np.testing.assert_allclose(every, plain, atol=1e-5)  # equivariant model: same maps
    assert len(set(semisup.DIHEDRAL)) == 8


def test_tta_averages_a_model_that_is_not_equivariant():
    x = keras.Input((8, 8, 1))
    # Output = row index of the pixel / 7: changes when the image is turned.
    rows = keras.layers.Lambda(lambda t: keras.ops.zeros_like(t) + keras.ops.reshape(
        keras.ops.arange(8, dtype="float32") / 7.0, (1, 8, 1, 1)))(x)  # fmt: skip
    model = keras.Model(x, {"final": rows})
    images = np.zeros((1, 8, 8), np.float32)
    plain = semisup.predict_probabilities(model, images)[0, ..., 0]
    turned = semisup.predict_probabilities(model, images, tta=semisup.DIHEDRAL[:2])[0, ..., 0]
    np.testing.assert_allclose(plain[:, 0], np.arange(8) / 7.0, atol=1e-6)
    # Half the plain rows, half the turned-back columns.
    expected = 0.5 * (np.arange(8)[:, None] / 7.0) + 0.5 * (np.arange(8)[None, ::-1] / 7.0)
    np.testing.assert_allclose(turned, expected, atol=1e-6)


def test_pseudo_labels_keep_the_surest_slices():
    probs = np.zeros((4, 8, 8, 1), np.float32)
    probs[0, :4] = 0.95  # sure lesion
    probs[1, :4] = 0.55  # undecided
    probs[2] = 0.02  # sure lesion-free
    probs[3, :4] = 0.95
    probs[3, 4:] = 0.5  # half of what it sees is undecided
    np.testing.assert_allclose(semisup.confidence(probs), [1.0, 0.0, 1.0, 0.5])
    kept = semisup.select_pseudo_labels(probs, keep=0.5)
    assert kept.index.tolist() == [0, 2]
    assert kept.masks.shape == (2, 8, 8, 1) and kept.masks[0, :4].all() and not kept.masks[1].any()
    assert semisup.select_pseudo_labels(probs, keep=0.75).index.tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="keep"):
        semisup.select_pseudo_labels(probs, keep=0.0)


class _Teacher:
    """Lesion probability = grey level / 255: bright slices are sure lesions, mid-grey ones
    undecided, dark ones sure background."""

    def predict_on_batch(self, x):
        return {"final": np.asarray(x, np.float32) / 255.0}


def test_a_round_keeps_the_surest_slices_matched_to_the_labelled_grey_levels():
    images = np.stack([np.full((8, 8, 1), v, np.float32) for v in (250, 128, 120, 5)])
    kept = semisup.label_round(_Teacher(), images, views=2, keep=0.5)
    assert kept.pool == 4 and len(kept.images) == 2
    np.testing.assert_array_equal(kept.images[:, 0, 0, 0], [250, 5])  # the undecided go
    np.testing.assert_array_equal(kept.masks[:, 0, 0, 0], [1, 0])
    assert kept.masks.dtype == np.uint8 and kept.confidence_min == pytest.approx(1.0)
    # With a reference, the pool is first mapped onto the labelled slices' grey levels.
    reference = images * 0.5
    matched = semisup.label_round(_Teacher(), images, views=1, keep=1.0, reference=reference)
    np.testing.assert_allclose(matched.images, intensity.match_intensity(images, reference))


def test_mixed_batches_append_a_pseudo_labelled_batch_to_each_labelled_one():
    import tensorflow as tf

    from tfcovseg.training.selftrain import mixed_dataset, pseudo_dataset

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8, 8, 1)).astype(np.float32)
    y = (rng.random((6, 8, 8, 3)) > 0.5).astype(np.float32)
    labelled = tf.data.Dataset.from_tensor_slices((x, {"coarse": y, "final": y})).batch(2)
    pseudo_images = np.full((5, 8, 8, 1), 7.0, np.float32)
    round_ = semisup.Round(pseudo_images, np.ones((5, 8, 8, 3), np.float32), 5, 0.9)
    pseudo = pseudo_dataset(round_, batch_size=3, seed=1, augment_data=False)
    ds = mixed_dataset(labelled, pseudo, ("coarse", "final"))
    batches = list(ds)
    assert len(batches) == int(ds.cardinality()) == 3
    for i, (images, masks) in enumerate(batches):
        np.testing.assert_array_equal(images[:2], x[2 * i : 2 * i + 2])
        np.testing.assert_array_equal(images[2:], 7.0)
        np.testing.assert_array_equal(masks["final"][:2], y[2 * i : 2 * i + 2])
        np.testing.assert_array_equal(masks["coarse"][2:], 1.0)
    # Its iterator, new every epoch, does not wait for tf.data's autotuning thread
    # (`tfcovseg.data.dataset.without_autotuner`).
    assert ds.options().autotune.enabled is False


def test_pseudo_labels_move_with_their_images_under_spatial_augment():
    """`pseudo_dataset(..., spatial=True)`: a pseudo-label is moved by the same rotation,
    zoom and shift as its image (and stays a label)."""
    from tfcovseg.training.selftrain import pseudo_dataset

    images = np.full((8, 32, 32, 1), 10.0, np.float32)
    masks = np.zeros((8, 32, 32, 2), np.uint8)
    images[:, 8:20, 6:24] = 240.0
    masks[:, 8:20, 6:24, 0] = 1
    batch = next(iter(pseudo_dataset(semisup.Round(images, masks, 8, 0.9), 8, 0, spatial=True)))
    x, y = (np.asarray(t) for t in batch)
    assert set(np.unique(y)) <= {0.0, 1.0}
    moved = 0
    for j in range(8):
        assert np.mean((x[j, ..., 0] > 120) != (y[j, ..., 0] == 1)) < 0.02
        area = y[j, ..., 0].sum()
        moved += area != 12 * 18  # a quarter turn or flip keeps the area; a zoom does not
    assert moved > 0
