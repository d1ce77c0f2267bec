"""The tf.data input pipeline (`tfcovseg.data.dataset.make_dataset`) on a converted phantom cohort.

One small cohort (10 patients at 64x64, about 300 slices) is written and converted once per
module; the tests read it back through the pipeline and check what it yields against the
converter's manifest.json and against the raw records.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from data_tools.conversion.pipeline import convert
from data_tools.features import decode_numpy
from data_tools.phantom import make_cohort
from tfcovseg.data.dataset import NON_COVID, make_dataset, split_patients, split_slices

SIZE = 64
CLASSES = ["ggo", "consolidation", "fibrosis"]


def _convert(cohort, out, **kwargs):
    kwargs = {"size": SIZE, "shards": 3, "workers": 1, "folds": 5, "seed": 0} | kwargs
    convert(cohort, out, salt="x", progress=False, **kwargs)
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    make_cohort(root / "dicom", 10, seed=3, size=SIZE)
    return root / "dicom"


@pytest.fixture(scope="module")
def records(cohort, tmp_path_factory):
    return _convert(cohort, tmp_path_factory.mktemp("records") / "records")


@pytest.fixture(scope="module")
def manifest(records):
    return json.loads((records / "manifest.json").read_text())


def _inspect(records, split="all", fold=0, **kwargs):
    """Every example of an "inspect" pipeline as numpy, in yield order."""
    kwargs = {"batch_size": 16, "training": False} | kwargs
    ds = make_dataset(records, split=split, fold=fold, task="inspect", **kwargs)
    examples = []
    for batch in ds:
        batch = {k: v.numpy() for k, v in batch.items()}
        for i in range(len(batch["hu"])):
            ex = {k: v[i] for k, v in batch.items()}
            for k in ("slice/id", "patient/id", "series/id", "patient/diagnosis"):
                ex[k] = ex[k].decode()
            examples.append(ex)
    return examples


def _raw_records(records, manifest):
    """slice id -> the record decoded with numpy, straight from the shards."""
    out = {}
    for shard in manifest["shards"]:
        ds = tf.data.TFRecordDataset(str(records / shard), manifest["compression"] or None)
        for serialized in ds.as_numpy_iterator():
            ex = decode_numpy(serialized)
            out[ex["slice/id"]] = ex
    return out


def _dihedral(x, k, flip):
    """tf.image.rot90(x, k) then an optional flip_left_right, on [H, W, ...] numpy arrays."""
    x = np.rot90(x, k, axes=(0, 1))
    return x[:, ::-1] if flip else x


TRANSFORMS = [(k, flip) for k in range(4) for flip in (False, True)]


@pytest.mark.parametrize("k, flip", TRANSFORMS)
def test_pipeline_dihedral_is_rot90_then_flip(k, flip):
    from tfcovseg.data.dataset import _dihedral as pipeline_dihedral

    x = np.arange(5 * 5 * 2, dtype=np.int16).reshape(5, 5, 2)
    got = pipeline_dihedral(tf.constant(x), tf.constant(k), tf.constant(flip)).numpy()
    np.testing.assert_array_equal(got, _dihedral(x, k, flip))


# ----------------------------------------------------------------------------- structure


def test_segment_task_yields_hu_images_and_requested_mask_targets(records):
    outputs = ("coarse", "refined", "final")
    ds = make_dataset(records, "all", batch_size=16, training=False, outputs=outputs)
    xs, masks = [], []
    for x, y in ds:
        assert x.dtype == tf.float32 and x.shape[1:] == (SIZE, SIZE, 1)
        assert set(y) == set(outputs)
        for name in outputs:
            assert y[name].dtype == tf.float32 and y[name].shape == (x.shape[0], SIZE, SIZE, 3)
            np.testing.assert_array_equal(y[name].numpy(), y["final"].numpy())
        xs.append(x.numpy())
        masks.append(y["final"].numpy())
    x, m = np.concatenate(xs), np.concatenate(masks)
    # Hounsfield units, not normalised: air and lung far below 0, soft tissue/bone above.
    assert x.min() < -700 and x.max() > 100
    assert set(np.unique(m)) == {0.0, 1.0}
    assert m.sum() > 0


def test_training_segment_batches_are_full(records, manifest):
    ds = make_dataset(records, "train", 0, batch_size=8, training=True)
    x_spec, y_spec = ds.element_spec
    # drop_remainder: a static batch dimension (H, W, C are only known at run time).
    assert x_spec.shape[0] == 8 and y_spec["coarse"].shape[0] == 8
    n = sum(
        manifest["patients"][p]["num_slices"] for p in manifest["folds"]["splits"]["0"]["train"]
    )
    sizes = [int(x.shape[0]) for x, _ in ds]
    assert sizes == [8] * (n // 8)


@pytest.mark.parametrize(
    "task,kwargs",
    [
        ("segment", {"training": True, "cache": True, "oversample_lesions": 2}),
        ("segment", {"training": False}),
        ("classify", {"training": True}),
        ("inspect", {"training": False}),
    ],
)
def test_datasets_run_without_the_autotuning_thread(records, task, kwargs):
    # Keras makes a new iterator every epoch, and destroying one waited for tf.data's
    # autotuning thread to wake (TF 2.21): 20-40 s lost at the start of one quickstart
    # epoch in four (experiments/benchmarks/epoch_start.py).
    ds = make_dataset(records, "train", 0, batch_size=4, task=task, **kwargs)
    assert ds.options().autotune.enabled is False
    assert len(list(ds.take(2))) == 2


def test_compact_batches_hold_the_same_values_in_the_stored_dtypes(records):
    kwargs = dict(split="train", fold=0, batch_size=8, training=True, seed=5)
    for task in ("segment", "classify"):
        full = list(make_dataset(records, task=task, **kwargs).take(3))
        compact = list(make_dataset(records, task=task, compact=True, **kwargs).take(3))
        for (x, y), (cx, cy) in zip(full, compact):
            assert cx.dtype == tf.int16 and x.dtype == tf.float32
            np.testing.assert_array_equal(cx.numpy().astype(np.float32), x.numpy())
            if task == "segment":
                assert cy["final"].dtype == tf.uint8
                np.testing.assert_array_equal(cy["final"].numpy().astype(np.float32), y["final"])
            else:
                np.testing.assert_array_equal(cy.numpy(), y.numpy())


@pytest.mark.usefixtures("eager")
def test_a_model_trains_the_same_on_compact_batches(records):
    """Keras casts the int16 input to the model's float32 input; the losses and metrics
    cast the uint8 targets: two steps on either batch end with the same weights."""
    import keras

    from tests.conftest import tiny_config
    from tfcovseg.evaluation.metrics import DiceScore
    from tfcovseg.models import build_model
    from tfcovseg.training.losses import deep_supervision

    weights = []
    for compact in (False, True):
        keras.utils.set_random_seed(0)
        model = build_model(tiny_config(input_size=(SIZE, SIZE)))
        losses, loss_weights = deep_supervision(list(model.output), "hybrid")
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=losses,
            loss_weights=loss_weights,
            metrics={"final": [DiceScore(0, "ggo")]},
        )
        ds = make_dataset(records, "train", 0, batch_size=4, training=True, compact=compact)
        history = model.fit(ds.take(2), epochs=1, verbose=0)
        weights.append((model.get_weights(), history.history))
    for a, b in zip(weights[0][0], weights[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key, values in weights[0][1].items():
        assert values == pytest.approx(weights[1][1][key], rel=1e-5), key


def test_inspect_task_yields_the_decoded_records(records, manifest):
    examples = _inspect(records)
    expected_keys = {"hu", "lesions", "lung", "label", "slice/id", "patient/id", "spacing_mm"}
    assert expected_keys <= set(examples[0])
    raw = _raw_records(records, manifest)
    assert len(examples) == len(raw) == manifest["num_slices"]
    assert {e["slice/id"] for e in examples} == set(raw)
    for ex in examples:
        ref = raw[ex["slice/id"]]
        assert ex["hu"].dtype == np.float32 and ex["hu"].shape == (SIZE, SIZE)
        np.testing.assert_array_equal(ex["hu"], ref["hu"].astype(np.float32))
        np.testing.assert_array_equal(ex["lesions"], ref["lesions"].astype(np.float32))
        np.testing.assert_array_equal(ex["lung"], ref["lung"].astype(np.float32))
        assert ex["label"] == ref["slice/label"] == int(ref["lesions"].any())
        np.testing.assert_allclose(ex["spacing_mm"], ref["spacing_mm"])


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize("fold", [0, 3])
def test_split_yields_exactly_the_manifest_patients(records, manifest, fold):
    splits = manifest["folds"]["splits"][str(fold)]
    seen = {}
    for split in ("train", "validation", "test"):
        examples = _inspect(records, split, fold)
        seen[split] = {e["patient/id"] for e in examples}
        assert seen[split] == set(splits[split]), split
        expected = sum(manifest["patients"][p]["num_slices"] for p in splits[split])
        assert len(examples) == expected
        assert len({e["slice/id"] for e in examples}) == expected  # no duplicates
    assert not seen["train"] & seen["validation"]
    assert not seen["train"] & seen["test"]
    assert not seen["validation"] & seen["test"]
    assert seen["train"] | seen["validation"] | seen["test"] == set(manifest["patients"])
    # A final model's training set: every patient but the validation ones, augmented.
    development = {e["patient/id"] for e in _inspect(records, "development", fold)}
    assert development == seen["train"] | seen["test"]
    assert split_patients(manifest, "development", fold) == sorted(development)


# ----------------------------------------------------------------------------- classify


@pytest.fixture(scope="module")
def relabelled_records(cohort, tmp_path_factory):
    """The cohort with two COVID patients (who have lesions) relabelled viral and unknown."""
    root = tmp_path_factory.mktemp("relabelled")
    shutil.copytree(cohort, root / "dicom")
    path = root / "dicom" / "manifest.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    covid = [r for r in rows if r["diagnosis"] == "covid"]
    covid[0]["diagnosis"], covid[0]["severity"] = "viral", "none"
    covid[1]["diagnosis"], covid[1]["severity"] = "unknown", "unknown"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return _convert(root / "dicom", root / "records")


def test_classify_labels_are_lesion_slices_of_patients_without_another_diagnosis(
    relabelled_records,
):
    manifest = json.loads((relabelled_records / "manifest.json").read_text())
    truth = {(s["patient"], s["index"]): s["label"] for s in manifest["slices"]}
    diagnosis = {p: e["diagnosis"] for p, e in manifest["patients"].items()}
    lesion_patients = {p for p, e in manifest["patients"].items() if e["lesion_slices"]}
    # The cohort must exercise every case of the rule.
    assert {diagnosis[p] for p in lesion_patients} >= {"covid", "viral", "unknown"}

    ds = make_dataset(relabelled_records, "all", batch_size=16, training=False, task="classify")
    inspect = _inspect(relabelled_records)
    xs, labels = [], []
    for x, y in ds:
        assert y.dtype == tf.float32 and y.shape == (x.shape[0],)
        xs.append(x.numpy())
        labels.append(y.numpy())
    x, labels = np.concatenate(xs), np.concatenate(labels)
    assert len(labels) == len(inspect) == manifest["num_slices"]
    # Evaluation order is deterministic: align with the inspect pipeline to get the ids.
    np.testing.assert_array_equal(x[..., 0], np.stack([e["hu"] for e in inspect]))
    cases = Counter()
    for ex, label in zip(inspect, labels):
        pid = ex["patient/id"]
        lesion = truth[(pid, int(ex["slice/index"]))]
        expected = float(lesion == 1 and diagnosis[pid] not in NON_COVID)
        assert label == expected, (diagnosis[pid], lesion, label)
        cases[(diagnosis[pid], lesion, label)] += 1
    assert cases[("viral", 1, 0.0)] > 0  # lesion slices of a non-COVID patient: negatives
    assert cases[("unknown", 1, 1.0)] > 0
    assert cases[("covid", 1, 1.0)] > 0 and cases[("covid", 0, 0.0)] > 0
    assert set(np.unique(labels)) == {0.0, 1.0}
    # The segment task with label_output carries the same labels beside the masks.
    joint = make_dataset(
        relabelled_records,
        "all",
        batch_size=16,
        training=False,
        outputs=("final",),
        label_output="covid_probability",
    )
    joint_labels = np.concatenate([y["covid_probability"].numpy() for _, y in joint])
    np.testing.assert_array_equal(joint_labels, labels)
    assert set(next(iter(joint))[1]) == {"final", "covid_probability"}


# ----------------------------------------------------------------------------- training


def _train_examples(records, seed=0, **kwargs):
    kwargs = {"batch_size": 8, "training": True, "drop_remainder": False, "seed": seed} | kwargs
    return _inspect(records, "train", 0, **kwargs)


def _which_transforms(ex, ref):
    """(k, flip) of the transforms of `ref` that reproduce ex's hu, and those that also
    reproduce its lesions and lung."""
    hu = [t for t in TRANSFORMS if np.array_equal(_dihedral(ref["hu"], *t), ex["hu"])]
    joint = [
        t
        for t in hu
        if np.array_equal(_dihedral(ref["lesions"], *t), ex["lesions"])
        and np.array_equal(_dihedral(ref["lung"], *t), ex["lung"])
    ]
    return hu, joint


# Without cache and oversampling the augmentation runs in the parsing map; with either, after
# the cache and the repeats: both paths must transform jointly and draw every transform.
@pytest.mark.parametrize("cache", [False, True])
def test_augmentation_transforms_image_lesions_and_lung_jointly(records, cache):
    reference = {e["slice/id"]: e for e in _inspect(records, "train", 0)}
    augmented = _train_examples(records, cache=cache)
    assert sorted(e["slice/id"] for e in augmented) == sorted(reference)
    used, moved_lesions = Counter(), 0
    for ex in augmented:
        ref = reference[ex["slice/id"]]
        hu_matches, joint = _which_transforms(ex, ref)
        assert hu_matches, "the augmented image is not a rotation/flip of the original"
        assert joint, f"lesions/lung not transformed like the image ({hu_matches})"
        t = joint[0]
        used[t] += 1
        if t != (0, False) and not np.array_equal(ex["lesions"], ref["lesions"]):
            moved_lesions += 1
    # Every rotation with and without flip occurs: the augmentation is not a no-op and
    # draws all eight transforms.
    assert set(used) == set(TRANSFORMS), used
    assert used[(0, False)] < len(augmented) / 3
    assert moved_lesions > 10  # the mask check above was not trivially about empty masks


def test_no_augmentation_when_disabled(records):
    reference = {e["slice/id"]: e for e in _inspect(records, "train", 0)}
    for ex in _train_examples(records, augment_data=False):
        np.testing.assert_array_equal(ex["hu"], reference[ex["slice/id"]]["hu"])


def _transform_sequence(records, seed):
    reference = {e["slice/id"]: e for e in _inspect(records, "train", 0)}
    out = []
    for ex in _train_examples(records, seed=seed):
        _, joint = _which_transforms(ex, reference[ex["slice/id"]])
        out.append((ex["slice/id"], joint[0]))
    return out


def test_training_pipeline_is_reproducible_for_a_seed(records):
    a = _transform_sequence(records, seed=5)
    b = _transform_sequence(records, seed=5)
    # The same slices in the same order with the same rotation/flip each.
    assert a == b
    c = _transform_sequence(records, seed=6)
    assert a != c


def test_intensity_jitter_changes_the_image_not_the_masks(records):
    """With `intensity_window`, each training slice's grey levels in that window are
    jittered (seeded); its masks and the paper's transforms stay as without."""
    window = (-1250.0, 250.0)
    plain = {e["slice/id"]: e for e in _train_examples(records, seed=3, augment_data=False)}
    a = _train_examples(records, seed=3, augment_data=True, intensity_window=window)
    b = _train_examples(records, seed=3, augment_data=True, intensity_window=window)
    changed = 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["hu"], y["hu"])  # reproducible for a seed
        ref = plain[x["slice/id"]]
        # Masks follow the paper's transform alone; the image differs by more than it.
        assert any(np.array_equal(_dihedral(ref["lesions"], *t), x["lesions"]) for t in TRANSFORMS)
        changed += not any(np.array_equal(_dihedral(ref["hu"], *t), x["hu"]) for t in TRANSFORMS)
        assert x["hu"].min() >= window[0] - 1e-3 and x["hu"].max() <= window[1] + 1e-3
    assert changed == len(a) > 0


def test_cached_pipeline_draws_new_transforms_every_epoch(records):
    reference = {e["slice/id"]: e for e in _inspect(records, "train", 0)}
    ds = make_dataset(
        records,
        "train",
        0,
        batch_size=8,
        training=True,
        task="inspect",
        cache=True,
        drop_remainder=False,
        oversample_lesions=2,
    )
    epochs = []
    for _ in range(2):
        seen = {}
        for b in ds:
            for i, slice_id in enumerate(s.decode() for s in b["slice/id"].numpy()):
                ex = {k: b[k][i].numpy() for k in ("hu", "lesions", "lung")}
                _, joint = _which_transforms(ex, reference[slice_id])
                assert joint
                seen.setdefault(slice_id, []).append(joint[0])
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # the cache holds untransformed slices


def test_training_shuffles_between_epochs(records):
    ds = make_dataset(
        records, "train", 0, batch_size=8, training=True, task="inspect", drop_remainder=False
    )
    epochs = [[s for b in ds for s in b["slice/id"].numpy()] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1])
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_oversampling_repeats_exactly_the_lesion_slices(records, manifest, factor):
    examples = _train_examples(records, oversample_lesions=factor, augment_data=False)
    counts = Counter(e["slice/id"] for e in examples)
    train = set(manifest["folds"]["splits"]["0"]["train"])
    lesion = {e["slice/id"] for e in examples if e["label"] == 1}
    label_by_key = {(s["patient"], s["index"]): s["label"] for s in manifest["slices"]}
    for e in examples:  # the records' slice labels agree with the manifest
        assert e["label"] == label_by_key[(e["patient/id"], int(e["slice/index"]))]
    n_slices = sum(manifest["patients"][p]["num_slices"] for p in train)
    n_lesion = sum(manifest["patients"][p]["lesion_slices"] for p in train)
    assert len(counts) == n_slices and len(lesion) == n_lesion > 0
    for slice_id, count in counts.items():
        assert count == (factor if slice_id in lesion else 1)
    assert len(examples) == n_slices + (factor - 1) * n_lesion


def test_pneumonia_oversampling_repeats_the_other_pneumonias_slices(records, manifest):
    examples = _train_examples(
        records, oversample_lesions=2, oversample_pneumonia=3, augment_data=False
    )
    counts = Counter(e["slice/id"] for e in examples)
    train = manifest["folds"]["splits"]["0"]["train"]
    diagnosis = {e["slice/id"]: e["patient/diagnosis"] for e in examples}
    assert {"bacterial", "viral"} & set(diagnosis.values())  # the test means something
    for e in examples:
        other = e["patient/diagnosis"] in ("bacterial", "viral")
        assert counts[e["slice/id"]] == (3 if other else 1) * (2 if e["label"] == 1 else 1)
    # The epoch length (Keras' progress bar, tf.data cardinality) counts the repeats.
    expected = sum(
        (3 if manifest["patients"][p]["diagnosis"] in ("bacterial", "viral") else 1)
        * (manifest["patients"][p]["num_slices"] + manifest["patients"][p]["lesion_slices"])
        for p in train
    )
    assert len(examples) == expected
    ds = make_dataset(
        records,
        "train",
        0,
        batch_size=8,
        training=True,
        oversample_lesions=2,
        oversample_pneumonia=3,
    )
    assert int(ds.cardinality()) == expected // 8 == sum(1 for _ in ds)
    with pytest.raises(ValueError, match="oversample_pneumonia must be an integer"):
        make_dataset(records, "train", 0, oversample_pneumonia=0)


def test_oversampling_does_not_apply_to_evaluation(records, manifest):
    examples = _inspect(records, "validation", 0, oversample_lesions=3)
    assert len(examples) == len({e["slice/id"] for e in examples})


# ----------------------------------------------------------------------------- resizing


def _pil_resize(image, size):
    """The converter's image resize, which the pipeline must equal."""
    from data_tools.conversion.reading import _resize

    return _resize(np.asarray(image, np.float32), size, nearest=False)


@pytest.mark.parametrize("size", [24, 37, 96])
def test_resize_image_equals_the_converters_resize(rng, size):
    """Training records are resized at conversion, a served study by resize_image in the
    graph: the two must agree or the model sees other images at serving time."""
    from tfcovseg.data.dataset import resize_image

    image = rng.normal(-500.0, 300.0, (64, 64)).astype(np.float32)
    ours = resize_image(image[..., None], (size, size)).numpy()[..., 0]
    np.testing.assert_allclose(ours, _pil_resize(image, size), atol=1e-3)
    # ... and TensorFlow's own antialiased resize, the one exports used before (the same
    # filter; it has no ONNX counterpart)
    tf_resize = tf.image.resize(image[..., None], (size, size), "bilinear", antialias=True)
    np.testing.assert_allclose(ours, tf_resize.numpy()[..., 0], atol=0.05)
    # a batch [N, H, W, C] gives the same per image and channel, sizes given as a tensor
    batch = np.stack([image, -image], axis=-1)[None].repeat(2, axis=0)
    resized = tf.function(resize_image)(batch, tf.constant([size, size])).numpy()
    assert resized.shape == (2, size, size, 2)
    np.testing.assert_allclose(resized[1, ..., 0], ours, atol=1e-3)
    np.testing.assert_allclose(resized[0, ..., 1], -ours, atol=1e-3)


def test_records_are_resized_to_the_model_size(records):
    small = 32
    ds = make_dataset(records, "all", batch_size=16, training=False, image_size=(small, small))
    x, y = next(iter(ds))
    assert x.shape[1:] == (small, small, 1) and y["final"].shape[1:] == (small, small, 3)
    full = _inspect(records)
    resized = _inspect(records, image_size=(small, small))
    assert [e["slice/id"] for e in full] == [e["slice/id"] for e in resized]
    lesion_full = lesion_small = 0
    for big, sm in zip(full, resized):
        assert sm["hu"].shape == (small, small) and sm["lesions"].shape == (small, small, 3)
        assert set(np.unique(sm["lesions"])) <= {0.0, 1.0}
        assert set(np.unique(sm["lung"])) <= {0.0, 1.0}
        # The image is resized as the converter resizes (antialiased bilinear, PIL's) ...
        np.testing.assert_allclose(sm["hu"], _pil_resize(big["hu"], small), atol=1e-2)
        # ... and nearest-neighbour picks one pixel of each block of the masks.
        assert any(
            np.array_equal(sm["lesions"], big["lesions"][i::2, j::2])
            and np.array_equal(sm["lung"], big["lung"][i::2, j::2])
            for i in (0, 1)
            for j in (0, 1)
        )
        lesion_full += big["lesions"].sum()
        lesion_small += sm["lesions"].sum()
    assert lesion_small > 0
    assert 0.15 < lesion_small / lesion_full < 0.35


def test_resizing_rescales_the_pixel_spacing(records):
    """Volumes in mL from "inspect" need the spacing of the pixels actually yielded."""
    full = _inspect(records, "validation", 0)
    resized = _inspect(records, "validation", 0, image_size=(32, 32))
    for big, sm in zip(full, resized):
        np.testing.assert_allclose(sm["spacing_mm"][:2], big["spacing_mm"][:2] * 2, rtol=1e-5)
        np.testing.assert_allclose(sm["spacing_mm"][2], big["spacing_mm"][2], rtol=1e-5)


def test_resized_training_pipeline_augments_and_batches(records):
    ds = make_dataset(records, "train", 0, batch_size=8, training=True, image_size=(32, 32))
    x, y = next(iter(ds))
    assert x.shape == (8, 32, 32, 1) and y["coarse"].shape == (8, 32, 32, 3)


# ----------------------------------------------------------------------------- errors


def test_missing_record_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dataset(tmp_path / "nowhere")


def test_directory_without_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        make_dataset(tmp_path)


def test_missing_shard(records, tmp_path):
    copy = tmp_path / "records"
    shutil.copytree(records, copy)
    shard = sorted(copy.glob("slices-*"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        make_dataset(copy)


def test_fold_that_does_not_exist(records):
    with pytest.raises(ValueError, match=r"fold 7 does not exist.*\[0, 1, 2, 3, 4\]"):
        make_dataset(records, "train", fold=7)


def test_class_names_must_match_the_records(records):
    make_dataset(records, class_names=CLASSES)  # the records' own classes are fine
    with pytest.raises(ValueError, match="ggo.*consolidation"):
        make_dataset(records, class_names=["ggo", "consolidation"])
    with pytest.raises(ValueError, match="classes"):
        make_dataset(records, class_names=["consolidation", "ggo", "fibrosis"])


def test_batch_larger_than_the_split(records, manifest):
    pid = manifest["folds"]["splits"]["0"]["validation"][0]
    n = manifest["patients"][pid]["num_slices"]
    with pytest.raises(ValueError, match=f"batch size {n + 1} is larger than the {n} slices"):
        make_dataset(records, "validation", 0, batch_size=n + 1, training=True)
    # Without dropping the remainder one short batch is fine.
    ds = make_dataset(records, "validation", 0, batch_size=n + 1, training=False)
    assert [int(x.shape[0]) for x, _ in ds] == [n]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "detect"}, "task must be one of"),
        ({"split": "val"}, "split must be one of"),
        ({"oversample_lesions": 0}, "oversample_lesions"),
        ({"oversample_lesions": 1.5}, "oversample_lesions"),
    ],
)
def test_bad_arguments(records, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_dataset(records, **kwargs)


# ----------------------------------------------------------------------------- determinism


def test_evaluation_passes_are_identical(records):
    def batches(ds):
        return [(x.numpy(), y["final"].numpy()) for x, y in ds]

    ds = make_dataset(records, "test", 0, batch_size=8, training=False)
    first, second = batches(ds), batches(ds)
    third = batches(make_dataset(records, "test", 0, batch_size=8, training=False))
    assert len(first) == len(second) == len(third) > 1
    for (xa, ya), (xb, yb), (xc, yc) in zip(first, second, third):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xc)
        np.testing.assert_array_equal(ya, yc)


# ----------------------------------------------------------------------------- GZIP


def test_gzip_records_read_the_same_examples(cohort, records, tmp_path):
    gz = _convert(cohort, tmp_path / "gz", compression="GZIP")
    shards = sorted(gz.glob("slices-*"))
    assert shards and all(s.name.endswith(".tfrecord.gz") for s in shards)
    assert all(s.read_bytes()[:2] == b"\x1f\x8b" for s in shards)  # really gzip
    plain = {e["slice/id"]: e for e in _inspect(records)}
    packed = _inspect(gz)
    assert len(packed) == len(plain) and {e["slice/id"] for e in packed} == set(plain)
    for ex in packed:
        ref = plain[ex["slice/id"]]
        for key in ("hu", "lesions", "lung", "label", "patient/id", "slice/index"):
            np.testing.assert_array_equal(ex[key], ref[key])


def test_slices_without_masks_never_train_as_lesion_free(cohort, tmp_path):
    # A COVID-19 patient's series without its mask has unknown lesions: not a segmentation
    # target, nor a slice label. A healthy patient's needs no mask (lesion-free by the
    # diagnosis).
    src = tmp_path / "cohort"
    shutil.copytree(cohort, src)
    with (src / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    for wanted in ("covid", "healthy"):  # the phantom writes patient i into case_000i
        i = next(i for i, r in enumerate(rows) if r["diagnosis"] == wanted)
        (src / f"case_{i:04d}" / "lesions.nii.gz").unlink()
    out = _convert(src, tmp_path / "records", folds=2)
    manifest = json.loads((out / "manifest.json").read_text())
    unknown = {s["patient"] for s in manifest["slices"] if not s["annotated"]}
    assert len(unknown) == 1
    (pid,) = unknown
    assert manifest["patients"][pid]["diagnosis"] == "covid"
    n_unknown = manifest["patients"][pid]["num_slices"]
    total = manifest["num_slices"]
    for task, expected in (("segment", total - n_unknown), ("classify", total - n_unknown)):
        ds = make_dataset(out, "all", 0, batch_size=8, training=False, task=task)
        seen = sum(int(x.shape[0]) for x, _ in ds)
        assert seen == expected == int(ds.cardinality()) * 8 - (-expected % 8)
    # The unlabelled task serves exactly the slices without masks, as images alone.
    ds = make_dataset(out, "all", 0, batch_size=4, training=False, task="unlabelled")
    batches = list(ds)
    assert all(isinstance(b, tf.Tensor) and b.shape[1:] == (64, 64, 1) for b in batches)
    assert (
        sum(int(b.shape[0]) for b in batches)
        == n_unknown
        == split_slices(manifest, "all", 0, "unlabelled")
    )
    with pytest.raises(ValueError, match="every slice has lesion masks"):
        make_dataset(_convert(cohort, tmp_path / "all-masked", folds=2), "all", 0,
                     task="unlabelled")  # fmt: skip
    everything = _inspect(out)
    assert len(everything) == total
    assert sum(e["mask/annotated"] == 0 for e in everything) == n_unknown


def test_spatial_jitter_moves_half_the_slices_with_their_masks(records):
    """With `spatial_augment`, about half of the training slices are no quarter turn or
    flip of their record any more; their masks moved with them (the lung mask still lies
    on air-filled lung) and stay labels; the draws are reproducible for a seed."""
    reference = {e["slice/id"]: e for e in _inspect(records, "train", 0)}
    a = _train_examples(records, seed=3, spatial_augment=True)
    b = _train_examples(records, seed=3, spatial_augment=True)
    moved = 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["hu"], y["hu"])
        np.testing.assert_array_equal(x["lung"], y["lung"])
        ref = reference[x["slice/id"]]
        assert set(np.unique(x["lesions"])) <= {0, 1} and set(np.unique(x["lung"])) <= {0, 1}
        hu_matches, joint = _which_transforms(x, ref)
        if hu_matches:
            assert joint  # a slice left alone keeps the paper's joint transform
            continue
        moved += 1
        if ref["lung"].sum() > 300:  # (a small lung is mostly its blurred edge)
            # Aligned: the moved lung mask covers air-filled pixels as the record's does
            # (0.85-0.95 of them; the unmoved mask on the moved image: 0.3-0.8).
            before = np.mean(ref["hu"][ref["lung"] > 0] < -500)
            assert np.mean(x["hu"][x["lung"] > 0] < -500) > before - 0.08
    assert 0.3 * len(a) < moved < 0.7 * len(a)


def test_spatial_jitter_keeps_the_compact_dtypes_and_labels_follow_the_masks(records):
    """Segment batches stay int16 HU and uint8 masks; a slice whose lesion a zoom or shift
    took out of the frame is no lesion slice any more (the classifier's target)."""
    import tensorflow as tf

    from tfcovseg.data.dataset import jitter_geometry

    ds = make_dataset(records, "train", 0, batch_size=8, compact=True, spatial_augment=True)
    x, y = next(iter(ds))
    assert x.dtype == tf.int16 and y["final"].dtype == tf.uint8
    lesions = np.zeros((16, 16, 1), np.uint8)
    lesions[0, 0] = 1  # one pixel in a corner: most moves take it out
    example = {"hu": tf.zeros((16, 16), tf.int16), "lesions": tf.constant(lesions),
               "slice/label": tf.constant([1], tf.int64)}  # fmt: skip
    kept = dropped = 0
    for k in range(40):
        out = jitter_geometry(example, tf.constant([k, 0], tf.int64))
        has = bool(np.any(out["lesions"].numpy()))
        assert out["slice/label"].numpy().tolist() == [int(has)]
        kept, dropped = kept + has, dropped + (not has)
    assert kept and dropped  # the unmoved half keeps it; moves drop it
