"""The coarse-refine network, its Table 7 ladder, and the paper's reference size."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.conftest import hu_batch, tiny_config
from tfcovseg.configs.experiment import ModelConfig
from tfcovseg.models import CoarseRefineNet, build_model
from tfcovseg.models.flops import count_flops, flops_by_part


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _dilation_rates(model):
    return sorted(
        layer.dilation_rate[0]
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.dilation_rate[0] > 1
    )


def test_outputs_are_float32_probabilities_per_class(rng):
    model = build_model(tiny_config())
    out = model(hu_batch(rng))
    assert set(out) == {"coarse", "final"}
    for name in ("coarse", "final"):
        assert tuple(out[name].shape) == (2, 64, 64, 3)
        assert keras.backend.standardize_dtype(out[name].dtype) == "float32"
        values = _np(out[name])
        assert values.min() >= 0.0 and values.max() <= 1.0
    assert model.class_names == ("ggo", "consolidation", "fibrosis")


def test_class_count_and_order_come_from_config(rng):
    model = build_model(tiny_config(class_names=("ggo", "consolidation")))
    assert tuple(model(hu_batch(rng))["final"].shape) == (2, 64, 64, 2)
    assert model.class_names == ("ggo", "consolidation")


def test_final_is_sigmoid_of_coarse_logits_plus_residual(rng):
    model = build_model(tiny_config())
    residual_conv = model.get_layer("refine_residual")
    x = hu_batch(rng)
    # With a zero residual the refined map is the coarse map.
    residual_conv.set_weights([np.zeros_like(w) for w in residual_conv.get_weights()])
    out = model(x)
    np.testing.assert_allclose(_np(out["final"]), _np(out["coarse"]), atol=1e-7)
    # A constant residual bias b shifts every logit: final = sigmoid(logit(coarse) + b).
    kernel, bias = residual_conv.get_weights()
    residual_conv.set_weights([kernel, np.array([1.0, -2.0, 0.5], "float32")])
    out = model(x)
    coarse = np.clip(_np(out["coarse"]).astype("float64"), 1e-6, 1 - 1e-6)
    logits = np.log(coarse / (1 - coarse)) + np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(_np(out["final"]), 1 / (1 + np.exp(-logits)), atol=2e-5)


def test_refinement_module_structure():
    model = build_model(tiny_config())
    refine_convs = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.name.startswith("refine_")
    ]
    three_by_three = [c for c in refine_convs if tuple(c.kernel_size) == (3, 3)]
    # 4 encoder + 3 atrous (ASPP) + 4 decoder convs + the residual conv, all 3x3.
    assert len(three_by_three) == 4 + 3 + 4 + 1
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert len(pools) == 4  # the refinement module's; the encoder's stem pool is nested
    assert model.get_layer("refine_residual").filters == 3


def test_table7_ladder():
    plain = build_model(tiny_config(architecture="seresnet_unet"))
    aspp = build_model(tiny_config(architecture="seresnet_unet_aspp"))
    full = build_model(tiny_config(architecture="coarse_refine"))
    assert list(plain.output) == ["final"] and list(aspp.output) == ["final"]
    assert set(full.output) == {"coarse", "final"}
    assert _dilation_rates(plain) == []
    assert _dilation_rates(aspp) == [3, 6, 9]
    assert _dilation_rates(full) == [3, 3, 6, 6, 9, 9]  # coarse bridge + refinement bridge
    assert not plain.use_aspp and aspp.use_aspp and full.use_refinement


def test_aspp_rates_and_filters_come_from_config():
    model = build_model(
        tiny_config(architecture="seresnet_unet_aspp", aspp_rates=(2, 4), aspp_filters=12)
    )
    assert _dilation_rates(model) == [2, 4]
    assert model.get_layer("aspp_project_conv").filters == 12
    assert model.get_layer("aspp_concat").output.shape[-1] == 12 * (2 + 2)


def test_refinement_bridge_follows_aspp_config():
    model = build_model(tiny_config(aspp_rates=(2, 5), aspp_filters=12, refine_filters=8))
    assert model.get_layer("refine_aspp_project_conv").filters == 12
    assert model.get_layer("refine_aspp_rate5_conv").dilation_rate == (5, 5)
    assert model.get_layer("refine_dec1_conv").filters == 8


def test_coarse_decoder_stages_use_three_convs():
    model = build_model(tiny_config(decoder_convs=3))
    for stage in (1, 2, 3, 4):
        convs = [
            layer
            for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D) and layer.name.startswith(f"decoder{stage}_")
        ]
        assert len(convs) == 3, stage


def test_pre_windowed_rescales_instead_of_windowing(rng):
    windowed = build_model(tiny_config(pre_windowed=True))
    equivalent = build_model(tiny_config(hu_window=(0.0, 255.0)))
    equivalent.set_weights(windowed.get_weights())
    pixels = rng.integers(0, 256, (2, 64, 64, 1)).astype("float32")
    np.testing.assert_allclose(
        _np(windowed(pixels)["final"]), _np(equivalent(pixels)["final"]), atol=1e-6
    )


def test_input_size_must_be_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        CoarseRefineNet(input_size=(48, 64))


def test_mixed_precision_outputs_float32(rng):
    keras.config.set_dtype_policy("mixed_float16")
    model = build_model(tiny_config())
    convs = [layer for layer in model.encoder.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs[0].compute_dtype == "float16"
    out = model(hu_batch(rng))
    for name in ("coarse", "final"):
        assert keras.backend.standardize_dtype(out[name].dtype) == "float32"
        assert np.isfinite(_np(out[name])).all()


def test_paper_reference_size():
    """At 512x512 and 3 classes the paper reports about 26 M parameters and 134 GFLOP."""
    model = build_model(ModelConfig())
    assert abs(model.count_params() - 26e6) / 26e6 < 0.01
    assert abs(count_flops(model) - 134e9) / 134e9 < 0.01
    parts = flops_by_part(model)
    assert set(parts) == {"encoder", "aspp", "decoder", "refine"}
    # The refinement module runs at full resolution: it costs about as much as the
    # whole coarse network (encoder + bridge + decoder) and more than its decoder.
    assert parts["refine"] > parts["decoder"]
    assert 0.6 < parts["refine"] / (parts["encoder"] + parts["aspp"] + parts["decoder"]) < 1.0
