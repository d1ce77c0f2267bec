"""python -m tfcovseg.train and tfcovseg.evaluate on a tiny phantom run."""

from __future__ import annotations

import json

import keras
import pytest

from tfcovseg.config import load_config
from tfcovseg.evaluate import evaluate_run
from tfcovseg.train import TrainingError, main, train

TINY_MODEL = [
    "model.input_size=[64,64]",
    "model.stem_filters=8",
    "model.encoder_filters=[8,16,16,32]",
    "model.encoder_blocks=[1,1,1,1]",
    "model.se_reduction=4",
    "model.aspp_filters=8",
    "model.decoder_filters=[16,8,8,8]",
    "model.decoder_convs=1",
    "model.refine_filters=8",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    overrides = TINY_MODEL + [
        f"data.records_dir={root / 'cache' / 'records'}",
        "data.phantom_patients=10",
        "data.phantom_seed=1",
        "data.cache=true",
        "train.epochs=2",
        "train.classifier_epochs=2",
        "train.batch_size=4",
        "name=tiny",
    ]
    config = load_config("experiments/quickstart.yaml", overrides)
    summary = train(config, root / "run", verbose=0, log=lambda *a: None)
    return root, config, summary


def test_run_folder_contents(tiny):
    root, config, summary = tiny
    run = root / "run"
    for name in (
        "config.yaml",
        "segmenter_best.keras",
        "segmenter_last.keras",
        "classifier_best.keras",
        "classifier_last.keras",
        "run.json",
        "logs/segmentation.csv",
        "logs/classification.csv",
    ):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml") == config
    info = json.loads((run / "run.json").read_text())
    assert info["seed"] == config.train.seed and len(info["data_fingerprint"]) == 16
    assert info["versions"]["keras"] == keras.__version__
    assert set(info["timings"]) == {"segmentation_s", "classification_s", "total_s"}
    lines = (run / "logs" / "segmentation.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 and "val_final_dice_ggo" in lines[0]
    # The records came from the phantom cohort written into the cache folder.
    assert (root / "cache" / "phantom" / "manifest.csv").is_file()


def test_phase_two_freezes_the_encoder(tiny):
    root, _, _ = tiny
    segmenter = keras.saving.load_model(root / "run" / "segmenter_last.keras")
    classifier = keras.saving.load_model(root / "run" / "classifier_last.keras")
    assert len(classifier.trainable_weights) == 2
    # The classifier's encoder weights are the segmenter's, untouched by phase 2.
    for a, b in zip(segmenter.encoder.weights, classifier.encoder.weights):
        assert (keras.ops.convert_to_numpy(a) == keras.ops.convert_to_numpy(b)).all()


def test_evaluate_writes_metrics_and_report(tiny):
    root, config, _ = tiny
    results = evaluate_run(root / "run", split="test")
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["split"] == "test" and set(metrics["segmentation"]) == set(
        config.model.class_names
    )
    for scores in metrics["segmentation"].values():
        assert set(scores) == {"dice", "iou", "precision", "recall", "mean_image_dice"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    patients = results["classification"]["any_slice"]
    c = patients["confusion"]
    assert c["tp"] + c["fp"] + c["fn"] + c["tn"] == patients["patients"] > 0
    report = (root / "run" / "report.md").read_text()
    assert "Research use, not a medical device." in report and "Table 4" in report


def test_existing_run_folder_needs_resume(tiny):
    root, config, _ = tiny
    with pytest.raises(TrainingError, match="--resume"):
        train(config, root / "run", verbose=0, log=lambda *a: None)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.class_names=[ggo,consolidation]", "have 3 classes"),
        ("train.batch_size=100000", "larger than the"),
        ("data.num_folds=6", "fold"),
    ],
)
def test_bad_inputs_stop_before_training(tiny, tmp_path, capsys, override, message):
    root, _, _ = tiny
    code = main(
        [
            "--config",
            str(root / "run" / "config.yaml"),
            "--out",
            str(tmp_path / "o"),
            "--set",
            override,
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "segmenter_last.keras").exists()


def test_missing_records_and_folds(tmp_path, capsys):
    code = main(
        [
            "--config",
            "experiments/paper.yaml",
            "--set",
            f"data.records_dir={tmp_path / 'none'}",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(["--set", "model.aspp_rate=[1]"])
    assert code == 2 and "unknown key 'model.aspp_rate'" in capsys.readouterr().err
    assert main(["--resume"]) == 2


def test_evaluate_cli_in_a_fresh_process(tiny):
    """A new process must load the saved models (custom losses registered on import)."""
    import os
    import subprocess
    import sys

    root, _, _ = tiny
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tfcovseg.evaluate",
            "--run",
            str(root / "run"),
            "--split",
            "validation",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "evaluation on the validation split" in proc.stdout
    assert "research use, not a medical device" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "tfcovseg.evaluate", "--run", str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "not a run folder" in bad.stderr
