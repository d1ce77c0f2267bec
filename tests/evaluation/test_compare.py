"""tfcovseg.evaluation.compare: cross-validation summaries and the paper's comparison tables.

Run folders are fabricated (config.yaml through tfcovseg.configs.experiment, metrics.json
by hand), so nothing is trained and neither TensorFlow nor Keras is needed by the module under test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tfcovseg.cli.compare import main as compare_main
from tfcovseg.configs.experiment import load_config, save_config
from tfcovseg.constants import DISCLAIMER
from tfcovseg.evaluation import compare

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["ggo", "consolidation", "fibrosis"]


def _seg(dice: dict[str, float]) -> dict:
    return {
        c: {
            "dice": d,
            "iou": d / (2 - d) if not math.isnan(d) else d,
            "precision": 0.9,
            "recall": 0.8,
            "lesion_slice_dice": 0.7,
        }
        for c, d in dice.items()
    }


def _cls(accuracy: float, robust: bool = False, min_slices: int = 3) -> dict:
    block = {
        "accuracy": accuracy,
        "recall": 1.0,
        "precision": 0.75,
        "f1": 2 * 0.75 / 1.75,
        "confusion": {"tp": 3, "fp": 1, "fn": 0, "tn": 2},
        "patients": 6,
        "rule": "positive when any slice is",
    }
    out = {"any_slice": block}
    if robust:
        out["robust"] = block | {
            "accuracy": accuracy - 0.1,
            "min_slices": min_slices,
            "threshold": 0.5,
            "chosen_on": "validation",
            "rule": f"positive when >= {min_slices} slices are",
        }
    # per-patient details, as evaluate.py writes them: not metrics to average
    out["patients"] = {"p01": {"diagnosis": "covid", "slices": 40, "max_probability": 0.9}}
    return out


def make_run(
    path: Path,
    *,
    name="quickstart",
    architecture="coarse_refine",
    loss="hybrid",
    dice=None,
    accuracy=None,
    robust=False,
    min_slices=3,
    classes=CLASSES,
    split="test",
    fold=0,
    metrics=True,
) -> Path:
    """An evaluated run folder: config.yaml from the quickstart plus hand-written metrics."""
    path.mkdir(parents=True, exist_ok=True)
    overrides = [f"name={name}", f"model.architecture={architecture}", f"train.loss={loss}"]
    if architecture in ("unet", "unet_plus_plus"):
        overrides.append("train.phases=[segmentation]")
    if architecture == "seresnet_classifier":
        overrides.append("train.phases=[classification]")
    save_config(load_config("quickstart", overrides), path / "config.yaml")
    if not metrics:
        return path
    results = {
        "experiment": name,
        "architecture": architecture,
        "loss": loss,
        "split": split,
        "fold": fold,
        "threshold": 0.5,
        "classes": list(classes),
        "disclaimer": DISCLAIMER,
    }
    if dice is not None:
        results["segmentation"] = _seg(dice)
    if accuracy is not None:
        results["classification"] = _cls(accuracy, robust, min_slices)
    (path / "metrics.json").write_text(json.dumps(results, indent=2))  # NaN written as NaN
    return path


FOLD_GGO = [0.80, 0.84, 0.78, 0.83]
FOLD_CONS = [0.60, 0.70, math.nan, 0.65]  # fold 2 has no consolidation: NaN


def make_cv(path: Path, name="cv_paper", min_slices=(3, 3, 3, 3)) -> Path:
    for k, (g, c) in enumerate(zip(FOLD_GGO, FOLD_CONS)):
        make_run(
            path / f"fold{k}",
            name=name,
            fold=k,
            dice={"ggo": g, "consolidation": c, "fibrosis": 0.5},
            accuracy=0.8 + 0.05 * k,
            robust=True,
            min_slices=min_slices[k],
        )
    return path


def test_cv_mean_and_sd_match_numpy_and_ignore_nan_folds(tmp_path):
    summary = compare.load_summary(make_cv(tmp_path / "cv"))
    assert summary["kind"] == "cv"
    assert summary["folds"] == [0, 1, 2, 3]
    assert summary["classes"] == CLASSES and summary["split"] == "test"
    ggo = summary["metrics"]["segmentation/ggo/dice"]
    assert ggo["n"] == 4
    assert ggo["mean"] == pytest.approx(np.mean(FOLD_GGO))
    assert ggo["sd"] == pytest.approx(np.std(FOLD_GGO, ddof=1))
    assert ggo["values"] == pytest.approx(FOLD_GGO)
    cons = summary["metrics"]["segmentation/consolidation/dice"]
    finite = [v for v in FOLD_CONS if not math.isnan(v)]
    assert cons["n"] == 3
    assert cons["mean"] == pytest.approx(np.mean(finite))
    assert cons["sd"] == pytest.approx(np.std(finite, ddof=1))
    acc = summary["metrics"]["classification/any_slice/accuracy"]
    assert acc["mean"] == pytest.approx(np.mean([0.8, 0.85, 0.9, 0.95]))
    # mean Dice: per fold over lesion types (NaN for fold 2), then over folds
    per_fold = [np.mean([g, c, 0.5]) for g, c in zip(FOLD_GGO, FOLD_CONS) if not math.isnan(c)]
    mean_dice = summary["metrics"][compare.MEAN_DICE]
    assert mean_dice["n"] == 3 and mean_dice["mean"] == pytest.approx(np.mean(per_fold))


def test_single_run_summary_is_flat_values(tmp_path):
    run = make_run(tmp_path / "r", dice={"ggo": 0.8, "consolidation": 0.6, "fibrosis": 0.4})
    s = compare.load_summary(run)
    assert s["kind"] == "run" and s["folds"] == [0] and s["experiment"] == "quickstart"
    assert s["metrics"]["segmentation/ggo/iou"]["mean"] == pytest.approx(0.8 / 1.2)
    assert math.isnan(s["metrics"]["segmentation/ggo/iou"]["sd"])
    assert s["metrics"][compare.MEAN_DICE]["mean"] == pytest.approx(0.6)
    assert "classification/any_slice/accuracy" not in s["metrics"]


def test_write_cv_summary_files(tmp_path):
    cv = make_cv(tmp_path / "cv")
    content = compare.write_cv_summary(cv)
    on_disk = json.loads((cv / "cv_metrics.json").read_text())  # strict JSON: NaN -> null
    assert on_disk == content
    assert on_disk["folds"] == [0, 1, 2, 3] and on_disk["num_folds"] == 4
    assert on_disk["metrics"]["segmentation/consolidation/dice"]["values"][2] is None
    assert on_disk["metrics"]["segmentation/ggo/dice"]["sd"] == pytest.approx(
        np.std(FOLD_GGO, ddof=1)
    )
    assert on_disk["rules"]["robust"] == "positive when >= 3 slices are"
    assert on_disk["fold_rules"]["robust"] == ["positive when >= 3 slices are"] * 4
    assert not any("p01" in key for key in on_disk["metrics"])  # per-patient details skipped
    report = (cv / "cv_report.md").read_text()
    assert DISCLAIMER in report
    cell = f"{np.mean(FOLD_GGO):.3f} ± {np.std(FOLD_GGO, ddof=1):.3f}"
    assert f"| ggo | {cell} |" in report
    assert "(n=3)" in report  # consolidation from three folds
    assert not list(cv.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_robust_rule_chosen_per_fold(tmp_path):
    cv = make_cv(tmp_path / "cv", min_slices=(2, 3, 3, 2))
    content = compare.write_cv_summary(cv)
    assert content["rules"]["robust"] == "chosen per fold (see fold_rules)"
    assert content["fold_rules"]["robust"][0] == "positive when >= 2 slices are"
    summary = compare.load_summary(cv)
    assert [r[1] for r in compare.table6([summary]).rows] == [
        "any slice",
        "robust (chosen per fold)",
    ]
    report = (cv / "cv_report.md").read_text()
    assert "robust, fold 1: positive when >= 3 slices are" in report


def test_ablation_ladder_names_and_order():
    assert compare.ablation_label("seresnet_unet", "bce") == "SE-ResNet-34 U-Net"
    assert compare.ablation_label("seresnet_unet_aspp", "bce") == "+ ASPP"
    assert compare.ablation_label("coarse_refine", "bce") == "+ refinement"
    assert compare.ablation_label("coarse_refine", "hybrid") == "+ hybrid loss"
    assert compare.ablation_label("unet", "bce") == "U-Net"
    assert compare.ablation_label("unet_plus_plus", "bce") == "U-Net++"
    assert compare.ablation_label("unet", "hybrid") == "U-Net + hybrid loss"
    assert compare.ablation_label("seresnet_classifier", "hybrid") == "SE-ResNet-34 classifier"


def test_names_and_models_from_config_when_metrics_lack_them(tmp_path):
    run = make_run(
        tmp_path / "old_style",
        name="ablation2_aspp",
        architecture="seresnet_unet_aspp",
        loss="bce",
        dice=dict.fromkeys(CLASSES, 0.5),
    )
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("experiment", "architecture", "loss"):  # as evaluate.py wrote them before
        del metrics[key]
    (run / "metrics.json").write_text(json.dumps(metrics))
    s = compare.load_summary(run)
    assert (s["experiment"], s["architecture"], s["loss"]) == (
        "ablation2_aspp",
        "seresnet_unet_aspp",
        "bce",
    )
    assert compare.table7([s]).rows[0][:2] == ["+ ASPP", "ablation2_aspp"]


def test_table7_rows_follow_the_ladder(tmp_path):
    ladder = [
        ("a4", "coarse_refine", "hybrid"),
        ("unet", "unet", "bce"),
        ("a1", "seresnet_unet", "bce"),
        ("a3", "coarse_refine", "bce"),
        ("a2", "seresnet_unet_aspp", "bce"),
    ]
    summaries = [
        compare.load_summary(
            make_run(
                tmp_path / n,
                name=n,
                architecture=a,
                loss=loss,
                dice={"ggo": 0.7 + 0.01 * i, "consolidation": 0.5, "fibrosis": 0.3},
            )
        )
        for i, (n, a, loss) in enumerate(ladder)
    ]
    table = compare.table7(summaries)
    assert [r[0] for r in table.rows] == [
        "SE-ResNet-34 U-Net",
        "+ ASPP",
        "+ refinement",
        "+ hybrid loss",
        "U-Net",
    ]
    assert [r[1] for r in table.rows] == ["a1", "a2", "a3", "a4", "unet"]
    assert table.header == [
        "model",
        "run",
        "ggo Dice",
        "consolidation Dice",
        "fibrosis Dice",
        "mean Dice",
    ]
    assert table.rows[0][2:] == ["0.720", "0.500", "0.300", "0.507"]


def test_cells_and_tables_formatting(tmp_path):
    assert compare.format_cell({"mean": 0.8123, "sd": math.nan, "n": 1}) == "0.812"
    assert compare.format_cell({"mean": 0.8123, "sd": 0.0314, "n": 5}, "cv", 5) == "0.812 ± 0.031"
    assert compare.format_cell({"mean": 0.8, "sd": 0.03, "n": 4}, "cv", 5) == "0.800 ± 0.030 (n=4)"
    assert compare.format_cell({"mean": 0.8, "sd": math.nan, "n": 1}, "cv", 5) == "0.800 (n=1)"
    assert compare.format_cell({"mean": math.nan, "sd": math.nan, "n": 0}) == "n/a"
    assert compare.format_cell(None) == "n/a"

    cv = compare.load_summary(make_cv(tmp_path / "cv"))
    single = compare.load_summary(
        make_run(tmp_path / "single", name="single", dice=dict.fromkeys(CLASSES, 0.5))
    )
    classifier = compare.load_summary(
        make_run(tmp_path / "clf", name="clf", architecture="seresnet_classifier", accuracy=0.9)
    )
    summaries = [cv, single, classifier]
    (t4,) = compare.table4(summaries)
    assert t4.header[:5] == ["run", "ggo Dice", "ggo IoU", "ggo precision", "ggo recall"]
    assert len(t4.header) == 1 + 4 * len(CLASSES)
    assert [r[0] for r in t4.rows] == ["cv_paper", "single"]
    assert t4.rows[0][1] == f"{np.mean(FOLD_GGO):.3f} ± {np.std(FOLD_GGO, ddof=1):.3f}"
    assert t4.rows[1][1:5] == ["0.500", f"{0.5 / 1.5:.3f}", "0.900", "0.800"]
    assert any("clf" in n and "segmentation" in n for n in t4.notes)
    assert len(compare.table4(summaries, per_lesion=True)) == len(CLASSES)

    t6 = compare.table6(summaries)
    assert [r[:2] for r in t6.rows] == [
        ["cv_paper", "any slice"],
        ["cv_paper", "robust (>= 3 slices)"],
        ["clf", "any slice"],
    ]
    assert t6.rows[2][2:] == ["0.900", "1.000", "0.750", f"{1.5 / 1.75:.3f}", "6"]
    assert t6.rows[0][-1] == "24"  # patients summed over four folds
    assert any("single" in n and "classification" in n for n in t6.notes)

    md = compare.render_markdown(t6)
    assert md.startswith("## Table 6") and "| run | rule | accuracy |" in md
    text = compare.render_text(t6)
    assert "robust (>= 3 slices)" in text and "|" not in text


def test_names_default_override_and_clash(tmp_path):
    a = compare.load_summary(make_run(tmp_path / "x" / "a", dice=dict.fromkeys(CLASSES, 0.5)))
    b = compare.load_summary(make_run(tmp_path / "y" / "b", dice=dict.fromkeys(CLASSES, 0.5)))
    assert compare.display_names([a, b]) == ["a", "b"]  # both "quickstart": folder names
    assert compare.display_names([a, b], ["A", "B"]) == ["A", "B"]
    with pytest.raises(compare.CompareError, match="2 runs"):
        compare.display_names([a, b], ["A"])
    # One name twice: the second run's row hid the first in the JSON (keyed by name).
    with pytest.raises(compare.CompareError, match="A given twice"):
        compare.display_names([a, b], ["A", " A"])


def test_cli_writes_files_and_returns_0(tmp_path, capsys):
    cv = make_cv(tmp_path / "cv")
    run = make_run(
        tmp_path / "ablation1",
        name="ablation1",
        architecture="seresnet_unet",
        loss="bce",
        dice={"ggo": 0.7, "consolidation": 0.5, "fibrosis": 0.3},
    )
    out = tmp_path / "cmp"
    assert compare_main([str(cv), str(run), "--out", str(out), "--names", "Ours (CV),Rung 1"]) == 0
    printed = capsys.readouterr().out
    assert "Table 4" in printed and "Table 6" in printed and "Table 7" in printed
    assert "Rung 1" in printed and "SE-ResNet-34 U-Net" in printed
    md = (out / "comparison.md").read_text()
    assert DISCLAIMER in md
    assert "| Ours (CV) |" in md and "## Table 7: ablation (Dice)" in md
    data = json.loads((out / "comparison.json").read_text())
    assert data["disclaimer"] == DISCLAIMER
    assert [r["name"] for r in data["runs"]] == ["Ours (CV)", "Rung 1"]
    assert data["runs"][0]["kind"] == "cv" and data["runs"][1]["model"] == "SE-ResNet-34 U-Net"
    assert [r[0] for r in data["tables"]["table7"]["rows"]] == [
        "SE-ResNet-34 U-Net",
        "+ hybrid loss",
    ]


def test_cli_missing_metrics_exit_2_names_folder(tmp_path, capsys):
    run = make_run(tmp_path / "not_evaluated", metrics=False)
    assert compare_main([str(run), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(run) in err and "python -m tfcovseg.evaluate --run" in err
    assert not (tmp_path / "cmp").exists()

    assert compare_main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_cli_refuses_a_run_given_twice_and_an_out_file_up_front(tmp_path, capsys):
    """The same run twice was a traceback; an --out that is a file failed only after the
    tables were computed and printed."""
    run = make_run(tmp_path / "r1")
    assert compare_main([str(run), str(tmp_path / "r1" / "."), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "is given twice" in err and "Traceback" not in err
    (tmp_path / "afile").write_text("x")
    assert compare_main([str(run), "--out", str(tmp_path / "afile")]) == 2
    captured = capsys.readouterr()
    assert "afile" in captured.err and "Table 4" not in captured.out


def test_cv_fold_without_metrics_is_named(tmp_path):
    cv = make_cv(tmp_path / "cv")
    (cv / "fold2" / "metrics.json").unlink()
    with pytest.raises(compare.CompareError, match=r"fold2.*python -m tfcovseg.evaluate"):
        compare.load_summary(cv)


def test_a_metrics_json_without_metrics_is_refused(tmp_path, capsys):
    """metrics.json holding no metrics ({} or another tool's file) gave empty tables and
    exit 0; a run, or one fold of a cross-validation, now stops naming the file."""
    run = make_run(tmp_path / "empty")
    (run / "metrics.json").write_text("{}")
    assert compare_main([str(run), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'metrics.json'} holds no metrics" in err
    assert not (tmp_path / "cmp").exists()
    cv = make_cv(tmp_path / "cv")
    (cv / "fold1" / "metrics.json").write_text('{"split": "test"}')
    with pytest.raises(compare.CompareError, match=r"fold1.metrics\.json holds no metrics"):
        compare.load_summary(cv)


def test_classes_and_split_mismatch_errors(tmp_path):
    cv = make_cv(tmp_path / "cv")
    make_run(
        cv / "fold4",
        fold=4,
        classes=["ggo", "consolidation"],
        dice={"ggo": 0.5, "consolidation": 0.5},
    )
    with pytest.raises(compare.CompareError, match=r"folds disagree on classes.*fold4"):
        compare.load_summary(cv)

    a = make_run(tmp_path / "a", dice=dict.fromkeys(CLASSES, 0.5))
    b = make_run(tmp_path / "b", classes=["ggo"], dice={"ggo": 0.5})
    c = make_run(tmp_path / "c", split="validation", dice=dict.fromkeys(CLASSES, 0.5))
    with pytest.raises(compare.CompareError, match="runs disagree on classes"):
        compare.load_summaries([a, b])
    with pytest.raises(compare.CompareError, match="runs disagree on split"):
        compare.load_summaries([a, c])
    assert compare_main([str(a), str(b), "--out", str(tmp_path / "o")]) == 2


def test_module_imports_neither_tensorflow_nor_keras():
    code = (
        "import sys, tfcovseg.compare\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
