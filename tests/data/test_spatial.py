"""The small random rotation, zoom and shift (`tfcovseg.data.spatial.SpatialJitter`) that
`data.spatial_augment` adds after the paper's quarter turns and flips."""

from __future__ import annotations

import numpy as np
import pytest

from tfcovseg.data.spatial import SpatialJitter, warp


def _slices(n=6, size=48):
    """Slices with a bright off-centre rectangle on air (-1000), its mask in channel 0 and
    a smaller one in channel 1."""
    images = np.full((n, size, size, 1), -1000.0, np.float32)
    masks = np.zeros((n, size, size, 2), np.uint8)
    images[:, 10:30, 14:40] = 200.0
    masks[:, 10:30, 14:40, 0] = 1
    masks[:, 12:16, 16:22, 1] = 1
    return images, masks


def test_moves_each_image_and_its_masks_alike():
    images, masks = _slices()
    x, y = SpatialJitter(probability=1.0)(images, masks, np.random.default_rng(0))
    assert x.shape == images.shape and x.dtype == images.dtype
    assert y.shape == masks.shape and y.dtype == np.uint8
    assert set(np.unique(y)) <= {0, 1}  # nearest neighbour: labels stay labels
    for j in range(len(x)):
        # Every slice moved (its rectangle's area or place changed) ...
        assert not np.array_equal(y[j], masks[j])
        # ... and its mask still marks the bright pixels (bilinear edges aside).
        bright = x[j, ..., 0] > -400.0
        assert np.mean(bright != (y[j, ..., 0] == 1)) < 0.02
        # The smaller lesion moved with the larger one: still inside it.
        assert np.all(y[j, ..., 0][y[j, ..., 1] == 1] == 1)
    # The inputs are left as they were.
    np.testing.assert_array_equal(images, _slices()[0])


def test_uncovered_borders_are_filled_with_air_and_hu_stays_whole():
    """A slice zoomed out uncovers its border: filled with the slice's minimum (air, here
    a patch of -1000 HU on -500 HU tissue), not 0 HU; int16 HU are rounded, not cut."""
    image = np.full((1, 32, 32, 1), -500, np.int16)
    image[0, 14:18, 14:18] = -1000
    image[0, 20:24, 8:30] = 41
    masks = np.zeros((1, 32, 32, 1), np.uint8)
    shrink = SpatialJitter(probability=1.0, degrees=0.0, zoom=(0.8, 0.8), shift=0.0)
    x, _ = shrink(image, masks, np.random.default_rng(0))
    assert x.dtype == np.int16
    assert x[0, 0, 0, 0] == x[0, -1, -1, 0] == -1000  # corners: uncovered
    assert x[0, 16, 16, 0] == -1000  # the air patch at the centre stays
    # Bilinear mixes of -500 and 41 (not -999.x cut to -999): every value an integer
    # reached by rounding; the middle of the band keeps its 41.
    assert x[0, 21, 16, 0] == 41


def test_probability_and_seed():
    images, masks = _slices(n=40)
    x0, y0 = SpatialJitter(probability=0.0)(images, masks, np.random.default_rng(1))
    np.testing.assert_array_equal(x0, images)
    np.testing.assert_array_equal(y0, masks)
    a = SpatialJitter()(images, masks, np.random.default_rng(2))
    b = SpatialJitter()(images, masks, np.random.default_rng(2))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)  # reproducible for a seed
    moved = [not np.array_equal(a[1][j], masks[j]) for j in range(len(masks))]
    assert 10 < sum(moved) < 30  # about half of the slices, by default


def test_zoom_and_rotation_stay_in_their_ranges():
    images, masks = _slices(n=1, size=64)
    rng = np.random.default_rng(3)
    area = masks[0, ..., 0].sum()
    jitter = SpatialJitter(probability=1.0, degrees=0.0, zoom=(1.2, 1.2), shift=0.0)
    _, y = jitter(images, masks, rng)
    assert y[0, ..., 0].sum() / area == pytest.approx(1.44, rel=0.1)
    m = SpatialJitter(probability=1.0, degrees=10.0, zoom=(1.0, 1.0), shift=0.0).matrix(rng, 8, 8)
    assert np.degrees(abs(np.arctan2(m[0, 1], m[0, 0]))) <= 10.0
    assert np.hypot(m[0, 0], m[0, 1]) == pytest.approx(1.0)


def test_warp_takes_any_number_of_channels_and_dtype():
    rng = np.random.default_rng(4)
    m = SpatialJitter(probability=1.0).matrix(rng, 16, 16)
    stack = (rng.random((16, 16, 6)) > 0.5).astype(np.int16)
    out = warp(stack, m, 0, 0.0)  # cv2.INTER_NEAREST
    assert out.dtype == np.int16 and out.shape == stack.shape
    for c in range(6):  # channel by channel the same as warping each alone
        np.testing.assert_array_equal(out[..., c], warp(stack[..., c], m, 0, 0.0))
    # int16 HU are rounded after the bilinear mix: -999.5 is -1000, not -999 cut towards 0.
    hu = np.tile(np.array([-1000, -999, -999, -999], np.int16), (4, 1))
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])  # half a pixel to the right
    assert warp(hu, half, 1, -1000.0)[0, 1] == -1000  # cv2.INTER_LINEAR


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"probability": 1.5}, "probability"),
        ({"zoom": (1.2, 0.9)}, "zoom"),
        ({"zoom": (0, 1)}, "zoom"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpatialJitter(**kwargs)
