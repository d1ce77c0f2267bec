"""Registered custom layers: known values plus the shared layer test."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.helpers import run_layer_test
from tfcovseg.models import HUWindow, ResizeToMatch, SqueezeAxis, window_hu


def test_window_hu_known_values():
    hu = np.array([-2000.0, -1250.0, -500.0, 250.0, 1000.0], "float32")
    out = keras.ops.convert_to_numpy(window_hu(hu))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)
    out = keras.ops.convert_to_numpy(window_hu(hu, window=(-1000.0, 0.0)))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)


def test_window_hu_pre_windowed_only_rescales():
    pixels = np.array([0, 51, 255, 300], "float32")
    out = keras.ops.convert_to_numpy(window_hu(pixels, pre_windowed=True))
    np.testing.assert_allclose(out, [0.0, 0.2, 1.0, 1.0], atol=1e-7)


def test_hu_window_layer_contract():
    out = run_layer_test(
        HUWindow,
        {"window": (-1000.0, 0.0)},
        (2, 8, 8, 1),
        (2, 8, 8, 1),
        input_low=-900.0,
        input_high=-100.0,
    )
    assert out.min() >= 0.1 - 1e-6 and out.max() <= 0.9 + 1e-6


def test_hu_window_computes_in_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    layer = HUWindow()
    out = layer(np.array([[-499.0]], "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), [[751.0 / 1500.0]], rtol=1e-7)


def test_hu_window_rejects_inverted_window():
    with pytest.raises(ValueError, match="low < high"):
        HUWindow(window=(250.0, -1250.0))


def test_resize_to_match_broadcasts_pooled_map():
    out = run_layer_test(ResizeToMatch, {}, [(2, 1, 1, 3), (2, 5, 7, 4)], (2, 5, 7, 3))
    # A 1x1 map resized to any size is a broadcast of its value.
    np.testing.assert_allclose(out, np.broadcast_to(out[:, :1, :1, :], out.shape))


def test_resize_to_match_bilinear_doubles():
    out = run_layer_test(ResizeToMatch, {}, [(1, 4, 4, 2), (1, 8, 8, 1)], (1, 8, 8, 2))
    assert out.shape == (1, 8, 8, 2)


def test_squeeze_axis():
    out = run_layer_test(SqueezeAxis, {"axis": -1}, (3, 1), (3,))
    assert out.shape == (3,)
