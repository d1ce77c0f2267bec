"""Evaluation callbacks: their metrics reach the logs that later callbacks see."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import tiny_config
from tfcovseg.evaluation.metrics import segmentation_scores
from tfcovseg.models import build_model
from tfcovseg.training.callbacks import (
    OverlayImages,
    PatientEvaluation,
    SegmentationEvaluation,
    overlay,
    patient_scores,
)


class _Constant(keras.Model):
    """A 'model' that returns fixed predictions, so expected metrics are known."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs_fixed = outputs
        self.offset = 0

    def predict_on_batch(self, x):
        start, self.offset = self.offset, self.offset + len(x)
        return {k: v[start : self.offset] for k, v in self.outputs_fixed.items()}


def test_segmentation_evaluation_matches_offline_scores_and_reaches_logs():
    rng = np.random.default_rng(0)
    truth = (rng.random((6, 16, 16, 2)) > 0.7).astype("float32")
    pred = rng.random((6, 16, 16, 2)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices(
        (np.zeros((6, 16, 16, 1), "float32"), {"final": truth})
    ).batch(4)
    callback = SegmentationEvaluation(ds, ["ggo", "consolidation"])
    callback.set_model(_Constant({"final": pred}))
    seen = {}

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.update(logs)

    callbacks = keras.callbacks.CallbackList([callback, Spy()])
    callbacks.on_epoch_end(0, {"loss": 1.0})
    expected = segmentation_scores(truth, pred, ["ggo", "consolidation"])
    for cls, scores in expected.items():
        assert seen[f"val_seg_dice_{cls}"] == pytest.approx(scores["dice"])
        assert seen[f"val_seg_iou_{cls}"] == pytest.approx(scores["iou"])
        assert seen[f"val_seg_slice_dice_{cls}"] == pytest.approx(scores["lesion_slice_dice"])
    assert seen["loss"] == 1.0


def test_every_n_epochs():
    ds = tf.data.Dataset.from_tensor_slices(
        (np.zeros((2, 8, 8, 1), "float32"), np.zeros((2, 8, 8, 1), "float32"))
    ).batch(2)
    callback = SegmentationEvaluation(ds, ["ggo"], every_n_epochs=2)
    callback.set_model(_Constant({"final": np.zeros((2, 8, 8, 1), "float32")}))
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs == {}
    callback.on_epoch_end(1, logs)
    assert logs["val_seg_dice_ggo"] == 1.0  # empty vs empty


def test_patient_scores_and_any_slice_rule():
    batches = tf.data.Dataset.from_tensor_slices(
        {
            "hu": np.zeros((5, 8, 8), "float32"),
            "patient/id": [b"a", b"a", b"b", b"c", b"c"],
            "patient/diagnosis": [b"covid", b"covid", b"healthy", b"covid", b"covid"],
        }
    ).batch(2)

    class Slices(keras.Model):
        def predict_on_batch(self, x):
            return self.values.pop(0)

    model = Slices()
    # patient a: one positive slice -> positive; b: negative; c: no slice above 0.5.
    model.values = [np.array([0.1, 0.9]), np.array([0.2, 0.4]), np.array([0.3])]
    callback = PatientEvaluation(batches)
    callback.set_model(model)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs["val_patient_accuracy"] == pytest.approx(2 / 3)
    assert logs["val_patient_recall"] == pytest.approx(1 / 2)
    assert logs["val_patient_precision"] == 1.0
    # At least two slices >= 0.35: a (0.9 only) and c (0.3 only) negative, b (0.4) too.
    model.values = [np.array([0.1, 0.9]), np.array([0.2, 0.4]), np.array([0.3])]
    strict = PatientEvaluation(batches, threshold=0.35, min_slices=2, prefix="k2_")
    strict.set_model(model)
    logs = {}
    strict.on_epoch_end(0, logs)
    assert logs["k2_accuracy"] == pytest.approx(1 / 3) and logs["k2_recall"] == 0.0
    with pytest.raises(ValueError, match="min_slices"):
        PatientEvaluation(batches, min_slices=0)
    s = patient_scores({"x": True, "y": False}, {"x": True, "y": True})
    assert s["confusion"] == {"tp": 1, "fp": 1, "fn": 0, "tn": 0} and s["precision"] == 0.5


def test_overlay_colours_and_tensorboard_images(tmp_path, rng):
    hu = np.full((1, 8, 8), -1250.0, "float32")
    masks = np.zeros((1, 8, 8, 3), "float32")
    masks[0, :2, :2, 0] = 1
    masks[0, 6:, 6:, 2] = 1
    rgb = overlay(hu, masks)
    assert rgb.shape == (1, 8, 8, 3)
    assert rgb[0, 0, 0, 0] > 0.4 and rgb[0, 0, 0, 1] == 0  # red GGO on black
    assert rgb[0, 7, 7, 2] > 0.4 and rgb[0, 7, 7, 0] == 0  # blue fibrosis
    assert rgb[0, 4, 4].max() == 0
    model = build_model(tiny_config())
    images = rng.uniform(-1000, 100, (2, 64, 64, 1)).astype("float32")
    callback = OverlayImages(images, np.zeros((2, 64, 64, 3), "float32"), tmp_path)
    callback.set_model(model)
    callback.on_epoch_end(0, {})
    events = list((tmp_path / "overlays").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000


def _shuffled(n=32, batch=4):
    """Shuffled every epoch, with augmentation-like random draws, of known length (as
    `make_dataset`'s): an SGD model's weights depend on the order of its batches."""
    x = np.linspace(-1, 1, 2 * n, dtype="float32").reshape(n, 2)
    ds = tf.data.Dataset.from_tensor_slices((x, x[:, :1] - 2 * x[:, 1:]))
    ds = ds.shuffle(n, seed=3, reshuffle_each_iteration=True)
    noise = tf.data.Dataset.random(seed=5, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((ds, noise)).map(
        lambda xy, r: (xy[0] + tf.cast(r % 7, tf.float32) * 0.01, xy[1])
    )
    return ds.batch(batch).apply(tf.data.experimental.assert_cardinality(n // batch))


class _KilledAfter(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt  # after the backup and the log of that epoch


def _fit_sgd(out, epochs, resume, extra=(), weights=None, ema=False):
    from tfcovseg.training.fitting import fit, phase_callbacks

    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    if weights is not None:
        model.set_weights(weights)
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9, use_ema=ema, ema_momentum=0.5)
    model.compile(optimizer=optimizer, loss="mse")
    train = _shuffled()
    callbacks = phase_callbacks(out, "segmentation", 9, resume, inputs=train, log=lambda m: None)
    fit(model, tf.distribute.get_strategy(), train, _shuffled(8), epochs, [*callbacks, *extra], 0)
    return model


@pytest.mark.parametrize("ema", [False, True], ids=["raw", "weights-average"])
def test_a_resumed_fit_sees_the_batches_of_the_unkilled_one(tmp_path, ema):
    """The resumed epochs saw the batches of the run's first epoch again: the dataset's
    shuffles and random draws restarted with the process. With a weights average
    (``train.ema_momentum``) the backup holds the average in the model: the resumed steps
    must go on from the raw weights."""
    start = _fit_sgd(tmp_path / "probe", 0, False).get_weights()
    unkilled = _fit_sgd(tmp_path / "unkilled", 4, False, weights=start, ema=ema)
    with pytest.raises(KeyboardInterrupt):
        _fit_sgd(tmp_path / "killed", 4, False, [_KilledAfter(1)], weights=start, ema=ema)
    resumed = _fit_sgd(tmp_path / "killed", 4, True, weights=start, ema=ema)
    # Last weights: neither run stopped early, and the best epoch may differ from the last.
    for got, want in zip(resumed.get_weights(), unkilled.get_weights()):
        np.testing.assert_array_equal(got, want)
