"""python -m tfcovseg.benchmarks.semiseg on tiny COVID-SemiSeg-layout folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tfcovseg
from tfcovseg.benchmarks.semiseg import (
    PUBLISHED,
    SEMI,
    TARGETS,
    BenchmarkError,
    load_slices,
    load_unlabelled,
    predict_maps,
    prediction_folder,
    run,
)
from tfcovseg.benchmarks.semiseg_config import benchmark_config
from tfcovseg.cli.semiseg import main
from tfcovseg.models import build_model

# Tiny networks: eager steps cost less than tracing them (tests.conftest.eager_functions).
pytestmark = pytest.mark.usefixtures("eager_module")

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "data" / "covid-semiseg" / "train"
# Narrow networks: the tests check the benchmark's plumbing, not what it learns.
TINY_WIDTHS = {
    "stem_filters": 4,
    "encoder_filters": (4, 8, 8, 16),
    "encoder_blocks": (1, 1, 1, 1),
    "se_reduction": 4,
    "aspp_filters": 4,
    "decoder_filters": (8, 4, 4, 4),
    "decoder_convs": 1,
    "refine_filters": 4,
    "unet_filters": (4, 8, 8, 16, 16),
}
FAST = dict(size=32, epochs=1, patience=1, passes=1, widths=TINY_WIDTHS, log=lambda *a: None)
SEMI_FAST = dict(semi_epochs=1, semi_pool=4, semi_keep=0.5, semi_tta=2, semi_rounds=1)


def make_folder(root: Path, names, seed=0) -> Path:
    """Imgs/N.jpg (8-bit windowed) and GT/N.png (0, 1 GGO, 2 consolidation), odd sizes."""
    rng = np.random.default_rng(seed)
    (root / "Imgs").mkdir(parents=True)
    (root / "GT").mkdir()
    for i, name in enumerate(names):
        h, w = 40 + 4 * i, 48 + 2 * i
        image = rng.integers(0, 256, (h, w), dtype=np.uint8)
        labels = np.zeros((h, w), np.uint8)
        labels[5:15, 8:20] = 1
        labels[20:26, 10 + i : 18 + i] = 2
        Image.fromarray(image).save(root / "Imgs" / f"{name}.jpg")
        Image.fromarray(labels).save(root / "GT" / f"{name}.png")
    return root


def make_unlabelled(root: Path, volumes=("coronacases_org_001", "radiopaedia_x_1-dcm"), k=3):
    """Imgs/Data-1_<volume>_<k>.jpg without GT/, dark as COVID-SemiSeg's coronacases."""
    rng = np.random.default_rng(5)
    (root / "Imgs").mkdir(parents=True)
    for volume in volumes:
        for i in range(1, k + 1):
            image = rng.integers(0, 120, (50, 36), dtype=np.uint8)
            Image.fromarray(image).save(root / "Imgs" / f"Data-1_{volume}_{i}.jpg")
    return root


def test_load_unlabelled_groups_slices_by_volume(tmp_path):
    data = load_unlabelled(make_unlabelled(tmp_path / "u"), 32)
    assert data.images.shape == (6, 32, 32) and data.images.max() <= 120.5
    assert sorted(set(data.volumes)) == ["Data-1_coronacases_org_001", "Data-1_radiopaedia_x_1-dcm"]
    assert data.names[0] == "Data-1_coronacases_org_001_1"
    # Checked, not kept (a per-fold run's parent): the same slices, no images.
    checked = load_unlabelled(tmp_path / "u", 32, keep_images=False)
    assert checked.images is None and checked.names == data.names
    assert checked.volumes == data.volumes and checked.source == data.source
    labelled = make_folder(tmp_path / "labelled", ["1", "2"])
    with pytest.raises(BenchmarkError, match="holds masks.*--train-dir"):
        load_unlabelled(labelled, 32)
    # A GT/ whose masks are named unlike the images is masks all the same (it was taken
    # for unlabelled slices without a word).
    (tmp_path / "u" / "GT").mkdir()
    (tmp_path / "u" / "GT" / "other.png").write_bytes(b"")
    with pytest.raises(BenchmarkError, match="holds masks \\(GT/ has one\\)"):
        load_unlabelled(tmp_path / "u", 32)
    (tmp_path / "none").mkdir()
    with pytest.raises(BenchmarkError, match="no Imgs"):
        load_unlabelled(tmp_path / "none", 32)
    # A blank image among the slices is left out and named, not a stop (nor a slice).
    (tmp_path / "u" / "GT" / "other.png").unlink()
    (tmp_path / "u" / "GT").rmdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "u" / "Imgs" / "blank.png")
    data = load_unlabelled(tmp_path / "u", 32)
    assert len(data.names) == 6 and data.skipped[0][0] == "Imgs/blank.png"
    assert "1 grey level: a mask, label or blank image" in data.skipped[0][1]


def test_semi_supervised_row_resumes_fold_by_fold(tmp_path):
    folder = make_folder(tmp_path / "train", [str(i) for i in range(6)])
    unlabelled = make_unlabelled(tmp_path / "u")
    out = tmp_path / "out"
    lines = []
    kw = FAST | SEMI_FAST | dict(log=lines.append, intensity=True, tta=2)
    results = run(folder, out, folds=2, models=("coarse_refine",), unlabelled_dir=unlabelled, **kw)
    assert list(results["models"]) == ["coarse_refine", SEMI] and results["complete"]
    semi = results["models"][SEMI]
    assert len(semi["folds"]) == 2 and semi["runs"][0]["rounds"][0]["pseudo_labelled"] == 2
    assert any("epoch 1/1: loss" in line for line in lines)  # a progress line per epoch
    assert any("pseudo-labelled" in line for line in lines)
    # The student's best validation loss beside its teacher's (one epoch: that epoch's).
    student = next(line for line in lines if "student 1 epoch 1/1" in line)
    recorded = semi["runs"][0]["rounds"][0]["best_val_loss"]
    assert recorded == pytest.approx(float(student.split("val_loss ")[1].split(",")[0]), abs=1e-4)
    assert results["models"]["coarse_refine"]["runs"][0]["best_val_loss"] > 0
    assert semi["runs"][0]["best_val_loss"] == recorded  # the row's model: the last round's
    # Each fold records the kernels it trained with (a run may go on under others).
    assert {r["cpu_kernels"] for r in semi["runs"]} == {tfcovseg.cpu_kernels()}
    assert semi["cpu_kernels"] == [tfcovseg.cpu_kernels()]
    jax = __import__("keras").backend.backend() == "jax"
    assert semi["jit_compile"] == [jax] and {r["jit_compile"] for r in semi["runs"]} == {jax}
    assert (out / SEMI / "predictions" / "infection" / "5.png").is_file()
    # The students are kept beside their teachers: their maps can be made again.
    student = build_model(benchmark_config(size=FAST["size"], widths=FAST["widths"]).model)
    student.load_weights(out / "folds" / SEMI / "fold0.weights.h5")
    test = semi["runs"][0]["test_slices"][0]
    data = load_slices(folder, FAST["size"])
    maps = predict_maps(student, data, [list(data.names).index(test)], 2)
    kept = np.asarray(Image.open(out / SEMI / "predictions" / "infection" / f"{test}.png"))
    assert np.abs(maps["infection"][0].astype(int) - kept).max() <= 1
    table = (out / "results.md").read_text()
    assert "self-training" in table and "per fold" in table
    # A kill after fold 0: the semi-supervised fold 1 is redone from the stored teacher,
    # nothing else is trained again and the figures of the finished folds stay.
    (out / "folds" / SEMI / "fold1.json").unlink()
    lines.clear()
    again = run(folder, out, folds=2, models=("coarse_refine",), unlabelled_dir=unlabelled, **kw)
    assert sum("done before" in line for line in lines) == 3
    assert sum("pseudo-labelled" in line for line in lines) == 1
    assert again["models"]["coarse_refine"]["folds"] == results["models"]["coarse_refine"]["folds"]
    # The table's time is its folds', not only this invocation's (which redid one fold).
    stored = [json.loads(f.read_text())["wall_s"] for f in (out / "folds").glob("*/fold*.json")]
    assert again["folds_wall_s"] == pytest.approx(sum(stored), abs=0.2)
    assert f"{sum(stored) / 60:.1f} min in its folds" in (out / "results.md").read_text()
    assert len(again["models"][SEMI]["folds"]) == 2
    # Other settings in the same folder are refused, naming what differs.
    with pytest.raises(BenchmarkError, match="other settings.*settings.semi_keep"):
        run(folder, out, folds=2, models=("coarse_refine",), unlabelled_dir=unlabelled,
            **(kw | {"semi_keep": 0.9}))  # fmt: skip
    with pytest.raises(BenchmarkError, match="include coarse_refine"):
        run(folder, tmp_path / "o2", models=("unet",), unlabelled_dir=unlabelled, **FAST)


def test_the_student_trains_at_the_semi_learning_rate(tmp_path, monkeypatch):
    """Self-training's student at semi.learning_rate, the teacher at train.learning_rate
    (session 43 lost this in a revert: a 1e-4 fold trained at 1e-3); the run records it."""
    from tfcovseg.benchmarks import semiseg

    rates, real = {}, semiseg.train_one

    def recording(config, *args, prefix="", **kw):
        rates[prefix or config.model.architecture] = config.train.learning_rate
        return real(config, *args, prefix=prefix, **kw)

    monkeypatch.setattr(semiseg, "train_one", recording)
    folder = make_folder(tmp_path / "train", [str(i) for i in range(6)])
    unlabelled = make_unlabelled(tmp_path / "u")
    kw = FAST | SEMI_FAST | dict(folds=2, only_folds=[0], models=("coarse_refine",))
    results = run(
        folder, tmp_path / "out", unlabelled_dir=unlabelled, semi_learning_rate=5e-5, **kw
    )
    assert rates == {"coarse_refine": 1e-3, "student 1": 5e-5}
    assert results["settings"]["semi_learning_rate"] == 5e-5


def test_every_rounds_student_but_the_last_is_scored_on_the_test_slices(tmp_path):
    """Round 1 of a two-round run is the one-round run's student: its recorded test score
    is that run's row score (what each round adds can be read from one run)."""
    folder = make_folder(tmp_path / "train", [str(i) for i in range(6)])
    unlabelled = make_unlabelled(tmp_path / "u")
    lines = []
    kw = FAST | SEMI_FAST | dict(folds=2, only_folds=[0], models=("coarse_refine",), tta=2)
    one = run(folder, tmp_path / "one", unlabelled_dir=unlabelled, **kw)
    two = run(folder, tmp_path / "two", unlabelled_dir=unlabelled, **kw | dict(
        semi_rounds=2, log=lines.append))  # fmt: skip
    first, last = two["models"][SEMI]["runs"][0]["rounds"]
    scored = one["models"][SEMI]["folds"][0]
    # The same training twice: equal on this CPU; a kernel's last digits may differ elsewhere.
    same = dict(abs=2e-3)
    assert first["test_scores"]["infection"]["meanDic"] == pytest.approx(
        scored["infection"]["meanDic"], **same
    )
    assert first["test_scores"]["ggo"]["Dice@0.5"] == pytest.approx(
        scored["ggo"]["Dice@0.5"], **same
    )
    assert first["test_scored_s"] > 0
    assert "test_scores" not in last  # the row's own scores are the last round's
    recorded = f"{first['test_scores']['infection']['meanDic']:.3f}"
    assert any(f"student 1 on the test slices: infection meanDic {recorded}" in x for x in lines)
    table = (tmp_path / "two" / "results.md").read_text()
    assert f"| ↳ its round 1 (a record) | {recorded} |" in table
    assert (
        "its round 2" not in table
        and "its round" not in (tmp_path / "one" / "results.md").read_text()
    )


def test_a_finished_runs_models_are_scored_again_under_other_views(tmp_path):
    """--from-run: the kept models of a run are scored under another --tta, not trained;
    a row it kept no model of trains; a run with other settings is refused by name."""
    folder = make_folder(tmp_path / "train", [str(i) for i in range(6)])
    unlabelled = make_unlabelled(tmp_path / "u")
    kw = FAST | SEMI_FAST | dict(folds=2, only_folds=[0], unlabelled_dir=unlabelled, semi_rounds=2)
    first = run(folder, tmp_path / "one", models=("coarse_refine", "unet"), **kw)
    lines = []
    both = ("coarse_refine", "unet")
    again = run(
        folder, tmp_path / "two", models=both, tta=2, from_run=tmp_path / "one",
        **kw | dict(log=lines.append),
    )  # fmt: skip
    trained = [x for x in lines if "epoch 1/1: loss" in x]
    assert trained and all(x.lstrip().startswith("unet") for x in trained)  # U-Net kept none
    assert sum("scored again" in x for x in lines) == 2
    data = load_slices(folder, FAST["size"])
    for row in ("coarse_refine", SEMI):
        entry = again["models"][row]
        assert entry["runs"][0]["from_run"] == str(tmp_path / "one")
        assert entry["runs"][0]["epochs"] == first["models"][row]["runs"][0]["epochs"]
        model = build_model(benchmark_config(size=FAST["size"], widths=FAST["widths"]).model)
        model.load_weights(tmp_path / "one" / "folds" / row / "fold0.weights.h5")
        idx = [list(data.names).index(n) for n in entry["runs"][0]["test_slices"]]
        infection = predict_maps(model, data, idx, 2)["infection"]  # 2 views: --tta 2
        folder_maps = prediction_folder(tmp_path / "two", row) / "infection"
        names = entry["runs"][0]["test_slices"]
        kept = [np.asarray(Image.open(folder_maps / f"{n}.png")) for n in names]
        assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(infection, kept))
        assert (tmp_path / "two" / "folds" / row / "fold0.weights.h5").is_file()
    assert again["settings"]["tta"] == 2 and first["settings"]["tta"] == 1
    # Round 1's test score was measured under the first run's views: not carried over.
    assert "test_scores" in first["models"][SEMI]["runs"][0]["rounds"][0]
    assert "test_scores" not in again["models"][SEMI]["runs"][0]["rounds"][0]
    assert "its round 1" not in (tmp_path / "two" / "results.md").read_text()
    # Its --out goes on only from the same run's models: not from another, nor training.
    lines.clear()
    run(folder, tmp_path / "two", models=both, tta=2, from_run=tmp_path / "one",
        **kw | dict(log=lines.append))  # fmt: skip
    assert sum("done before" in x for x in lines) == 3
    progress = (tmp_path / "two" / "progress.json").read_text()
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "one", other)
    for source in (other, None):
        with pytest.raises(BenchmarkError, match="two holds a run with other settings "
                           r"\(from_run differ\)"):  # fmt: skip
            run(folder, tmp_path / "two", models=both, tta=2, from_run=source, **kw)
    assert (tmp_path / "two" / "progress.json").read_text() == progress
    # A student whose teacher that run no longer keeps is refused, before --out exists.
    (other / "folds" / "coarse_refine" / "fold0.weights.h5").unlink()
    with pytest.raises(BenchmarkError, match="kept fold 0's .* model but not its teacher"):
        run(folder, tmp_path / "seven", models=both, tta=2, from_run=other, **kw)
    assert not (tmp_path / "seven").exists()
    with pytest.raises(BenchmarkError, match="other settings \\(settings.epochs differ\\)"):
        run(folder, tmp_path / "three", models=("coarse_refine",), from_run=tmp_path / "one",
            **kw | dict(epochs=2))  # fmt: skip
    assert not (tmp_path / "three").exists()  # a refusal leaves nothing to block the next try
    # A run that kept no model (killed before its first fold): scoring again, not training.
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "progress.json").write_bytes(
        (tmp_path / "one" / "progress.json").read_bytes()
    )
    with pytest.raises(BenchmarkError, match="bare kept no model"):
        run(folder, tmp_path / "five", models=("coarse_refine",), from_run=tmp_path / "bare", **kw)
    # A kept model cut short is named, not an h5py traceback.
    weights = tmp_path / "one" / "folds" / SEMI / "fold0.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BenchmarkError, match=f"{weights}, cannot be read \\(OSError"):
        run(folder, tmp_path / "six", models=("coarse_refine",), from_run=tmp_path / "one", **kw)
    with pytest.raises(BenchmarkError, match="is the --out folder"):
        run(folder, tmp_path / "one", models=("coarse_refine",), from_run=tmp_path / "one", **kw)
    with pytest.raises(BenchmarkError, match="u is not a benchmark run \\(no progress.json\\)"):
        run(folder, tmp_path / "four", models=("coarse_refine",), from_run=tmp_path / "u", **kw)


def test_fixmatch_row_trains_from_the_supervised_teacher(tmp_path, monkeypatch):
    from tfcovseg.benchmarks import semiseg
    from tfcovseg.benchmarks.semiseg import FIXMATCH

    folder = make_folder(tmp_path / "train", [str(i) for i in range(6)])
    unlabelled = make_unlabelled(tmp_path / "u")
    lines = []
    kw = FAST | SEMI_FAST | dict(log=lines.append, semi_method="fixmatch", semi_learning_rate=5e-5)
    out = tmp_path / "out"
    rates, real = {}, semiseg._fit

    def recording(config, model, train, val, epochs, name, *rest):
        rates[name] = config.train.learning_rate
        return real(config, model, train, val, epochs, name, *rest)

    monkeypatch.setattr(semiseg, "_fit", recording)
    results = run(folder, out, folds=2, models=("coarse_refine",), unlabelled_dir=unlabelled, **kw)
    assert rates == {"coarse_refine": 1e-3, "fixmatch": 5e-5}  # a student, at the students' rate
    assert list(results["models"]) == ["coarse_refine", FIXMATCH] and results["complete"]
    assert results["settings"]["semi_method"] == "fixmatch"
    assert results["models"][FIXMATCH]["runs"][0]["unlabelled"] == 6
    assert any(line.startswith("    fixmatch epoch 1/1: loss") for line in lines)
    assert "FixMatch consistency" in (out / "results.md").read_text()
    assert (out / FIXMATCH / "predictions" / "infection" / "5.png").is_file()
    with pytest.raises(BenchmarkError, match="semi.method must be one of"):
        run(folder, tmp_path / "o2", models=("coarse_refine",), unlabelled_dir=unlabelled,
            **(kw | {"semi_method": "mean_teacher"}))  # fmt: skip


def test_load_slices_reads_images_and_original_truth(tmp_path):
    folder = make_folder(tmp_path / "train", ["10", "2", "7"])
    data = load_slices(folder, 32)
    assert data.names == ["2", "7", "10"]  # numeric order
    assert data.images.shape == (3, 32, 32) and data.masks.shape == (3, 32, 32, 2)
    assert data.images.max() > 1.0  # 8-bit, not rescaled: the model's window does that
    assert [t.shape for t in data.truth] == [(44, 50), (48, 52), (40, 48)]
    assert set(np.unique(data.truth[0])) == {0, 1, 2}
    assert data.masks[..., 0].any() and data.masks[..., 1].any()


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(BenchmarkError, match="not a directory"):
        load_slices(tmp_path / "missing", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkError, match="no Imgs"):
        load_slices(tmp_path / "empty", 32)
    folder = make_folder(tmp_path / "nogt", ["1", "2"])
    (folder / "GT" / "2.png").unlink()
    with pytest.raises(BenchmarkError, match="no GT mask for Imgs/2.jpg"):
        load_slices(folder, 32)


def test_bad_runs_are_refused_before_training(tmp_path):
    two = make_folder(tmp_path / "two", ["1", "2"])
    out = tmp_path / "out"
    # Each fold's training part needs a slice to fit and one for early stopping (with
    # two slices in two folds, a fold had none to fit and Keras raised).
    with pytest.raises(BenchmarkError, match="holds 2 slice.*too few for 2 folds"):
        run(two, out, folds=2, **FAST)
    one = make_folder(tmp_path / "one", ["1"])
    with pytest.raises(BenchmarkError, match="holds 1 slice.*too few"):
        run(one, out, test_dir=two, **FAST)
    six = make_folder(tmp_path / "six", [str(i) for i in range(6)])
    with pytest.raises(BenchmarkError, match="--passes must be at least 1"):
        run(six, out, folds=2, **{**FAST, "passes": 0})
    with pytest.raises(BenchmarkError, match="--models names no model"):
        run(six, out, folds=2, models=(), **FAST)
    with pytest.raises(BenchmarkError, match="--test-dir .* is the --train-dir"):
        run(six, out, test_dir=tmp_path / "six" / ".." / "six", **FAST)
    # Each folder's refusal names its option (all three said "input X is not a directory").
    with pytest.raises(BenchmarkError, match="^--train-dir: .*missing is not a directory"):
        run(tmp_path / "missing", out, folds=2, **FAST)
    with pytest.raises(BenchmarkError, match="^--test-dir: .*missing is not a directory"):
        run(six, out, test_dir=tmp_path / "missing", **FAST)
    with pytest.raises(BenchmarkError, match="^--unlabelled-dir: .*missing is not a directory"):
        run(six, out, folds=2, unlabelled_dir=tmp_path / "missing", **FAST)
    # An --out that is a file, or a folder of someone else's files: named, left as it was.
    (tmp_path / "file").write_text("kept")
    with pytest.raises(BenchmarkError, match="file"):
        run(six, tmp_path / "file", folds=2, **FAST)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my own notes")
    with pytest.raises(BenchmarkError, match="holds other files and no benchmark run"):
        run(six, mine, folds=2, **FAST)
    assert (mine / "results.md").read_text() == "my own notes"
    assert sorted(p.name for p in mine.iterdir()) == ["results.md"]
    assert not out.exists()


def test_cross_validation_writes_scores_tables_and_maps(tmp_path):
    folder = make_folder(tmp_path / "train", [str(i) for i in range(6)])
    out = tmp_path / "out"
    results = run(folder, out, folds=2, **FAST)
    assert results["mode"] == "cross-validation" and results["folds"] == 2
    for arch in ("coarse_refine", "unet"):
        entry = results["models"][arch]
        assert len(entry["folds"]) == 2 and len(entry["runs"]) == 2
        tested = sorted(sum((r["test_slices"] for r in entry["runs"]), []), key=int)
        assert tested == [str(i) for i in range(6)]  # each slice tested once
        for target in TARGETS:
            summary = entry["summary"][target]
            assert 0.0 <= summary["meanDic"]["mean"] <= summary["maxDic"]["mean"] <= 1.0
            assert summary["meanDic"]["sd"] >= 0.0 and "MAE" in summary
            for i in range(6):
                png = np.asarray(Image.open(prediction_folder(out, arch) / target / f"{i}.png"))
                assert png.dtype == np.uint8 and png.shape == (40 + 4 * i, 48 + 2 * i)
    # The coarse-refine maps where the issue puts them, the baseline's beside them.
    assert prediction_folder(out, "coarse_refine") == out / "predictions"
    assert (out / "predictions" / "infection" / "0.png").is_file()
    assert (out / "unet" / "predictions" / "infection" / "0.png").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["published_meanDic"] == PUBLISHED
    table = (out / "results.md").read_text()
    assert "coarse-refine (ours" in table and "Semi-Inf-Net" in table and "0.439" in table
    assert "not a medical device" in table


def test_test_dir_mode_scores_the_test_slices(tmp_path, capsys):
    train = make_folder(tmp_path / "train", [str(i) for i in range(5)])
    test = make_folder(tmp_path / "test", ["100", "101"], seed=1)
    out = tmp_path / "out"
    results = run(train, out, test_dir=test, models=("unet",), **FAST)
    assert results["mode"] == "test" and results["test_slices"] == 2
    assert list(results["models"]) == ["unet"]
    assert results["models"]["unet"]["folds"][0]["infection"]["images"] == 2
    names = sorted(p.name for p in (out / "unet" / "predictions" / "ggo").iterdir())
    assert names == ["100.png", "101.png"]
    assert main(["--train-dir", str(train), "--models", "vit", "--out", str(out)]) == 2
    assert "unknown models" in capsys.readouterr().err
    assert main(["--train-dir", str(train), "--size", "50", "--out", str(out)]) == 2
    assert "model.input_size must be positive multiples of 32" in capsys.readouterr().err
    assert main(["--train-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2


def make_infection_folder(root: Path, names, seed=2) -> Path:
    """Imgs/N.jpg and GT/N.png as binary 0/255 infection masks (Inf-Net's
    LungInfection-Test layout)."""
    make_folder(root, names, seed)
    for name in names:
        labels = np.asarray(Image.open(root / "GT" / f"{name}.png"))
        Image.fromarray(np.where(labels > 0, 255, 0).astype(np.uint8)).save(
            root / "GT" / f"{name}.png"
        )
    return root


def test_infection_only_test_masks_score_infection_alone(tmp_path):
    train = make_folder(tmp_path / "train", [str(i) for i in range(5)])
    test = make_infection_folder(tmp_path / "test", ["200", "201"])
    data = load_slices(test, 32, allow_infection_only=True)
    assert data.infection_only and data.targets == ("infection",)
    # Truth: infection is GGO and consolidation together, as in the multi-class masks.
    multi = load_slices(make_folder(tmp_path / "multi", ["200", "201"], seed=2), 32)
    for a, b in zip(data.truth, multi.truth):
        np.testing.assert_array_equal(a > 0, b > 0)
    out = tmp_path / "out"
    results = run(train, out, test_dir=test, models=("unet",), **FAST)
    assert results["targets"] == ["infection"]
    fold = results["models"]["unet"]["folds"][0]
    assert list(fold) == ["infection"] and fold["infection"]["images"] == 2
    assert set(results["models"]["unet"]["summary"]) == {"infection"}
    # The maps of every target are still written, for other evaluators.
    assert (out / "unet" / "predictions" / "ggo" / "200.png").is_file()
    table = (out / "results.md").read_text()
    assert "infection-only" in table and "| — | — |" in table


def test_infection_only_masks_are_refused_for_training_and_mixing(tmp_path):
    train = make_infection_folder(tmp_path / "train", ["1", "2"])
    with pytest.raises(BenchmarkError, match=r"GT/1.png is an infection-only 0/255 mask"):
        load_slices(train, 32)
    mixed = make_folder(tmp_path / "mixed", ["1", "2"])
    Image.fromarray(np.full((44, 50), 255, np.uint8)).save(mixed / "GT" / "2.png")
    with pytest.raises(BenchmarkError, match=r"mixes infection-only.*GT/2.png.*GT/1.png"):
        load_slices(mixed, 32, allow_infection_only=True)


def test_runs_under_jax_without_tensorflow(tmp_path):
    folder = make_folder(tmp_path / "train", [str(i) for i in range(4)])
    script = textwrap.dedent(
        f"""
        import json, sys
        import tests.no_tensorflow  # `import tensorflow` fails, as on a JAX-only machine
        import keras
        from tests.benchmarks.test_semiseg import FAST
        from tfcovseg.benchmarks.semiseg import run
        assert keras.backend.backend() == "jax"
        results = run({str(folder)!r}, {str(tmp_path / "out")!r}, folds=2,
                      models=("unet",), **FAST)
        assert "tensorflow" not in sys.modules
        print(json.dumps(results["models"]["unet"]["summary"]["infection"]["meanDic"]))
        """
    )
    # Fold 1's models compile as fold 0's did: XLA's cache saves the second compile.
    cache = str(tmp_path / "xla-cache")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_COMPILATION_CACHE_DIR": cache}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.0 <= summary["mean"] <= 1.0
    assert (tmp_path / "out" / "results.json").is_file()


@pytest.mark.skipif(not REAL.is_dir(), reason=f"COVID-SemiSeg slices not found at {REAL}")
def test_real_slices_load():
    data = load_slices(REAL, 64)
    assert len(data.names) == 50 and data.images.shape == (50, 64, 64)
    assert all(set(np.unique(t)) <= {0, 1, 2} for t in data.truth)
    assert sum(int((t == 2).any()) for t in data.truth) > 10  # consolidation is common
    sizes = {t.shape for t in data.truth}
    assert len(sizes) > 5  # images keep their own sizes for the protocol


def test_cli_options_set_keys_of_the_experiment(tmp_path, monkeypatch):
    """The CLI hands `run` an experiment config: --width picks the paper's widths or a
    quarter, --config / --set / shortcuts reach the config, options left out keep the
    experiment's values, and the benchmark's own options go to `run` as they are."""
    from tfcovseg.benchmarks import semiseg
    from tfcovseg.benchmarks.semiseg_config import WIDTHS, widths_of
    from tfcovseg.configs.experiment import ModelConfig, load_config

    seen = []

    def fake_run(train_dir, out, **kw):
        seen.append(kw)
        raise BenchmarkError("stop here")

    monkeypatch.setattr(semiseg, "run", fake_run)
    train = ["--train-dir", str(tmp_path)]
    assert main([*train, "--width", "full"]) == 2
    quarter = ["--width", "quarter", "--epochs", "7", "--set", "train.epochs=9", "--tta", "8"]
    semi = ["--semi-keep", "0.25", "--semi-learning-rate", "2e-4"]
    assert main([*train, *quarter, "--intensity", "--spatial", *semi]) == 2
    assert main(train) == 2
    full, quarter, plain = (kw["config"] for kw in seen)
    assert full.model.encoder.filters == ModelConfig().encoder.filters == (64, 128, 256, 512)
    assert full.model.decoder == ModelConfig().decoder
    assert widths_of(quarter.model) == WIDTHS
    # The quarter widths are the quickstart's (its U-Net baseline's for the U-Net row).
    quick = load_config("quickstart_unet").model
    assert quarter.model.encoder == quick.encoder and quarter.model.unet == quick.unet
    # --set is applied after the shortcuts: it wins; the others reach their keys.
    assert quarter.train.epochs == 9 and quarter.data.intensity_augment
    assert quarter.data.spatial_augment and not plain.data.spatial_augment
    assert quarter.semi.keep == 0.25 and quarter.semi.learning_rate == 2e-4
    assert seen[1]["tta"] == 8 and seen[1]["isolate"] is True  # a process per fold
    # Nothing given: the experiment decides (its widths are the quarter ones too).
    assert plain == semiseg.benchmark_config() and "tta" not in seen[2]
    # A bad key is answered before anything trains, naming it.
    assert main([*train, "--set", "train.nope=1"]) == 2 and len(seen) == 3


def test_the_benchmark_trains_the_experiment_config(tmp_path):
    """The default experiment is the built-in semiseg recipe with the benchmark's settings;
    a config's keys reach the rows, and keys the table does not show still tell runs apart."""
    from tfcovseg.benchmarks import semiseg_config as sc
    from tfcovseg.configs.experiment import load_config

    config = sc.benchmark_config()
    recipe = load_config("semiseg")
    assert config.model.encoder == recipe.model.encoder and config.semi == recipe.semi
    assert config.train.learning_rate == recipe.train.learning_rate == 1e-3
    assert not config.data.intensity_augment and config.train.seed == 0
    unet = sc.row_config(config, "unet")
    assert unet.model.architecture == "unet" and unet.train.loss == "bce"
    assert sc.row_config(config, "coarse_refine").train.loss == "hybrid"
    settings = sc.settings_record(config, sc.BENCH_DEFAULTS)
    assert "experiment" not in settings and settings["semi_tta"] == config.semi.views
    # data.spatial_augment is recorded when on (and a run folder of before it, off, goes on).
    assert "spatial" not in settings
    spatial = sc.settings_record(sc.benchmark_config(spatial=True), sc.BENCH_DEFAULTS)
    assert spatial == settings | {"spatial": True}
    other = sc.benchmark_config("semiseg_benchmark", ["train.coarse_loss_weight=0.5"])
    assert sc.settings_record(other, sc.BENCH_DEFAULTS)["experiment"] == {
        "train.coarse_loss_weight": 0.5
    }
    # A run without a semi-supervised row records no semi key: they train nothing there,
    # so a supervised run must not refuse to resume over one.
    semi_keys = ["semi.confidence=0.8", "semi.epochs=3", "train.coarse_loss_weight=0.5"]
    supervised = sc.settings_record(
        sc.benchmark_config("semiseg_benchmark", semi_keys), sc.BENCH_DEFAULTS, semi_row=False
    )
    assert not [k for k in supervised if k.startswith("semi")]
    assert supervised["experiment"] == {"train.coarse_loss_weight": 0.5}
    assert supervised == sc.settings_record(other, sc.BENCH_DEFAULTS, semi_row=False)
    # XLA and the CPU kernels change the arithmetic only: not part of what must match.
    free = ["train.jit_compile=true", "train.cpu_kernels=eigen"]
    assert sc.settings_record(sc.benchmark_config(overrides=free), sc.BENCH_DEFAULTS) == settings
    # A folder of a run that recorded XLA off (the old default) goes on (session 49's lead).
    older = {f"settings.{k}": v for k, v in settings.items()}
    older["settings.experiment"] = {"train.jit_compile": False}
    assert sc.comparable(older) == {f"settings.{k}": v for k, v in settings.items()}
    older["settings.experiment"]["train.coarse_loss_weight"] = 0.5
    assert sc.comparable(older)["settings.experiment"] == {"train.coarse_loss_weight": 0.5}
    with pytest.raises(BenchmarkError, match="model.class_names must be"):
        sc.benchmark_config("quickstart")
    with pytest.raises(BenchmarkError, match="train.epochs"):
        sc.benchmark_config(epochs=0)
    with pytest.raises(BenchmarkError, match="unknown settings"):
        sc.benchmark_config(epoch=3)
    # A YAML file of one's own, as tfcovseg.train reads it.
    path = tmp_path / "mine.yaml"
    path.write_text("base: semiseg_benchmark\ntrain:\n  epochs: 3\n  loss: bce\n")
    mine = sc.benchmark_config(str(path))
    assert mine.train.epochs == 3 and sc.row_config(mine, "coarse_refine").train.loss == "bce"


def test_only_folds_fill_one_run_folder_in_turn(tmp_path, capsys):
    folder = make_folder(tmp_path / "train", [str(i) for i in range(6)])
    out = tmp_path / "out"
    kw = FAST | dict(folds=2, models=("unet",))
    later = run(folder, out, only_folds=[1], **kw)
    entry = later["models"]["unet"]
    assert entry["fold_ids"] == [1] and not later["complete"]
    table = (out / "results.md").read_text()
    assert "| fold 1 |" in table and "fold 0" not in table and "Not finished" in table
    both = run(folder, out, only_folds=[0], **kw)
    entry = both["models"]["unet"]
    assert entry["fold_ids"] == [0, 1] and both["complete"]
    assert entry["folds"][1] == later["models"]["unet"]["folds"][0]  # kept, not redone
    # Without --unlabelled-dir the semi keys train nothing: not recorded, no refusal,
    # nor over those a run before this rule recorded.
    assert not [k for k in both["settings"] if k.startswith("semi")]
    again = run(folder, out, only_folds=[0], semi_epochs=3, **kw)
    assert again["models"]["unet"]["folds"] == entry["folds"]
    progress = json.loads((out / "progress.json").read_text())
    progress["settings"]["settings.semi_epochs"] = 12
    progress["settings"].setdefault("settings.experiment", {})["semi.confidence"] = 0.8
    (out / "progress.json").write_text(json.dumps(progress))
    again = run(folder, out, only_folds=[0], **kw)
    assert again["models"]["unet"]["folds"] == entry["folds"]
    # The folds of one run are those of the whole run: fold 1 tests the same slices.
    assert entry["runs"][1]["test_slices"] == later["models"]["unet"]["runs"][0]["test_slices"]
    assert set(entry["runs"][0]["test_slices"]) | set(entry["runs"][1]["test_slices"]) == {
        str(i) for i in range(6)
    }
    with pytest.raises(BenchmarkError, match="folds 0 to 1, got \\[3\\]"):
        run(folder, out, only_folds=[3], **kw)
    test = make_folder(tmp_path / "test", ["100"], seed=1)
    with pytest.raises(BenchmarkError, match="not with --test-dir"):
        run(folder, tmp_path / "o2", test_dir=test, only_folds=[0], **FAST)
    assert main(["--train-dir", str(folder), "--only-folds", "a,b", "--out", str(out)]) == 2
    assert "fold numbers such as 3,4" in capsys.readouterr().err


def test_isolated_folds_train_in_their_own_processes(tmp_path, monkeypatch):
    """The command trains each fold in a fresh process (memory stays that of one fold):
    here the parent cannot train at all, and the fold still lands in the store."""
    from tfcovseg.benchmarks import semiseg

    folder = make_folder(tmp_path / "train", [str(i) for i in range(6)])

    def not_here(*args, **kw):
        raise AssertionError("a fold trained in the parent process")

    monkeypatch.setattr(semiseg, "train_one", not_here)
    kw = FAST | dict(folds=2, models=("unet",), only_folds=[1])
    with pytest.raises(AssertionError, match="in the parent process"):
        run(folder, tmp_path / "here", **kw)
    # No XLA: each process would compile its model again.
    results = run(
        folder, tmp_path / "out", isolate=True, overrides=["train.jit_compile=false"], **kw
    )
    entry = results["models"]["unet"]
    assert entry["fold_ids"] == [1] and not results["complete"]
    assert 0.0 <= entry["summary"]["infection"]["meanDic"]["mean"] <= 1.0
    assert (tmp_path / "out" / "folds" / "unet" / "fold1.json").is_file()


def test_the_parent_of_fold_processes_never_loads_keras(tmp_path):
    """With folds in their own processes the parent holds no Keras (nor TensorFlow, ~0.9
    GB for the whole run): reading slices, the store, the tables. The folds' processes are
    stubbed here (they would import it), as is the backend probe (tested on its own)."""
    folder = make_folder(tmp_path / "train", [str(i) for i in range(6)])
    script = textwrap.dedent(f"""
        import sys
        from tfcovseg.benchmarks import processes, semiseg
        processes.run_in_process = lambda target, args, name: 0
        processes.keras_backend = lambda: "numpy"
        results = semiseg.run({str(folder)!r}, {str(tmp_path / "out")!r}, isolate=True,
                              folds=2, models=("unet",), size=32, log=print)
        print(results["backend"], not results["complete"], "keras" in sys.modules,
              "tensorflow" in sys.modules)
    """)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-4:] == ["numpy", "True", "False", "False"]
    assert (tmp_path / "out" / "results.md").is_file()


def test_the_parent_chooses_the_folds_cpu_kernels_before_tensorflow_loads(tmp_path):
    """The experiment's ``train.cpu_kernels`` (the benchmark's default: oneDNN) is set in
    the parent's environment, which the folds' processes inherit, and kept out of the
    settings a run must match to resume (each fold records its own)."""
    folder = make_folder(tmp_path / "train", [str(i) for i in range(6)])
    script = textwrap.dedent(f"""
        import os, sys
        from tfcovseg.benchmarks import processes, semiseg
        seen = []
        def fold(target, args, name):
            seen.append(os.environ["TF_ENABLE_ONEDNN_OPTS"])  # what a fold's process gets
            return 0
        processes.run_in_process = fold
        processes.keras_backend = lambda: "tensorflow"
        for name, sets in (("one", []), ("two", ["train.cpu_kernels=eigen"])):
            r = semiseg.run({str(folder)!r}, {str(tmp_path)!r} + "/" + name, isolate=True,
                            folds=2, models=("unet",), size=32, overrides=sets, log=print)
            print(seen[-1], "experiment" in r["settings"], "tensorflow" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if "ONEDNN" not in k}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "backend tensorflow (oneDNN (train.cpu_kernels) CPU kernels)" in done.stdout
    assert "backend tensorflow (Eigen (train.cpu_kernels) CPU kernels)" in done.stdout
    lines = [line for line in done.stdout.splitlines() if line[:2] in ("0 ", "1 ")]
    assert lines == ["1 False False", "0 False False"]


def test_peak_fold_memory_is_the_folds_own_not_the_parents_children(tmp_path):
    """Each finished row records its process's peak; the run's `peak_fold_rss_mb` is their
    largest. Other children of the parent (the backend's probe: ~0.9 GB) do not count:
    here a 400 MB child, against folds that peaked at 120 and 150 MB."""
    import types

    from tfcovseg.benchmarks import semiseg

    touch_400_mb = "b = bytearray(400 << 20); b[::4096] = b'x' * len(b[::4096])"
    subprocess.run([sys.executable, "-c", touch_400_mb], check=True)
    peaks = {0: 120, 1: 150}
    entry = dict(scores={"infection": {"meanDic": 0.5}}, run={}, wall_s=1.0)
    store = types.SimpleNamespace(get=lambda row, fold: entry | {"peak_rss_mb": peaks[fold]})
    splits = [types.SimpleNamespace(fold=k) for k in peaks]
    results = semiseg._assemble({}, store, ["unet"], splits, start=0.0)
    assert results["models"]["unet"]["peak_rss_mb"] == 150
    assert results["peak_fold_rss_mb"] == 150
    older = types.SimpleNamespace(get=lambda row, fold: entry)  # folds recorded before
    assert semiseg._assemble({}, older, ["unet"], splits, 0.0)["peak_fold_rss_mb"] is None


def test_a_fold_process_that_fails_stops_the_run_naming_the_fold(tmp_path, monkeypatch):
    from tfcovseg.benchmarks import processes

    folder = make_folder(tmp_path / "train", [str(i) for i in range(6)])
    monkeypatch.setattr(processes, "run_in_process", lambda target, args, name: -9)
    with pytest.raises(
        BenchmarkError, match=r"fold 0 stopped in its own process \(killed by SIGKILL"
    ):
        run(folder, tmp_path / "out", isolate=True, folds=2, models=("unet",), **FAST)
    assert not (tmp_path / "out" / "folds").exists()


def test_a_fold_process_refuses_code_changed_since_its_run_started(tmp_path, capsys):
    from types import SimpleNamespace

    from tfcovseg.benchmarks.semiseg import _fold_process

    fold = SimpleNamespace(split=SimpleNamespace(fold=3))
    with pytest.raises(SystemExit) as stop:
        _fold_process(fold, ["coarse_refine"], tmp_path, False, "0" * 16)
    assert stop.value.code == 2
    assert "fold 3: the code of tfcovseg, data_tools changed on disk" in capsys.readouterr().err


def test_a_fold_process_reads_the_unlabelled_slices_itself(tmp_path):
    # The parent keeps and pipes no copy of them (420 MB at 256x256): the fold's process
    # loads them from their folder, the same slices.
    import dataclasses
    from types import SimpleNamespace

    from tfcovseg.benchmarks import processes
    from tfcovseg.benchmarks.semiseg import _fold_process

    unlabelled = load_unlabelled(make_unlabelled(tmp_path / "u"), 32)
    seen = []
    fold = SimpleNamespace(
        split=SimpleNamespace(fold=0),
        unlabelled=dataclasses.replace(unlabelled, images=None),
        rows=lambda *args: seen.append(fold.unlabelled.images),
    )
    _fold_process(fold, ["coarse_refine_semi"], tmp_path, True, processes.source_digest())
    np.testing.assert_array_equal(seen[0], unlabelled.images)
