"""tfcovseg.training.consistency: FixMatch-style consistency for the segmenter."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from tests.conftest import TINY_MODEL
from tfcovseg.configs.experiment import ConfigError, load_config
from tfcovseg.training.consistency import ConsistencyTrainer, consistency_loss
from tfcovseg.training.recipe import build_segmenter, compile_segmenter, segmentation_objective

# Tiny networks: eager steps cost less than tracing them (tests.conftest.eager_functions).
pytestmark = pytest.mark.usefixtures("eager_module")


def test_only_confident_pixels_are_targets_with_the_losss_weights():
    weak = np.array([0.95, 0.6, 0.02, 0.3], np.float32).reshape(1, 2, 2, 1)
    strong = np.array([0.8, 0.1, 0.5, 0.9], np.float32).reshape(1, 2, 2, 1)
    got = float(consistency_loss(weak, strong, confidence=0.9))
    # Sure: 0.95 (target 1) and 0.02 (target 0); 0.6 and 0.3 are not; mean over 4 pixels.
    assert got == pytest.approx(-(np.log(0.8) + np.log(0.5)) / 4, rel=1e-5)
    # A positive weight w: the weak map is corrected first (q / (q + w (1 - q))), so
    # 0.95 -> 0.655 is unsure at 0.9 and 0.3 -> 0.041 a sure negative; negatives weigh 1.
    weighted = float(consistency_loss(weak, strong, confidence=0.9, positive_weights=[10.0]))
    assert weighted == pytest.approx(-(np.log(0.5) + np.log(0.1)) / 4, rel=1e-5)
    # Nothing sure: no term.
    assert float(consistency_loss(weak * 0 + 0.5, strong, confidence=0.6)) == 0.0


def test_the_term_trains_the_strong_view_only():
    weak = ops.convert_to_tensor(np.full((1, 2, 2, 1), 0.97, np.float32))
    strong = keras.Variable(np.full((1, 2, 2, 1), 0.4, np.float32))
    import tensorflow as tf

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(weak)
        loss = consistency_loss(weak, strong.value, 0.9)
    assert tape.gradient(loss, weak) is None or not np.any(tape.gradient(loss, weak))
    assert np.all(np.asarray(tape.gradient(loss, strong.value)) < 0)  # q pulled up to 1


def _tiny(confidence=0.6, weight=1.0):
    config = load_config("semiseg", TINY_MODEL + ["model.input_size=[32,32]"])
    keras.utils.set_random_seed(0)
    segmenter = build_segmenter(config, compile=False)
    model = ConsistencyTrainer(segmenter, confidence, weight)
    compile_segmenter(config, model, segmentation_objective(config, segmenter.output))
    return model, segmenter


def test_the_trainer_adds_the_term_to_labelled_batches_and_validates_as_the_segmenter():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 32, 32, 1)).astype(np.float32)
    y = (rng.random((2, 32, 32, 2)) > 0.8).astype(np.float32)
    targets = {"coarse": y, "final": y}
    views = {"labelled": x, "weak": x, "strong": x}
    model, segmenter = _tiny()
    supervised = model.evaluate(x, targets, verbose=0, return_dict=True)
    logs = model.train_on_batch(views, targets, return_dict=True)
    # The step's loss is the supervised terms plus the consistency term (> 0: an untrained
    # map is sure of some pixels at 0.6).
    assert logs["loss"] > logs["coarse_loss"] + logs["final_loss"] + 1e-4
    assert supervised["loss"] == pytest.approx(
        supervised["coarse_loss"] + supervised["final_loss"], rel=1e-5
    )
    # Called on images it is the segmenter (validation, prediction, early stopping's weights).
    got = model(x)["final"]
    assert np.allclose(ops.convert_to_numpy(got), ops.convert_to_numpy(segmenter(x)["final"]))
    assert {id(w) for w in model.weights} == {id(w) for w in segmenter.weights}
    # Nothing sure: the step is the supervised one.
    model, _ = _tiny(confidence=0.999999)
    logs = model.train_on_batch(views, targets, return_dict=True)
    assert logs["loss"] == pytest.approx(logs["coarse_loss"] + logs["final_loss"], rel=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="semi.confidence must be in"):
        load_config("semiseg", ["semi.confidence=0.5"])
    with pytest.raises(ConfigError, match="semi.consistency_weight must be finite"):
        load_config("semiseg", ["semi.consistency_weight=0"])
    segmenter = build_segmenter(
        load_config("semiseg", TINY_MODEL + ["model.input_size=[32,32]"]), compile=False
    )
    with pytest.raises(ValueError, match="confidence must be in"):
        ConsistencyTrainer(segmenter, confidence=1.0)


def test_train_refuses_fixmatch_before_anything_is_written(tmp_path, capsys):
    from tfcovseg.cli.train import main
    from tfcovseg.training.trainer import TrainingError, train

    config = load_config("semiseg", ["semi.method=fixmatch"])
    with pytest.raises(TrainingError, match="benchmark only.*semi.method self_training"):
        train(config, tmp_path / "run", log=lambda *a: None)
    assert not (tmp_path / "run").exists()
    args = ["--config", "semiseg", "--set", "semi.method=fixmatch", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert "semi.method fixmatch is measured by the COVID-SemiSeg benchmark" in (
        capsys.readouterr().err
    )
