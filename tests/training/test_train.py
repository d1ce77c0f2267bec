"""python -m tfcovseg.train and tfcovseg.evaluate on a tiny phantom run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import pytest

from tests.conftest import TINY_MODEL
from tfcovseg.cli.train import main
from tfcovseg.configs.experiment import load_config
from tfcovseg.data.dataset import make_dataset, split_slices
from tfcovseg.evaluation.burden import lesion_burdens
from tfcovseg.evaluation.calibration import validation_burdens
from tfcovseg.evaluation.metrics import patient_scores
from tfcovseg.evaluation.run import evaluate_run
from tfcovseg.models import load_run_models
from tfcovseg.training.trainer import TrainingError, train


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
    config = load_config("quickstart", overrides)
    summary = train(config, root / "run", verbose=0, log=lambda *a: None)
    return root, config, summary


def test_prepare_records_writes_the_configured_mix(tmp_path):
    from data_tools.phantom import cohort_plan
    from tfcovseg.training.trainer import prepare_records

    overrides = [
        "model.input_size=[32,32]",
        f"data.records_dir={tmp_path / 'records'}",
        "data.phantom_patients=5",
        "data.phantom_seed=3",
        "data.phantom_mix=pneumonia",
    ]
    folder = prepare_records(load_config("quickstart", overrides), log=print)
    manifest = json.loads((folder / "manifest.json").read_text())
    diagnoses = sorted(p["diagnosis"] for p in manifest["patients"].values())
    assert diagnoses == sorted(d for d, _ in cohort_plan(5, 3, "pneumonia"))
    assert diagnoses != sorted(d for d, _ in cohort_plan(5, 3, "default"))
    again = load_config("quickstart", overrides)
    assert prepare_records(again, log=print) == folder  # same settings: the cache is reused

    # Other settings with the old cache: an error naming the folder, nothing rewritten.
    before = (folder / "manifest.json").read_bytes()
    for change in (
        "data.phantom_mix=default",
        "data.phantom_seed=4",
        "data.phantom_patients=6",
        "data.phantom_slices=[50,60]",
    ):
        config = load_config("quickstart", overrides + [change])
        with pytest.raises(TrainingError, match="phantom cohort in .*phantom.*not made with"):
            prepare_records(config, log=print)
    # A cohort folder that matches but records from another cohort (half-replaced cache).
    with (tmp_path / "phantom" / "manifest.csv").open("w") as f:
        f.write("patient,diagnosis,severity,slices\n")
        for i, (d, s) in enumerate(cohort_plan(5, 4, "pneumonia")):
            f.write(f"X{i},{d},{s},25\n")
    config = load_config(
        "quickstart",
        overrides[:-2] + ["data.phantom_seed=4", "data.phantom_mix=pneumonia"],
    )
    # Records of one's own beside a cohort folder: the fix is named, not only a deletion.
    with pytest.raises(
        TrainingError,
        match=r"phantom records in .*records.*phantom_seed=4.*--set data.phantom_patients=0",
    ):
        prepare_records(config, log=print)
    assert (folder / "manifest.json").read_bytes() == before


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
        "severity.json",
        "logs/segmentation.csv",
        "logs/classification.csv",
    ):
        assert (run / name).is_file(), name
    assert not (run / "backup").exists()  # nothing left to resume from a finished run
    assert load_config(run / "config.yaml") == config
    info = json.loads((run / "run.json").read_text())
    assert info["seed"] == config.train.seed and len(info["data_fingerprint"]) == 16
    assert info["versions"]["keras"] == keras.__version__
    assert info["cpu_kernels"] == "Eigen"  # the package's default; pytest loaded TF so
    assert set(info["timings"]) == {"segmentation_s", "classification_s", "total_s"}
    lines = (run / "logs" / "segmentation.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 and "val_final_dice_ggo" in lines[0]
    # The records came from the phantom cohort written into the cache folder.
    assert (root / "cache" / "phantom" / "manifest.csv").is_file()


def test_phase_two_freezes_the_encoder(tiny):
    root, _, _ = tiny
    segmenter = keras.saving.load_model(root / "run" / "segmenter_last.keras")
    classifier = keras.saving.load_model(root / "run" / "classifier_last.keras")
    # Only the head trains: dense kernel and bias, normalisation scale and offset.
    assert len(classifier.trainable_weights) == 4
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
        assert set(scores) == {
            "dice", "iou", "precision", "recall", "lesion_slice_dice", "lesion_slices"
        }  # fmt: skip
        assert all(0.0 <= scores[k] <= 1.0 for k in scores if k != "lesion_slices")
    patients = results["classification"]["any_slice"]
    c = patients["confusion"]
    assert c["tp"] + c["fp"] + c["fn"] + c["tn"] == patients["patients"] > 0
    report = (root / "run" / "report.md").read_text()
    assert "Research use, not a medical device." in report and "Table 4" in report
    html = (root / "run" / "report.html").read_text()
    assert "Research use, not a medical device." in html
    # Both patient rules; the robust one was chosen on the validation patients.
    robust = results["classification"]["robust"]
    assert robust["chosen_on"] == "validation" and robust["min_slices"] >= 1
    assert 0.0 < robust["threshold"] < 1.0
    assert set(results["classification"]["patients"]) == set(results["lesion_lung_ratio"])
    # The segmentation's lesion-burden rule: burdens as `lesion_burdens` computes them on
    # the same split, the cut chosen on the validation patients, the calls follow it.
    burden = results["classification"]["lesion_burden"]
    burdens = results["classification"]["lesion_burdens"]
    segmenter, _ = load_run_models(root / "run")
    ds = make_dataset(
        config.data.records_dir, "test", config.data.fold, 8, training=False, task="inspect"
    )
    weights = config.train.positive_weights
    expected, diagnosis = lesion_burdens(segmenter, ds, positive_weights=weights)
    assert burdens == pytest.approx(expected)
    _, val_diagnosis = validation_burdens(segmenter, config, run=root / "run")
    if len({d == "covid" for d in val_diagnosis.values()}) == 1:
        # Validation patients of one kind choose no rule (as the export): no calls.
        assert burden["threshold"] is None and "every validation patient is" in burden["rule"]
    else:
        assert burden["chosen_on"] == "validation" and 0.0 <= burden["threshold"] <= 1.0
        calls = {p: b >= burden["threshold"] for p, b in burdens.items()}
        truth = {p: diagnosis[p] == "covid" for p in burdens}
        assert burden["accuracy"] == patient_scores(truth, calls)["accuracy"]
    assert "lesion-burden" in report or "lesion burden" in report
    # Severity statistics and figures, as PNG files.
    assert "severity" in next(iter(results["lesion_lung_ratio"].values()))
    assert results["severity_statistics"]
    for rel in results["figures"].values():
        assert (root / "run" / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
    assert {"ratios", "confusion", "overlays"} <= set(results["figures"])
    # The training record from the run's logs and run.json: each phase's epochs (2 of 2,
    # so no early stop), its best epoch, the data fingerprint and versions.
    phases = results["training"]["phases"]
    assert list(phases) == ["segmentation", "classification"]
    seg = phases["segmentation"]
    assert seg["epochs"] == seg["max_epochs"] == 2 and seg["stopped_early"] is False
    assert seg["best_epoch"] == 1 + min(range(2), key=seg["val_loss"].__getitem__)
    assert results["training"]["data_fingerprint"] and results["training"]["versions"]["keras"]
    assert results["training"]["cpu_kernels"] == "Eigen"  # shown in the report's facts
    assert "cpu kernels: Eigen" in (root / "run" / "report.md").read_text()
    # The slice classifier's ROC on the annotated slices, its AUC the area under it.
    roc = results["classification"]["slices"]
    lesion = [
        bool(m.any())
        for b in ds
        for m, a in zip(b["lesions"].numpy(), b["mask/annotated"].numpy())
        if a
    ]
    assert (roc["positives"], roc["negatives"]) == (sum(lesion), len(lesion) - sum(lesion))
    if roc["positives"] and roc["negatives"]:
        fpr, tpr = roc["fpr"], roc["tpr"]
        area = sum((b - a) * (c + d) / 2 for a, b, c, d in zip(fpr, fpr[1:], tpr, tpr[1:]))
        assert roc["auc"] == pytest.approx(area) and fpr[-1] == tpr[-1] == 1.0
    else:  # this split's patients have no lesion slice: the AUC is undefined and said so
        assert roc["auc"] is None and "slice AUC is undefined" in report
    # Dice per patient of the split, with its diagnosis.
    assert set(results["patient_dice"]) == set(results["lesion_lung_ratio"])
    assert all(
        set(e["dice"]) == set(config.model.class_names) for e in results["patient_dice"].values()
    )
    assert "## Training" in report and "## Dice per patient" in report
    assert "learning_curves" in results["figures"]


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
            "--set",
            "train.positive_weights=[]",  # the tiny run's are for 3 classes
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "segmenter_last.keras").exists()


def test_missing_records_and_folds(tmp_path, capsys):
    code = main(
        [
            "--config",
            "paper",
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
    # A final model trains on the test patients too: nothing is left to evaluate.
    code = main(["--set", "data.train_split=development", "--evaluate"])
    assert code == 2 and "nothing left to evaluate" in capsys.readouterr().err
    code = main(["--set", "data.train_split=everything"])
    assert code == 2 and "data.train_split" in capsys.readouterr().err


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


def test_each_split_keeps_its_own_evaluation(tiny, tmp_path, monkeypatch, capsys):
    """`evaluate --split validation` wrote over the test split's metrics.json, report and
    figures (compare then read validation figures as the run's); and a kill between
    metrics.json and the reports left figures of one evaluation beside the other's."""
    import shutil

    from tfcovseg.cli.evaluate import main as evaluate
    from tfcovseg.evaluation.compare import CompareError, load_summary
    from tfcovseg.reporting import report

    run = tmp_path / "run"
    shutil.copytree(tiny[0] / "run", run)
    for name in ("metrics.json", "report.md", "report.html", "figures", "evaluation"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    assert evaluate(["--run", str(run), "--split", "validation"]) == 0
    assert str(run / "evaluation" / "validation" / "metrics.json") in capsys.readouterr().out
    with pytest.raises(CompareError, match="compare .*evaluation/validation"):
        load_summary(run)  # no test evaluation yet: the validation one is pointed at
    assert load_summary(run / "evaluation" / "validation")["split"] == "validation"
    assert evaluate(["--run", str(run), "--no-figures"]) == 0
    test = json.loads((run / "metrics.json").read_text())
    validation = run / "evaluation" / "validation"
    assert test["split"] == "test" and "figures" not in test
    assert json.loads((validation / "metrics.json").read_text())["split"] == "validation"
    assert (validation / "figures" / "learning_curves.png").is_file()
    assert "validation split" in (validation / "report.md").read_text()
    # Summaries of either read the run's config.
    assert load_summary(validation)["experiment"] == load_summary(run)["experiment"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_reports", killed)
    assert evaluate(["--run", str(run), "--split", "validation"]) == 130
    # No metrics.json describing other figures than those beside it; the test split's kept.
    assert not (validation / "metrics.json").exists()
    assert not (validation / "report.md").exists()  # no report of the figures now gone
    assert "interrupted: an interrupted evaluation writes no metrics.json" in (
        capsys.readouterr().err
    )
    assert json.loads((run / "metrics.json").read_text()) == test


def test_evaluating_another_folds_patients_is_refused(tiny, capsys):
    """`evaluate --fold 1` on a fold-0 run scored fold 1's test patients, whom it had
    trained on, and overwrote the run's metrics.json with the flattering figures."""
    from tfcovseg.cli.evaluate import main as evaluate

    root, _, _ = tiny
    metrics = root / "run" / "metrics.json"
    before = metrics.read_bytes() if metrics.exists() else None
    assert evaluate(["--run", str(root / "run"), "--fold", "1"]) == 2
    err = capsys.readouterr().err
    assert "trained on fold 0" in err and "--fold 1" in err
    assert (metrics.read_bytes() if metrics.exists() else None) == before


def test_evaluate_names_the_checkpoints_it_scored(tiny, tmp_path, capsys):
    """Without segmenter_best.keras evaluate scored segmenter_last.keras, and without
    either it scored the classifier alone, saying nothing of it anywhere."""
    import shutil

    from tfcovseg.cli.evaluate import main as evaluate

    run = tmp_path / "run"
    shutil.copytree(tiny[0] / "run", run)
    (run / "segmenter_best.keras").unlink()
    assert evaluate(["--run", str(run), "--split", "validation", "--no-figures"]) == 0
    assert "models: segmenter_last.keras, classifier_best.keras (no best checkpoint" in (
        capsys.readouterr().out
    )
    metrics = json.loads((run / "evaluation" / "validation" / "metrics.json").read_text())
    assert metrics["models"] == {
        "segmenter": "segmenter_last.keras",
        "classifier": "classifier_best.keras",
    }
    (run / "segmenter_last.keras").unlink()
    assert evaluate(["--run", str(run), "--split", "validation", "--no-figures"]) == 0
    assert "(no segmenter in the run)" in capsys.readouterr().out


def _tiny_yaml(tiny, tmp_path, *extra):
    """The tiny run's config with extra overrides, as a YAML file."""
    from tfcovseg.configs.experiment import save_config

    _, config, _ = tiny
    path = tmp_path / "tiny.yaml"
    save_config(load_config(tiny[0] / "run" / "config.yaml", list(extra)), path)
    return path


def _csv_epochs(path):
    import csv

    with open(path, newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_killed_run_resumes_and_loses_at_most_one_epoch(tiny, tmp_path):
    """SIGKILL during epoch 3 of 5; --resume continues from the last completed epoch."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config_path = _tiny_yaml(
        tiny,
        tmp_path,
        "train.phases=[segmentation]",
        "train.epochs=5",
        "train.early_stopping_patience=10",
        "train.batch_size=8",
        "data.oversample_lesions=1",
        "train.overlay_images=0",
        "train.lr_schedule=cosine",
    )
    out = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tfcovseg.train",
            "--config",
            str(config_path),
            "--out",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    csv_path = out / "logs" / "segmentation.csv"
    deadline = time.monotonic() + 600  # a hang guard (the cores are shared)
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if csv_path.is_file() and len(_csv_epochs(csv_path)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.5)  # into the third epoch
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done = _csv_epochs(csv_path)
    assert 2 <= len(done) < 5 and not (out / "run.json").exists()
    # The killed run reads as unfinished: without a state.json until its first phase
    # ended, evaluate and export took segmenter_best.keras of epoch 2 for a finished run's.
    from tfcovseg.evaluation.runlog import unfinished_phases

    assert unfinished_phases(out, load_config(out / "config.yaml")) == ["segmentation"]
    assert main(["--out", str(out), "--resume", "--quiet"]) == 0
    epochs = _csv_epochs(csv_path)
    resumed = epochs[len(done) :]
    # BackupAndRestore saved the last completed epoch: training goes on from there.
    assert resumed[0] in (len(done), len(done) + 1) and resumed[-1] == 4
    assert epochs == sorted(epochs)
    info = json.loads((out / "run.json").read_text())
    assert info["resumed"] is True
    assert json.loads((out / "state.json").read_text())["completed"] == ["segmentation"]
    # The best checkpoint is the best of the whole run, across the kill.
    assert (out / "segmenter_best.keras").is_file()
    # The cosine schedule went on from the restored optimiser's step: after 5 epochs it
    # sits at its floor, 1 % of the rate, having counted every epoch's steps once.
    last = keras.saving.load_model(out / "segmenter_last.keras", compile=True)
    steps = _steps_per_epoch(load_config(config_path))
    assert int(last.optimizer.iterations) == 5 * steps
    peak = load_config(config_path).train.learning_rate
    assert float(last.optimizer.learning_rate) == pytest.approx(0.01 * peak, rel=1e-4)


def test_severity_rule_and_export_at_the_end(tiny, tmp_path, capsys):
    import shutil

    root, config, _ = tiny
    rule = json.loads((root / "run" / "severity.json").read_text())
    manifest = json.loads((config_records(config) / "manifest.json").read_text())
    fitted_on = manifest["folds"]["splits"][str(config.data.fold)]
    covid = [
        p
        for p in fitted_on["train"] + fitted_on["validation"]
        if manifest["patients"][p]["diagnosis"] == "covid"
    ]
    assert rule["patients"] == len(covid) and "grades" in rule
    # --export after a (resumed, already complete) run writes the next servable version.
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    models = tmp_path / "models"
    (models / "1").mkdir(parents=True)
    args = ["--config", str(out / "config.yaml"), "--out", str(out), "--resume", "--quiet"]
    assert main(args + ["--export", str(models)]) == 0
    assert (models / "2" / "saved_model.pb").is_file()
    assert f"servable model: {models / '2'}" in capsys.readouterr().out
    # The config's train.export_dir does the same (the quickstart sets it); into the
    # folder it went to last, the same weights are not exported again (they were, as
    # version 3, and evaluated again), into another they are.
    assert main(args + ["--set", f"train.export_dir={models}"]) == 0
    printed = capsys.readouterr().out
    assert f"nothing trained: exported before as {models / '2'}" in printed
    assert not (models / "3").exists()
    assert main(args + ["--export", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "1" / "saved_model.pb").is_file()
    total = json.loads((out / "run.json").read_text())["timings"]["total_s"]
    assert total > json.loads((root / "run" / "run.json").read_text())["timings"]["total_s"]


def _steps_per_epoch(config) -> int:
    manifest = json.loads((config_records(config) / "manifest.json").read_text())
    data = config.data
    factors = (data.oversample_lesions, data.oversample_pneumonia)
    slices = split_slices(manifest, "train", data.fold, "segment", *factors)
    return slices // config.train.batch_size


def config_records(config):
    from pathlib import Path

    return Path(config.data.records_dir).expanduser()


def test_resume_skips_completed_phases(tiny, tmp_path):
    root, config, _ = tiny
    import shutil

    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    before = (out / "segmenter_last.keras").stat().st_mtime_ns
    messages = []
    train(config, out, resume=True, verbose=0, log=messages.append)
    assert (out / "segmenter_last.keras").stat().st_mtime_ns == before
    assert any("already completed" in m for m in messages)
    # Another configuration cannot resume this run.
    other = load_config(out / "config.yaml", ["train.epochs=7"])
    # It named the fix "--config OUT/config.yaml", which fails the same way under the
    # --set that made the difference: the key is named now.
    with pytest.raises(TrainingError, match="another configuration.*train.epochs 2 there, 7 now"):
        train(other, out, resume=True, verbose=0, log=lambda *a: None)
    # Other CPU kernels may go on with it (the quickstart's oneDNN since session 46
    # against a run begun with Eigen's): how the steps compute, not what.
    other_kernels = {"eigen": "onednn", "onednn": "eigen"}[config.train.cpu_kernels]
    kernels = load_config(out / "config.yaml", [f"train.cpu_kernels={other_kernels}"])
    train(kernels, out, resume=True, verbose=0, log=lambda *a: None)
    # And so may XLA (benchmark folders and runs alike: `ARITHMETIC_KEYS`).
    xla = load_config(out / "config.yaml", [f"train.jit_compile={not config.train.jit_compile}"])
    train(xla, out, resume=True, verbose=0, log=lambda *a: None)


def test_a_kill_after_a_phase_s_last_epoch_resumes_without_training_it_again(
    tiny, tmp_path, monkeypatch
):
    """Keras deleted the backup as fit ended, before the phase saved its last model and
    state.json recorded it: a kill there (seconds at 512x512) made --resume train the
    whole phase again from epoch 1, its CSV log listing every epoch twice."""
    from tfcovseg.training import phases

    _, config, _ = tiny
    config = load_config(
        tiny[0] / "run" / "config.yaml", ["train.phases=[segmentation]", "train.epochs=1"]
    )
    out = tmp_path / "run"
    real = phases.save_model

    def killed(model, path, *args, **kwargs):
        if Path(path).name == "segmenter_last.keras":
            raise KeyboardInterrupt  # as a SIGKILL would land: after fit, before the state
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(phases, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config, out, verbose=0, log=lambda *a: None)
    monkeypatch.undo()
    rows = _csv_epochs(out / "logs" / "segmentation.csv")
    metadata = json.loads((out / "backup" / "segmentation" / "training_metadata.json").read_text())
    assert metadata["finished"] is True and rows == [0]
    best = (out / "segmenter_best.keras").read_bytes()
    said = []
    train(config, out, resume=True, verbose=0, log=said.append)
    assert _csv_epochs(out / "logs" / "segmentation.csv") == rows  # no epoch trained again
    assert any("had finished its epochs" in line for line in said)
    assert (out / "segmenter_best.keras").read_bytes() == best
    assert json.loads((out / "state.json").read_text())["completed"] == ["segmentation"]
    assert (out / "segmenter_last.keras").is_file() and not (out / "backup").exists()


def test_a_run_resumes_on_its_records_moved_not_on_others(tiny, tmp_path):
    """A run resumed from another folder could not find its relative records_dir, and
    --set data.records_dir=<the same records elsewhere> was refused as "another
    configuration": the way the error itself advised was a dead end."""
    import shutil

    root, config, _ = tiny
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    moved = tmp_path / "moved"
    shutil.copytree(config_records(config), moved)
    said = []
    there = load_config(out / "config.yaml", [f"data.records_dir={moved}"])
    train(there, out, resume=True, verbose=0, log=said.append)
    assert any(f"records: {moved} (moved from" in line for line in said)
    # Other records (a manifest that differs, as another conversion's would).
    elsewhere = tmp_path / "other"
    shutil.copytree(moved, elsewhere)
    manifest = json.loads((elsewhere / "manifest.json").read_text())
    (elsewhere / "manifest.json").write_text(json.dumps(manifest | {"note": "another"}))
    other = load_config(out / "config.yaml", [f"data.records_dir={elsewhere}"])
    with pytest.raises(TrainingError, match="holds other records"):
        train(other, out, resume=True, verbose=0, log=lambda *a: None)


def test_cross_validation_trains_every_fold(tiny, phantom_run, tmp_path, capsys):
    # The shared 8-patient records with 2 folds: every fold, at 2/5 of the cost.
    config_path = _tiny_yaml(
        tiny,
        tmp_path,
        "train.epochs=1",
        "train.classifier_epochs=1",
        f"data.records_dir={phantom_run.records}",
        "data.num_folds=2",
        "data.phantom_patients=0",
    )
    out = tmp_path / "cv"
    assert main(["--config", str(config_path), "--fold", "all", "--out", str(out), "--quiet"]) == 0
    folds = load_config(config_path).data.num_folds
    for k in range(folds):
        metrics = json.loads((out / f"fold{k}" / "metrics.json").read_text())
        assert metrics["fold"] == k
    cv = json.loads((out / "cv_metrics.json").read_text())
    printed = capsys.readouterr().out
    assert (out / "cv_report.md").is_file() and "cross-validation folder" in printed
    # Not a terminal: one short line per epoch (both phases, every fold), no progress bar.
    epochs = [line for line in printed.splitlines() if line.startswith("  epoch 1/1: loss")]
    assert len(epochs) == 2 * folds and all(len(line) < 200 for line in epochs)
    assert "\x1b" not in printed and "━" not in printed
    assert folds == 2 and len(cv["folds"]) == folds
    # ... and a cross-validation is not one fold's run to continue (it trained one beside
    # the folds).
    assert main(["--out", str(out), "--resume"]) == 2
    assert "holds a cross-validation (fold0/, ...)" in capsys.readouterr().err
    assert not (out / "logs").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--fold", "seven"])
    assert exit_info.value.code == 2
    assert "integer or 'all'" in capsys.readouterr().err


def test_two_workers_train_through_the_cli_to_identical_weights(tiny, tmp_path):
    """`python -m tfcovseg.train` under TF_CONFIG: MultiWorkerMirroredStrategy, custom loop."""
    import numpy as np

    from tests.training.test_distributed import _finish, _free_ports, _python

    config_path = _tiny_yaml(
        tiny, tmp_path, "train.phases=[segmentation]", "train.epochs=1", "train.overlay_images=0"
    )
    out = tmp_path / "run"
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        scratch = tmp_path / f"tmp{index}"
        scratch.mkdir()
        procs.append(
            _python(
                "from tfcovseg.cli.train import main; import sys; "
                f"sys.exit(main(['--config', {str(config_path)!r}, '--out', {str(out)!r}, "
                "'--quiet']))",
                tmp_path / f"worker{index}.log",
                {"TF_CONFIG": json.dumps(tf_config), "TMPDIR": str(scratch)},
            )
        )
    _finish(procs)
    info = json.loads((out / "run.json").read_text())
    assert info["strategy"] == "MultiWorkerMirroredStrategy" and info["replicas"] == 2
    assert _csv_epochs(out / "logs" / "segmentation.csv") == [0]
    # Worker 1 wrote its copy under its temporary folder, not into the run folder.
    (other,) = (tmp_path / "tmp1").rglob("segmenter_last.keras")
    chief = keras.saving.load_model(out / "segmenter_last.keras")
    worker = keras.saving.load_model(other)
    for a, b in zip(chief.weights, worker.weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_figure6_prefers_true_lesions_then_predicted_then_probability():
    import numpy as np

    from tfcovseg.evaluation.run import _Overlays

    def offer(overlays, pid, true_area, pred_value, pred_pixels=0):
        pred = np.full((4, 4, 1), pred_value, "float32")
        pred.flat[:pred_pixels] = 0.9
        overlays.offer(true_area, pid, np.zeros((4, 4)), np.zeros((4, 4, 1)), pred)

    overlays = _Overlays(3, threshold=0.5)
    offer(overlays, "healthy", 0, 0.2)  # nothing true, nothing predicted
    offer(overlays, "viral", 0, 0.1, pred_pixels=5)  # false lesions
    offer(overlays, "covid", 12, 0.1, pred_pixels=2)
    offer(overlays, "covid", 3, 0.1, pred_pixels=9)  # a smaller true lesion: not kept
    offer(overlays, "bacterial", 0, 0.3)  # higher probability than healthy, no lesion
    assert [item[1] for item in overlays.items] == ["covid", "viral", "bacterial"]
    assert overlays.items[0][0][0] == 12
    # A split without lesions still gets its overlays: the most predicted lesion first.
    empty = _Overlays(2)
    offer(empty, "a", 0, 0.2)
    offer(empty, "b", 0, 0.1, pred_pixels=1)
    assert [item[1] for item in empty.items] == ["b", "a"]


# A process that dies (as under SIGKILL) while it writes classifier_best.keras: Keras writes
# the file through saving_lib.save_model, so the kill comes with part of the file written.
_DIE_WRITING_CLASSIFIER = """
import os, sys
from keras.src.saving import saving_lib
real = saving_lib.save_model
def dying(model, filepath, *args, **kwargs):
    if "classifier_best" in str(filepath):
        with open(filepath, "wb") as f:
            f.write(b"PK\\x03\\x04 cut short")
        os._exit(137)
    return real(model, filepath, *args, **kwargs)
saving_lib.save_model = dying
from tfcovseg.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def _phase_one_done(tiny, tmp_path, *overrides):
    """A copy of the tiny run with phase 1 done and phase 2 still to run (its files gone),
    under the tiny config with `overrides` (phase 2 without retraining phase 1)."""
    import shutil

    from tfcovseg.configs.experiment import save_config

    root, _, _ = tiny
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    for name in ("classifier_best.keras", "classifier_last.keras", "run.json", "severity.json"):
        (out / name).unlink(missing_ok=True)
    (out / "logs" / "classification.csv").unlink()
    state = json.loads((out / "state.json").read_text())
    (out / "state.json").write_text(json.dumps(state | {"completed": ["segmentation"]}))
    config = load_config(out / "config.yaml", list(overrides))
    save_config(config, out / "config.yaml")
    return out, config


def test_an_interrupted_run_is_said_by_evaluate_and_refused_by_export(tiny, tmp_path, capsys):
    """A run killed in phase 1 was evaluated and exported without a word (its report said
    the phase "stopped early"), and the export served a model of 1 epoch of 4."""
    from tfcovseg.cli.evaluate import main as evaluate_main
    from tfcovseg.inference.export import ExportError, export_run

    out, _ = _phase_one_done(tiny, tmp_path)
    (out / "state.json").write_text(json.dumps({"completed": [], "timings": {}}))
    assert evaluate_main(["--run", str(out), "--split", "validation", "--no-figures"]) == 0
    printed = capsys.readouterr().out
    assert "warning: " in printed and "did not finish training (phase segmentation" in printed
    assert f"--out {out} --resume" in printed
    metrics = json.loads((out / "evaluation" / "validation" / "metrics.json").read_text())
    assert metrics["training"]["phases"]["segmentation"]["interrupted"] is True
    assert "Warning: " in (out / "evaluation" / "validation" / "report.md").read_text()
    with pytest.raises(ExportError, match="did not finish training"):
        export_run(out, tmp_path / "models", log=lambda *a: None)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_a_moved_or_swapped_model_is_named_by_evaluate_and_export(tiny, tmp_path, capsys):
    """A run whose classifier was moved away exported with the segmenter as its gate
    ("the run has no classifier"); one whose two files were swapped raised AttributeError
    deep in the export."""
    import shutil

    from tfcovseg.cli.evaluate import main as evaluate_main
    from tfcovseg.inference.export import ExportError, export_run

    root, _, _ = tiny
    moved = tmp_path / "moved"
    shutil.copytree(root / "run", moved)
    for name in ("classifier_best.keras", "classifier_last.keras"):
        (moved / name).unlink(missing_ok=True)
    with pytest.raises(ExportError, match="lacks classifier_best.keras.*--resume"):
        export_run(moved, tmp_path / "models", log=lambda *a: None)
    assert evaluate_main(["--run", str(moved), "--split", "validation", "--no-figures"]) == 0
    assert "warning: " in capsys.readouterr().out
    warnings = json.loads((moved / "evaluation" / "validation" / "metrics.json").read_text())[
        "warnings"
    ]
    assert any("lacks classifier_best.keras" in w for w in warnings)
    swapped = tmp_path / "swapped"
    shutil.copytree(root / "run", swapped)
    for name in ("segmenter_last.keras", "classifier_last.keras"):
        (swapped / name).unlink(missing_ok=True)
    (swapped / "segmenter_best.keras").rename(swapped / "tmp.keras")
    (swapped / "classifier_best.keras").rename(swapped / "segmenter_best.keras")
    (swapped / "tmp.keras").rename(swapped / "classifier_best.keras")
    with pytest.raises(ExportError, match="holds a CovidClassifier, not the run's segmenter"):
        export_run(swapped, tmp_path / "models", log=lambda *a: None)
    assert evaluate_main(["--run", str(swapped), "--split", "validation"]) == 2
    assert "not the run's segmenter" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_evaluating_on_other_records_is_said(tiny, tmp_path, capsys):
    """Records of another cohort (--set data.records_dir=...) were scored as the run's
    split without a word, the report still naming the training records' fingerprint."""
    import shutil

    from tfcovseg.cli.evaluate import main as evaluate_main

    root, _, _ = tiny
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    argv = ["--run", str(run), "--split", "validation", "--no-figures"]
    assert evaluate_main(argv) == 0
    assert "are not those" not in capsys.readouterr().out
    assert not json.loads((run / "evaluation" / "validation" / "metrics.json").read_text()).get(
        "warnings"
    )
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(info | {"data_fingerprint": "0123456789abcdef"}))
    assert evaluate_main(argv) == 0
    assert "are not those" in capsys.readouterr().out
    warnings = json.loads((run / "evaluation" / "validation" / "metrics.json").read_text())[
        "warnings"
    ]
    assert any("(0123456789abcdef)" in w and "are not those" in w for w in warnings)


def test_kill_while_writing_the_best_classifier_then_resume_and_export(tiny, tmp_path):
    import os
    import subprocess
    import sys

    from tfcovseg.inference.export import export_run

    # The kill comes in the last epoch's checkpoint: nothing after it would write it again.
    out, _ = _phase_one_done(tiny, tmp_path, "train.classifier_epochs=1")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    args = ["--out", str(out), "--resume", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-c", _DIE_WRITING_CLASSIFIER, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 137, proc.stderr[-2000:]
    # Nothing half-written under the final name (the old code left the cut file there).
    assert not (out / "classifier_best.keras").exists()
    assert main(["--out", str(out), "--resume", "--quiet"]) == 0
    assert not list(out.glob(".*.partial-*"))
    segmenter, classifier = load_run_models(out)
    assert classifier is not None and (out / "classifier_best.keras").stat().st_size > 0
    target = export_run(out, tmp_path / "models", log=lambda *a: None)
    assert (target / "saved_model.pb").is_file()


def test_resume_redoes_a_completed_phase_whose_model_does_not_load(tiny, tmp_path):
    import shutil

    from tfcovseg.configs.experiment import save_config
    from tfcovseg.training.run_folder import verified_state

    root, _, _ = tiny
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    config = load_config(out / "config.yaml", ["train.classifier_epochs=1"])
    save_config(config, out / "config.yaml")
    kept = (out / "segmenter_best.keras").stat().st_mtime_ns
    (out / "classifier_best.keras").write_bytes(b"")  # left by a kill before atomic writes
    (out / "metrics.json").write_text("{}")  # an evaluation of the weights retrained now
    (out / "figures").mkdir(exist_ok=True)
    (out / "evaluation" / "validation").mkdir(parents=True, exist_ok=True)
    messages = []
    train(config, out, resume=True, verbose=0, log=messages.append)
    text = "\n".join(messages)
    assert "classifier_best.keras is empty (0 bytes)" in text and "runs again" in text
    # It described weights no longer there (and compare read it): gone, and said so.
    assert not (out / "metrics.json").exists() and not (out / "figures").exists()
    assert not (out / "evaluation").exists()
    assert "removed the evaluation of the earlier weights (metrics.json" in text
    assert "phase 1: segmentation already completed" in text
    assert (out / "segmenter_best.keras").stat().st_mtime_ns == kept
    assert load_run_models(out)[1] is not None
    assert json.loads((out / "state.json").read_text())["completed"] == [
        "segmentation",
        "classification",
    ]
    assert _csv_epochs(out / "logs" / "classification.csv") == [0]  # afresh, not appended
    # A broken segmenter undoes the classifier built on it too.
    (out / "segmenter_best.keras").write_bytes(b"PK\x03\x04 cut")
    state = verified_state(out, config, messages.append)
    assert state["completed"] == []
    assert not (out / "segmenter_best.keras").exists()
    assert not (out / "logs" / "classification.csv").exists()


def test_evaluate_names_a_shard_whose_bytes_changed(tiny, tmp_path, capsys):
    """A shard of the right size with bytes flipped inside ended evaluate in a DataLossError
    traceback (a truncated one was named)."""
    import shutil

    from tfcovseg.cli.evaluate import main as evaluate_main

    root, config, _ = tiny
    records = tmp_path / "records"
    shutil.copytree(config_records(config), records)
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    for name in json.loads((records / "manifest.json").read_text())["shards"]:
        data = bytearray((records / name).read_bytes())
        data[100:4100] = bytes(255 - b for b in data[100:4100])  # same size, other bytes
        (records / name).write_bytes(bytes(data))
    argv = ["--run", str(run), "--split", "test", "--no-figures"]
    assert evaluate_main([*argv, "--set", f"data.records_dir={records}"]) == 2
    err = capsys.readouterr().err
    assert "are corrupt" in err and "data_tools.convert" in err
    assert len(err.strip().splitlines()) == 1


def test_a_truncated_shard_is_named_and_leaves_no_run_folder(tiny, tmp_path, capsys):
    import shutil

    root, config, _ = tiny
    records = tmp_path / "records"
    shutil.copytree(config_records(config), records)
    manifest = json.loads((records / "manifest.json").read_text())
    shard = records / manifest["shards"][0]
    shard.write_bytes(shard.read_bytes()[:-5000])
    args = ["--config", str(root / "run" / "config.yaml"), "--set"]
    args += [f"data.records_dir={records}", "--quiet", "--out"]
    assert main(args + [str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "truncated" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o1").exists()
    # Records written before the manifest kept shard sizes: the error comes at read time,
    # still naming the shard, and still no run folder blocks the next --out.
    del manifest["shard_bytes"]
    (records / "manifest.json").write_text(json.dumps(manifest))
    assert main(args + [str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "corrupt" in err
    assert not (tmp_path / "o2").exists()


def test_every_fold_is_checked_before_the_first_trains(tmp_path):
    """Six patients in five folds: fold 0 trained for hours before fold 1 was found to
    have no validation patient."""
    from tfcovseg.training.trainer import cross_validate

    config = load_config(
        "quickstart",
        [
            "model.input_size=[32,32]",
            f"data.records_dir={tmp_path / 'records'}",
            "data.phantom_patients=6",
            "data.phantom_slices=[4,6]",
        ],
    )
    with pytest.raises(TrainingError, match=r"split of fold [1-4] .* is empty"):
        cross_validate(config, tmp_path / "cv", log=lambda *a: None)
    assert not (tmp_path / "cv" / "fold0").exists()


def test_resume_and_out_mistakes_are_one_line_errors(tiny, tmp_path, capsys):
    root, _, _ = tiny
    assert main(["--out", str(tmp_path / "nothing"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no run to continue" in err
    assert not (tmp_path / "nothing").exists()
    (tmp_path / "file").write_text("x")
    config = ["--config", str(root / "run" / "config.yaml")]
    for out, words in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "under")):
        assert main(config + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out") and words in err and str(out) in err
        assert len(err.strip().splitlines()) == 1
    assert main(config + ["--out", str(tmp_path / "r"), "--export", str(tmp_path / "file")]) == 2
    assert "--export" in capsys.readouterr().err and not (tmp_path / "r").exists()
    bad = f"train.export_dir={tmp_path / 'file'}"
    assert main(config + ["--out", str(tmp_path / "r"), "--set", bad]) == 2
    assert "train.export_dir" in capsys.readouterr().err and not (tmp_path / "r").exists()
    # A folder that is not a run (records, say) is never taken for a failed start and
    # cleared, nor (with --resume) for a run to continue: the default experiment trained
    # into a predict output that way. It stays as it was.
    records = config_records(tiny[1])
    before = sorted(p.name for p in records.iterdir())
    assert main(config + ["--out", str(records)]) == 2
    assert "is not empty: choose a new or empty --out" in capsys.readouterr().err
    assert main(["--out", str(records), "--resume"]) == 2
    assert "holds no run to continue (no config.yaml)" in capsys.readouterr().err
    assert sorted(p.name for p in records.iterdir()) == before
    (tmp_path / "empty").mkdir()
    assert main(["--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "is empty: there is no run to continue" in capsys.readouterr().err
    assert not any((tmp_path / "empty").iterdir())
    # A finished single-fold run is not a cross-validation to continue.
    assert main(["--out", str(root / "run"), "--resume", "--fold", "all"]) == 2
    assert "holds a single-fold run" in capsys.readouterr().err
    assert not (root / "run" / "fold0").exists()


@pytest.mark.usefixtures("eager")
def test_classifier_trains_on_its_own_larger_cohort(tmp_path):
    """data.classifier_phantom_patients: phase 2 on a second cohort's pooled features."""
    from tfcovseg.configs.experiment import ConfigError
    from tfcovseg.data.dataset import read_manifest

    overrides = TINY_MODEL + [
        f"data.records_dir={tmp_path / 'cache' / 'records'}",
        "data.phantom_patients=5",
        "data.classifier_phantom_patients=4",
        "data.phantom_seed=2",
        "data.phantom_slices=[6,8]",
        "train.epochs=1",
        "train.classifier_epochs=3",
        "train.batch_size=4",
        "name=tiny-cohort",
    ]
    messages = []
    train(load_config("quickstart", overrides), tmp_path / "run", verbose=0, log=messages.append)
    main_cohort = read_manifest(tmp_path / "cache" / "records")["patients"]
    own = read_manifest(tmp_path / "cache" / "classifier-records")["patients"]
    assert len(main_cohort) == 5 and len(own) == 4 and not set(own) & set(main_cohort)
    slices = sum(p["num_slices"] for p in own.values())
    assert any(f"pooled features of {slices} slices of cache/classifier-records" in m
               for m in messages)  # fmt: skip
    with (tmp_path / "run" / "logs" / "classification.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 1 and {"val_auc", "val_patient_accuracy"} <= set(rows[0])
    assert (tmp_path / "run" / "classifier_best.keras").is_file()
    # Made once: a second run reuses both cohorts.
    stamp = (tmp_path / "cache" / "classifier-records" / "manifest.json").stat().st_mtime_ns
    from tfcovseg.training.inputs import classifier_records

    assert classifier_records(load_config("quickstart", overrides)) == (
        tmp_path / "cache" / "classifier-records"
    )
    assert (tmp_path / "cache" / "classifier-records" / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="classifier_phantom_patients needs a phantom cohort"):
        load_config("quickstart", [*overrides, "data.phantom_patients=0"])


def test_pooled_features_keep_the_classify_task_slices():
    """An unannotated slice of a COVID-19 patient is no negative: the head never sees it."""
    import numpy as np
    import tensorflow as tf

    from tfcovseg.training.phases import pooled_features

    class Features:
        def predict_on_batch(self, hu):
            return np.arange(len(hu), dtype="float32")[:, None]

    batch = {
        "hu": tf.zeros((4, 8, 8)),
        "mask/annotated": tf.constant([1, 0, 0, 1]),
        "patient/diagnosis": tf.constant(["covid", "covid", "viral", "healthy"]),
        "slice/label": tf.constant([1, 1, 0, 0]),
    }
    x, y, w = pooled_features(Features(), [batch], 3)
    assert x[:, 0].tolist() == [0, 2, 3] and y.tolist() == [1, 0, 0] and w.tolist() == [1, 3, 1]


def test_evaluate_and_export_take_data_overrides_for_moved_records(tiny, tmp_path, capsys):
    """A run whose records moved since training: --set data.records_dir=DIR finds them;
    keys that would change the trained network are refused."""
    import shutil
    from pathlib import Path

    from tfcovseg.cli.evaluate import main as evaluate_main
    from tfcovseg.cli.export import main as export_main

    root, config, _ = tiny
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    text = (run / "config.yaml").read_text()
    records = str(Path(config.data.records_dir).expanduser())
    (run / "config.yaml").write_text(text.replace(records, str(tmp_path / "moved-away")))
    args = ["--run", str(run), "--split", "validation", "--no-figures"]
    assert evaluate_main(args) == 2
    assert "moved-away" in capsys.readouterr().err  # the missing records are named
    assert evaluate_main(args + ["--set", f"data.records_dir={records}"]) == 0
    assert (
        json.loads((run / "evaluation" / "validation" / "metrics.json").read_text())["split"]
        == "validation"
    )
    bad = ["--set", "model.input_size=[32,32]"]
    assert evaluate_main(args + bad) == 2 and export_main(["--run", str(run)] + bad) == 2
    assert "only data.* keys can change for a trained run" in capsys.readouterr().err
