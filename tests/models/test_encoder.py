"""SE-ResNet-34 encoder: pyramid by name, stage layout, and the exact parameter count."""

from __future__ import annotations

import keras
import numpy as np

from tfcovseg.models import PYRAMID_LEVELS, SEResNetEncoder


def _layers(model, cls):
    return [layer for layer in model.layers if isinstance(layer, cls)]


def test_pyramid_levels_shapes_and_strides(rng):
    enc = SEResNetEncoder(
        input_size=(64, 96),
        stem_filters=8,
        stage_filters=(8, 16, 24, 32),
        stage_blocks=(1, 1, 1, 1),
        se_reduction=4,
    )
    feats = enc(rng.random((2, 64, 96, 1)).astype("float32"))
    assert list(feats) == list(PYRAMID_LEVELS)
    expected = {
        "stem": (32, 48, 8),
        "stage1": (16, 24, 8),
        "stage2": (8, 12, 16),
        "stage3": (4, 6, 24),
        "stage4": (2, 3, 32),
    }
    for level, shape in expected.items():
        assert tuple(feats[level].shape) == (2, *shape), level
    assert enc.pyramid_channels == {
        "stem": 8,
        "stage1": 8,
        "stage2": 16,
        "stage3": 24,
        "stage4": 32,
    }


def test_se_resnet34_layout():
    enc = SEResNetEncoder(
        input_size=(64, 64),
        stem_filters=16,
        stage_filters=(16, 32, 64, 128),
        stage_blocks=(3, 4, 6, 3),
        se_reduction=16,
    )
    convs = _layers(enc, keras.layers.Conv2D)
    kernels = [tuple(c.kernel_size) for c in convs]
    assert kernels.count((7, 7)) == 1  # the input layer
    assert kernels.count((3, 3)) == 2 * (3 + 4 + 6 + 3)  # 32 -> ResNet-34's 33 convs + fc
    shortcuts = [c for c in convs if tuple(c.kernel_size) == (1, 1)]
    assert [c.strides for c in shortcuts] == [(2, 2)] * 3  # stages 2-4 downsample
    assert len(_layers(enc, keras.layers.Add)) == 16
    se_reduce = [
        d.units for d in _layers(enc, keras.layers.Dense) if d.activation.__name__ == "relu"
    ]
    assert se_reduce == [1] * 3 + [2] * 4 + [4] * 6 + [8] * 3  # filters // 16
    assert len(_layers(enc, keras.layers.MaxPooling2D)) == 1


def _expected_se_resnet_params(stem, filters, blocks, r, channels=1):
    """SE-ResNet parameter count by hand (convs without bias, BN has 4 per channel)."""

    def bn(c):
        return 4 * c

    total = 7 * 7 * channels * stem + bn(stem)
    cin = stem
    for stage, (c, n) in enumerate(zip(filters, blocks)):
        for b in range(n):
            total += 9 * cin * c + bn(c) + 9 * c * c + bn(c)
            total += (c * (c // r) + c // r) + ((c // r) * c + c)  # SE dense layers
            if b == 0 and (stage > 0 or cin != c):
                total += cin * c + bn(c)
            cin = c
    return total


def test_full_width_parameter_count_matches_se_resnet34():
    enc = SEResNetEncoder(input_size=(64, 64))
    expected = _expected_se_resnet_params(64, (64, 128, 256, 512), (3, 4, 6, 3), 16)
    assert enc.count_params() == expected
    # ResNet-34 convolutions are 21.28 M; squeeze-excitation adds about 0.16 M.
    assert 21.4e6 < expected < 21.5e6


def test_stem_shortcut_when_widths_differ():
    enc = SEResNetEncoder(
        input_size=(32, 32),
        stem_filters=8,
        stage_filters=(16, 16, 16, 16),
        stage_blocks=(1, 1, 1, 1),
        se_reduction=4,
    )
    shortcuts = [c for c in _layers(enc, keras.layers.Conv2D) if tuple(c.kernel_size) == (1, 1)]
    assert [c.strides for c in shortcuts] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert enc.count_params() == _expected_se_resnet_params(8, (16,) * 4, (1,) * 4, 4)


def test_encoder_is_deterministic_in_inference(rng):
    enc = SEResNetEncoder(
        input_size=(32, 32),
        stem_filters=4,
        stage_filters=(4, 4, 8, 8),
        stage_blocks=(1, 1, 1, 1),
        se_reduction=2,
    )
    x = rng.random((1, 32, 32, 1)).astype("float32")
    a = keras.ops.convert_to_numpy(enc(x, training=False)["stage4"])
    b = keras.ops.convert_to_numpy(enc(x, training=False)["stage4"])
    np.testing.assert_array_equal(a, b)
