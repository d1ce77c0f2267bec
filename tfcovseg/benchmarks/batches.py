"""In-memory training batches of the COVID-SemiSeg benchmark (`tfcovseg.benchmarks.semiseg`):
slices held as arrays, so that the benchmark runs under any Keras backend (the trainer reads
TFRecords through tf.data instead)."""

from __future__ import annotations

import keras
import numpy as np


class SliceBatches(keras.utils.PyDataset):
    """Batches of (image, {output: mask}) from memory, with the paper's augmentation
    (random quarter turn and horizontal flip, image and mask together), with `spatial`
    a small random rotation, zoom and shift as well (`spatial.SpatialJitter`) and, with
    `jitter`, random intensity changes (`intensity.IntensityJitter`).

    With `extra` (images, masks: pseudo-labelled slices), `extra_share` of every batch is
    drawn from them at random; the epoch is still `passes` passes over the labelled slices.
    Not `training` (validation): one pass in order, nothing changed.
    """

    def __init__(
        self, images, masks, outputs, batch_size, passes, seed, training=True, augment=True,
        jitter=None, extra=None, extra_share=0.5, spatial=None,
    ):  # fmt: skip
        super().__init__()
        self.images, self.masks, self.outputs = images, masks, tuple(outputs)
        self.training = training
        self.augment, self.jitter = training and augment, jitter if training else None
        self.spatial = spatial if self.augment else None
        self.extra = extra
        n_extra = int(round(extra_share * batch_size)) if extra is not None else 0
        self.n_extra = min(max(n_extra, 1), batch_size - 1) if extra is not None else 0
        self.batch_size = batch_size - self.n_extra  # labelled slices per batch
        self.rng = np.random.default_rng(seed)
        self.passes = passes
        self._order()

    def _order(self):
        order = [self.rng.permutation(len(self.images)) for _ in range(self.passes)]
        self.order = np.concatenate(order) if self.training else np.arange(len(self.images))

    def __len__(self):
        return int(np.ceil(len(self.order) / self.batch_size))

    def __getitem__(self, i):
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        x, y = self.images[idx][..., None], self.masks[idx]
        if self.n_extra:
            pick = self.rng.integers(len(self.extra[0]), size=self.n_extra)
            x = np.concatenate([x, self.extra[0][pick][..., None]])
            y = np.concatenate([y, self.extra[1][pick]])
        if self.augment:
            x, y = x.copy(), y.copy()
            for j in range(len(x)):
                k = int(self.rng.integers(4))
                x[j], y[j] = np.rot90(x[j], k), np.rot90(y[j], k)
                if self.rng.random() < 0.5:
                    x[j], y[j] = x[j][:, ::-1], y[j][:, ::-1]
        if self.spatial is not None:
            x, y = self.spatial(x, y, self.rng)
        if self.jitter is not None:
            x = self.jitter(x, self.rng)
        return x, {name: y for name in self.outputs}

    def on_epoch_end(self):
        if self.training:
            self._order()


class ConsistencyBatches(SliceBatches):
    """`SliceBatches` of labelled slices, each batch with as many unlabelled ones in two
    views for FixMatch (`tfcovseg.training.consistency`): ``({"labelled", "weak",
    "strong"}, {output: mask})``. The weak view is a random quarter turn and flip; the
    strong view is the same with `strong`'s intensity changes (an
    `intensity.IntensityJitter`), so that their pixels correspond."""

    def __init__(self, images, masks, outputs, batch_size, passes, seed, unlabelled, strong,
                 augment=True, jitter=None, spatial=None):  # fmt: skip
        super().__init__(
            images, masks, outputs, batch_size, passes, seed, augment=augment, jitter=jitter,
            spatial=spatial,
        )  # fmt: skip
        self.unlabelled, self.strong = unlabelled, strong

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        pick = self.rng.integers(len(self.unlabelled), size=len(x))
        weak = self.unlabelled[pick][..., None].copy()
        for j in range(len(weak)):
            weak[j] = np.rot90(weak[j], int(self.rng.integers(4)))
            if self.rng.random() < 0.5:
                weak[j] = weak[j][:, ::-1]
        strong = self.strong(weak, self.rng)
        return {"labelled": x, "weak": weak, "strong": strong}, y


def fit_input(batches: SliceBatches):
    """What `model.fit` reads for `batches`, with ``steps_per_epoch=len(batches)`` (and
    ``shuffle=False``): under TensorFlow, one endless tf.data pipeline over them without
    tf.data's autotuning thread; under other backends the `PyDataset` itself.

    Keras turns a `PyDataset` into a pipeline with ``prefetch(AUTOTUNE)`` and autotuning on,
    makes new iterators of it at every epoch's end and start, and in TensorFlow 2.21
    dropping one waits for its autotuning thread to wake (seconds to tens of seconds at
    some epoch starts; `tfcovseg.data.dataset.without_autotuner`). Here a single
    generator reads ``batches[0]``, ``batches[1]``, ... and calls `on_epoch_end` (the next
    permutation) after the last, epoch after epoch, all in one thread: the random draws do
    not depend on when Keras makes or drops iterators, and with `steps_per_epoch` it keeps
    one for the whole fit. (Keras' own adapter reads two batches for their shapes before
    the first epoch and, under fit's default ``shuffle=True``, shuffles the batches' order
    each epoch: other random draws.)
    """
    if keras.backend.backend() != "tensorflow":
        return batches
    import tensorflow as tf

    from tfcovseg.data.dataset import without_autotuner

    state = batches.rng.bit_generator.state
    first = batches[0]  # for the shapes, its random draws given back
    batches.rng.bit_generator.state = state
    signature = tf.nest.map_structure(lambda a: tf.TensorSpec((None, *a.shape[1:]), a.dtype), first)

    def epochs():
        while True:
            for i in range(len(batches)):
                yield batches[i]
            batches.on_epoch_end()

    ds = tf.data.Dataset.from_generator(epochs, output_signature=signature)
    return without_autotuner(ds.prefetch(2))
