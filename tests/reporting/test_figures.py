"""Evaluation figures: valid PNGs, the paper's colours, lesions where the masks are."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfcovseg.evaluation.severity import covid_cohort, ratio_statistics
from tfcovseg.reporting import figures as viz

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["ggo", "consolidation", "fibrosis"]


def _png(path, min_size=(200, 150)):
    assert Path(path).is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= min_size[0] and img.height >= min_size[1]
        return np.asarray(img.convert("RGB"), np.int16)


def _reddish(rgb):
    return (rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 80


def test_class_colours_follow_the_paper():
    red, green, blue = viz.class_colours(CLASSES)
    assert red[0] == 1.0 and red[1] == red[2] == 0.0
    assert green[1] > max(green[0], green[2])
    assert blue[2] > max(blue[0], blue[1])
    assert viz.class_colours(["ground-glass opacity"]) == [red]
    unknown = viz.class_colours(["ggo", "nodule", "effusion"])
    assert unknown[0] == red and len(set(unknown)) == 3
    assert all(c in viz.FALLBACK_COLOURS for c in unknown[1:])


def test_overlay_rgb_colours_the_masked_pixels():
    hu = np.full((1, 8, 8), -1250.0)  # window bottom: black
    masks = np.zeros((1, 8, 8, 3), np.float32)
    masks[0, 2:4, 2:4, 0] = 0.9
    masks[0, 5, 5, 2] = 0.4  # below threshold
    rgb = viz.overlay_rgb(hu, masks, CLASSES, alpha=0.5)
    assert rgb.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(rgb[0, 2, 2], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(rgb[0, 5, 5], [0.0, 0.0, 0.0])
    assert viz.window_image(np.array([-1250.0, -500.0, 250.0, 999.0])).tolist() == [
        0.0,
        0.5,
        1.0,
        1.0,
    ]


def _slices(k=2, size=48):
    hu = np.full((k, size, size), -850.0, np.float32)
    empty = np.zeros((k, size, size, 3), np.float32)
    ggo = empty.copy()
    ggo[:, 10:30, 12:32, 0] = 1.0
    return hu, empty, ggo


def test_overlays_draw_red_ggo_where_predicted(tmp_path):
    hu, empty, ggo = _slices()
    with_ggo = viz.plot_overlays(hu, ggo, ggo, CLASSES, tmp_path / "a" / "fig6.png")
    without = viz.plot_overlays(hu, empty, empty, CLASSES, tmp_path / "fig6_empty.png")
    assert with_ggo == tmp_path / "a" / "fig6.png"
    a, b = _png(with_ggo), _png(without)
    assert a.shape == b.shape and a.shape[0] > a.shape[1] / 2  # rows of 3 panels, 2 slices
    red_a, red_b = _reddish(a), _reddish(b)
    # the legend has a red patch in both; the filled prediction adds many red pixels
    assert red_a.sum() > red_b.sum() + 2000
    extra = red_a & ~red_b
    width = a.shape[1]
    ys, xs = np.nonzero(extra)
    in_pred = (xs > 2 * width / 3).mean()
    in_truth = ((xs > width / 3) & (xs < 2 * width / 3)).mean()
    assert in_pred > 0.6  # mostly the filled prediction (third column)
    assert in_truth > 0.02  # and the ground-truth contours (second column)
    assert (xs < width / 3).mean() < 0.01  # the plain CT column stays grey


def test_overlays_accept_channel_axis_titles_and_check_shapes(tmp_path):
    hu, empty, ggo = _slices(k=1, size=32)
    path = viz.plot_overlays(
        hu[..., None], ggo, empty, CLASSES, tmp_path / "f.png", titles=["P1 slice 4"]
    )
    _png(path)
    full = np.ones_like(ggo)  # a mask covering the whole slice still gets a contour
    viz.plot_overlays(hu, full, full, CLASSES, tmp_path / "full.png")
    with pytest.raises(ValueError, match="pred"):
        viz.plot_overlays(hu, ggo, ggo[..., :2], CLASSES, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="titles"):
        viz.plot_overlays(hu, ggo, ggo, CLASSES, tmp_path / "bad.png", titles=["a", "b"])


def test_confusion_figure(tmp_path):
    path = viz.plot_confusion({"tp": 17, "fp": 1, "fn": 2, "tn": 3}, tmp_path / "x" / "c.png")
    rgb = _png(path)
    assert (rgb.std(axis=(0, 1)) > 0).all()
    entry = {"accuracy": 0.5, "confusion": {"tp": 0, "fp": 0, "fn": 0, "tn": 0}}
    _png(viz.plot_confusion(entry, tmp_path / "empty.png", title="robust rule"))


def _ratios():
    rng = np.random.default_rng(0)
    out = {}
    for i, (severity, base) in enumerate([("mild", 0.02), ("moderate", 0.1), ("severe", 0.3)] * 4):
        t = {"ggo": base * rng.uniform(0.5, 1.5), "consolidation": base / 3, "fibrosis": 0.0}
        out[f"P{i}"] = {
            "diagnosis": "covid",
            "severity": severity,
            "true": t,
            "pred": {k: v * 1.1 for k, v in t.items()},
        }
    out["H"] = {"diagnosis": "healthy", "severity": "none", "true": t, "pred": t}
    return out


def test_ratio_boxplots(tmp_path):
    patients, _ = covid_cohort(_ratios(), CLASSES)
    stats = ratio_statistics(_ratios(), CLASSES)
    path = viz.plot_ratio_boxplots(patients, stats, CLASSES, tmp_path / "fig4.png")
    rgb = _png(path, min_size=(600, 200))
    assert rgb.shape[1] > rgb.shape[0]  # four panels side by side
    assert _reddish(rgb).sum() > 50  # GGO predicted boxes in the class colour


def test_ratio_boxplots_without_covid_patients(tmp_path):
    _png(viz.plot_ratio_boxplots([], {}, ["ggo"], tmp_path / "fig4.png"))


def test_figures_are_released(tmp_path, monkeypatch):
    refs = []
    save = viz._save

    def spy(fig, path):
        refs.append(weakref.ref(fig))
        return save(fig, path)

    monkeypatch.setattr(viz, "_save", spy)
    for i in range(3):
        viz.plot_confusion({"tp": i, "fp": 1, "fn": 1, "tn": 1}, tmp_path / f"c{i}.png")
    gc.collect()
    assert refs and all(r() is None for r in refs)


def test_modules_need_neither_tensorflow_nor_keras_nor_pyplot():
    code = (
        "import tests.no_tensorflow, sys\n"
        "import tfcovseg.evaluation.severity, tfcovseg.reporting.figures\n"
        "import tfcovseg.reporting.report\n"
        "bad = [m for m in ('keras', 'tensorflow', 'matplotlib.pyplot') if m in sys.modules]\n"
        "print('BAD', bad)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "jax", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BAD []" in proc.stdout
