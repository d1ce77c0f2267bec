"""An experiment's segmentation recipe on any Keras backend: the network its config builds,
the loss, optimiser and metrics it compiles with, how a fit stops early and what it prints.

`tfcovseg.training.trainer` (records through tf.data, tf.distribute, a run folder) and the
COVID-SemiSeg benchmark (slices in memory, any backend: `tfcovseg.benchmarks.semiseg`) both
train through these, so one experiment config is one recipe in both.
"""

from __future__ import annotations

import math
import os
import time

import keras

from tfcovseg.evaluation.metrics import segmentation_metrics
from tfcovseg.models import build_model
from tfcovseg.training.losses import deep_supervision


def segmentation_objective(config, outputs) -> tuple[dict, dict, dict]:
    """(losses, loss weights, metrics) of an experiment's segmentation phase on a
    segmenter's `outputs` (their names): deep supervision with ``train.loss`` and its
    weights; Dice, IoU, precision and recall per class on "final"."""
    t = config.train
    losses, weights = deep_supervision(
        list(outputs), t.loss, t.coarse_loss_weight, t.final_loss_weight, t.positive_weights
    )
    return losses, weights, {"final": segmentation_metrics(config.model.class_names)}


# A cosine schedule ends at this fraction of its peak rate: small steps, not none.
LR_FLOOR = 0.01


def learning_rate(config, steps_per_epoch=None, epochs=None):
    """The segmentation optimiser's rate under ``train.lr_schedule``: the constant
    ``train.learning_rate``, or a cosine from it to `LR_FLOOR` of it over `epochs`
    (default ``train.epochs``) of `steps_per_epoch` steps. Keras steps the schedule by
    the optimiser's iterations, which a resumed run restores with the optimiser."""
    t = config.train
    if t.lr_schedule == "constant":
        return t.learning_rate
    if not steps_per_epoch or steps_per_epoch < 1:
        raise ValueError(f"train.lr_schedule {t.lr_schedule!r} needs the number of steps per epoch")
    steps = int(steps_per_epoch) * int(epochs or t.epochs)
    return keras.optimizers.schedules.CosineDecay(t.learning_rate, steps, alpha=LR_FLOOR)


def jit_compile(config) -> bool:
    """Whether `compile_segmenter` compiles the steps with XLA: ``train.jit_compile``, and
    always under JAX, where Keras' jit_compile=False runs a step op by op (a debugging
    mode)."""
    return bool(config.train.jit_compile) or keras.backend.backend() == "jax"


def compile_segmenter(config, model, objective=None, steps_per_epoch=None, epochs=None):
    """Compiles `model` with Adam (`learning_rate`: ``train.learning_rate`` under
    ``train.lr_schedule``, which needs `steps_per_epoch` unless constant; keeping a moving
    average of the weights with ``train.ema_momentum``, which `EMAWeights` swaps in),
    ``train.jit_compile`` (always under JAX) and `objective` (default:
    `segmentation_objective` on the model's outputs)."""
    losses, weights, metrics = objective or segmentation_objective(config, model.output)
    jit = jit_compile(config)
    ema = config.train.ema_momentum
    model.compile(
        optimizer=keras.optimizers.Adam(
            learning_rate(config, steps_per_epoch, epochs),
            use_ema=ema > 0,
            ema_momentum=ema or 0.99,
        ),
        loss=losses,
        loss_weights=weights,
        metrics=metrics,
        jit_compile=jit,
    )


def build_segmenter(config, init=None, steps_per_epoch=None, epochs=None, compile=True):
    """The segmenter of ``config.model``, compiled (`compile_segmenter`, where
    `steps_per_epoch` and `epochs` are the fit's, for a learning-rate schedule) unless
    `compile` is False; starting from `init`'s weights (a model of the same config) when
    given, else from scratch."""
    model = build_model(config.model)
    if init is not None:
        model.set_weights(init.get_weights())
    if compile:
        compile_segmenter(config, model, steps_per_epoch=steps_per_epoch, epochs=epochs)
    return model


class EMAWeights(keras.callbacks.SwapEMAWeights):
    """The optimiser's moving average of the weights (``train.ema_momentum``) in the model
    from each epoch's validation to the next epoch's first step: the validation loss, the
    best checkpoint, early stopping's best weights and a backup all hold the averaged
    weights; the steps go on from the raw ones. Does nothing for an optimiser that keeps
    no average. Comes before every other callback of a fit, so they see the average.

    A backup taken at an epoch's end (`AtomicBackupAndRestore`) holds the averaged weights
    in the model and the raw ones in the optimiser's average: a resumed fit swaps them
    back before its first step, as the unkilled run did."""

    def __init__(self):
        super().__init__(swap_on_epoch=True)
        self._on, self._first = False, True

    def on_train_begin(self, logs=None):
        optimizer = getattr(self.model, "optimizer", None)
        # Under mixed precision Keras wraps the optimiser (LossScaleOptimizer).
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        self._on = bool(getattr(optimizer, "use_ema", False))
        self._first, self._ema_weights_in_model = True, False

    def on_epoch_begin(self, epoch, logs=None):
        if self._on:
            if self._first and epoch > 0:  # resumed from an epoch's end: the average is in
                self._ema_weights_in_model = True
            self._first = False
            super().on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self._on:
            super().on_epoch_end(epoch, logs)

    def on_test_begin(self, logs=None):
        if self._on:
            super().on_test_begin(logs)

    def on_test_end(self, logs=None):
        if self._on:
            super().on_test_end(logs)

    # No swap around `predict`: no fit of ours predicts with its callbacks (and Keras
    # 3.15's on_predict_end leaves the average in the model).
    def on_predict_begin(self, logs=None):
        pass

    def on_predict_end(self, logs=None):
        pass


def early_stopping(patience: int, history=None, best_file=None, target=None):
    """Stops after `patience` epochs without a lower validation loss and restores the best
    epoch's weights (the paper's criterion, in every phase). For a resumed phase,
    `history` ({epoch: val_loss} the run logged before) and `best_file` (its best
    checkpoint, holding `target` or the model being fit): `ResumedEarlyStopping`."""
    return ResumedEarlyStopping(patience, history, best_file, target)


class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
    """`EarlyStopping` on ``val_loss`` that goes on counting across a resume.

    Keras' callback starts afresh in every `fit`: a resumed phase counted its patience
    from the resume, took the first resumed epoch for the best so far and, stopping,
    restored that epoch's weights rather than the best. Here the epochs logged before the
    first epoch this `fit` runs set the best value, its epoch and the wait as the unkilled
    run had them; when a phase ends with its best among those epochs, the weights come
    from the best checkpoint (`best_file`).
    """

    def __init__(self, patience: int, history=None, best_file=None, target=None):
        super().__init__(monitor="val_loss", patience=patience, restore_best_weights=True)
        self._history = {int(e): float(v) for e, v in (history or {}).items()}
        self._best_file, self._target = best_file, target
        self._started = False

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._started = False

    def on_epoch_begin(self, epoch, logs=None):
        if self._started:
            return
        self._started = True  # `epoch` is where this fit starts (BackupAndRestore's)
        before = {e: v for e, v in self._history.items() if e < epoch}
        if before:
            self.best_epoch = min(before, key=lambda e: (before[e], e))
            self.best = before[self.best_epoch]
            self.wait = epoch - 1 - self.best_epoch

    def on_epoch_end(self, epoch, logs=None):
        current = self.get_monitor_value(logs)
        if current is None:
            return
        self.wait += 1
        if self.best is None or current < self.best:
            self.best, self.best_epoch, self.wait = current, epoch, 0
            self.best_weights = self.model.get_weights()
        elif self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
            return
        # The best epoch was before the resume: its weights are in the checkpoint. Also
        # when the resumed fit ran no epoch (the kill came after the last one): the model
        # then holds the backup's last epoch, or, with a weights average, whatever Keras'
        # finalize_variable_values copied from it.
        before = self.best is not None or (not self._started and self._history)
        if before and self._best_file and os.path.isfile(self._best_file):
            (self._target or self.model).load_weights(self._best_file)


class EpochLine(keras.callbacks.Callback):
    """One short line per epoch for a person or a log file: no progress bar, no ANSI codes.

    ``epoch 3/16: loss 1.932, val_loss 1.971, val Dice ggo 0.543 consolidation 0.000
    fibrosis 0.000, 81 s``: the losses, the validation Dice per class of the final output
    (or the classifier's validation AUC and patient accuracy) and the epoch's time. The
    whole metric set goes to the CSV log and TensorBoard.

    Args:
        epochs: The phase's maximum epochs (shown as the denominator).
        log: Where lines go (default `print`).
        prefix: What starts each line (the indent; a benchmark adds the model's name).
    """

    def __init__(self, epochs, log=print, prefix="  "):
        super().__init__()
        self.epochs = int(epochs)
        self.log = log
        self.prefix = prefix
        self._start = None
        self._val_losses = {}  # epoch (1-based) -> val_loss, as seen by this process

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    @staticmethod
    def describe(logs: dict) -> str:
        parts = [f"{k} {float(logs[k]):.4f}" for k in ("loss", "val_loss") if k in logs]
        final = any(k.startswith("val_final_dice_") for k in logs)
        prefix = "val_final_dice_" if final else "val_dice_"
        dice = [
            f"{k[len(prefix) :]} {float(v):.3f}" for k, v in logs.items() if k.startswith(prefix)
        ]
        if dice:
            parts.append("val Dice " + " ".join(dice))
        for key, name in (
            ("val_auc", "val AUC"),
            ("val_patient_accuracy", "val patient accuracy"),
        ):
            if key in logs:
                value = float(logs[key])
                # `SliceAUC` is NaN on a validation split of one kind of slice.
                shown = "n/a (one kind of slice)" if math.isnan(value) else f"{value:.3f}"
                parts.append(f"{name} {shown}")
        return ", ".join(parts)

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - (self._start or time.perf_counter())
        if logs and "val_loss" in logs:
            self._val_losses[epoch + 1] = float(logs["val_loss"])
        self.log(
            f"{self.prefix}epoch {epoch + 1}/{self.epochs}: "
            f"{self.describe(logs or {})}, {seconds:.0f} s"
        )

    def on_train_end(self, logs=None):
        # A phase that ends before its last epoch has been stopped by EarlyStopping: said,
        # rather than leaving "up to 10 epochs" and 9 epoch lines unexplained.
        last = max(self._val_losses, default=self.epochs)
        if last >= self.epochs:
            return
        line = f"{self.prefix}stopped early after epoch {last} of {self.epochs}"
        if 1 in self._val_losses:  # every epoch seen here (not a resumed phase)
            best = min(self._val_losses, key=self._val_losses.get)
            line += f": no better val_loss since epoch {best}, whose weights are kept"
        self.log(line)


def keras_verbose(verbose, callbacks, epochs, log=print, prefix="  "):
    """(Keras' verbose, callbacks): 2 means one short `EpochLine` per epoch, not Keras'
    line of every metric; "auto"/1 keep Keras' progress bar (a terminal); 0 nothing."""
    if verbose == 2:
        return 0, [*callbacks, EpochLine(epochs, log, prefix)]
    return verbose, callbacks
