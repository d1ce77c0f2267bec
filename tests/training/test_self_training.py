"""python -m tfcovseg.train with semi.method self_training on tiny 2-D slice folders."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from data_tools.conversion.pipeline import convert
from tests.conftest import TINY_MODEL
from tfcovseg.configs.experiment import ConfigError, config_from_dict, load_config
from tfcovseg.models import load_model
from tfcovseg.training.trainer import TrainingError, train

# Tiny networks: eager steps cost less than tracing them (tests.conftest.eager_functions).
pytestmark = pytest.mark.usefixtures("eager_module")

SIZE = 32


def _slices(root, names, labelled, seed):
    """8-bit windowed slices (Imgs/) with a bright blob, masks (GT/) when `labelled`."""
    rng = np.random.default_rng(seed)
    (root / "Imgs").mkdir(parents=True)
    if labelled:
        (root / "GT").mkdir()
    for name in names:
        image = rng.normal(60, 10, (40, 40))
        labels = np.zeros((40, 40), np.uint8)
        y, x = rng.integers(8, 28, 2)
        image[y : y + 8, x : x + 8] += 120
        labels[y : y + 8, x : x + 8] = 1
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "Imgs" / f"{name}.png")
        if labelled:
            Image.fromarray(labels).save(root / "GT" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("semi")
    classes = ("ggo", "consolidation")
    kw = dict(size=SIZE, salt="x", classes=classes, default_diagnosis="covid", progress=False)
    convert(_slices(root / "lab", [str(i) for i in range(10)], True, 0), root / "rec", **kw)
    names = [f"Data-1_vol{v}_{k}" for v in (1, 2) for k in range(1, 4)]
    convert(_slices(root / "unl", names, False, 1), root / "unrec", **kw)
    return root


def _config(root, *more):
    return load_config(
        "quickstart",
        TINY_MODEL
        + [
            f"model.input_size=[{SIZE},{SIZE}]",
            "model.pre_windowed=true",
            "model.class_names=[ggo,consolidation]",
            "train.positive_weights=[]",  # the quickstart's are for its three classes
            f"data.records_dir={root / 'rec'}",
            "data.phantom_patients=0",
            "data.oversample_lesions=1",
            "data.oversample_pneumonia=1",
            "data.intensity_augment=true",
            "data.spatial_augment=true",
            "train.phases=[segmentation,self_training]",
            "train.epochs=1",
            "train.batch_size=4",
            "train.overlay_images=0",
            "semi.method=self_training",
            f"semi.records_dir={root / 'unrec'}",
            "semi.rounds=2",
            "semi.pool=0",
            "semi.epochs=1",
            "name=semi",
            *more,
        ],
    )


def _weights(path):
    return load_model(path).get_weights()


def _peak_learning_rate(path) -> float:
    """The Adam rate (a schedule's peak) a saved model was compiled with."""
    with zipfile.ZipFile(path) as z:
        rate = json.loads(z.read("config.json"))["compile_config"]["optimizer"]["config"]
    rate = rate["learning_rate"]
    return rate["config"]["initial_learning_rate"] if isinstance(rate, dict) else rate


def test_self_training_rounds_make_the_student_the_runs_segmenter(folders, tmp_path, monkeypatch):
    from tfcovseg.data import dataset

    moved = []  # which pipelines data.spatial_augment reached (traced once per map)
    original = dataset.jitter_geometry

    def spy(example, seed):  # the records' slices carry their label; pseudo-labels do not
        moved.append("labelled" if "slice/label" in example else "pseudo-labelled")
        return original(example, seed)

    monkeypatch.setattr(dataset, "jitter_geometry", spy)
    lines = []
    config = _config(folders, "semi.learning_rate=5e-5")
    summary = train(config, tmp_path / "run", verbose=0, log=lines.append)
    run = tmp_path / "run"
    rounds = summary["self_training"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["pool"] == 6 and r["pseudo_labelled"] == 3 for r in rounds)  # keep 0.5
    assert any("phase 1b: self-training on 6 unlabelled slices" in line for line in lines)
    for name in ("teacher_best", "student_r1_best", "student_r2_best", "student_best"):
        assert (run / f"{name}.keras").is_file(), name
    segmenter, student = (
        _weights(run / "segmenter_best.keras"),
        _weights(run / "student_best.keras"),
    )
    assert all(np.array_equal(a, b) for a, b in zip(segmenter, student))
    teacher = _weights(run / "teacher_best.keras")
    assert not all(np.array_equal(a, b) for a, b in zip(segmenter, teacher))
    state = json.loads((run / "state.json").read_text())
    assert state["completed"] == ["segmentation", "self_training"]
    assert (run / "logs" / "student_r2.csv").is_file()
    # The students train at semi.learning_rate, not at the teacher's train.learning_rate.
    assert config.train.learning_rate != pytest.approx(5e-5)
    assert _peak_learning_rate(run / "student_r1_best.keras") == pytest.approx(5e-5)
    # The small rotation, zoom and shift moved the labelled and the pseudo-labelled slices.
    assert {"labelled", "pseudo-labelled"} <= set(moved)

    # Killed during round 2: --resume keeps phase 1 and round 1, runs round 2 alone.
    state["completed"] = ["segmentation"]
    state["self_training"] = state["self_training"][:1]
    (run / "state.json").write_text(json.dumps(state))
    (run / "student_r2_best.keras").unlink()
    round1 = _weights(run / "student_r1_best.keras")
    lines.clear()
    again = train(config, run, resume=True, verbose=0, log=lines.append)
    assert any("round 1: completed before" in line for line in lines)
    assert any("round 2: 3 of 6 slices pseudo-labelled" in line for line in lines)
    assert [r["round"] for r in again["self_training"]] == [1, 2]
    assert all(
        np.array_equal(a, b) for a, b in zip(_weights(run / "student_r1_best.keras"), round1)
    )
    assert (run / "student_r2_best.keras").is_file()


def test_unlabelled_slices_of_the_training_split(folders, tmp_path):
    """Without semi.records_dir, the training split's slices without masks are used; a
    split without any is an error that says so."""
    with pytest.raises(TrainingError, match="no slice without lesion masks to label in the "
                       "training split of fold 0"):  # fmt: skip
        train(_config(folders, "semi.records_dir=''"), tmp_path / "run", verbose=0,
              log=lambda *a: None)  # fmt: skip
    assert not (tmp_path / "run").exists()  # nothing left to block the next run
    with pytest.raises(TrainingError, match="semi.records_dir: .*nowhere"):
        train(_config(folders, f"semi.records_dir={tmp_path / 'nowhere'}"), tmp_path / "run",
              verbose=0, log=lambda *a: None)  # fmt: skip


@pytest.mark.parametrize(
    "values, message",
    [
        ({"semi": {"method": "self_training"}}, "go together"),
        ({"train": {"phases": ["segmentation", "self_training"]}}, "go together"),
        ({"semi": {"keep": 0.0}}, r"semi.keep must be in \(0, 1\]"),
        ({"semi": {"share": 1.0}}, r"semi.share must be in \(0, 1\)"),
        ({"semi": {"views": 9}}, "semi.views must be 1 to 8"),
        ({"semi": {"learning_rate": -1e-4}}, r"semi.learning_rate must be >= 0"),
        ({"semi": {"method": "mean_teacher"}}, "semi.method"),
    ],
)
def test_bad_semi_settings_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)
