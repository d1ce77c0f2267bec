"""The shared antialiased bilinear resize (`data_tools.resize`): PIL's, as matrices."""

import numpy as np
import pytest
from PIL import Image

from data_tools.resize import bilinear_weights, resize_bilinear


def _pil(image, height, width):
    return np.asarray(Image.fromarray(image, mode="F").resize((width, height), Image.BILINEAR))


@pytest.mark.parametrize(
    "shape, size",
    [((64, 64), (24, 24)), ((64, 50), (37, 61)), ((20, 17), (64, 64)), ((512, 512), (128, 128))],
)
def test_equals_pils_bilinear_resize(shape, size):
    """Shrinking (antialiased), enlarging and non-square sizes all match PIL, the resize
    records were written with before, to well under one HU."""
    image = np.random.default_rng(1).normal(-500.0, 300.0, shape).astype(np.float32)
    ours = resize_bilinear(image, size)
    assert ours.shape == size and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _pil(image, *size), atol=2e-3)


def test_weights_are_a_normalised_triangle_filter():
    w = bilinear_weights(8, 4)
    assert w.shape == (4, 8) and w.dtype == np.float32
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    # shrinking by 2: output pixel 1 is centred at 3.0, between input pixels 2 and 3, with
    # the triangle widened to 2 pixels: weights 1/8, 3/8, 3/8, 1/8 on pixels 1..4
    np.testing.assert_allclose(w[1], [0, 1 / 8, 3 / 8, 3 / 8, 1 / 8, 0, 0, 0], atol=1e-6)
    # the same size is the identity, exactly
    assert np.array_equal(bilinear_weights(5, 5), np.eye(5, dtype=np.float32))


def test_a_constant_image_stays_constant():
    image = np.full((33, 47), -812.0, np.float32)
    np.testing.assert_allclose(resize_bilinear(image, (100, 9)), -812.0, rtol=1e-6)


def test_one_slice_only():
    with pytest.raises(ValueError, match=r"one \[H, W\] slice, got shape \(2, 4, 4\)"):
        resize_bilinear(np.zeros((2, 4, 4)), (2, 2))
