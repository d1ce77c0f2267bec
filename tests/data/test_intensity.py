"""Intensity jitter and matching (`tfcovseg.data.intensity`)."""

from __future__ import annotations

import numpy as np

from tfcovseg.data import intensity


def test_jitter_is_seeded_per_image_and_stays_8_bit():
    x = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (4, 32, 1))[..., None]
    jitter = intensity.IntensityJitter()
    a = jitter(x, np.random.default_rng(1))
    b = jitter(x, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 255.0
    # Each image gets its own window: the four copies of one ramp differ.
    assert np.abs(a[0] - a[1]).mean() > 1.0
    # No change at all with every range collapsed to the identity.
    same = intensity.IntensityJitter(shift=0.0, contrast=(1, 1), gamma=(1, 1), noise=0.0)
    np.testing.assert_allclose(same(x, np.random.default_rng(0)), x, atol=1e-3)


def test_match_intensity_moves_a_dark_window_onto_the_reference():
    rng = np.random.default_rng(0)
    reference = rng.uniform(40, 240, (6, 24, 24)).astype(np.float32)
    dark = reference * 0.4 + 5  # soft tissue at ~100 instead of ~240
    matched = intensity.match_intensity(dark, reference)
    target = np.median(intensity.intensity_scale(reference), axis=0)
    np.testing.assert_allclose(np.median(intensity.intensity_scale(matched), 0), target, atol=1)
    assert np.abs(matched - reference).mean() < 3.0
    assert matched.min() >= 0 and matched.max() <= 255
