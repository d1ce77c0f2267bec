"""Every network saves to .keras and reloads with safe_mode=True to identical outputs."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.conftest import hu_batch, tiny_config
from tfcovseg.configs.experiment import ARCHITECTURES
from tfcovseg.models import build_classifier, build_model

# Tiny networks: eager steps cost less than tracing them (tests.conftest.eager_functions).
pytestmark = pytest.mark.usefixtures("eager_module")


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _outputs(model, x):
    out = model.predict(x, verbose=0)
    return out if isinstance(out, dict) else {"out": out}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_keras_round_trip_safe_mode(architecture, tmp_path, rng):
    model = build_model(tiny_config(architecture=architecture))
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in _all_layers(model))
    x = hu_batch(rng)
    # Train one step so batch-norm statistics differ from their initial values.
    if architecture == "seresnet_classifier":
        model.compile(optimizer="adam", loss="binary_crossentropy")
        model.train_on_batch(x, np.array([0.0, 1.0], "float32"))
    else:
        model.compile(optimizer="adam", loss={k: "binary_crossentropy" for k in model.output})
        model.train_on_batch(x, {k: np.zeros((2, 64, 64, 3), "float32") for k in model.output})
    path = tmp_path / f"{architecture}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    assert loaded.get_config() == model.get_config()
    expected, got = _outputs(model, x), _outputs(loaded, x)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_classifier_on_segmenter_round_trip(tmp_path, rng):
    classifier = build_classifier(build_model(tiny_config()))
    classifier.save(tmp_path / "classifier.keras")
    loaded = keras.saving.load_model(tmp_path / "classifier.keras", safe_mode=True)
    x = hu_batch(rng)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), classifier.predict(x, verbose=0))


def test_frozen_encoder_stays_frozen_after_reload(tmp_path, rng):
    classifier = build_classifier(build_model(tiny_config()))
    classifier.encoder.trainable = False
    classifier.save(tmp_path / "frozen.keras")
    loaded = keras.saving.load_model(tmp_path / "frozen.keras", safe_mode=True)
    assert len(loaded.trainable_weights) == 4  # the head: dense and normalisation
    x = hu_batch(rng)
    stem = loaded.encoder.layers[1]
    before = keras.ops.convert_to_numpy(stem.kernel).copy()
    loaded.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    loaded.train_on_batch(x, np.array([0.0, 1.0], "float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(stem.kernel), before)


def test_classifier_with_dropout_round_trip(tmp_path, rng):
    model = build_model(tiny_config(architecture="seresnet_classifier", classifier_dropout=0.3))
    model.save(tmp_path / "dropout.keras")
    loaded = keras.saving.load_model(tmp_path / "dropout.keras", safe_mode=True)
    assert loaded.dropout == 0.3
    x = hu_batch(rng)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
