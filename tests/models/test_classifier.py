"""The slice classifier: shared encoder weights, freezing, and the Table 6 baseline."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.conftest import hu_batch, tiny_config
from tfcovseg.models import CovidClassifier, build_classifier, build_model


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_classifier_output_is_probability_per_slice(rng):
    classifier = build_classifier(build_model(tiny_config()))
    out = classifier(hu_batch(rng, n=3))
    assert tuple(out.shape) == (3,)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert ((_np(out) > 0) & (_np(out) < 1)).all()


def test_classifier_shares_the_segmenter_encoder_weights(rng):
    segmenter = build_model(tiny_config())
    classifier = build_classifier(segmenter)
    assert classifier.encoder is segmenter.encoder
    x = hu_batch(rng)
    before_cls, before_seg = _np(classifier(x)), _np(segmenter(x)["coarse"])
    stem_conv = segmenter.encoder.layers[1]
    stem_conv.kernel.assign(stem_conv.kernel * 3.0)
    assert not np.allclose(_np(classifier(x)), before_cls)
    assert not np.allclose(_np(segmenter(x)["coarse"]), before_seg)


@pytest.mark.usefixtures("eager")
def test_frozen_encoder_trains_only_the_head(rng):
    segmenter = build_model(tiny_config())
    classifier = build_classifier(segmenter)
    classifier.encoder.trainable = False
    # Dense kernel and bias, and the feature normalisation's scale and offset.
    assert len(classifier.trainable_weights) == 4
    x = hu_batch(rng, n=4)
    seg_before = _np(segmenter(x, training=False)["final"])
    head = classifier.get_layer("head_logit")
    head_before = _np(head.kernel).copy()
    classifier.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    classifier.train_on_batch(x, np.array([1, 0, 1, 0], "float32"))
    assert not np.allclose(_np(head.kernel), head_before)
    # Frozen BN layers run in inference mode: the segmenter is untouched.
    np.testing.assert_array_equal(_np(segmenter(x, training=False)["final"]), seg_before)


def test_classifier_learns_a_separable_toy_task(rng):
    classifier = build_model(tiny_config(architecture="seresnet_classifier"))
    x = np.concatenate([np.full((8, 64, 64, 1), -900.0), np.full((8, 64, 64, 1), 0.0)])
    x = (x + rng.normal(0, 20, x.shape)).astype("float32")
    y = np.array([0] * 8 + [1] * 8, "float32")
    classifier.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    classifier.fit(x, y, epochs=15, batch_size=16, verbose=0)
    p = _np(classifier(x, training=False))
    assert p[:8].max() < 0.5 < p[8:].min()


def test_head_standardises_the_pooled_features(rng):
    segmenter = build_model(tiny_config())
    classifier = build_classifier(segmenter)
    classifier.encoder.trainable = False
    pooled = keras.Model(classifier.input, classifier.get_layer("head_pool").output)
    normed = keras.Model(classifier.input, classifier.get_layer("head_norm").output)
    x = hu_batch(rng, n=8)
    raw = _np(pooled(x))
    assert raw.mean() > 3 * raw.std(0).mean()  # a large common level, little variation
    z = _np(normed(x, training=True))  # batch statistics while training
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(z.std(0), raw.std(0) / np.sqrt(raw.var(0) + 1e-3), rtol=0.02)
    # Fit a few steps: the moving statistics follow, so inference standardises too.
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    y = np.arange(8) % 2
    classifier.fit(x, y.astype("float32"), batch_size=8, epochs=60, verbose=0)
    live = raw.std(0) > 0.05  # an untrained encoder has dead (constant) features too
    z = _np(normed(x, training=False))[:, live]
    assert live.sum() >= 4
    assert np.abs(z.mean(0)).max() < 0.15 and 0.7 < z.std(0).mean() < 1.3


def test_norm_round_trips_and_old_files_load_without_it(rng):
    classifier = build_classifier(build_model(tiny_config()))
    assert classifier.norm is True
    config = classifier.get_config()
    assert CovidClassifier.from_config(config).norm is True
    del config["norm"]  # saved before the option: the bare dense head
    old = CovidClassifier.from_config(config)
    assert old.norm is False
    assert all(layer.name != "head_norm" for layer in old.layers)
    bare = build_classifier(build_model(tiny_config()), norm=False)
    assert len(bare.trainable_weights) == len(classifier.trainable_weights) - 2


def test_build_classifier_needs_an_se_resnet_encoder():
    with pytest.raises(ValueError, match="SE-ResNet encoder"):
        build_classifier(build_model(tiny_config(architecture="unet")))
    with pytest.raises(TypeError, match="SEResNetEncoder"):
        CovidClassifier(encoder=keras.layers.Dense(3))


def test_seresnet_classifier_architecture(rng):
    model = build_model(tiny_config(architecture="seresnet_classifier", classifier_dropout=0.2))
    assert isinstance(model, CovidClassifier)
    assert tuple(model(hu_batch(rng)).shape) == (2,)
    assert model.dropout == 0.2


@pytest.mark.parametrize("pooling, features", [("avg", 1), ("max", 1), ("avg_max", 2)])
def test_classifier_pooling_heads(rng, pooling, features):
    segmenter = build_model(tiny_config())
    classifier = build_classifier(segmenter, pooling=pooling)
    classifier.encoder.trainable = False
    kernel = [w for w in classifier.trainable_weights if len(w.shape) == 2][0]
    channels = segmenter.encoder.output["stage4"].shape[-1]
    assert tuple(kernel.shape) == (features * channels, 1)
    x = hu_batch(rng, n=2)
    out = _np(classifier(x))
    assert out.shape == (2,) and np.all((out > 0) & (out < 1))
    clone = CovidClassifier.from_config(classifier.get_config())
    assert clone.pooling == pooling
    with pytest.raises(ValueError, match="pooling"):
        build_classifier(segmenter, pooling="median")


@pytest.mark.usefixtures("eager")
def test_with_classifier_head_trains_encoder_and_head_together(rng):
    from tfcovseg.models.classifier import with_classifier_head

    segmenter = build_model(tiny_config())
    classifier = build_classifier(segmenter)
    joint = with_classifier_head(segmenter, classifier)
    assert set(joint.output) == {"coarse", "final", "covid_probability"}
    # One encoder call: the joint model holds the segmenter's weights plus the head's
    # (dense kernel and bias; normalisation scale, offset, moving mean and variance).
    assert len(joint.weights) == len(segmenter.weights) + 6
    x = hu_batch(rng, n=2)
    out = joint(x)
    np.testing.assert_allclose(_np(out["covid_probability"]), _np(classifier(x)), atol=1e-6)
    np.testing.assert_allclose(_np(out["final"]), _np(segmenter(x)["final"]), atol=1e-6)
    joint.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss={"coarse": "mse", "final": "mse", "covid_probability": "binary_crossentropy"},
        loss_weights={"coarse": 0.0, "final": 0.0, "covid_probability": 1.0},
    )
    stem = _np(segmenter.encoder.weights[0])
    joint.train_on_batch(
        x,
        {
            "coarse": np.zeros((2, 64, 64, 3), "float32"),
            "final": np.zeros((2, 64, 64, 3), "float32"),
            "covid_probability": np.array([1.0, 0.0], "float32"),
        },
    )
    # The classification loss alone moved the shared encoder.
    assert not np.allclose(_np(segmenter.encoder.weights[0]), stem)
    other = build_classifier(build_model(tiny_config()))
    with pytest.raises(ValueError, match="share the segmenter's encoder"):
        with_classifier_head(segmenter, other)


@pytest.mark.usefixtures("eager")
def test_conv_head_reads_stages_two_to_four_and_trains_alone(rng):
    segmenter = build_model(tiny_config())
    classifier = build_classifier(segmenter, pooling="avg_max", head="conv", head_filters=6)
    classifier.encoder.trainable = False
    channels = segmenter.encoder.pyramid_channels
    kernels = [w for w in classifier.trainable_weights if len(w.shape) == 4]
    # Two 3x3 convolutions on stages 2-4 concatenated, then the dense layer on avg + max.
    assert [tuple(k.shape) for k in kernels] == [
        (3, 3, channels["stage2"] + channels["stage3"] + channels["stage4"], 6),
        (3, 3, 6, 6),
    ]
    dense = [w for w in classifier.trainable_weights if len(w.shape) == 2]
    assert [tuple(k.shape) for k in dense] == [(12, 1)]
    x = hu_batch(rng, n=4)
    seg_before = _np(segmenter(x, training=False)["final"])
    before = [_np(w).copy() for w in classifier.trainable_weights]
    classifier.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    classifier.train_on_batch(x, np.array([1, 0, 1, 0], "float32"))
    assert all(not np.allclose(_np(w), b) for w, b in zip(classifier.trainable_weights, before))
    np.testing.assert_array_equal(_np(segmenter(x, training=False)["final"]), seg_before)
    clone = CovidClassifier.from_config(classifier.get_config())
    assert (clone.head, clone.head_filters, clone.pooling) == ("conv", 6, "avg_max")
    assert not clone.encoder.trainable
    with pytest.raises(ValueError, match="head must be one of"):
        build_classifier(segmenter, head="mlp")


def test_copy_head_and_joint_model_with_the_conv_head(rng):
    from tfcovseg.models.classifier import copy_head, with_classifier_head

    segmenter = build_model(tiny_config())
    keras.utils.set_random_seed(1)
    trained = build_classifier(segmenter, head="conv", head_filters=4)
    keras.utils.set_random_seed(2)
    other = build_classifier(segmenter, head="conv", head_filters=4)
    x = hu_batch(rng, n=2)
    assert not np.allclose(_np(other(x)), _np(trained(x)))
    copy_head(other, trained)
    np.testing.assert_allclose(_np(other(x)), _np(trained(x)), atol=1e-6)
    joint = with_classifier_head(segmenter, other)
    np.testing.assert_allclose(_np(joint(x)["covid_probability"]), _np(trained(x)), atol=1e-6)
    with pytest.raises(ValueError, match="heads differ"):
        copy_head(build_classifier(segmenter), trained)


@pytest.mark.parametrize("pooling", ["avg", "avg_max"])
def test_head_on_features_splits_the_classifier_and_trains_it(rng, pooling):
    from tfcovseg.models.classifier import head_on_features

    classifier = build_classifier(build_model(tiny_config()), pooling=pooling, dropout=0.2)
    classifier.encoder.trainable = False
    features, head = head_on_features(classifier)
    x = hu_batch(rng, n=4)
    pooled = _np(features(x))
    assert pooled.shape == (4, 32 * (2 if pooling == "avg_max" else 1))
    # The two halves in a row are the classifier (inference mode: dropout off).
    np.testing.assert_allclose(_np(head(pooled)), _np(classifier(x)), rtol=1e-5, atol=1e-6)
    # Training the head on the features trains the classifier's own head layers only.
    encoder_before = [_np(w).copy() for w in classifier.encoder.weights]
    before = _np(classifier(x))
    head.compile(optimizer=keras.optimizers.Adam(1e-1), loss="binary_crossentropy")
    head.fit(pooled, np.array([1, 0, 1, 0], "float32"), epochs=3, verbose=0)
    assert not np.allclose(_np(classifier(x)), before)
    np.testing.assert_allclose(_np(head(pooled)), _np(classifier(x)), rtol=1e-5, atol=1e-6)
    for w, b in zip(classifier.encoder.weights, encoder_before):
        np.testing.assert_array_equal(_np(w), b)
    conv = build_classifier(build_model(tiny_config()), head="conv")
    with pytest.raises(ValueError, match="only a dense head"):
        head_on_features(conv)


def test_head_options_reach_every_builder_by_keyword():
    """The config's classifier_* keys, the built classifier's attributes and a head built
    on a segmenter from either agree (one mapping, `head_options`)."""
    from tfcovseg.models.classifier import head_options

    config = tiny_config(
        architecture="seresnet_classifier",
        classifier_dropout=0.25,
        classifier_pooling="avg_max",
        classifier_head="conv",
        classifier_head_filters=6,
        classifier_norm=False,
    )
    expected = {"dropout": 0.25, "pooling": "avg_max", "head": "conv", "head_filters": 6}
    assert head_options(config) == expected | {"norm": False}
    classifier = build_model(config)
    assert head_options(classifier) == head_options(config)
    segmenter = build_model(tiny_config())
    again = build_classifier(segmenter, **head_options(classifier))
    assert head_options(again) == head_options(config)
