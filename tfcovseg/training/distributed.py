"""Training across several GPUs or machines with `tf.distribute`.

- `choose_strategy(kind)`: the `tf.distribute.Strategy` for a run: MultiWorkerMirrored
  when ``TF_CONFIG`` describes a cluster of several workers, Mirrored over the local GPUs
  (or over the logical CPUs when there is no GPU), or the default strategy.
- `fit_distributed(model, strategy, train_ds, ...)`: a custom training loop that stands in
  for `model.fit` where `fit` cannot run. Under `MultiWorkerMirroredStrategy` Keras 3.15 on
  TensorFlow 2.21 fails in `fit` before the first step: `_maybe_symbolic_build` reduces a
  distributed batch and raises "Attempt to convert a value (PerReplica...) to a Tensor"
  (keras-team/keras#20585). The loop drives the same Keras callbacks as `fit`.
- `is_multi_worker`, `is_chief`, `worker_path`: which worker writes files.

Multi-worker runs, in short:

1. Every worker runs the same program with its own ``TF_CONFIG``, e.g. on worker 1 of two
   ``{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker",
   "index": 1}}``. Create the strategy (``choose_strategy()``) at the very start of the
   program, before any other TensorFlow operation: it starts the worker's gRPC server and
   configures the collective ops.
2. Build and `compile` the model inside ``strategy.scope()``; variables created there are
   initialised on worker 0 and broadcast, so every worker starts from the same weights.
3. Batch the datasets with the *global* batch size. `strategy.experimental_distribute_dataset`
   splits each batch into per-replica batches and shards the data between workers following
   the dataset's ``options().experimental_distribute.auto_shard_policy``: FILE (default for
   datasets read from several files; needs at least as many files as workers), DATA (every
   worker reads everything and keeps its share of each batch; the choice for in-memory data
   or few files) or OFF (every worker sees every batch; only for tests).
4. Every worker calls `fit_distributed` with the same epochs and steps, and the same kinds
   of callbacks: the callbacks that write files (ModelCheckpoint, BackupAndRestore,
   CSVLogger, TensorBoard) must run on every worker, since saving may read distributed
   variables (collective ops in which all workers take part), but only the chief may write
   to the real run folder. Give each of them ``worker_path(path, strategy)``: the path
   itself on the chief, a path in a per-worker temporary folder elsewhere, which the
   caller may delete after training.

Research use, not a medical device.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import keras

from tfcovseg import require_tensorflow
from tfcovseg.configs.experiment import STRATEGIES

tf = require_tensorflow("tfcovseg.training.distributed")

__all__ = [
    "STRATEGY_KINDS",
    "build_training_state",
    "choose_strategy",
    "fit_distributed",
    "is_chief",
    "is_multi_worker",
    "tf_config_cluster",
    "worker_path",
]

STRATEGY_KINDS = STRATEGIES  # the values of train.strategy
_WORKER_JOBS = ("chief", "worker")


def tf_config_cluster() -> dict | None:
    """The parsed ``TF_CONFIG`` environment variable, or None when it is unset or empty.

    Raises:
        ValueError: if ``TF_CONFIG`` is not a JSON object with a "cluster" mapping.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {raw[:200]!r}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ValueError(
            'TF_CONFIG must be a JSON object with a "cluster" mapping of job names to '
            f'addresses and a "task" with its type and index, got {raw[:200]!r}'
        )
    return config


def _cluster_workers(cluster: dict) -> int:
    """How many training tasks (chief and workers) a cluster mapping lists."""
    count = 0
    for job in _WORKER_JOBS:
        tasks = cluster.get(job) or []
        count += len(tasks) if isinstance(tasks, (list, tuple, dict)) else 1
    return count


def _mirrored_over_local_devices():
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy()
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=cpus)


def _multi_worker():
    if tf_config_cluster() is None:
        raise ValueError(
            "a multi_worker strategy needs the TF_CONFIG environment variable: a JSON "
            'object such as {"cluster": {"worker": ["host0:port", "host1:port"]}, '
            '"task": {"type": "worker", "index": 0}}, set differently on every worker'
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def choose_strategy(kind: str = "auto"):
    """The `tf.distribute.Strategy` to build and train models under.

    Call it at the start of the program, before other TensorFlow operations: the
    multi-worker strategy must be created before the TensorFlow runtime starts, and
    logical devices must be configured before that too.

    Args:
        kind: "auto": MultiWorkerMirroredStrategy when ``TF_CONFIG`` describes a cluster
            with more than one worker (chief included), else MirroredStrategy when more
            than one logical GPU is visible, else the default strategy.
            "mirrored": MirroredStrategy over all local GPUs or, when there is none, over
            all logical CPU devices (see `tf.config.set_logical_device_configuration`).
            "multi_worker": MultiWorkerMirroredStrategy; ``TF_CONFIG`` must be set.
            "default": the default (single-device) strategy.

    Raises:
        ValueError: for an unknown kind, or a missing or malformed ``TF_CONFIG`` where
            one is needed (a malformed one is an error for "auto" too).
    """
    if kind not in STRATEGY_KINDS:
        raise ValueError(
            f"unknown strategy kind {kind!r}; choose one of {', '.join(STRATEGY_KINDS)}"
        )
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        return _mirrored_over_local_devices()
    if kind == "multi_worker":
        return _multi_worker()
    config = tf_config_cluster()
    if config is not None and _cluster_workers(config["cluster"]) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _task(strategy):
    """(task_type, task_id, cluster jobs) of a multi-worker strategy, else None."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return None
    try:
        jobs = resolver.cluster_spec().as_dict()
    except (AttributeError, ValueError):
        return None
    if _cluster_workers(jobs) <= 1:
        return None
    return resolver.task_type, resolver.task_id, jobs


def is_multi_worker(strategy) -> bool:
    """Whether the strategy spans several worker processes (machines)."""
    return _task(strategy) is not None


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files.

    True for the "chief" task, for worker 0 of a cluster without a chief, and for every
    single-machine strategy.
    """
    task = _task(strategy)
    if task is None:
        return True
    task_type, task_id, jobs = task
    if task_type is None or task_type == "chief":
        return True
    return task_type == "worker" and int(task_id or 0) == 0 and "chief" not in jobs


_TEMP_ROOTS: dict = {}


def worker_path(path, strategy, temp_root=None):
    """Where this worker should write what the chief writes to ``path``.

    On the chief (and on any single-machine strategy) this is ``path`` itself. On other
    workers it is the same absolute path re-rooted in a per-worker temporary folder, so
    different paths stay different (``out/backup/segmentation`` and
    ``out/logs/tensorboard/segmentation`` must not collide) and nothing lands in the run
    folder. The parent folder of the returned path exists.

    Args:
        path: A file or folder path (str or `pathlib.Path`; the result has the same type).
        strategy: The strategy training runs under.
        temp_root: The folder to re-root non-chief paths in; default a folder made once
            per process with `tempfile.mkdtemp` (prefix ``tfcovseg-<task>-<index>-``),
            which the caller may delete after training.
    """
    if is_chief(strategy):
        return path
    task_type, task_id, _ = _task(strategy)
    if temp_root is None:
        key = (task_type, task_id)
        if key not in _TEMP_ROOTS:
            _TEMP_ROOTS[key] = tempfile.mkdtemp(prefix=f"tfcovseg-{task_type}-{task_id}-")
        temp_root = _TEMP_ROOTS[key]
    absolute = Path(os.path.abspath(os.fspath(path)))
    target = Path(temp_root).joinpath(*absolute.parts[1:])
    target.parent.mkdir(parents=True, exist_ok=True)
    return target if isinstance(path, Path) else str(target)


def _broadcaster(strategy, variables):
    """A function that copies `variables` and some host numbers from replica 0 (the chief)
    to every replica of every worker, and returns the numbers as replica 0 has them.

    Needed after callbacks restore state on one worker only (BackupAndRestore reading the
    chief's folder while the others read empty temporary folders), and for variables every
    replica updates on its own (BatchNormalization's moving statistics). The `tf.function`
    is traced once, at the first call, on all workers alike: the collective ops it holds
    get their keys then, and workers must agree on them.
    """
    variables = list(variables)

    def replica_fn(numbers):
        ctx = tf.distribute.get_replica_context()
        first = tf.equal(ctx.replica_id_in_sync_group, 0)
        values = [tf.convert_to_tensor(v) for v in variables] + [numbers]
        # Integers (optimizer iterations, seeds) travel as float64, exact below 2**53.
        # One all-reduce per dtype: all_reduce packs its list into one buffer.
        sent = [v if v.dtype.is_floating else tf.cast(v, tf.float64) for v in values]
        sent = [tf.where(first, v, tf.zeros_like(v)) for v in sent]
        out = [None] * len(sent)
        for dtype in sorted({v.dtype for v in sent}, key=lambda d: d.name):
            index = [i for i, v in enumerate(sent) if v.dtype == dtype]
            summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [sent[i] for i in index])
            for i, value in zip(index, summed):
                out[i] = value
        return out

    step = tf.function(lambda numbers: strategy.run(replica_fn, args=(numbers,)))

    def broadcast(numbers=()):
        numbers = tf.constant([float(n) for n in numbers] or [0.0], tf.float64)
        local = [strategy.experimental_local_results(r)[0] for r in step(numbers)]
        for variable, value in zip(variables, local[:-1]):
            variable.assign(tf.cast(value, variable.dtype))
        return [float(n) for n in local[-1].numpy()]

    return broadcast


def _any_worker_fn(strategy):
    """A function telling whether a flag is True on any replica of any worker (one
    collective all-reduce, traced once)."""

    def replica_fn(value):
        ctx = tf.distribute.get_replica_context()
        # A value computed on the replica: the bare argument has no device, which the
        # multi-worker all-reduce rejects ("destinations can not be empty").
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(value))

    step = tf.function(lambda value: strategy.run(replica_fn, args=(value,)))

    def any_worker(flag: bool) -> bool:
        out = step(tf.constant(1.0 if flag else 0.0, tf.float32))
        return float(strategy.experimental_local_results(out)[0].numpy()) > 0.0

    return any_worker


def _cardinality(dataset):
    n = int(dataset.cardinality().numpy())
    return n if n >= 0 else None


def _local_batch_size(x):
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    return tf.cast(tf.shape(first)[0], tf.float32)


def _scalar(x):
    return float(x.numpy()) if hasattr(x, "numpy") else float(x)


def _make_steps(model, strategy):
    """The distributed train and test steps.

    Keras losses with the "sum_over_batch_size" reduction (the default, and
    `tfcovseg.training.losses.HybridLoss`), the loss weights of `compile` and the regularisation
    losses come back from `model.compute_loss` already divided by `num_replicas_in_sync`
    (Keras' own `scale_loss_for_distribution`). The steps multiply that back to the
    replica's mean and weight it by its share of the global batch, local_n / global_n, so
    the gradients summed by the optimizer over all replicas are those of the mean loss over
    the global batch, also when the last batch splits unevenly.
    """
    optimizer = model.optimizer
    num_replicas = float(strategy.num_replicas_in_sync)
    sum_op = tf.distribute.ReduceOp.SUM

    def local_loss(x, y, sample_weight, training):
        y_pred = model(x, training=training)
        loss = model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        # The replica's mean loss: undo Keras' division by the number of replicas.
        return tf.reduce_sum(tf.cast(loss, tf.float32)) * num_replicas

    def train_replica(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        ctx = tf.distribute.get_replica_context()
        local_n = _local_batch_size(x)
        global_n = ctx.all_reduce(sum_op, local_n)
        with tf.GradientTape() as tape:
            mean = local_loss(x, y, sample_weight, training=True)
            objective = mean * tf.math.divide_no_nan(local_n, global_n)
            scaled = optimizer.scale_loss(objective)
        variables = model.trainable_variables
        if variables:  # as in Keras' train_step: nothing to update, nothing applied
            gradients = tape.gradient(scaled, variables)
            optimizer.apply_gradients(zip(gradients, variables))
        return mean * local_n, local_n

    def test_replica(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        local_n = _local_batch_size(x)
        mean = local_loss(x, y, sample_weight, training=False)
        return tf.where(local_n > 0, mean * local_n, 0.0), local_n

    def reduced(replica_fn):
        def step(data):
            loss_sum, count = strategy.run(replica_fn, args=(data,))
            return strategy.reduce(sum_op, loss_sum, axis=None), strategy.reduce(
                sum_op, count, axis=None
            )

        return tf.function(step, reduce_retracing=True)

    return reduced(train_replica), reduced(test_replica)


def build_training_state(model, strategy, dataset):
    """Builds the compiled loss, compiled metrics and optimizer state before training.

    `model.fit` builds them itself only under a non-default strategy, in
    `_maybe_symbolic_build` from a distributed batch, which is what fails under the
    multi-worker strategy. Under the default strategy it leaves them to the first trace
    of the train step, and a `tf.function` whose first trace creates variables is traced
    a second time: a second trace of the whole network and its gradients, about a fifth
    of the first `fit`'s start-up for our segmenters. Here the same symbolic build runs
    from the dataset's `element_spec` (shapes and dtypes only, no data read).
    """
    with strategy.scope():
        if hasattr(model, "_symbolic_build"):
            model._symbolic_build(data_batch=dataset.element_spec)
        elif model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)


def fit_distributed(
    model,
    strategy,
    train_ds,
    epochs,
    validation_data=None,
    callbacks=(),
    verbose=0,
    initial_epoch=0,
    steps_per_epoch=None,
):
    """Trains a compiled model with a custom loop under any `tf.distribute.Strategy`.

    A stand-in for ``model.fit(train_ds, epochs=..., validation_data=..., callbacks=...)``
    where `fit` cannot run (MultiWorkerMirroredStrategy with Keras 3.15 / TF 2.21). Each
    step is `strategy.run` of a `tf.function` that computes the compiled loss
    (`model.compute_loss`: the losses, loss weights and regularisation losses of
    `compile`) under a `tf.GradientTape` and applies the gradients with the model's
    optimizer, whose `apply_gradients` sums them over all replicas. Mixed precision works
    through `optimizer.scale_loss` (LossScaleOptimizer).

    Logs hold "loss" (mean over the epoch's samples so far) and, with validation data,
    "val_loss" (mean over the whole validation set), both over all workers. Compiled
    metrics are not computed in this loop (their keys are absent from the logs), and
    `compile(jit_compile=...)` is not applied: the step runs as a plain `tf.function`.

    The callbacks are called as `fit` calls them, through `keras.callbacks.CallbackList`
    (a History is added and returned, and a progress bar when `verbose` is not 0):
    on_train_begin, on_epoch_begin, on_train_batch_begin/end, on_test_begin,
    on_test_batch_begin/end and on_test_end around validation, on_epoch_end, on_train_end.
    `model.stop_training` (EarlyStopping, TerminateOnNaN) ends training: set during an
    epoch it ends it after that step (callbacks that act on the logs, which are the same
    on all workers, set it on all alike; a callback that sets it on some workers only
    mid-epoch leaves the others waiting); at the end of an epoch the workers agree, and
    all stop when it is set on any. BackupAndRestore works: the epoch it
    restores (``model._initial_epoch``, which Keras' callback sets) is where training
    continues. Under a multi-worker strategy the weights, optimizer state and that epoch
    are then broadcast from the chief, so a BackupAndRestore that restored on the chief
    alone (the others writing to temporary folders, see `worker_path`) restores all.
    TensorBoard works with ``write_graph=False`` (there is no `model.train_function` to
    draw).

    BatchNormalization's moving statistics (and other non-trainable variables) are
    variables with aggregation "none": every replica updates its own copy from its own
    batch, and `get_weights` or saving reads the local first replica's copy. Left alone,
    the workers of a multi-worker run would end with different statistics, and
    validation would mix them (as `model.fit` does over local replicas). After each
    epoch's training steps this loop copies replica 0's (the chief's) non-trainable
    variables to every replica of every worker, so validation, checkpoints,
    EarlyStopping and all workers use the statistics that are saved.

    Args:
        model: A Keras model built and compiled inside ``strategy.scope()``.
        strategy: The strategy, e.g. from `choose_strategy`.
        train_ds: A `tf.data.Dataset` of (x, y) or (x, y, sample_weight) batches of the
            global batch size. Training batches should split evenly over the replicas
            (``drop_remainder=True``): a replica with an empty batch would feed
            BatchNormalization an empty batch.
        epochs: Index of the last epoch + 1, as in `fit`.
        validation_data: An optional dataset like `train_ds`, evaluated after every epoch.
            A partial last batch is fine if it gives every replica at least one example
            (the segmenter fails on an empty per-replica batch, under `evaluate` too).
        callbacks: Keras callbacks (or a `keras.callbacks.CallbackList`).
        verbose: As `fit`: 0 silent, 1 or "auto" progress bar, 2 one line per epoch.
        initial_epoch: Epoch to start at, unless a callback restores another.
        steps_per_epoch: Steps per epoch; default: until `train_ds` is exhausted (a new
            pass every epoch). When set, batches are drawn from one iterator that lives
            across epochs, so `train_ds` may repeat indefinitely.

    Returns:
        The `keras.callbacks.History` of the run.
    """
    _check_optimizer(model, strategy)
    multi_worker = is_multi_worker(strategy)
    build_training_state(model, strategy, train_ds)
    train_step, test_step = _make_steps(model, strategy)
    dist_train = strategy.experimental_distribute_dataset(train_ds)
    dist_val = (
        strategy.experimental_distribute_dataset(validation_data)
        if validation_data is not None
        else None
    )
    steps = steps_per_epoch if steps_per_epoch is not None else _cardinality(train_ds)
    callback_list = _callback_list(callbacks, model, verbose, epochs, steps)
    start = _start_epoch(model, strategy, callback_list, initial_epoch, multi_worker)
    any_worker = _any_worker_fn(strategy) if multi_worker else None
    sync_statistics = (
        _broadcaster(strategy, model.non_trainable_variables)
        if strategy.num_replicas_in_sync > 1 and model.non_trainable_variables
        else None
    )

    persistent = iter(dist_train) if steps_per_epoch is not None else None
    epoch_logs = None
    for epoch in range(start, epochs):
        callback_list.on_epoch_begin(epoch)
        iterator = persistent if persistent is not None else iter(dist_train)
        logs = _train_epoch(model, train_step, iterator, callback_list, epoch, steps_per_epoch)
        iterator = None  # released here, on every worker alike, not at some later GC
        if sync_statistics is not None:
            sync_statistics()
        epoch_logs = dict(logs)
        if dist_val is not None:
            epoch_logs["val_loss"] = _evaluate(test_step, dist_val, callback_list)
        callback_list.on_epoch_end(epoch, epoch_logs)
        stop = model.stop_training
        if any_worker is not None:
            stop = any_worker(stop)
        model.stop_training = stop
        if stop:
            break

    persistent = iterator = None
    if isinstance(model.optimizer, keras.optimizers.Optimizer):
        model.optimizer.finalize_variable_values(model.trainable_variables)
    callback_list.on_train_end(logs=epoch_logs)
    if any_worker is not None:
        # A last barrier: no worker leaves (and perhaps exits) while another still
        # releases its input pipeline or writes files.
        any_worker(False)
    return model.history


def _check_optimizer(model, strategy) -> None:
    if getattr(model, "optimizer", None) is None:
        raise ValueError("fit_distributed needs a model compiled with an optimizer")
    # An optimizer made outside the scope keeps plain variables: every replica then adds
    # its own step to `iterations` (learning-rate schedules run too fast) and Keras says
    # nothing. The TensorFlow optimizer records the strategy it was made under.
    made_under = getattr(model.optimizer, "_distribution_strategy", strategy)
    if made_under is not strategy:
        raise ValueError(
            "the model's optimizer was created outside strategy.scope(); create it (and "
            "build and compile the model) inside the scope of the strategy passed here"
        )


def _callback_list(callbacks, model, verbose, epochs, steps):
    """The callbacks as `fit` wraps them (a History, a progress bar unless silent)."""
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return callbacks
    return keras.callbacks.CallbackList(
        list(callbacks or ()),
        add_history=True,
        add_progbar=verbose != 0,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=steps,
    )


def _start_epoch(model, strategy, callback_list, initial_epoch, multi_worker) -> int:
    """on_train_begin, then the epoch to start at: the one a BackupAndRestore restored,
    else `initial_epoch`; under a multi-worker strategy the chief's, with its weights and
    optimizer state broadcast to every worker."""
    model.stop_training = False
    model._initial_epoch = None  # Keras never clears what BackupAndRestore left there.
    callback_list.on_train_begin()
    start = model._initial_epoch or initial_epoch
    model._initial_epoch = None
    if multi_worker:
        state = list(model.variables) + list(model.optimizer.variables)
        start = _broadcaster(strategy, state)([start])[0]
    return int(start)


def _train_epoch(model, train_step, iterator, callback_list, epoch, steps_per_epoch) -> dict:
    """One epoch's training steps; the logs ("loss": mean over the epoch's samples)."""
    loss_sum, count, step, logs = 0.0, 0.0, 0, {}
    while steps_per_epoch is None or step < steps_per_epoch:
        try:
            batch = next(iterator)
        except (StopIteration, tf.errors.OutOfRangeError):
            break
        callback_list.on_train_batch_begin(step)
        batch_loss, batch_count = train_step(batch)
        loss_sum += _scalar(batch_loss)
        count += _scalar(batch_count)
        logs = {"loss": loss_sum / count if count else float("nan")}
        callback_list.on_train_batch_end(step, logs)
        step += 1
        if model.stop_training:
            break
    if step == 0:
        raise ValueError(
            f"the training dataset gave no batch in epoch {epoch}"
            + (" (steps_per_epoch outlasted it)" if steps_per_epoch else "")
        )
    return logs


def _evaluate(test_step, dist_val, callback_list) -> float:
    """The mean loss over a distributed validation set, with the test callbacks."""
    callback_list.on_test_begin()
    loss_sum, count = 0.0, 0.0
    for step, batch in enumerate(dist_val):
        callback_list.on_test_batch_begin(step)
        batch_loss, batch_count = test_step(batch)
        loss_sum += _scalar(batch_loss)
        count += _scalar(batch_count)
        callback_list.on_test_batch_end(step, {"loss": loss_sum / count if count else 0.0})
    if count == 0:
        raise ValueError("the validation dataset gave no batch")
    val_loss = loss_sum / count
    callback_list.on_test_end({"loss": val_loss})
    return val_loss
