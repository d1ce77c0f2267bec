"""Self-training's data in tf.data: the teacher's pseudo-labels and the mixed batches.

`tfcovseg.train`'s "self_training" phase uses these; the rules themselves (intensity
matching, confidence, selection) are `tfcovseg.training.semisup`'s, shared with the COVID-SemiSeg
benchmark. Research use, not a medical device.
"""

from __future__ import annotations

import numpy as np

from tfcovseg import require_tensorflow
from tfcovseg.data.dataset import augmentation, without_autotuner
from tfcovseg.training import semisup

tf = require_tensorflow("tfcovseg.training.selftrain")


def collect_images(dataset) -> np.ndarray:
    """The images [N, H, W, 1] (float32) of a dataset of image batches or of
    (image, target) batches."""
    parts = [np.asarray(b[0] if isinstance(b, tuple) else b, np.float32) for b in dataset]
    if not parts:
        return np.zeros((0, 0, 0, 1), np.float32)
    return np.concatenate(parts)


def pseudo_dataset(
    round_: semisup.Round, batch_size: int, seed: int, augment_data=True, window=None,
    spatial=False,
):  # fmt: skip
    """An endless, shuffled dataset of (image, masks) batches of the pseudo-labels, with
    the labelled batches' augmentation (with `spatial` the small rotation, zoom and shift
    too, and intensity jitter with `window`)."""
    ds = tf.data.Dataset.from_tensor_slices((round_.images[..., 0], round_.masks))
    ds = ds.shuffle(len(round_.images), seed=seed, reshuffle_each_iteration=True).repeat()
    seeds = tf.data.Dataset.random(seed=seed + 1).batch(2, drop_remainder=True)

    # The labelled batches' order of transforms; the jitter even without `augment_data`.
    augment_fn = augmentation(window, spatial, geometric=augment_data)

    def prepare(pair, sd):
        image, masks = pair
        example = augment_fn({"hu": image, "lesions": masks}, sd)
        return example["hu"][..., None], tf.cast(example["lesions"], tf.float32)

    ds = tf.data.Dataset.zip((ds, seeds)).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True)


def mixed_dataset(labelled, pseudo, outputs):
    """Each labelled batch (image, {output: masks}) with a pseudo-labelled batch appended:
    as many batches as the labelled dataset."""

    def merge(a, b):
        (x, y), (px, pm) = a, b
        masks = tf.concat([tf.cast(y[outputs[0]], tf.float32), pm], 0)
        return tf.concat([tf.cast(x, tf.float32), px], 0), {name: masks for name in outputs}

    n = labelled.cardinality()
    ds = tf.data.Dataset.zip((labelled, pseudo)).map(merge, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.apply(tf.data.experimental.assert_cardinality(n)).prefetch(tf.data.AUTOTUNE)
    return without_autotuner(ds)
