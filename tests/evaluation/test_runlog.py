"""tfcovseg.evaluation.runlog: a run folder's training record read back for the report."""

from __future__ import annotations

import json

from tfcovseg.configs.experiment import load_config
from tfcovseg.evaluation.metrics import roc_curve
from tfcovseg.evaluation.runlog import fingerprint_message, training_summary


def _log(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,loss,val_loss"] + [f"{i},{a},{b}" for i, (a, b) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_phases_epochs_best_epoch_and_early_stop(tmp_path):
    config = load_config("quickstart", ["train.epochs=5", "train.classifier_epochs=3"])
    _log(tmp_path / "logs" / "classification.csv", [(0.7, 0.6), (0.5, 0.55), (0.4, 0.58)])
    _log(tmp_path / "logs" / "segmentation.csv", [(3.0, 2.9), (2.5, 2.2), (2.2, 2.4)])
    _log(tmp_path / "logs" / "student_r1.csv", [(2.0, 2.1)])
    (tmp_path / "logs" / "empty.csv").write_text("epoch,loss,val_loss\n")
    run = {"data_fingerprint": "abc", "seed": 7, "versions": {"keras": "3"}, "other": 1}
    (tmp_path / "run.json").write_text(json.dumps(run | {"timings": {"segmentation_s": 12}}))
    summary = training_summary(tmp_path, config)
    # In the order the phases run; a log without epochs is no phase.
    assert list(summary["phases"]) == ["segmentation", "student_r1", "classification"]
    seg = summary["phases"]["segmentation"]
    assert (seg["epochs"], seg["max_epochs"], seg["best_epoch"]) == (3, 5, 2)
    assert seg["best_val_loss"] == 2.2 and seg["stopped_early"] is True
    cls = summary["phases"]["classification"]
    assert (cls["best_epoch"], cls["stopped_early"]) == (2, False)  # 3 of 3 epochs
    assert summary["phases"]["student_r1"]["max_epochs"] == config.semi.epochs
    assert summary["data_fingerprint"] == "abc" and summary["timings"] == {"segmentation_s": 12}
    assert "other" not in summary
    # A damaged log is named, the others still read.
    (tmp_path / "logs" / "classification.csv").write_bytes(b"\xff\xfe\x00garbage")
    damaged = training_summary(tmp_path, config)
    assert "classification" not in damaged["phases"] and "segmentation" in damaged["phases"]
    assert damaged["unreadable_logs"] == ["logs/classification.csv: UnicodeDecodeError"]
    # Text that is no training log, and a run.json that is no JSON or holds fields of
    # other types, were left out of the report without a word (the second and third
    # stopped the evaluation: JSONDecodeError, AttributeError). A diverged log (NaN
    # losses) is still its phase.
    (tmp_path / "logs" / "classification.csv").write_text("name,value\nx,1\n")
    (tmp_path / "logs" / "student_r1.csv").write_text("epoch,loss\n0,nan\n1,nan\n")
    (tmp_path / "run.json").write_text("{not json")
    damaged = training_summary(tmp_path, config)
    assert list(damaged["phases"]) == ["segmentation", "student_r1"]
    assert damaged["unreadable_logs"] == [
        "run.json: JSONDecodeError",
        "logs/classification.csv: no loss column (not a training log)",
    ]
    (tmp_path / "run.json").write_text(json.dumps({"timings": [1, 2], **run}))
    damaged = training_summary(tmp_path, config)
    assert damaged["unreadable_logs"][0] == "run.json: timings malformed"
    assert damaged["seed"] == 7 and "timings" not in damaged
    # Only unreadable files: the report's training section still names them.
    from tfcovseg.reporting.report import render_markdown

    for name in ("segmentation", "student_r1"):
        (tmp_path / "logs" / f"{name}.csv").unlink()
    results = {"split": "test", "fold": 0, "classes": ["ggo"]}
    summary = training_summary(tmp_path, config)
    assert summary["phases"] == {}
    markdown = render_markdown(results | {"training": summary}, "x")
    assert "could not be read (left out): run.json: timings malformed" in markdown
    # A run folder without logs or run.json (an older or foreign run): no phases, no facts.
    assert training_summary(tmp_path / "nothing") == {"phases": {}}


def test_roc_curve_known_answer_and_one_class():
    roc = roc_curve([1, 0, 1, 0, 1], [0.9, 0.8, 0.8, 0.1, 0.05])
    # The tie at 0.8 moves both rates at once (its segment is diagonal).
    assert roc["fpr"] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert roc["tpr"] == [0.0, 1 / 3, 2 / 3, 2 / 3, 1.0]
    assert roc["thresholds"] == [0.9, 0.8, 0.1, 0.05]
    assert roc["auc"] == 0.5833333333333334 and (roc["positives"], roc["negatives"]) == (3, 2)
    one = roc_curve([1, 1], [0.2, 0.4])
    assert one["auc"] is None and one["fpr"] is None and one["negatives"] == 0


def test_fingerprint_message_reads_run_json_as_the_report_does(tmp_path):
    def message(text):
        (tmp_path / "run.json").write_text(text)
        trained = training_summary(tmp_path).get("data_fingerprint")
        return fingerprint_message(tmp_path, "REC", "f1", trained)

    assert message(json.dumps({"data_fingerprint": "f1"})) is None
    assert "(fingerprint f1) are not those" in message(json.dumps({"data_fingerprint": "f0"}))
    # Unreadable or malformed: the report names that; no mismatch is claimed.
    assert message("{not json") is None and message("[1]") is None
    assert message(json.dumps({"data_fingerprint": 7})) is None
