"""Evaluation reports: Markdown and self-contained HTML of the same results."""

from __future__ import annotations

import base64
import copy
import math
from html.parser import HTMLParser

import pytest

from tfcovseg.evaluation.severity import ratio_statistics
from tfcovseg.reporting.report import fmt, fmt_p, render_html, render_markdown, write_reports

CLASSES = ["ggo", "consolidation", "fibrosis"]
PNG = base64.b64decode(  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)


def _results():
    ratios = {}
    for i, (severity, g) in enumerate(
        [("mild", 0.01), ("mild", 0.02), ("moderate", 0.1), ("moderate", 0.12), ("severe", 0.3)]
    ):
        ratios[f"P{i}"] = {
            "diagnosis": "covid",
            "severity": severity,
            "true": {"ggo": g, "consolidation": g / 2, "fibrosis": 0.0},
            "pred": {"ggo": g * 0.9, "consolidation": g / 2, "fibrosis": 0.0},
        }
    ratios["<script>alert(1)</script>"] = {
        "diagnosis": "healthy",
        "severity": "none",
        "true": dict.fromkeys(CLASSES, 0.0),
        "pred": {"ggo": 0.0123, "consolidation": 0.0, "fibrosis": 0.0},
    }
    nan = math.nan
    return {
        "experiment": "quickstart",
        "architecture": "coarse_refine",
        "loss": "hybrid",
        "split": "test",
        "fold": 0,
        "threshold": 0.5,
        "classes": CLASSES,
        "disclaimer": "Research use, not a medical device.",
        "segmentation": {
            "ggo": {
                "dice": 0.81234,
                "iou": 0.6834,
                "precision": 0.8,
                "recall": 0.82,
                "lesion_slice_dice": 0.7512,
                "lesion_slices": 14,
            },
            "consolidation": {
                "dice": 0.5,
                "iou": 0.333,
                "precision": 0.6,
                "recall": 0.4,
                "lesion_slice_dice": 0.45,
                "lesion_slices": 6,
            },
            "fibrosis": dict.fromkeys(
                ["dice", "iou", "precision", "recall", "lesion_slice_dice"], nan
            ),
        },
        "lesion_lung_ratio": ratios,
        "severity_statistics": ratio_statistics(ratios, CLASSES),
        "classification": {
            "any_slice": {
                "accuracy": 0.9,
                "recall": 0.9444,
                "precision": 0.8947,
                "f1": 0.9189,
                "confusion": {"tp": 17, "fp": 2, "fn": 1, "tn": 4},
                "patients": 24,
                "rule": "COVID-19 when any slice has p >= 0.5",
            },
            "robust": {
                "accuracy": 0.9583,
                "recall": 0.9444,
                "precision": 1.0,
                "f1": 0.9714,
                "confusion": {"tp": 17, "fp": 0, "fn": 1, "tn": 6},
                "patients": 24,
                "rule": "COVID-19 when at least 3 slices have p >= 0.7",
                "min_slices": 3,
                "threshold": 0.7,
            },
        },
        "figures": {
            "ratios": "figures/fig4_ratios.png",
            "confusion": "figures/fig5_confusion.png",
            "overlays": "figures/fig6_overlays.png",
        },
    }


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.text, self.imgs = [], [], [], []
        self.errors = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag not in ("meta", "br", "hr", "link"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def _parse(page):
    parser = _Collect()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    return parser


def test_markdown_has_all_tables_numbers_and_disclaimer():
    results = _results()
    # Per-patient details beside the rules are not a rule row.
    results["classification"]["patients"] = {"P1": {"diagnosis": "covid", "slices": 3}}
    md = render_markdown(results, "quickstart")
    assert "| patients | —" not in md and "no rule text recorded" not in md
    head = md.splitlines()[:5]
    assert md.startswith("# quickstart: evaluation on the test split of fold 0")
    assert "**Research use, not a medical device.**" in head
    assert "| ggo | 0.812 | 0.683 | 0.800 | 0.820 | 0.751 | 14 |" in md
    assert "Dice per lesion slice" in md and "in the truth or in the prediction" in md
    assert "| fibrosis | — | — | — | — | — |" in md
    assert "nan" not in md.lower()
    assert "| any-slice | 24 | 0.900 | 0.944 | 0.895 | 0.919 | 17 | 2 | 1 | 4 |" in md
    assert "| robust | 24 | 0.958 | 0.944 | 1.000 | 0.971 | 17 | 0 | 1 | 6 |" in md
    assert "any-slice: COVID-19 when any slice has p &gt;= 0.5" in md
    assert "robust: COVID-19 when at least 3 slices have p &gt;= 0.7 (min slices 3" in md
    assert "| P2 | covid | moderate | 0.1000 | 0.0900 | 0.0500 | 0.0500 |" in md
    for title in ("Table 4", "Table 5", "Table 6", "Table 5 statistics"):
        assert title in md
    assert "![Figure 4" in md and "(figures/fig4_ratios.png)" in md
    assert "(figures/fig5_confusion.png)" in md and "(figures/fig6_overlays.png)" in md
    assert "<script>" not in md  # patient ids cannot inject HTML into a rendered Markdown


def test_markdown_severity_table():
    results = _results()
    md = render_markdown(results, "quickstart")
    st = results["severity_statistics"]["classes"]["ggo"]["true"]
    row = next(line for line in md.splitlines() if line.startswith("| ggo | ground truth |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "0.0150 [0.0125, 0.0175] (n=2)"  # mild
    assert cells[4] == "0.3000 [0.3000, 0.3000] (n=1)"  # severe
    # The severe group has one patient: no Kruskal-Wallis test, and the report says why.
    assert st["kruskal"]["p"] is None and cells[-4] == cells[-3] == "—"
    assert "ggo (true), Kruskal–Wallis: a group of one patient (severe)" in md
    assert cells[-2] == f"{st['spearman']['rho']:.3f}"
    assert "| total | predicted |" in md
    assert "5 COVID-19 patients with a known severity (left out: 1 non-COVID" in md
    assert "fibrosis (true), Kruskal–Wallis: all ratios are identical" in md


def test_missing_sections_are_left_out():
    base = {"split": "validation", "fold": 2, "classes": CLASSES}
    md = render_markdown(base, "run")
    assert "Research use, not a medical device." in md
    for word in ("Table 4", "Table 6", "Table 5", "Figure"):
        assert word not in md
    _parse(render_html(base, "run"))

    only_cls = _results()
    for key in ("segmentation", "lesion_lung_ratio", "severity_statistics", "figures"):
        del only_cls[key]
    del only_cls["classification"]["robust"]
    md = render_markdown(only_cls, "run")
    assert "any-slice" in md and "robust" not in md and "Table 4" not in md

    no_severity = _results()
    del no_severity["severity_statistics"]
    for entry in no_severity["lesion_lung_ratio"].values():
        del entry["severity"]
    md = render_markdown(no_severity, "run")
    assert "| patient | diagnosis | ggo true |" in md and "Table 5 statistics" not in md


def test_html_is_well_formed_escaped_and_embeds_figures(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "fig4_ratios.png").write_bytes(PNG)
    page = render_html(_results(), "quick<start>", base_dir=tmp_path)
    parsed = _parse(page)
    assert "script" not in parsed.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>" not in page
    assert "quick&lt;start&gt;" in page
    text = "".join(parsed.text)
    assert "Research use, not a medical device." in text
    assert "0.812" in text and "COVID-19 when at least 3 slices have p >= 0.7" in text
    assert "nan" not in text.lower() and "—" in text
    embedded = [i["src"] for i in parsed.imgs if i["src"].startswith("data:image/png;base64,")]
    assert len(embedded) == 1
    assert base64.b64decode(embedded[0].split(",", 1)[1]) == PNG
    assert 'href="figures/fig5_confusion.png"' in page  # missing files are linked
    assert 'href="figures/fig6_overlays.png"' in page


def test_write_reports_is_atomic_and_complete(tmp_path):
    out = tmp_path / "run"
    md_path, html_path = write_reports(_results(), "quickstart", out)
    assert (md_path, html_path) == (out / "report.md", out / "report.html")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    assert md_path.read_text(encoding="utf-8") == render_markdown(_results(), "quickstart")
    _parse(html_path.read_text(encoding="utf-8"))
    # rewriting replaces the files and leaves no temporaries behind
    changed = copy.deepcopy(_results())
    changed["segmentation"]["ggo"]["dice"] = 0.1
    write_reports(changed, "quickstart", out)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    assert "| ggo | 0.100 |" in md_path.read_text(encoding="utf-8")


def test_failed_write_leaves_old_report_and_no_temporaries(tmp_path, monkeypatch):
    write_reports(_results(), "quickstart", tmp_path)
    before = (tmp_path / "report.md").read_text(encoding="utf-8")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("data_tools.files.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_reports({"split": "x", "fold": 1}, "other", tmp_path)
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md"]


def test_number_formatting():
    assert fmt(math.nan) == "—" and fmt(None) == "—" and fmt(float("inf")) == "—"
    assert fmt(0.12345) == "0.123" and fmt(0.12345, 4) == "0.1235" and fmt(7) == "7"
    assert fmt_p(None) == "—" and fmt_p(0.0312) == "0.031" and fmt_p(1.234e-5) == "1.23e-05"


def test_figure_path_relative_to_base_dir(tmp_path):
    results = {"split": "test", "fold": 0, "figures": {"extra": "plots/x.png"}}
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "x.png").write_bytes(PNG)
    assert "data:image/png;base64," in render_html(results, "r", base_dir=tmp_path)
    assert "data:image/png" not in render_html(results, "r")
    assert "Other figures" in render_markdown(results, "r")


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    from data_tools.files import atomic_directory

    target = tmp_path / "out" / "7"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []
    with atomic_directory(target) as tmp:
        assert tmp.name.startswith(".") and not target.exists()
        (tmp / "whole.bin").write_bytes(b"y")
    assert (target / "whole.bin").read_bytes() == b"y"
    with pytest.raises(OSError):  # an existing folder is never replaced
        with atomic_directory(target) as tmp:
            (tmp / "other.bin").write_bytes(b"z")
    assert sorted(p.name for p in target.iterdir()) == ["whole.bin"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["7"]


def test_training_patient_dice_and_slice_auc_sections():
    results = _results()
    results["training"] = {
        "phases": {
            "segmentation": {
                "epochs": 7,
                "max_epochs": 20,
                "best_epoch": 4,
                "best_val_loss": 1.23456,
                "stopped_early": True,
            },
            "classification": {
                "epochs": 3,
                "max_epochs": 3,
                "best_epoch": 3,
                "best_val_loss": 0.5,
                "stopped_early": False,
            },
        },  # fmt: skip
        "timings": {"segmentation_s": 61.4, "total_s": 99.6},
        "data_fingerprint": "f00d",
        "unreadable_logs": ["logs/student_r1.csv: UnicodeDecodeError"],
        "versions": {"keras": "3.15.1"},
    }
    results["patient_dice"] = {
        "P1": {"diagnosis": "covid", "dice": {"ggo": 0.8, "consolidation": 1.0, "fibrosis": 0.0},
               "lesion_pixels": {"ggo": 50, "consolidation": 0, "fibrosis": 0}},
    }  # fmt: skip
    results["classification"]["slices"] = {"auc": 0.9123, "positives": 12, "negatives": 30}
    md = render_markdown(results, "quickstart")
    assert "| segmentation | 7 (20) | 4 | 1.2346 | yes | 61 s |" in md
    assert "| classification | 3 (3) | 3 | 0.5000 | no | — |" in md
    assert "could not be read (left out): logs/student_r1.csv: UnicodeDecodeError" in md
    assert "data fingerprint: f00d" in md and "keras 3.15.1" in md and "whole run: 100 s" in md
    # No lesion in truth or prediction: a dash; false positives only: 0.
    assert "| P1 | covid | 0.800 | — | 0.000 |" in md
    assert "12 annotated slices with a lesion and 30 without" in md and "AUC is 0.912" in md
    # The sections come in reading order: training first.
    assert md.index("## Training") < md.index("## Segmentation") < md.index("## Dice per patient")
    _parse(render_html(results, "quickstart"))
