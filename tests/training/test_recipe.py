"""The segmentation recipe the trainer and the COVID-SemiSeg benchmark share."""

from __future__ import annotations

import types

import keras
import numpy as np
import pytest

from tests.conftest import tiny_config
from tfcovseg.configs.experiment import ConfigError, ExperimentConfig, TrainConfig
from tfcovseg.training.losses import HybridLoss
from tfcovseg.training.recipe import (
    EMAWeights,
    EpochLine,
    build_segmenter,
    compile_segmenter,
    early_stopping,
    keras_verbose,
    learning_rate,
    segmentation_objective,
)


def _experiment(**train) -> ExperimentConfig:
    model = tiny_config(input_size=(32, 32), class_names=("ggo", "consolidation"))
    return ExperimentConfig(model=model, train=TrainConfig(**train))


def test_the_objective_follows_the_train_config():
    config = _experiment(loss="bce", coarse_loss_weight=0.25, positive_weights=(1.0, 5.0))
    losses, weights, metrics = segmentation_objective(config, ("coarse", "final"))
    assert weights == {"coarse": 0.25, "final": 1.0}
    assert all(isinstance(loss, HybridLoss) for loss in losses.values())
    assert losses["final"].terms == ("bce",) and losses["final"].positive_weights == (1.0, 5.0)
    names = [m.name for m in metrics["final"]]
    assert "dice_ggo" in names and "dice_consolidation" in names
    # The U-Net baselines have no coarse output: the loss is on "final" alone.
    losses, weights, _ = segmentation_objective(config, ("final",))
    assert set(losses) == set(weights) == {"final"}


def test_build_segmenter_compiles_and_starts_from_a_teacher():
    config = _experiment(learning_rate=0.02, jit_compile=False)
    keras.utils.set_random_seed(1)
    teacher = build_segmenter(config)
    assert float(teacher.optimizer.learning_rate) == np.float32(0.02)
    assert set(teacher.loss) == {"coarse", "final"} and teacher.jit_compile is False
    student = build_segmenter(config, init=teacher)
    for a, b in zip(teacher.get_weights(), student.get_weights()):
        np.testing.assert_array_equal(a, b)
    fresh = build_segmenter(config)
    assert any(not np.array_equal(a, b) for a, b in zip(teacher.get_weights(), fresh.get_weights()))
    # An objective of one's own (the trainer's classifier head rides along this way).
    compile_segmenter(config, fresh, ({"final": "mse"}, {"final": 2.0}, {}))
    assert fresh.loss == {"final": "mse"}


def test_a_cosine_schedule_falls_from_the_rate_to_one_percent_over_the_epochs():
    config = _experiment(learning_rate=0.01, lr_schedule="cosine", epochs=4)
    schedule = learning_rate(config, steps_per_epoch=5)
    rates = [float(schedule(step)) for step in (0, 10, 20, 30)]
    np.testing.assert_allclose(rates, [0.01, 0.01 * (0.01 + 0.99 * 0.5), 1e-4, 1e-4], rtol=1e-5)
    # A phase of its own length (self-training's students).
    assert float(learning_rate(config, 5, epochs=2)(10)) == np.float32(1e-4)
    model = build_segmenter(config, steps_per_epoch=5)
    assert float(model.optimizer.learning_rate) == np.float32(0.01)  # at iteration 0
    model.optimizer.iterations.assign(20)  # the optimiser steps the schedule
    np.testing.assert_allclose(float(model.optimizer.learning_rate), 1e-4, rtol=1e-5)
    # Constant: the number itself, no steps needed; a schedule without them is refused.
    assert learning_rate(_experiment(learning_rate=0.02)) == 0.02
    with pytest.raises(ValueError, match="steps per epoch"):
        learning_rate(config)
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        _experiment(lr_schedule="linear")


class _SeenAtEpochEnd(keras.callbacks.Callback):
    """What a callback after `EMAWeights` sees: the weights and their validation loss."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.seen = x, y, []

    def on_epoch_end(self, epoch, logs=None):
        weights = [w.copy() for w in self.model.get_weights()]
        self.seen.append(
            (logs["val_loss"], self.model.evaluate(self.x, self.y, verbose=0), weights)
        )


def _fit_with_average(callbacks, epochs=3):
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(32, 2)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=0.5), loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=epochs, validation_data=(x, y),
                        shuffle=False, verbose=0, callbacks=callbacks(x, y))  # fmt: skip
    return model, history.history


def test_the_weights_average_is_validated_and_seen_but_the_steps_go_on_from_the_raw_weights():
    seen = []

    def with_average(x, y):
        seen.append(_SeenAtEpochEnd(x, y))
        return [EMAWeights(), seen[-1]]

    _, history = _fit_with_average(with_average)
    # Later callbacks (checkpoint, early stopping, backup) see the weights validated.
    for logged, evaluated, _ in seen[0].seen:
        np.testing.assert_allclose(evaluated, logged, rtol=1e-5)
    # The steps are the plain fit's (the raw weights go on), not steps from the average.
    _, plain = _fit_with_average(lambda x, y: [])
    np.testing.assert_allclose(history["loss"], plain["loss"], rtol=1e-4)
    assert not np.allclose(history["val_loss"], plain["val_loss"], rtol=1e-3)
    # Under mixed precision the optimiser Keras wraps keeps the average.
    wrapped = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(use_ema=True))
    callback = EMAWeights()
    callback.set_model(types.SimpleNamespace(optimizer=wrapped))
    callback.on_train_begin()
    assert callback._on
    # Without an average in the optimiser the callback does nothing.
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=1, verbose=0, callbacks=[EMAWeights()],
              validation_data=(np.zeros((4, 2)), np.zeros((4, 1))))  # fmt: skip


def test_the_recipe_keeps_a_weights_average_only_when_asked():
    assert not build_segmenter(_experiment()).optimizer.use_ema
    optimizer = build_segmenter(_experiment(ema_momentum=0.9)).optimizer
    assert optimizer.use_ema and optimizer.ema_momentum == pytest.approx(0.9)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="train.ema_momentum must be in"):
            _experiment(ema_momentum=bad)


def test_early_stopping_restores_the_best_epoch():
    stop = early_stopping(3)
    assert stop.patience == 3 and stop.monitor == "val_loss" and stop.restore_best_weights


def _dense():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    return model, [w.copy() for w in model.get_weights()]


def _epochs(stop, model, first, losses):
    stop.set_model(model)
    model.stop_training = False
    stop.on_train_begin()
    for epoch, loss in enumerate(losses, first):
        stop.on_epoch_begin(epoch)
        model.set_weights([w + epoch for w in model.get_weights()])  # this epoch's weights
        stop.on_epoch_end(epoch, {"val_loss": loss})
        if model.stop_training:
            break
    stop.on_train_end()
    return epoch


def test_early_stopping_counts_on_across_a_resume(tmp_path):
    """A resumed phase's EarlyStopping started afresh: it counted its patience from the
    resume and took the first resumed epoch for the best, whose weights it restored."""
    model, start = _dense()
    best_file = tmp_path / "best.keras"
    model.save(best_file)  # the checkpoint of epoch 1, the best before the kill
    logged = {0: 1.0, 1: 0.5, 2: 0.7}
    # Resumed at epoch 3 of an unkilled run with patience 2: epoch 1 is still the best,
    # epoch 2 was one without a better loss, so epoch 3 (0.8) is the second: it stops.
    stop = early_stopping(2, logged, best_file)
    assert _epochs(stop, model, 3, [0.8, 0.6, 0.9]) == 3
    assert stop.best == 0.5 and stop.best_epoch == 1 and stop.stopped_epoch == 3
    for got, want in zip(model.get_weights(), start):  # the best epoch's, from its file
        np.testing.assert_array_equal(got, want)
    # A better epoch after the resume is the best, restored from memory as Keras does.
    model, _ = _dense()
    stop = early_stopping(2, logged, best_file)
    assert _epochs(stop, model, 3, [0.4, 0.6, 0.9]) == 5
    assert stop.best_epoch == 3 and stop.best == 0.4
    np.testing.assert_array_equal(model.get_weights()[1], start[1] + 3)
    # Without a history: Keras' rule (the first epoch is the best so far).
    model, _ = _dense()
    stop = early_stopping(1)
    assert _epochs(stop, model, 0, [1.0, 1.2, 0.5]) == 1 and stop.best_epoch == 0
    # Killed after the last epoch's backup: the resumed fit runs no epoch and ended with
    # the backup's last weights (with a weights average: whatever Keras' finalize copied).
    model, _ = _dense()
    model.set_weights([w + 9 for w in model.get_weights()])
    stop = early_stopping(2, logged, best_file)
    stop.set_model(model)
    stop.on_train_begin()
    stop.on_train_end()
    for got, want in zip(model.get_weights(), start):
        np.testing.assert_array_equal(got, want)


def test_epoch_line_is_one_short_line_per_epoch_without_terminal_codes(capsys):
    logs = {"loss": 1.93214, "val_loss": 1.9712, "final_dice_ggo": 0.5, "coarse_loss": 0.9}
    logs |= {f"val_final_dice_{c}": v for c, v in (("ggo", 0.543), ("consolidation", 0.0))}
    logs |= {"val_coarse_dice_ggo": 0.2, "val_final_iou_ggo": 0.3}
    assert EpochLine.describe(logs) == (
        "loss 1.9321, val_loss 1.9712, val Dice ggo 0.543 consolidation 0.000"
    )
    assert EpochLine.describe({"loss": 0.5, "val_auc": 0.91, "val_patient_accuracy": 1}) == (
        "loss 0.5000, val AUC 0.910, val patient accuracy 1.000"
    )
    # A validation split of one kind of slice has no AUC (`SliceAUC` is NaN), not 0.000.
    assert EpochLine.describe({"val_auc": float("nan")}) == "val AUC n/a (one kind of slice)"
    # verbose 2: Keras silent, our line instead; other values leave Keras in charge.
    lines = []
    verbose, callbacks = keras_verbose(2, ["kept"], 3, lines.append)
    assert verbose == 0 and callbacks[0] == "kept" and isinstance(callbacks[1], EpochLine)
    assert keras_verbose("auto", ["kept"], 3) == ("auto", ["kept"])
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((4, 2), "float32")
    model.fit(x, x[:, :1], validation_data=(x, x[:, :1]), epochs=3, verbose=verbose,
              callbacks=callbacks[1:])  # fmt: skip
    assert [line.split(":")[0] for line in lines] == ["  epoch 1/3", "  epoch 2/3", "  epoch 3/3"]
    assert all("val_loss" in line and line.endswith(" s") for line in lines)
    assert "\x1b" not in capsys.readouterr().out + "".join(lines)


def test_epoch_line_says_when_a_phase_stops_early():
    """A classifier phase of "up to 10 epochs" ended after 9 epoch lines, unexplained."""
    lines = []
    line = EpochLine(10, lines.append)
    for epoch, val_loss in enumerate([0.8, 0.7, 0.75, 0.72, 0.71]):
        line.on_epoch_begin(epoch)
        line.on_epoch_end(epoch, {"loss": 0.5, "val_loss": val_loss})
    line.on_train_end()
    assert lines[-1] == (
        "  stopped early after epoch 5 of 10: no better val_loss since epoch 2, "
        "whose weights are kept"
    )
    # All epochs run: nothing more; a resumed phase (epochs before it unseen) names no best.
    done, resumed = [], []
    full, late = EpochLine(2, done.append), EpochLine(10, resumed.append)
    for epoch in range(2):
        full.on_epoch_end(epoch, {"val_loss": 1.0})
    late.on_epoch_end(6, {"val_loss": 1.0})
    full.on_train_end()
    late.on_train_end()
    assert len(done) == 2 and resumed[-1] == "  stopped early after epoch 7 of 10"
