"""The evaluation report of a run, as Markdown and as a self-contained HTML page.

`render_markdown` and `render_html` turn the evaluation's results (the content of
``metrics.json``) into the same document:

- the run (experiment, architecture, loss, split, fold, threshold) and the disclaimer;
- Table 4: segmentation scores per lesion type;
- Table 6: patient-level classification under each rule present (the paper's any-slice
  rule, the robust rule and the segmentation's lesion-burden rule), with the rule's text
  and the confusion counts;
- Table 5: lesion / lung area ratios per patient with diagnosis and severity;
- the severity statistics of `tfcovseg.evaluation.severity.ratio_statistics` (per severity
  median and IQR, Kruskal-Wallis and Spearman tests, ground truth and predicted);
- Figures 4 to 6 where the results name them (images in Markdown; embedded as base64 PNG
  in HTML when the file exists, else linked).

Sections whose results are absent are left out; undefined values (None, NaN) are shown as
an em dash. `write_reports` writes ``report.md`` and ``report.html`` atomically. Pure
Python; no TensorFlow or Keras. Research use, not a medical device.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from pathlib import Path

from data_tools.files import atomic_write_text
from tfcovseg.constants import (
    DISCLAIMER,
    SEVERITY_ORDER,
    TOTAL,
)

MISSING = "—"
RULE_ORDER = ("any_slice", "robust", "lesion_burden")
FIGURES = (
    ("overlays", "Figure 6: CT slices, ground-truth contours and predicted lesions"),
    ("confusion", "Figure 5: patient-level confusion matrix"),
    ("ratios", "Figure 4: lesion / lung area ratio by severity (COVID-19 patients)"),
    ("learning_curves", "Loss per epoch of each training phase (dashed: the best epoch)"),
    ("slice_roc", "The slice classifier's ROC curve on the split's annotated slices"),
)


def fmt(value, digits: int = 3) -> str:
    """A number with `digits` decimals; None, NaN and infinity as an em dash."""
    if value is None or isinstance(value, str):
        return MISSING if value is None else value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (hasattr(value, "dtype") and value.dtype.kind in "iu"):
        return str(int(value))
    return f"{number:.{digits}f}"


def fmt_p(value) -> str:
    """A p-value with three decimals (scientific notation below 0.001)."""
    if value is None:
        return MISSING
    number = float(value)
    if not math.isfinite(number):
        return MISSING
    return f"{number:.2e}" if 0 < number < 1e-3 else f"{number:.3f}"


def _plain(value) -> str:
    """A setting as written: floats in shortest form (0.5), NaN as an em dash."""
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else MISSING
    return str(value)


def fmt_count(value) -> str:
    if value is None:
        return MISSING
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(number)) if math.isfinite(number) else MISSING


# The document is built once as a list of sections of blocks and rendered twice.
# A block is ("p", text) | ("strong", text) | ("list", [text]) | ("table", header, rows)
# | ("figure", path, caption).


def _figure_block(figures: Mapping, key: str, caption: str):
    path = figures.get(key)
    return [("figure", str(path), caption)] if path else []


def composition_text(composition: Mapping) -> str:
    """ "3 covid (moderate 2, severe 1), 1 healthy" from `evaluate.split_composition`."""
    grades = composition.get("covid_severity") or {}
    parts = []
    for d, n in composition["diagnosis"].items():
        detail = ", ".join(f"{g} {k}" for g, k in grades.items()) if d == "covid" else ""
        parts.append(f"{n} {d}" + (f" ({detail})" if detail else ""))
    return ", ".join(parts)


def _header(results: Mapping, name: str) -> tuple[str, list]:
    title = (
        f"{name}: evaluation on the {results.get('split', '?')} split "
        f"of fold {results.get('fold', '?')}"
    )
    facts = []
    for key, label in (
        ("experiment", "experiment"),
        ("architecture", "architecture"),
        ("loss", "loss"),
        ("split", "split"),
        ("fold", "fold"),
        ("threshold", "threshold"),
    ):
        if key in results and results[key] is not None:
            value = results[key]
            facts.append(f"{label}: {_plain(value)}")
    if results.get("classes"):
        facts.append("lesion classes: " + ", ".join(str(c) for c in results["classes"]))
    composition = results.get("patients")
    if isinstance(composition, Mapping) and composition.get("diagnosis"):
        facts.append("patients: " + composition_text(composition))
    blocks = [("strong", results.get("disclaimer") or DISCLAIMER)]
    blocks += [("strong", f"Warning: {w}") for w in results.get("warnings", [])]
    if facts:
        blocks.append(("p", "; ".join(facts) + "."))
    return title, blocks


def _classes(results: Mapping, keys) -> list:
    listed = [c for c in results.get("classes") or [] if c in keys]
    return listed + [c for c in keys if c not in listed]


def _segmentation(results: Mapping, figures: Mapping):
    seg = results.get("segmentation")
    if not seg:
        return None
    header = ["lesion", "Dice", "IoU", "precision", "recall", "Dice per lesion slice", "slices"]
    keys = ("dice", "iou", "precision", "recall", "lesion_slice_dice")
    rows = []
    for cls in _classes(results, list(seg)):
        s = seg[cls] or {}
        slices = s.get("lesion_slices")
        rows.append(
            [str(cls)] + [fmt(s.get(k)) for k in keys] + ["" if slices is None else str(slices)]
        )
    blocks = [
        (
            "p",
            "Pixel scores from global pixel counts over the split's annotated slices. Dice "
            "per lesion slice: the Dice of each slice averaged over the slices that have the "
            "lesion type in the truth or in the prediction (their number in the last column; "
            "1 when there is none). Slices where both are empty are left out: they would "
            "each score 1 and hide a type the model never finds.",
        ),
        ("table", header, rows),
    ]
    return "Segmentation (Table 4)", blocks + _figure_block(figures, *FIGURES[0])


def _classification(results: Mapping, figures: Mapping):
    cls = results.get("classification")
    if not cls:
        return None
    # Rule entries hold scores; other entries (e.g. "patients", per-patient details) do not.
    scored = [r for r, m in cls.items() if isinstance(m, dict) and "accuracy" in m]
    rules = [r for r in RULE_ORDER if r in scored] + [r for r in scored if r not in RULE_ORDER]
    header = ["rule", "patients", "accuracy", "recall", "precision", "F1", "TP", "FP", "FN", "TN"]
    rows, notes = [], []
    for rule in rules:
        m = cls[rule] or {}
        c = m.get("confusion") or {}
        rows.append(
            [rule.replace("_", "-"), fmt_count(m.get("patients"))]
            + [fmt(m.get(k)) for k in ("accuracy", "recall", "precision", "f1")]
            + [fmt_count(c.get(k)) for k in ("tp", "fp", "fn", "tn")]
        )
        extra = [
            f"{k.replace('_', ' ')} {_plain(m[k])}"
            for k in ("min_slices", "threshold")
            if m.get(k) is not None
        ]
        text = str(m.get("rule") or "no rule text recorded")
        notes.append(
            f"{rule.replace('_', '-')}: {text}" + (f" ({', '.join(extra)})" if extra else "")
        )
    # A rule that could not be chosen (validation patients of one kind) has no scores:
    # its reason stands in the notes.
    unscored = [r for r in RULE_ORDER if isinstance(cls.get(r), dict) and r not in scored]
    notes += [f"{r.replace('_', '-')}: {cls[r].get('rule', 'off')}" for r in unscored]
    blocks = [
        ("p", "The truth is the patient's diagnosis (COVID-19 or not)."),
        ("table", header, rows),
        ("list", notes),
    ] + _slice_blocks(cls.get("slices"), figures)
    return "Patient-level classification (Table 6)", blocks + _figure_block(figures, *FIGURES[1])


def _slice_blocks(slices, figures) -> list:
    """The slice classifier against the annotated slices (lesion or not): AUC and ROC."""
    if not slices:
        return []
    auc = slices.get("auc")
    text = (
        f"Slice level: {fmt_count(slices.get('positives'))} annotated slices with a lesion "
        f"and {fmt_count(slices.get('negatives'))} without; the classifier's slice AUC is "
        + ("undefined (one kind of slice only)." if auc is None else f"{fmt(auc)}.")
    )
    return [("p", text)] + _figure_block(figures, *FIGURES[4])


def _training(results: Mapping, figures: Mapping):
    training = results.get("training") or {}
    phases = training.get("phases") or {}
    if not phases and not training.get("unreadable_logs"):
        return None
    timings = training.get("timings") or {}
    header = [
        "phase",
        "epochs (max)",
        "best epoch",
        "best validation loss",
        "stopped early",
        "time",
    ]
    rows = []
    for name, p in phases.items():
        seconds = timings.get(f"{name}_s")
        most = _plain(p["max_epochs"]) if p.get("max_epochs") else MISSING
        rows.append(
            [
                name,
                f"{p['epochs']} ({most})",
                _plain(p.get("best_epoch")) if p.get("best_epoch") else MISSING,
                fmt(p.get("best_val_loss"), 4),
                "interrupted"
                if p.get("interrupted")
                else {True: "yes", False: "no"}.get(p.get("stopped_early"), MISSING),
                MISSING if seconds is None else f"{float(seconds):.0f} s",
            ]
        )
    facts = [
        f"{k.replace('_', ' ')}: {_plain(training[k])}"
        for k in ("data_fingerprint", "seed", "strategy", "replicas", "cpu_kernels")
        if training.get(k) is not None
    ]
    versions = training.get("versions") or {}
    if versions:
        facts.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if timings.get("total_s") is not None:
        facts.append(f"whole run: {float(timings['total_s']):.0f} s")
    if training.get("unreadable_logs"):
        unreadable = ", ".join(training["unreadable_logs"])
        facts.append(f"run files that could not be read (left out): {unreadable}")
    blocks = [
        ("p", "Each phase keeps the epoch with the lowest validation loss (its *_best.keras)."),
        ("table", header, rows),
    ]
    blocks = (blocks if rows else []) + ([("list", facts)] if facts else [])
    return "Training", blocks + _figure_block(figures, *FIGURES[3])


def _patient_dice(results: Mapping):
    per_patient = results.get("patient_dice")
    if not per_patient:
        return None
    classes = _classes(results, [c for e in per_patient.values() for c in e.get("dice", {})])
    header = ["patient", "diagnosis"] + [f"{c} Dice" for c in classes]
    rows = [
        [str(pid), str(e.get("diagnosis", MISSING))] + [_dice_cell(e, c) for c in classes]
        for pid, e in per_patient.items()
    ]
    text = (
        "Dice of each patient's annotated slices from its own pixel counts; a dash where "
        "neither the truth nor the prediction has the lesion type (nothing to score)."
    )
    return "Dice per patient", [("p", text), ("table", header, rows)]


def _dice_cell(entry, cls) -> str:
    lesion = (entry.get("lesion_pixels") or {}).get(cls)
    dice = (entry.get("dice") or {}).get(cls)
    if lesion == 0 and dice == 1.0:
        return MISSING
    return fmt(dice)


def _ratios(results: Mapping):
    ratios = results.get("lesion_lung_ratio")
    if not ratios:
        return None
    keys = []
    for entry in ratios.values():
        for kind in ("true", "pred"):
            keys += [k for k in (entry.get(kind) or {}) if k not in keys]
    classes = _classes(results, keys)
    with_severity = any("severity" in e for e in ratios.values())
    header = ["patient", "diagnosis"] + (["severity"] if with_severity else [])
    header += [f"{c} {kind}" for c in classes for kind in ("true", "pred")]
    rows = []
    for pid, entry in ratios.items():
        row = [str(pid), str(entry.get("diagnosis", MISSING))]
        if with_severity:
            row.append(str(entry.get("severity") or MISSING))
        for c in classes:
            for kind in ("true", "pred"):
                row.append(fmt((entry.get(kind) or {}).get(c), 4))
        rows.append(row)
    blocks = [
        ("p", "Lesion area / lung area per patient over the split's slices."),
        ("table", header, rows),
    ]
    return "Lesion / lung area ratio per patient (Table 5)", blocks


def _group_cell(group) -> str:
    if not group or not group.get("n"):
        return f"{MISSING} (n=0)"
    return (
        f"{fmt(group.get('median'), 4)} [{fmt(group.get('q1'), 4)}, {fmt(group.get('q3'), 4)}]"
        f" (n={fmt_count(group.get('n'))})"
    )


def _severity(results: Mapping, figures: Mapping):
    stats = results.get("severity_statistics")
    if not stats:
        figure = _figure_block(figures, *FIGURES[2])
        return ("Lesion burden by severity (Figure 4)", figure) if figure else None
    per_class = stats.get("classes") or {}
    names = _classes(results, [c for c in per_class if c != TOTAL])
    names += [TOTAL] if TOTAL in per_class else []
    order = [s for s in stats.get("severity_order") or SEVERITY_ORDER]
    populated = [
        s
        for s in order
        if any(
            ((k.get("groups") or {}).get(s) or {}).get("n")
            for c in per_class.values()
            for k in c.values()
        )
    ]
    shown = populated or [s for s in order if s != "none"]
    header = (
        ["lesion", "ratio"]
        + [f"{s}: median [q1, q3]" for s in shown]
        + ["Kruskal–Wallis H", "Kruskal–Wallis p", "Spearman ρ", "Spearman p"]
    )
    rows, reasons = [], []
    for name in names:
        for kind in ("true", "pred"):
            entry = per_class[name].get(kind)
            if entry is None:
                continue
            kw = entry.get("kruskal") or {}
            sp = entry.get("spearman") or {}
            rows.append(
                [str(name), "ground truth" if kind == "true" else "predicted"]
                + [_group_cell((entry.get("groups") or {}).get(s)) for s in shown]
                + [fmt(kw.get("h")), fmt_p(kw.get("p")), fmt(sp.get("rho")), fmt_p(sp.get("p"))]
            )
            for test, label in ((kw, "Kruskal–Wallis"), (sp, "Spearman")):
                if test.get("reason"):
                    reasons.append(f"{name} ({kind}), {label}: {test['reason']}")
    excluded = stats.get("excluded") or {}
    intro = (
        f"{fmt_count(stats.get('patients'))} COVID-19 patients with a known severity "
        f"(left out: {fmt_count(excluded.get('not_covid', 0))} non-COVID, "
        f"{fmt_count(excluded.get('unknown_severity', 0))} without a severity). "
        "Spearman's ρ correlates the ordinal severity (none 0, mild 1, moderate 2, severe 3) "
        "with the ratio; Kruskal–Wallis compares the severity groups with patients."
    )
    blocks = [("p", intro), ("table", header, rows)]
    if reasons:
        blocks += [("p", "Undefined tests:"), ("list", reasons)]
    return "Lesion burden by severity (Table 5 statistics)", blocks + _figure_block(
        figures, *FIGURES[2]
    )


def _other_figures(figures: Mapping):
    known = {key for key, _ in FIGURES}
    blocks = [("figure", str(p), str(k)) for k, p in figures.items() if k not in known and p]
    return ("Other figures", blocks) if blocks else None


def build_document(results: Mapping, name: str) -> tuple[str, list]:
    """(title, [(section title, blocks)]) of the report; the header section comes first."""
    figures = results.get("figures") or {}
    title, header = _header(results, name)
    sections = [(None, header)]
    for section in (
        _training(results, figures),
        _segmentation(results, figures),
        _patient_dice(results),
        _classification(results, figures),
        _ratios(results),
        _severity(results, figures),
        _other_figures(figures),
    ):
        if section:
            sections.append(section)
    return title, sections


# Markdown


def _md(text: str) -> str:
    """Text safe in Markdown prose and table cells: no raw HTML, no cell breaks."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_url(path: str) -> str:
    return path.replace(" ", "%20").replace("(", "%28").replace(")", "%29")


def render_markdown(results: Mapping, name: str) -> str:
    """The report as Markdown (GitHub flavour)."""
    title, sections = build_document(results, name)
    lines = [f"# {_md(title)}", ""]
    for heading, blocks in sections:
        if heading:
            lines += [f"## {_md(heading)}", ""]
        for block in blocks:
            kind = block[0]
            if kind == "p":
                lines += [_md(block[1]), ""]
            elif kind == "strong":
                lines += [f"**{_md(block[1])}**", ""]
            elif kind == "list":
                lines += [f"- {_md(item)}" for item in block[1]] + [""]
            elif kind == "table":
                _, header, rows = block
                lines.append("| " + " | ".join(_md(h) for h in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
                lines.append("")
            elif kind == "figure":
                _, path, caption = block
                lines += [f"![{_md(caption)}]({_md_url(path)})", "", f"*{_md(caption)}*", ""]
    return "\n".join(lines).rstrip() + "\n"


# HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
.disclaimer { background: #fff4e5; border-left: 4px solid #e69500; padding: 0.5em 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-style: italic; font-size: 0.9em; }
""".strip()


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _img(path: str, caption: str, base_dir) -> str:
    file = Path(base_dir) / path if base_dir is not None else None
    if file is not None and file.is_file():
        data = base64.b64encode(file.read_bytes()).decode("ascii")
        mime = "image/svg+xml" if file.suffix.lower() == ".svg" else "image/png"
        if file.suffix.lower() in (".jpg", ".jpeg"):
            mime = "image/jpeg"
        body = f'<img src="data:{mime};base64,{data}" alt="{_e(caption)}">'
    else:
        body = f'<a href="{_e(path)}">{_e(path)}</a>'
    return f"<figure>{body}<figcaption>{_e(caption)}</figcaption></figure>"


def render_html(results: Mapping, name: str, base_dir=None) -> str:
    """The report as one self-contained HTML page.

    Args:
        results: The evaluation results.
        name: The run's name, for the title.
        base_dir: Folder the figure paths are relative to; figures found there are embedded
            as base64 images, others (or all, when None) are linked.
    """
    title, sections = build_document(results, name)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
    ]
    for heading, blocks in sections:
        if heading:
            out.append(f"<h2>{_e(heading)}</h2>")
        for block in blocks:
            kind = block[0]
            if kind == "p":
                out.append(f"<p>{_e(block[1])}</p>")
            elif kind == "strong":
                out.append(f'<p class="disclaimer"><strong>{_e(block[1])}</strong></p>')
            elif kind == "list":
                out.append("<ul>" + "".join(f"<li>{_e(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                _, header, rows = block
                out.append("<table>")
                out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header))
                out.append("</tr></thead><tbody>")
                for row in rows:
                    out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
                out.append("</tbody></table>")
            elif kind == "figure":
                out.append(_img(block[1], block[2], base_dir))
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def write_reports(results: Mapping, name: str, out_dir) -> tuple[Path, Path]:
    """Writes report.md and report.html into out_dir (figures relative to it); atomic."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, render_markdown(results, name))
    atomic_write_text(html_path, render_html(results, name, base_dir=out_dir))
    return md_path, html_path
