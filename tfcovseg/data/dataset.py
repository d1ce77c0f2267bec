"""The tf.data input pipeline over the converter's TFRecords.

    ds = make_dataset("data/records", split="train", fold=0, batch_size=8, training=True)

Stages, in order (decoding and augmentation are separate functions, as in TF Model
Garden; deterministic work is cached before the first random transform, as in MONAI):

1. interleaved reading of the shards (`data_tools.features` spec);
2. the fold's patients only (from ``manifest.json``, judged on a parse of the patient id
   alone), so no patient crosses splits;
3. parsing, decoding (`data_tools.features.decode_example`) and resizing to the model size
   when the records were written at another size (bilinear for images, nearest for
   masks), in one map;
4. optional in-memory cache;
5. training only: lesion-slice oversampling, shuffling, and the paper's augmentation —
   rotation by a random multiple of 90 degrees and a random horizontal flip, applied
   jointly to the image, the lesion masks and the lung mask (optionally followed by a
   small random rotation, zoom and shift, and by intensity jitter). With no cache and no
   oversampling the augmentation runs in step 3's map, before the shuffle;
6. batching (still int16 HU and uint8 masks), then float32 (unless ``compact``) and the
   task's structure per batch, and prefetching.

Tasks: "segment" yields ``(hu [N,H,W,1], {"coarse": masks, "final": masks})`` (the output
names are an argument), "classify" yields ``(hu, label [N])`` where the label is 1 for a
slice with a lesion of a patient not diagnosed with another disease (slices of healthy,
bacterial and viral patients are negatives), and "inspect" yields the whole decoded dict
(image, masks, lung, ids, spacing) for evaluation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_tools.features import decode_example, feature_spec
from data_tools.resize import bilinear_weights
from tfcovseg import require_tensorflow

tf = require_tensorflow("tfcovseg.data.dataset (the tf.data pipeline)")

# "development": every patient but the fold's validation ones (a final model's training set).
SPLITS = ("train", "validation", "test", "all", "development")
TASKS = ("segment", "classify", "unlabelled", "inspect")
NON_COVID = ("healthy", "bacterial", "viral")
OTHER_PNEUMONIA = ("bacterial", "viral")


def data_fingerprint(record_dir) -> str:
    """The records' fingerprint: their manifest's SHA-256 (its first 16 hex digits). The
    converter writes the same manifest for the same input, so moved or re-converted
    records keep it; other records do not."""
    digest = hashlib.sha256((Path(record_dir) / "manifest.json").read_bytes()).hexdigest()
    return digest[:16]


def read_manifest(record_dir) -> dict:
    """The converter's manifest.json, with errors that name the directory.

    Raises:
        FileNotFoundError: no folder, no manifest, a shard missing.
        CorruptRecordsError: a manifest that does not parse, a shard of another size
            than the converter wrote.
    """
    record_dir = Path(record_dir)
    path = record_dir / "manifest.json"
    if not record_dir.is_dir():
        raise FileNotFoundError(
            f"record directory {record_dir} does not exist; if the records moved, give "
            f"their folder (--set data.records_dir=DIR), else write them with "
            f"python -m data_tools.convert --input DIR --out {record_dir}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{record_dir} has no manifest.json: it is empty or not written "
            f"by data_tools.convert (or the conversion did not finish)"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise CorruptRecordsError(f"{path} is not valid JSON ({e})") from None
    missing = [s for s in manifest.get("shards", []) if not (record_dir / s).is_file()]
    if missing or not manifest.get("shards"):
        raise FileNotFoundError(
            f"{record_dir}: shards listed in manifest.json are missing: {missing or 'none listed'}"
        )
    # The converter records each shard's size: a shard cut short (a copy or a download
    # that stopped) is named here, before any training, not by a DataLossError later.
    sizes = manifest.get("shard_bytes") or {}
    changed = [
        f"{name} ({(record_dir / name).stat().st_size} bytes, the manifest says {size})"
        for name, size in sizes.items()
        if (record_dir / name).stat().st_size != size
    ]
    if changed:
        raise CorruptRecordsError(
            f"{record_dir}: truncated or changed shards: {', '.join(changed)}; copy them "
            "again or convert the records again"
        )
    return manifest


class CorruptRecordsError(ValueError):
    """Records whose manifest or shards are damaged; the message names the files."""


def find_corrupt_shards(record_dir, manifest: dict) -> list[str]:
    """The shards of a record folder that do not read to the end (slow: reads them all)."""
    record_dir = Path(record_dir)
    bad = []
    for name in manifest.get("shards", []):
        ds = tf.data.TFRecordDataset(str(record_dir / name), manifest.get("compression") or None)
        try:
            for _ in ds:
                pass
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError):
            bad.append(name)
    return bad


def corrupt_records_message(folder, manifest: dict, error) -> str:
    """What to say of records a reader found damaged (`error`: TensorFlow's DataLossError,
    a shard of the right size with bytes changed inside), naming the shards at fault."""
    bad = find_corrupt_shards(folder, manifest)
    where = ", ".join(bad) if bad else "a shard"
    return (
        f"the records in {folder} are corrupt ({where}: {error.message.splitlines()[0]}); "
        "convert them again with python -m data_tools.convert"
    )


def split_patients(manifest: dict, split: str, fold: int) -> list[str]:
    """Patient pseudonyms of one split of one fold ("all": every patient; "development":
    the fold's training and test patients, for a final model that keeps only the
    validation patients out to choose its epoch)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return sorted(manifest["patients"])
    folds = manifest["folds"]["splits"]
    if str(fold) not in folds:
        raise ValueError(
            f"fold {fold} does not exist: the records have folds {sorted(int(k) for k in folds)}"
        )
    if split == "development":
        return sorted(folds[str(fold)]["train"] + folds[str(fold)]["test"])
    return list(folds[str(fold)][split])


def slice_is_usable(task: str, annotated: bool, diagnosis: str) -> bool:
    """Whether a slice serves `task`: segmentation needs ground-truth masks; the slice
    label (the "classify" task) needs them too, except for patients diagnosed with
    another disease, whose slices are negatives whatever their masks; "unlabelled" takes
    the slices without masks ("inspect": all)."""
    if task == "segment":
        return bool(annotated)
    if task == "unlabelled":  # the slices a semi-supervised method labels itself
        return not annotated
    if task == "classify":
        return bool(annotated) or diagnosis in NON_COVID
    return True


def split_slices(
    manifest: dict,
    split: str,
    fold: int,
    task: str = "inspect",
    lesions: int = 1,
    pneumonia: int = 1,
) -> int:
    """Slices of a split that serve `task` (`slice_is_usable`), from the manifest alone.

    With `lesions` / `pneumonia` > 1: per epoch, when lesion slices are repeated `lesions`
    times and the slices of other pneumonias (`OTHER_PNEUMONIA`) `pneumonia` times.
    """
    patients = manifest["patients"]
    chosen = set(split_patients(manifest, split, fold))
    total = 0
    for entry in manifest["slices"]:
        pid = entry["patient"]
        if pid not in chosen:
            continue
        diagnosis = patients[pid].get("diagnosis")
        # Records written before slices carried the flag: the patient's (default True).
        annotated = entry.get("annotated", patients[pid].get("annotated", True))
        if slice_is_usable(task, annotated, diagnosis):
            factor = pneumonia if diagnosis in OTHER_PNEUMONIA else 1
            total += factor * (lesions if entry["label"] else 1)
    return total


def _all_usable(manifest: dict, split: str, fold: int, task: str) -> bool:
    return split_slices(manifest, split, fold, task) == split_slices(manifest, split, fold)


def _dihedral(x, k, flip):
    """Rotation by k * 90 degrees (counter-clockwise) then an optional horizontal flip of an
    [H, W, ...] tensor. Each of the eight results is at most one transpose and one reversal
    (rot90 then flip composed by hand: k=1 is reverse(transpose, rows), flipped it reverses
    rows and columns; k=3 flipped is the transpose alone), cheaper than tf.image on big
    slices and than applying the rotation and the flip one after the other."""
    branches = [
        lambda: x,  # k=0
        lambda: tf.reverse(x, [1]),  # k=0, flip
        lambda: tf.reverse(_swap_hw(x), [0]),  # k=1
        lambda: tf.reverse(_swap_hw(x), [0, 1]),  # k=1, flip
        lambda: tf.reverse(x, [0, 1]),  # k=2
        lambda: tf.reverse(x, [0]),  # k=2, flip
        lambda: tf.reverse(_swap_hw(x), [1]),  # k=3
        lambda: _swap_hw(x),  # k=3, flip
    ]
    return tf.switch_case(2 * k + tf.cast(flip, tf.int32), branches)


def _swap_hw(x):
    perm = [1, 0] + list(range(2, len(x.shape)))
    return tf.transpose(x, perm)


def augment(example, seed):
    """The paper's augmentation: random 90-degree rotation and horizontal flip, jointly.

    Args:
        example: dict with "hu" [H, W], "lesions" [H, W, C] and "lung" [H, W] (square).
        seed: int tensor [2] for the stateless random ops.
    """
    k = tf.random.stateless_uniform([], seed, 0, 4, dtype=tf.int32)
    flip = tf.random.stateless_uniform([], seed[::-1], 0.0, 1.0) < 0.5
    out = dict(example)
    for key in ("hu", "lesions", "lung"):
        if key in example:  # the training tasks drop the lung mask before this
            out[key] = _dihedral(example[key], k, flip)
    return out


def jitter_geometry(example, seed):
    """`tfcovseg.data.spatial.SpatialJitter` on one slice inside tf.data: its image,
    lesion masks and (when present) lung mask moved by the same small random rotation,
    zoom and shift, each in its own dtype.

    Args:
        example: dict with "hu" [H, W], "lesions" [H, W, C] and optionally "lung" [H, W].
        seed: int tensor [2] (the augmentation's seed); the draw is independent of
            `jitter_intensity`'s from the same seed.

    With "slice/label" (1 for a slice with a lesion pixel) as well, the label is the moved
    masks' (the classifier's target follows what is left in the slice).
    """
    import numpy as np

    from tfcovseg.data.spatial import SpatialJitter

    jitter = SpatialJitter()
    keys = [k for k in ("hu", "lesions", "lung") if k in example]

    def apply(s, *arrays):
        # A third word of entropy: not the generator jitter_intensity draws from.
        rng = np.random.default_rng([int(v) & 0xFFFFFFFF for v in s] + [1])
        return list(jitter.transform(rng, *arrays))

    arrays = [example[k] for k in keys]
    moved = tf.numpy_function(apply, [seed, *arrays], [a.dtype for a in arrays], stateful=False)
    out = dict(example)
    for key, before, after in zip(keys, arrays, moved):
        out[key] = tf.ensure_shape(after, before.shape)
    if "slice/label" in example and "lesions" in example:
        # A zoom or shift can take a small lesion out of the slice: the label follows.
        label = example["slice/label"]
        out["slice/label"] = tf.cast(
            tf.fill(tf.shape(label), tf.reduce_any(out["lesions"] > 0)), label.dtype
        )
    return out


def jitter_intensity(image, seed, window):
    """`tfcovseg.data.intensity.IntensityJitter` on one slice [H, W] inside tf.data: the values
    are mapped through `window` (low, high) to grey levels 0-255, jittered there and
    mapped back (HU records stay in HU, pre-windowed ones use (0, 255)).

    Args:
        image: [H, W] tensor of any real dtype; returned as float32.
        seed: int tensor [2] (the augmentation's seed: one draw per slice and epoch).
        window: (low, high) of the model's window.
    """
    import numpy as np

    from tfcovseg.data.intensity import IntensityJitter

    low, high = (float(w) for w in window)
    jitter = IntensityJitter()

    def apply(x, s):
        rng = np.random.default_rng([int(v) & 0xFFFFFFFF for v in s])
        grey = np.clip((x - low) / (high - low), 0.0, 1.0) * 255.0
        return (jitter(grey[None, ..., None], rng)[0, ..., 0] / 255.0 * (high - low) + low).astype(
            np.float32
        )

    out = tf.numpy_function(apply, [tf.cast(image, tf.float32), seed], tf.float32, stateful=False)
    return tf.ensure_shape(out, image.shape)


class _TensorOps:
    """The array functions `data_tools.resize.bilinear_weights` needs, on TensorFlow
    tensors (sizes known only when the graph runs)."""

    arange = staticmethod(tf.range)
    abs = staticmethod(tf.abs)
    maximum = staticmethod(tf.maximum)

    @staticmethod
    def float32(x):
        return tf.cast(x, tf.float32)

    @staticmethod
    def sum(x, axis, keepdims):
        return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


def resize_image(images, size):
    """THE image resize of tfcovseg: antialiased bilinear, as float32.

    Used by the input pipeline (records stored at another size than the model's), by the
    exported serving graph (any input size to the model's and the masks back) and by
    `tfcovseg.predict`. The weights are `data_tools.resize.bilinear_weights`, the ones
    `data_tools.convert` resizes with when it writes records, so a study resized here looks
    like the training slices (no train/serve skew); as two matrix products the graph also
    converts to ONNX (`tfcovseg.inference.onnx`).

    Args:
        images: [H, W, C] or [N, H, W, C] tensor (HU or probabilities).
        size: (height, width) of the output; a tensor is accepted.
    """
    images = tf.cast(images, tf.float32)
    single = images.shape.rank == 3
    if single:
        images = images[None]
    shape = tf.shape(images)
    n, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    rows = bilinear_weights(height, size[0], _TensorOps)  # [h, H]
    columns = bilinear_weights(width, size[1], _TensorOps)  # [w, W]
    # [h, H] @ plane @ [W, w] for every image and channel, as two plain 2-D products over
    # the stacked planes: a matrix broadcast over a batch of matrices is what TensorFlow's
    # oneDNN kernels (on by default on CPUs with AVX-512 VNNI, in TF Serving too) read past
    # (tensorflow/tensorflow#117700).
    planes = tf.reshape(tf.transpose(images, [0, 2, 3, 1]), [-1, height])  # [N W C, H]
    planes = tf.matmul(planes, rows, transpose_b=True)  # [N W C, h]
    planes = tf.reshape(planes, [n, width, channels, tf.shape(rows)[0]])
    planes = tf.reshape(tf.transpose(planes, [0, 3, 2, 1]), [-1, width])  # [N h C, W]
    planes = tf.matmul(planes, columns, transpose_b=True)  # [N h C, w]
    planes = tf.reshape(planes, [n, tf.shape(rows)[0], channels, tf.shape(columns)[0]])
    out = tf.transpose(planes, [0, 1, 3, 2])
    return out[0] if single else out


def _resize(example, size):
    """Resizes image (bilinear) and masks (nearest) and rescales the in-plane spacing."""
    out = dict(example)
    old = tf.cast(tf.shape(example["hu"])[:2], tf.float32)
    hu = resize_image(example["hu"][..., None], size)
    out["hu"] = hu[..., 0]  # float32: interpolated HU are not integers
    out["lesions"] = tf.image.resize(example["lesions"], size, "nearest")
    if "lung" in example:
        out["lung"] = tf.image.resize(example["lung"][..., None], size, "nearest")[..., 0]
    if "spacing_mm" in example:
        scale = old / tf.constant(size, tf.float32)
        spacing = example["spacing_mm"]
        out["spacing_mm"] = tf.concat([spacing[:2] * scale, spacing[2:]], 0)
    out["image/height"] = tf.constant(size[0], tf.int64)
    out["image/width"] = tf.constant(size[1], tf.int64)
    return out


def _as_float(example):
    out = dict(example)
    for key in ("hu", "lesions", "lung"):
        if key in example:
            out[key] = tf.cast(example[key], tf.float32)
    return out


# What the "segment" and "classify" tasks need (targets included): nothing else is
# augmented, shuffled or batched.
_TRAINING_KEYS = ("hu", "lesions", "slice/label", "patient/diagnosis")
_TRAINING_FEATURES = (  # the record features they are decoded from
    "image/hu",
    "image/height",
    "image/width",
    "mask/lesions",
    "mask/num_classes",
    "slice/label",
    "patient/diagnosis",
)


def _set_shapes(example, size, num_classes, keep=None):
    out = dict(example) if keep is None else {k: example[k] for k in keep}
    out["hu"] = tf.ensure_shape(example["hu"], size)
    out["lesions"] = tf.ensure_shape(example["lesions"], (*size, num_classes))
    if "lung" in out:
        out["lung"] = tf.ensure_shape(example["lung"], size)
    return out


def classify_label(example):
    """The "classify" task's target: 1.0 for a lesion slice of a patient not diagnosed
    with another disease (healthy, bacterial and viral patients' slices are negatives)."""
    diagnosis = example["patient/diagnosis"][..., None]  # one example or a batch
    non_covid = tf.reduce_any(tf.equal(diagnosis, list(NON_COVID)), axis=-1)
    has_lesion = example["slice/label"] > 0
    return tf.cast(tf.logical_and(has_lesion, tf.logical_not(non_covid)), tf.float32)


def make_dataset(
    record_dir,
    split="train",
    fold=0,
    batch_size=8,
    training=None,
    task="segment",
    image_size=None,
    class_names=None,
    outputs=("coarse", "final"),
    augment_data=None,
    oversample_lesions=1,
    oversample_pneumonia=1,
    cache=False,
    shuffle_buffer=1024,
    seed=0,
    drop_remainder=None,
    label_output=None,
    compact=False,
    intensity_window=None,
    spatial_augment=False,
):
    """A batched `tf.data.Dataset` of one split of one fold.

    Args:
        record_dir: Output folder of `data_tools.convert`.
        split: "train", "validation", "test", "all" or "development" (`split_patients`).
        fold: Cross-validation fold.
        batch_size: Global batch size.
        training: Shuffle and augment (default: split == "train").
        task: "segment" ((image, {output: masks}) of annotated slices), "classify"
            ((image, slice label)), "unlabelled" (images of the slices without masks, for
            semi-supervised training) or "inspect" (every decoded feature).
        image_size: (H, W) of the model; records of another size are resized.
        class_names: The model's classes; must equal the records' classes when given.
        outputs: Target names of the "segment" task (the model's output names).
        augment_data: The paper's augmentation (default: `training`).
        oversample_lesions: Integer factor by which slices with lesions are repeated in
            each training epoch (1: no oversampling).
        oversample_pneumonia: Integer factor by which the slices of patients diagnosed
            with another pneumonia (bacterial, viral: `OTHER_PNEUMONIA`) are repeated in
            each training epoch: the hard negatives, whose patterns look like COVID-19
            lesions and are few (1: no oversampling).
        cache: Cache decoded (and resized) slices in memory.
        shuffle_buffer: Slices in the shuffle buffer.
        seed: Seed of file order, shuffling and augmentation.
        drop_remainder: Drop the last partial batch (default: `training`).
        label_output: With the "segment" task, also yield the slice label (the
            "classify" task's target) under this output name, for a model trained on
            both (`tfcovseg.models.classifier.with_classifier_head`).
        compact: Yield the stored dtypes ("segment" and "classify" tasks): HU as int16
            (float32 when resized) and masks as uint8, 4x less to batch and to copy to
            an accelerator. Keras models cast inputs to their input dtype and tfcovseg's
            losses and metrics cast the targets, so ``model.fit`` takes either; `train`
            uses this. Default: float32 throughout.
        intensity_window: With augmentation, also jitter every slice's intensities
            (`jitter_intensity`) in grey levels of this (low, high) window (the model's:
            its HU window, or (0, 255) for pre-windowed slices). None: no jitter.
        spatial_augment: With augmentation, also a small random rotation, zoom and shift
            of half the slices (`jitter_geometry`).

    Raises:
        FileNotFoundError: missing or empty record directory.
        ValueError: unknown split/task, a fold that does not exist, classes that differ from
            the records', a batch larger than the split, an empty split.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    manifest = read_manifest(record_dir)
    record_dir = Path(record_dir)
    classes = list(manifest["classes"])
    if class_names is not None and list(class_names) != classes:
        raise ValueError(
            f"the model has classes {list(class_names)} but the records in "
            f"{record_dir} have {classes}"
        )
    training = split in ("train", "development") if training is None else bool(training)
    augment_data = training if augment_data is None else bool(augment_data)
    drop_remainder = training if drop_remainder is None else bool(drop_remainder)
    patients = split_patients(manifest, split, fold)
    n_slices = split_slices(manifest, split, fold, task)
    _check_split(record_dir, split, fold, task, patients, n_slices, batch_size, drop_remainder)
    factors = (oversample_lesions, oversample_pneumonia)
    for name, factor in zip(("oversample_lesions", "oversample_pneumonia"), factors):
        if factor < 1 or int(factor) != factor:
            raise ValueError(f"{name} must be an integer >= 1, got {factor}")
    ds = _split_records(manifest, record_dir, split, fold, task, patients, training, seed)
    load = _decoder(manifest, task, image_size, len(classes))
    oversample = training and (oversample_lesions > 1 or oversample_pneumonia > 1)
    augment_fn = augmentation(intensity_window, spatial_augment)
    if augment_data and not cache and not oversample:
        # Nothing to cache and no repeated slices: augment in the same map as the parsing
        # (each slice still gets its own random transform every epoch), then shuffle.
        ds = tf.data.Dataset.zip((ds, _seeds(seed))).map(
            lambda s, sd: augment_fn(load(s), sd), num_parallel_calls=tf.data.AUTOTUNE
        )
        if training:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        if cache:
            ds = ds.cache()
        if oversample:
            ds = _oversampled(ds, *factors)
        if training:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if augment_data:
            # After the cache (a fresh transform every epoch) and the oversampling (each
            # copy of a lesion slice its own).
            ds = tf.data.Dataset.zip((ds, _seeds(seed))).map(
                augment_fn, num_parallel_calls=tf.data.AUTOTUNE
            )
    # Batch in the compact dtypes, then cast and build the task's structure once per batch.
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if task == "inspect" or not compact:
        ds = ds.map(_as_float, num_parallel_calls=tf.data.AUTOTUNE)
    ds = _task_structure(ds, task, outputs, label_output)
    # The split's size is known from the manifest: tell tf.data (and Keras' progress bar).
    n_examples = n_slices
    if oversample:
        n_examples = split_slices(manifest, split, fold, task, *(int(f) for f in factors))
    n_batches = n_examples // batch_size if drop_remainder else -(-n_examples // batch_size)
    ds = ds.apply(tf.data.experimental.assert_cardinality(n_batches))
    return without_autotuner(ds.prefetch(tf.data.AUTOTUNE))


def without_autotuner(ds):
    """`ds` without tf.data's autotuning thread: parallel maps run as many calls as
    there are cores, and prefetching sizes its buffer by itself.

    Keras makes a new iterator of a dataset every epoch, and in TensorFlow 2.21 destroying
    an iterator waits until its autotuning thread wakes from its sleep, which grows with
    the iterator's age: on a busy 2-core CPU the quickstart lost 20-40 s at the start of
    about one epoch in four (~40 s each), and none without the thread, whose batches are
    the same (`experiments/benchmarks/epoch_start.py`). Our pipelines are cheap beside a
    training step, so nothing is left for the autotuner to win.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def _check_split(record_dir, split, fold, task, patients, n_slices, batch_size, drop_remainder):
    if not patients or n_slices == 0:
        why = "too few patients for the folds?"
        if patients and task == "unlabelled":
            why = "every slice has lesion masks"
        elif patients and task != "inspect":
            why = "none has the lesion masks this task needs"
        raise ValueError(f"split {split!r} of fold {fold} in {record_dir} has no slices ({why})")
    if drop_remainder and batch_size > n_slices:
        raise ValueError(
            f"batch size {batch_size} is larger than the {n_slices} slices of "
            f"split {split!r} (fold {fold}) in {record_dir}"
        )


def _split_records(manifest, record_dir, split, fold, task, patients, training, seed):
    """The serialized examples of the split's patients that the task can use, read from
    the shards (in a seeded order when training)."""
    files = [str(record_dir / s) for s in manifest["shards"]]
    compression = manifest.get("compression") or None
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training and len(files) > 1:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression, buffer_size=8 << 20),
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,  # a seed must reproduce a training run
    )
    spec = feature_spec()
    if split != "all":
        # The split's patients only, judged on the patient id alone: the records of the
        # other splits are never fully parsed.
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(patients), tf.ones(len(patients), tf.int32)
            ),
            0,
        )
        id_spec = {"patient/id": spec["patient/id"]}
        ds = ds.filter(
            lambda s: table.lookup(tf.io.parse_single_example(s, id_spec)["patient/id"]) > 0
        )
    if not _all_usable(manifest, split, fold, task):
        # Slices without ground-truth masks: their zeros are unknown, not "no lesion".
        usable_spec = {k: spec[k] for k in ("mask/annotated", "patient/diagnosis")}

        def usable(serialized):
            e = tf.io.parse_single_example(serialized, usable_spec)
            annotated = e["mask/annotated"] > 0
            if task == "segment":
                return annotated
            if task == "unlabelled":
                return tf.logical_not(annotated)
            other = tf.reduce_any(tf.equal(e["patient/diagnosis"], list(NON_COVID)))
            return tf.logical_or(annotated, other)

        ds = ds.filter(usable)
    return ds


def _decoder(manifest, task, image_size, n_classes):
    """serialized example -> decoded slice: parse, decode (compact dtypes: int16 image,
    uint8 masks, 4x less to shuffle and cache until batching), resize to `image_size`,
    static shapes; one map, one pass per slice. The training tasks parse only what they
    keep."""
    stored = int(manifest["size"])
    size = (stored, stored)
    resize = image_size is not None and tuple(image_size) != size
    if resize:
        size = tuple(int(s) for s in image_size)
    spec = feature_spec()
    keep = None if task == "inspect" else _TRAINING_KEYS
    if keep is not None:
        spec = {k: spec[k] for k in _TRAINING_FEATURES}

    def load(serialized):
        example = decode_example(tf.io.parse_single_example(serialized, spec), compact=True)
        if resize:
            example = _resize(example, size)
        # Static shapes from here on: models with fixed input sizes need them in graph mode.
        return _set_shapes(example, size, n_classes, keep)

    return load


def _seeds(seed):
    """One stateless seed pair per example, from the dataset's seed."""
    return tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)


def augmentation(intensity_window=None, spatial=False, geometric=True):
    """(example, seed) -> example: the paper's augmentation (with `geometric`), then with
    `spatial` a small rotation, zoom and shift, then with a window the intensity jitter:
    the order every training pipeline uses (`make_dataset`, self-training's
    pseudo-labels)."""
    if intensity_window is None and not spatial and geometric:
        return augment

    def augment_fn(example, sd):
        out = augment(example, sd) if geometric else dict(example)
        if spatial and geometric:
            out = jitter_geometry(out, sd)
        if intensity_window is not None:
            out["hu"] = jitter_intensity(out["hu"], sd, intensity_window)
        return out

    return augment_fn


def _oversampled(ds, oversample_lesions, oversample_pneumonia):
    """Lesion slices `oversample_lesions` times, other pneumonias' slices
    `oversample_pneumonia` times (both: the product)."""
    lesion = tf.constant(int(oversample_lesions), tf.int64)
    pneumonia = tf.constant(int(oversample_pneumonia), tf.int64)

    def copies(e):
        other = tf.reduce_any(tf.equal(e["patient/diagnosis"], list(OTHER_PNEUMONIA)))
        n = tf.where(other, pneumonia, tf.constant(1, tf.int64))
        return tf.where(e["slice/label"] > 0, lesion * n, n)

    return ds.flat_map(lambda e: tf.data.Dataset.from_tensors(e).repeat(copies(e)))


def _task_structure(ds, task, outputs, label_output):
    """Batches in the task's structure: (image, {output: masks}), (image, label), image,
    or the decoded features ("inspect")."""
    if task == "segment":
        names = tuple(outputs)

        def targets(e):
            out = {n: e["lesions"] for n in names}
            if label_output:
                out[label_output] = classify_label(e)
            return e["hu"][..., None], out

        return ds.map(targets, num_parallel_calls=tf.data.AUTOTUNE)
    if task == "classify":
        return ds.map(
            lambda e: (e["hu"][..., None], classify_label(e)), num_parallel_calls=tf.data.AUTOTUNE
        )
    if task == "unlabelled":  # images only: there is no target
        return ds.map(lambda e: e["hu"][..., None], num_parallel_calls=tf.data.AUTOTUNE)
    return ds


def records_folder(config) -> Path:
    """The records folder of an `ExperimentConfig` (``data.records_dir``, ``~`` expanded)."""
    return Path(config.data.records_dir).expanduser()


def split_dataset(config, split="validation", fold=None, batch_size=16):
    """The run's records of one split, unshuffled, as evaluate and the export read them.

    Batches of `make_dataset(..., task="inspect")` (HU, masks, lung, patient ids and
    diagnoses) at the run's input size and classes; `fold` defaults to the run's.
    """
    return make_dataset(
        records_folder(config),
        split=split,
        fold=config.data.fold if fold is None else fold,
        batch_size=batch_size,
        training=False,
        task="inspect",
        image_size=config.model.input_size,
        class_names=config.model.class_names,
    )
