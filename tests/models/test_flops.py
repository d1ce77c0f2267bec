"""FLOP counting on hand-checkable layers, and the summary command."""

from __future__ import annotations

import keras
import pytest

from tfcovseg.cli import summary as summary_cli
from tfcovseg.models import summary
from tfcovseg.models.flops import count_flops, flops_by_part, layer_flops


def test_known_answer_per_layer_type():
    x = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", name="conv")
    strided = keras.layers.Conv2D(5, 3, strides=2, padding="same", name="strided")
    dilated = keras.layers.Conv2D(2, 3, dilation_rate=2, padding="same", name="dilated")
    up = keras.layers.Conv2DTranspose(6, 2, strides=2, name="up")
    dense = keras.layers.Dense(7, name="dense")
    y = conv(x)  # 8x8 outputs, 3*3*3 MACs each per filter
    z = strided(y)  # 4x4 outputs
    w = dilated(z)
    v = up(w)  # 4x4 inputs, each spread over 2x2x6 outputs
    u = dense(keras.layers.GlobalAveragePooling2D()(v))
    model = keras.Model(x, u)
    assert layer_flops(conv) == 2 * 64 * 27 * 4
    assert layer_flops(strided) == 2 * 16 * 9 * 4 * 5
    assert layer_flops(dilated) == 2 * 16 * 9 * 5 * 2
    assert layer_flops(up) == 2 * 16 * 4 * 2 * 6
    assert layer_flops(dense) == 2 * 6 * 7
    assert count_flops(model) == sum(
        layer_flops(layer) for layer in (conv, strided, dilated, up, dense)
    )


def test_nested_models_are_counted_under_their_name():
    inner_in = keras.Input((4, 4, 2))
    inner = keras.Model(inner_in, keras.layers.Conv2D(3, 1)(inner_in), name="encoder")
    x = keras.Input((4, 4, 2))
    out = keras.layers.Conv2D(1, 1, name="head")(inner(x))
    parts = flops_by_part(keras.Model(x, out))
    assert parts == {"encoder": 2 * 16 * 2 * 3, "head": 2 * 16 * 3 * 1}


def test_summary_cli_prints_parameters_and_gflops(capsys):
    code = summary_cli.main(["--config", "quickstart", "--set", "model.input_size=[64,64]"])
    out = capsys.readouterr().out
    assert code == 0
    assert "architecture    coarse_refine" in out
    assert "input           64x64x1 HU, 3 classes" in out
    assert "parameters" in out and "forward GFLOPs" in out
    assert "refine" in out and "encoder" in out


def test_summary_cli_reports_bad_keys(capsys):
    assert summary_cli.main(["--set", "model.aspp_rate=[1]"]) == 2
    assert "unknown key 'model.aspp_rate'" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["paper"])
def test_summarize_paper_numbers(config):
    from tfcovseg.configs.experiment import load_config

    s = summary.summarize(load_config(config))
    assert round(s["parameters"] / 1e6) == 26
    assert round(s["gflops"]) == 134
    assert s["trainable_parameters"] < s["parameters"]
