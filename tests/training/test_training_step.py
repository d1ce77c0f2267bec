"""The segmenter trains with the hybrid loss on both outputs and reports per-class metrics."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.conftest import tiny_config
from tfcovseg.evaluation.metrics import segmentation_metrics
from tfcovseg.models import build_model
from tfcovseg.training.losses import deep_supervision


def _lesion_batch(rng, n=4):
    """Lung-like slices with a bright disc (GGO channel) on half of them."""
    x = rng.normal(-850.0, 30.0, (n, 64, 64, 1)).astype("float32")
    y = np.zeros((n, 64, 64, 3), "float32")
    yy, xx = np.mgrid[:64, :64]
    for i in range(0, n, 2):
        disc = (yy - 20 - 4 * i) ** 2 + (xx - 30) ** 2 < 100
        x[i, disc, 0] = -450.0
        y[i, disc, 0] = 1.0
    return x, y


@pytest.mark.usefixtures("eager")
@pytest.mark.parametrize("loss", ["hybrid", "bce"])
def test_fit_reduces_the_deep_supervision_loss(loss, rng):
    cfg = tiny_config()
    model = build_model(cfg)
    losses, weights = deep_supervision(list(model.output), loss, 1.0, 1.0)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=losses,
        loss_weights=weights,
        metrics={"final": segmentation_metrics(cfg.class_names)},
    )
    x, y = _lesion_batch(rng)
    targets = {"coarse": y, "final": y}
    history = model.fit(x, targets, epochs=12, batch_size=4, verbose=0).history
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    assert history["loss"][-1] == pytest.approx(
        history["coarse_loss"][-1] + history["final_loss"][-1], rel=1e-4
    )
    for name in ("dice", "iou", "precision", "recall", "slice_dice"):
        for cls in cfg.class_names:
            assert f"final_{name}_{cls}" in history


@pytest.mark.usefixtures("eager")
def test_mixed_precision_training_step_is_finite(rng):
    keras.config.set_dtype_policy("mixed_float16")
    model = build_model(tiny_config())
    losses, weights = deep_supervision(list(model.output))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=losses, loss_weights=weights)
    x, y = _lesion_batch(rng)
    before = [w.copy() for w in model.get_weights()]
    logs = model.train_on_batch(x, {"coarse": y, "final": y}, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values())
    assert all(np.isfinite(w).all() for w in model.get_weights())
    changed = sum(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    # The first step of dynamic loss scaling may skip the update on overflow; a second
    # step must then apply it.
    if changed == 0:
        model.train_on_batch(x, {"coarse": y, "final": y})
        changed = sum(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert changed > 0


def test_the_training_loop_traces_the_train_step_once(rng):
    """`tfcovseg.train` builds the loss, metric and optimizer state before `fit`: left to
    the first trace (Keras 3.15's `fit` under the default strategy), they make TensorFlow
    trace the whole step a second time (this test saw 2 traces before)."""
    import tensorflow as tf

    from tfcovseg.training.fitting import fit

    inputs = keras.Input((16, 16, 1))
    out = keras.layers.Conv2D(3, 3, padding="same", activation="sigmoid", name="final")(inputs)
    model = keras.Model(inputs, out)
    model.compile(optimizer="adam", loss="binary_crossentropy",
                  metrics=segmentation_metrics(("a", "b", "c")))  # fmt: skip
    traces = []
    step = model.train_step
    model.train_step = lambda data: traces.append(1) or step(data)
    x = rng.random((4, 16, 16, 1), dtype="float32")
    ds = tf.data.Dataset.from_tensor_slices((x, (x > 0.5).repeat(3, -1).astype("float32")))
    ds = ds.batch(2)
    history = fit(model, tf.distribute.get_strategy(), ds, ds, 2, [], verbose=0)
    assert len(traces) == 1
    assert np.isfinite(history.history["val_loss"]).all()
