"""U-Net and U-Net++ baselines."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.conftest import hu_batch, tiny_config
from tfcovseg.models import UNet, UNetPlusPlus, build_model


def _count(model, cls):
    return sum(isinstance(layer, cls) for layer in model.layers)


@pytest.mark.parametrize("architecture", ["unet", "unet_plus_plus"])
def test_baseline_outputs(architecture, rng):
    model = build_model(tiny_config(architecture=architecture, class_names=("a", "b")))
    out = model(hu_batch(rng))
    assert list(out) == ["final"]
    assert tuple(out["final"].shape) == (2, 64, 64, 2)
    values = keras.ops.convert_to_numpy(out["final"])
    assert values.min() >= 0 and values.max() <= 1


def test_unet_structure():
    model = UNet(input_size=(32, 32), filters=(4, 8, 16, 32))
    assert _count(model, keras.layers.MaxPooling2D) == 3
    assert _count(model, keras.layers.Conv2DTranspose) == 3
    assert _count(model, keras.layers.Concatenate) == 3
    # 2 convs per level on the way down (4 levels) and up (3 levels), plus the 1x1 head.
    assert _count(model, keras.layers.Conv2D) == 2 * (4 + 3) + 1


def test_unet_plus_plus_nested_skips():
    depth = 3
    model = UNetPlusPlus(input_size=(32, 32), filters=(4, 8, 16, 32))
    # Nodes X(i, j) with j >= 1: depth (depth + 1) / 2 of them, each fed by a concat.
    assert _count(model, keras.layers.Concatenate) == depth * (depth + 1) // 2
    assert _count(model, keras.layers.Conv2DTranspose) == depth * (depth + 1) // 2
    # X(0, 3) concatenates X(0, 0), X(0, 1), X(0, 2) and the up-convolved X(1, 2).
    assert model.get_layer("x0_3_concat").output.shape[-1] == 4 * 4


def test_baselines_reject_indivisible_sizes():
    with pytest.raises(ValueError, match="divisible"):
        UNet(input_size=(36, 36), filters=(4, 8, 16, 32))
    with pytest.raises(ValueError, match="divisible"):
        UNetPlusPlus(input_size=(36, 36), filters=(4, 8, 16, 32))


@pytest.mark.usefixtures("eager")
def test_unet_trains_on_a_fixed_batch(rng):
    model = build_model(tiny_config(architecture="unet", class_names=("lesion",)))
    x = hu_batch(rng, n=4)
    y = (x > -400).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={"final": "binary_crossentropy"})
    first = model.train_on_batch(x, {"final": y})
    for _ in range(10):
        last = model.train_on_batch(x, {"final": y})
    assert np.isfinite(last) and last < first
