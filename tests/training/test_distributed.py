"""tfcovseg.training.distributed: strategy choice, MirroredStrategy on two logical CPUs, and
`fit_distributed` under the default and the multi-worker strategy.

The multi-device runs are subprocesses: logical devices and the multi-worker strategy must
be set up before TensorFlow starts, which it has long done in the test process. The
subprocesses run `_mirrored_main` / `_worker_main` below (``python -c "from
tests.training.test_distributed import ..."`` from the repository root). All three start together
(fixture `runs`), from initial weights the test process writes, and run while the
in-process training test does; the tests that need their results wait for them.

Reference for the multi-worker run: `model.fit` under MirroredStrategy over two logical
CPUs, from the same initial weights on the same batches. Two workers with one replica each
and AutoShardPolicy.DATA see exactly the per-replica batches of the two local replicas
(worker i keeps the i-th half of each global batch, as replica i does), so the workers'
`fit_distributed` must reproduce Keras' own loop: same per-replica BatchNorm statistics,
same loss weights, same gradient scaling. The optimizer is SGD because Adam's update
barely depends on a constant factor on the gradients and would hide a scaling error.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import TINY_MODEL
from tfcovseg.configs.experiment import load_config
from tfcovseg.models import build_model, load_model
from tfcovseg.training.distributed import (
    choose_strategy,
    fit_distributed,
    is_chief,
    is_multi_worker,
    worker_path,
)
from tfcovseg.training.losses import deep_supervision

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 4
EPOCHS = 2  # the workers resume at epoch 1 from a backup, so each trains one epoch
TIMEOUT_S = 600  # a hang guard: under pytest-xdist the subprocesses share the cores


def _arrays():
    """8 training and 6 validation slices (2 steps; a last validation batch of 2)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1100.0, 300.0, (8, 64, 64, 1)).astype("float32")
    y = (rng.uniform(size=(8, 64, 64, 3)) > 0.8).astype("float32")
    return x, y


def _datasets(shard_data=False):
    x, y = _arrays()
    train = tf.data.Dataset.from_tensor_slices((x, {"coarse": y, "final": y}))
    val = tf.data.Dataset.from_tensor_slices((x[:6], {"coarse": y[:6], "final": y[:6]}))
    train, val = train.batch(GLOBAL_BATCH), val.batch(GLOBAL_BATCH)
    if shard_data:
        options = tf.data.Options()
        policy = tf.data.experimental.AutoShardPolicy.DATA
        options.experimental_distribute.auto_shard_policy = policy
        train, val = train.with_options(options), val.with_options(options)
    return train, val


def _compiled_segmenter(strategy, optimizer="sgd"):
    """The tiny segmenter compiled as tfcovseg.train compiles it, inside the strategy's
    scope, optimizer included (coarse weight 1, final 0.5, so that a loss ignoring the
    weights shows)."""
    config = load_config("quickstart", TINY_MODEL)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(config.model)
        losses, weights = deep_supervision(list(model.output), "hybrid", 1.0, 0.5)
        opt = keras.optimizers.SGD(0.05) if optimizer == "sgd" else keras.optimizers.Adam(1e-3)
        model.compile(optimizer=opt, loss=losses, loss_weights=weights, jit_compile=False)
    return model


def _reference_loss(model, x, y):
    """The compiled loss of tfcovseg.train (weights 1 and 0.5) over all of x at once,
    eagerly from the loss objects: the size-weighted mean of any batching of x."""
    losses, weights = deep_supervision(list(model.output), "hybrid", 1.0, 0.5)
    pred = model(x, training=False)  # outside any strategy scope: no replica scaling
    return float(sum(weights[k] * losses[k](y, pred[k]) for k in losses))


def _save_weights(path, weights):
    np.savez(path, *weights)


def _load_weights(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


# ---- subprocess entry points ----------------------------------------------------------


def _mirrored_main(out):
    """model.fit under MirroredStrategy over 2 logical CPUs: the reference run."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    out = Path(out)
    strategy = choose_strategy("mirrored")
    model = _compiled_segmenter(strategy)
    model.set_weights(_load_weights(out / "initial.npz"))
    train, val = _datasets()
    history = model.fit(train, epochs=1, verbose=0, shuffle=False)
    _save_weights(out / "fitted.npz", model.get_weights())
    # Each replica keeps its own BatchNorm moving statistics; fit_distributed gives all of
    # them replica 0's (the saved ones) after each epoch. Do the same before evaluating.
    model.set_weights(model.get_weights())
    x, y = _arrays()
    val_loss = _reference_loss(model, x[:6], y[:6])
    result = {
        "replicas": strategy.num_replicas_in_sync,
        "devices": list(strategy.extended.worker_devices),
        "history": history.history,
        "steps": int(model.optimizer.iterations.numpy()),
        "val_loss": float(val_loss),
    }
    (out / "mirrored.json").write_text(json.dumps(result))


def _worker_main(out, index):
    """One worker of two: resume from the chief's backup at epoch 1, train one epoch."""
    strategy = choose_strategy()  # first: MultiWorkerMirroredStrategy from TF_CONFIG
    out = Path(out)
    run = out / "run"
    temp_root = out / f"worker{index}_tmp"
    model = _compiled_segmenter(strategy)
    initial = _load_weights(out / "initial.npz")
    backup = run / "backup"
    if is_chief(strategy):
        # A backup of "epoch 0 finished with the reference's initial weights", as
        # BackupAndRestore writes it. Only the chief's folder has it.
        backup.mkdir(parents=True)
        model.set_weights(initial)
        model.save_weights(backup / "latest.weights.h5")
        (backup / "training_metadata.json").write_text(json.dumps({"epoch": 1, "batch": 0}))
        start = [w * 0.5 for w in initial]
    else:
        start = [w + 0.01 for w in initial]
    # Each worker now holds other weights (a local assignment): only the chief's restore,
    # broadcast by fit_distributed, makes them start alike.
    model.set_weights(start)
    paths = {
        "best": worker_path(run / "segmenter_best.keras", strategy, temp_root),
        "csv": worker_path(run / "logs" / "segmentation.csv", strategy, temp_root),
        "tensorboard": worker_path(run / "logs" / "tensorboard", strategy, temp_root),
        "backup": worker_path(backup, strategy, temp_root),
    }
    paths["csv"].parent.mkdir(parents=True, exist_ok=True)
    callbacks = [
        keras.callbacks.BackupAndRestore(str(paths["backup"])),
        keras.callbacks.ModelCheckpoint(
            str(paths["best"]), monitor="val_loss", save_best_only=True
        ),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True),
        keras.callbacks.CSVLogger(str(paths["csv"])),
        keras.callbacks.TensorBoard(str(paths["tensorboard"]), write_graph=False),
    ]
    train, val = _datasets(shard_data=True)
    history = fit_distributed(
        model, strategy, train, EPOCHS, validation_data=val, callbacks=callbacks
    )
    _save_weights(out / f"worker{index}.npz", model.get_weights())
    result = {
        "chief": is_chief(strategy),
        "multi_worker": is_multi_worker(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "epochs": history.epoch,
        "history": history.history,
        "steps": int(model.optimizer.iterations.numpy()),
        "paths": {k: str(v) for k, v in paths.items()},
        "exists": {k: Path(v).exists() for k, v in paths.items()},
    }
    (out / f"worker{index}.json").write_text(json.dumps(result))


def _python(code, log, env_extra=None):
    """Starts ``python -c code`` in the repository root, output (both streams) to `log`."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        )
    proc.log = Path(log)
    return proc


def _finish(procs, timeout=TIMEOUT_S):
    """Waits for the processes; when one fails or time runs out, kills the others (a worker
    would wait for a dead peer) and fails the test with their output."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    timed_out = any(p.poll() is None for p in procs)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    bad = [p for p in procs if p.returncode != 0]
    if bad:
        what = f"timed out after {timeout} s" if timed_out else "failed"
        pytest.fail(
            f"subprocess {what}:\n"
            + "\n----\n".join(
                f"{p.log.name}: rc {p.returncode}\n{p.log.read_text(errors='replace')[-3000:]}"
                for p in bad
            )
        )


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# ---- tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the MirroredStrategy reference and the two workers; yields (folder, procs)."""
    out = tmp_path_factory.mktemp("distributed")
    keras.utils.set_random_seed(0)
    config = load_config("quickstart", TINY_MODEL)
    _save_weights(out / "initial.npz", build_model(config.model).get_weights())
    procs = {
        "mirrored": _python(
            f"from {__name__} import _mirrored_main; _mirrored_main({str(out)!r})",
            out / "mirrored.log",
        )
    }
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        code = f"from {__name__} import _worker_main; _worker_main({str(out)!r}, {index})"
        env = {"TF_CONFIG": json.dumps(tf_config)}
        procs[f"worker{index}"] = _python(code, out / f"worker{index}.log", env)
    yield out, procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_choose_strategy_kinds(monkeypatch):
    with pytest.raises(ValueError, match="auto, mirrored, multi_worker, default"):
        choose_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    default = choose_strategy("default")
    assert default is tf.distribute.get_strategy() and default.num_replicas_in_sync == 1
    assert not is_multi_worker(default) and is_chief(default)
    assert choose_strategy("auto") is tf.distribute.get_strategy()  # one CPU, no cluster
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        choose_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    for kind in ("multi_worker", "auto"):
        with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
            choose_strategy(kind)
    # A "cluster" of one worker is no multi-worker run.
    one = {"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(one))
    assert choose_strategy("auto") is tf.distribute.get_strategy()


class _FakeStrategy:
    def __init__(self, jobs, task_type, task_id):
        self.cluster_resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(jobs), task_type=task_type, task_id=task_id
        )


def test_chief_and_worker_paths(tmp_path):
    workers = {"worker": ["a:1", "b:1", "c:1"]}
    with_chief = {"chief": ["a:1"], "worker": ["b:1", "c:1"]}
    assert is_chief(_FakeStrategy(workers, "worker", 0))
    assert not is_chief(_FakeStrategy(workers, "worker", 2))
    assert is_chief(_FakeStrategy(with_chief, "chief", 0))
    assert not is_chief(_FakeStrategy(with_chief, "worker", 0))
    assert is_multi_worker(_FakeStrategy(workers, "worker", 1))
    assert not is_multi_worker(_FakeStrategy({"worker": ["a:1"]}, "worker", 0))

    chief, other = _FakeStrategy(workers, "worker", 0), _FakeStrategy(workers, "worker", 1)
    run = tmp_path / "run"
    assert worker_path(run / "best.keras", chief) == run / "best.keras"
    assert worker_path(str(run), chief) == str(run)
    temp = tmp_path / "tmp1"
    backup = worker_path(run / "backup" / "segmentation", other, temp)
    board = worker_path(run / "logs" / "tensorboard" / "segmentation", other, temp)
    assert isinstance(backup, Path) and isinstance(worker_path(str(run), other, temp), str)
    assert backup != board and temp in backup.parents and temp in board.parents
    assert backup.parent.is_dir() and not backup.exists()
    # Without temp_root: one mkdtemp folder per process, outside the run folder.
    default = worker_path(run / "a.csv", other)
    root = Path(str(default).removesuffix(str(run / "a.csv")))
    try:
        assert root.name.startswith("tfcovseg-worker-1-") and default.parent.is_dir()
        assert worker_path(run / "b.csv", other) == root / (run / "b.csv").relative_to("/")
    finally:
        shutil.rmtree(root)


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs:
            self.model.stop_training = True


@pytest.mark.usefixtures("runs")  # the subprocesses run meanwhile
@pytest.mark.usefixtures("eager")
def test_fit_distributed_default_strategy_callbacks(tmp_path):
    strategy = tf.distribute.get_strategy()
    model = _compiled_segmenter(strategy, "adam")
    train, val = _datasets()
    best = tmp_path / "segmenter_best.keras"
    csv = tmp_path / "logs" / "segmentation.csv"
    csv.parent.mkdir()
    callbacks = [
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
        keras.callbacks.ModelCheckpoint(str(best), monitor="val_loss", save_best_only=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True),
        keras.callbacks.CSVLogger(str(csv)),
        keras.callbacks.TensorBoard(str(tmp_path / "tb"), write_graph=False),
    ]
    history = fit_distributed(model, strategy, train, 2, validation_data=val, callbacks=callbacks)
    assert history.epoch == [0, 1] and set(history.history) == {"loss", "val_loss"}
    assert all(np.isfinite(v) for vs in history.history.values() for v in vs)
    assert int(model.optimizer.iterations.numpy()) == 4  # 2 steps x 2 epochs
    rows = csv.read_text().splitlines()
    assert rows[0] == "epoch,loss,val_loss" and len(rows) == 3
    assert not (tmp_path / "backup").exists()  # deleted on train end, as in fit
    assert list((tmp_path / "tb").glob("train/events.out.tfevents.*"))
    assert list((tmp_path / "tb").glob("validation/events.out.tfevents.*"))

    # val_loss is the compiled loss (weights 1 and 0.5) over the whole validation set
    # (batches of 4 and 2, weighted by size), and the model ends with the best epoch's
    # weights (restore_best_weights), which is also what the checkpoint holds.
    best_val = min(history.history["val_loss"])
    x, y = _arrays()
    assert _reference_loss(model, x[:6], y[:6]) == pytest.approx(best_val, rel=1e-5)
    for a, b in zip(load_model(best).get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted")


def test_fit_distributed_resume_stop_and_steps(tmp_path):
    """BackupAndRestore resumes, stop_training stops, initial_epoch and steps_per_epoch
    (one iterator across epochs) count as in fit; a small dense model keeps it quick."""
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x = np.arange(24, dtype="float32").reshape(8, 3) / 24.0
    data = tf.data.Dataset.from_tensor_slices((x, x.sum(1, keepdims=True))).batch(2)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        fit_distributed(model, strategy, data, 5, callbacks=[backup, _Interrupt()])
    assert int(model.optimizer.iterations.numpy()) == 8  # epochs 0 and 1, 4 steps each
    resumed = fit_distributed(model, strategy, data, 5, callbacks=[backup])
    assert resumed.epoch == [2, 3, 4] and len(resumed.history["loss"]) == 3
    assert int(model.optimizer.iterations.numpy()) == 20

    stopped = fit_distributed(model, strategy, data, 9, callbacks=[_StopAfter(3)], initial_epoch=1)
    assert stopped.epoch == [1, 2] and "val_loss" not in stopped.history

    # 3 steps per epoch from a repeated dataset: 6 batches over 2 epochs, not 3 + 3 from
    # two fresh passes (checked through the batches' targets).
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(logs["loss"])
    )
    ordered = tf.data.Dataset.range(4).map(
        lambda i: (tf.fill((1, 3), 0.0), tf.fill((1, 1), tf.cast(i, tf.float32)))
    )
    with strategy.scope():
        zero = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(1, trainable=False, kernel_initializer="zeros")]
        )
        zero.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    fit_distributed(zero, strategy, ordered.repeat(), 2, callbacks=[record], steps_per_epoch=3)
    # Running means of the squared targets 0, 1, 4 | 9, 0, 1 (the iterator went on).
    np.testing.assert_allclose(seen, [0.0, 0.5, 5 / 3, 9.0, 4.5, 10 / 3], rtol=1e-6)


def test_mirrored_strategy_on_two_logical_cpus(runs):
    out, procs = runs
    _finish([procs["mirrored"]])
    result = json.loads((out / "mirrored.json").read_text())
    assert result["replicas"] == 2 and len(result["devices"]) == 2
    assert all("CPU" in d for d in result["devices"])
    assert result["steps"] == 2  # 8 slices in global batches of 4
    assert set(result["history"]) == {"loss", "coarse_loss", "final_loss"}
    (loss,) = result["history"]["loss"]
    assert np.isfinite(loss)
    initial, fitted = _load_weights(out / "initial.npz"), _load_weights(out / "fitted.npz")
    assert any(not np.allclose(a, b) for a, b in zip(initial, fitted))


def test_multi_worker_fit_distributed(runs):
    out, procs = runs
    _finish([procs["worker0"], procs["worker1"], procs["mirrored"]])
    expected = json.loads((out / "mirrored.json").read_text())
    results = [json.loads((out / f"worker{i}.json").read_text()) for i in range(2)]
    assert [r["chief"] for r in results] == [True, False]
    for r in results:
        assert r["multi_worker"] and r["replicas"] == 2
        # Resumed from the chief's backup at epoch 1 (the other worker had none): one
        # epoch of 2 steps, with loss and val_loss agreed over both workers.
        assert r["epochs"] == [1] and r["steps"] == 2
        assert set(r["history"]) == {"loss", "val_loss"}
    assert results[0]["history"] == results[1]["history"]
    # The same numbers as Keras' own loop on the same per-replica batches.
    assert results[0]["history"]["loss"][0] == pytest.approx(
        expected["history"]["loss"][0], rel=1e-5
    )
    assert results[0]["history"]["val_loss"][0] == pytest.approx(expected["val_loss"], rel=1e-5)

    initial = _load_weights(out / "initial.npz")
    fitted = _load_weights(out / "fitted.npz")
    w0, w1 = _load_weights(out / "worker0.npz"), _load_weights(out / "worker1.npz")
    assert any(not np.allclose(a, b) for a, b in zip(initial, w0))
    for a, b in zip(w0, w1):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(w0, fitted):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    # Files: the chief wrote the run folder, the other worker its temporary folder.
    run = out / "run"
    chief_paths, other_paths = results[0]["paths"], results[1]["paths"]
    assert chief_paths["best"] == str(run / "segmenter_best.keras")
    assert chief_paths["csv"] == str(run / "logs" / "segmentation.csv")
    for key in ("best", "csv", "tensorboard"):
        assert Path(other_paths[key]).is_relative_to(out / "worker1_tmp"), key
        assert results[0]["exists"][key] and results[1]["exists"][key], key
    assert not results[0]["exists"]["backup"]  # deleted at the end of training
    rows = (run / "logs" / "segmentation.csv").read_text().splitlines()
    assert rows[0] == "epoch,loss,val_loss" and len(rows) == 2 and rows[1].startswith("1,")
    checkpoint = load_model(run / "segmenter_best.keras")
    for a, b in zip(checkpoint.get_weights(), w0):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    written = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert [p for p in written if not p.startswith("logs/tensorboard/")] == [
        "logs/segmentation.csv",
        "segmenter_best.keras",
    ]


def test_optimizer_made_outside_the_scope_is_refused():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    optimizer = keras.optimizers.SGD(0.1)  # outside the scope: plain variables
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=optimizer, loss="mse")
    data = tf.data.Dataset.from_tensor_slices((np.ones((4, 3), "float32"), np.ones((4, 1)))).batch(
        2
    )
    with pytest.raises(ValueError, match="outside strategy.scope"):
        fit_distributed(model, strategy, data, 1)
    assert int(model.optimizer.iterations.numpy()) == 0
