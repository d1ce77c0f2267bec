"""Compare evaluated runs in the layouts of the paper's tables (the library of
``python -m tfcovseg.compare RUN [RUN ...] [--out DIR] [--names A,B,...]``).

Each RUN is a run folder evaluated by ``python -m tfcovseg.evaluate`` (it holds
``metrics.json``) or a cross-validation folder written by ``train --fold all`` (it holds
``fold0/``, ``fold1/``, ... each an evaluated run folder). A cross-validation folder is
summarised by the mean and sample standard deviation over its folds of every metric; folds
where a metric is NaN are left out of that metric's mean and the number of folds used is
kept.

Prints, and writes to ``DIR/comparison.md`` and ``DIR/comparison.json`` (default
``runs/comparison``):

- Table 4: per lesion type Dice, IoU, pixel precision and pixel recall, one row per run;
- Table 6: patient-level accuracy, recall, precision and F1 of the any-slice rule and, where
  the evaluation has it, of the robust rule;
- Table 7: the ablation ladder (SE-ResNet-34 U-Net, + ASPP, + refinement, + hybrid loss) and
  any other architecture, Dice per lesion type and their mean.

`write_cv_summary` writes ``cv_metrics.json`` and ``cv_report.md`` into a cross-validation
folder. Pure Python and NumPy: neither TensorFlow nor Keras is imported.

Research use, not a medical device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from data_tools.files import atomic_write_text, json_text, plain
from tfcovseg.constants import DISCLAIMER
from tfcovseg.evaluation.runlog import EVALUATION_DIR, run_of

SEGMENTATION_METRICS = ("dice", "iou", "precision", "recall", "lesion_slice_dice")
TABLE4_METRICS = (
    ("dice", "Dice"),
    ("iou", "IoU"),
    ("precision", "precision"),
    ("recall", "recall"),
)
TABLE6_METRICS = (
    ("accuracy", "accuracy"),
    ("recall", "recall"),
    ("precision", "precision"),
    ("f1", "F1"),
)
RULES = ("any_slice", "robust", "lesion_burden")
MEAN_DICE = "segmentation/mean_dice"
DEFAULT_OUT = Path("runs") / "comparison"

# Table 7: (architecture, loss) -> (rank on the ladder, the paper's row name).
ABLATION_LADDER = {
    ("seresnet_unet", "bce"): (0, "SE-ResNet-34 U-Net"),
    ("seresnet_unet_aspp", "bce"): (1, "+ ASPP"),
    ("coarse_refine", "bce"): (2, "+ refinement"),
    ("coarse_refine", "hybrid"): (3, "+ hybrid loss"),
}
ARCHITECTURE_NAMES = {
    "seresnet_unet": "SE-ResNet-34 U-Net",
    "seresnet_unet_aspp": "SE-ResNet-34 U-Net + ASPP",
    "coarse_refine": "SE-ResNet-34 U-Net + ASPP + refinement",
    "unet": "U-Net",
    "unet_plus_plus": "U-Net++",
    "unetpp": "U-Net++",
    "seresnet_classifier": "SE-ResNet-34 classifier",
}
_FOLD_DIR = re.compile(r"^fold(\d+)$")


class CompareError(ValueError):
    """A folder that cannot be summarised or compared; the message names the path."""


# ----------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CompareError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path} must hold a JSON object")
    return data


def _read_config(folder: Path) -> dict:
    """The run's config.yaml as plain values ({} when absent or unreadable); `folder` is
    the run or one of its ``evaluation/<split>`` folders."""
    path = run_of(folder) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return values if isinstance(values, dict) else {}


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _flatten(tree: Any, prefix: str, out: dict[str, float]) -> None:
    """Numeric leaves of a nested dict as "a/b/c" keys (strings and lists are skipped)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            _flatten(value, f"{prefix}/{key}", out)
    else:
        value = _number(tree)
        if value is not None:
            out[prefix] = value


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of one metrics.json as flat keys.

    Keys are ``segmentation/<class>/<metric>``, ``segmentation/mean_dice`` (mean over the
    lesion types of their Dice; NaN when any is NaN), and
    ``classification/<rule>/<metric>`` (confusion counts as
    ``classification/<rule>/confusion/tp`` and so on).
    """
    flat: dict[str, float] = {}
    seg = _lesion_blocks(metrics)
    for name, block in seg.items():
        _flatten(block, f"segmentation/{name}", flat)
    if seg:
        dice = [flat.get(f"segmentation/{c}/dice", math.nan) for c in seg]
        flat[MEAN_DICE] = float(np.mean(dice))
    for rule, block in _rule_blocks(metrics).items():
        _flatten(block, f"classification/{rule}", flat)
    return flat


def _lesion_blocks(metrics: dict) -> dict[str, dict]:
    """Per lesion type score dicts of "segmentation" (other entries are skipped)."""
    seg = metrics.get("segmentation")
    if not isinstance(seg, dict):
        return {}
    return {k: v for k, v in seg.items() if isinstance(v, dict) and "dice" in v}


def _rule_blocks(metrics: dict) -> dict[str, dict]:
    """Patient-level rule results of "classification" (per-patient details are skipped)."""
    cls = metrics.get("classification")
    if not isinstance(cls, dict):
        return {}
    return {k: v for k, v in cls.items() if isinstance(v, dict) and "accuracy" in v}


def _stats(values: Sequence[float]) -> dict:
    """Mean, sample SD (ddof=1) and count of the non-NaN values; all values kept."""
    arr = np.asarray(values, dtype=np.float64)
    ok = arr[~np.isnan(arr)]
    n = int(ok.size)
    return {
        "mean": float(ok.mean()) if n else math.nan,
        "sd": float(ok.std(ddof=1)) if n >= 2 else math.nan,
        "n": n,
        "values": [float(v) for v in arr],
    }


def _rules(metrics: dict) -> dict[str, str]:
    return {r: str(b["rule"]) for r, b in _rule_blocks(metrics).items() if b.get("rule")}


def _merge_rules(per_fold: Sequence[dict[str, str]]) -> tuple[dict[str, str], dict[str, list]]:
    """(rule -> text where every fold that has the rule agrees, rule -> text per fold)."""
    names = list(dict.fromkeys(r for rules in per_fold for r in rules))
    fold_rules = {r: [rules.get(r) for rules in per_fold] for r in names}
    common = {}
    for rule, texts in fold_rules.items():
        distinct = {t for t in texts if t is not None}
        common[rule] = distinct.pop() if len(distinct) == 1 else "chosen per fold (see fold_rules)"
    return common, fold_rules


def _fold_dirs(path: Path) -> list[tuple[int, Path]]:
    found = []
    for child in path.iterdir():
        match = _FOLD_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _evaluate_hint(path: Path) -> str:
    others = sorted(p.parent.name for p in (path / EVALUATION_DIR).glob("*/metrics.json"))
    if others:  # evaluated on another split only: its metrics are a folder further down
        where = " or ".join(str(path / EVALUATION_DIR / s) for s in others)
        return f"compare {where}, or run python -m tfcovseg.evaluate --run {path} (test split)"
    return f"run python -m tfcovseg.evaluate --run {path} first"


def _check_agree(items: Sequence[tuple[Path, dict]], key: str, what: str) -> None:
    first_path, first = items[0]
    for path, metrics in items[1:]:
        if metrics.get(key) != first.get(key):
            raise CompareError(
                f"{what} disagree on {key}: {first_path} has {first.get(key)!r}, {path} has "
                f"{metrics.get(key)!r}"
            )


def _describe(metrics: dict, config: dict, fallback: dict) -> dict:
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    fb_model = fallback.get("model") if isinstance(fallback.get("model"), dict) else {}
    fb_train = fallback.get("train") if isinstance(fallback.get("train"), dict) else {}
    return {
        "experiment": metrics.get("experiment") or config.get("name") or fallback.get("name"),
        "architecture": metrics.get("architecture")
        or model.get("architecture")
        or fb_model.get("architecture")
        or "coarse_refine",
        "loss": metrics.get("loss") or train.get("loss") or fb_train.get("loss") or "hybrid",
    }


def load_summary(path: str | Path) -> dict:
    """Summarises an evaluated run folder or a cross-validation folder.

    Args:
        path: A run folder holding ``metrics.json``, or a cross-validation folder holding
            ``fold0/metrics.json``, ``fold1/metrics.json``, ...

    Returns:
        A dict with ``path``, ``kind`` ("run" or "cv"), ``experiment``, ``architecture``,
        ``loss``, ``split``, ``classes``, ``threshold`` (None when the folds differ),
        ``folds`` (fold indices; for a run, the fold it was evaluated on),
        ``fold_dirs`` (folder names; [] for a run), ``rules`` (rule -> description;
        "chosen per fold (see fold_rules)" where folds differ), ``fold_rules`` (rule -> the
        description of each fold, None where absent; {} for a run) and
        ``metrics``: flat key (see `flatten_metrics`) -> {"mean", "sd", "n", "values"}.
        For a run, ``mean`` is the value, ``sd`` NaN and ``n`` 1 (0 when the value is
        NaN); for a cross-validation folder, the NaN-aware mean and sample SD over folds,
        ``n`` the number of non-NaN folds and ``values`` the per-fold values in the order
        of ``folds`` (NaN where a fold lacks the metric).

    Raises:
        CompareError: the folder is missing, holds neither metrics.json nor evaluated
            folds, some folds are not evaluated, or the folds disagree on classes or split.
    """
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{path} is not a folder")
    folds = _fold_dirs(path)
    if folds:
        missing = [d for _, d in folds if not (d / "metrics.json").is_file()]
        if missing:
            listed = ", ".join(str(d) for d in missing)
            raise CompareError(
                f"{path}: fold folder(s) without metrics.json: {listed}; "
                f"{_evaluate_hint(missing[0])}"
            )
        items = [(d / "metrics.json", _read_json(d / "metrics.json")) for _, d in folds]
        flats = [_flat_metrics(f, m) for f, m in items]
        _check_agree(items, "classes", "folds")
        _check_agree(items, "split", "folds")
        keys = list(dict.fromkeys(k for flat in flats for k in flat))
        first = items[0][1]
        thresholds = {m.get("threshold") for _, m in items}
        top = _read_config(path)
        rules, fold_rules = _merge_rules([_rules(m) for _, m in items])
        summary = {
            "path": str(path),
            "kind": "cv",
            **_describe(first, _read_config(folds[0][1]), top),
            "split": first.get("split"),
            "classes": list(first.get("classes") or []),
            "threshold": thresholds.pop() if len(thresholds) == 1 else None,
            "folds": [i for i, _ in folds],
            "fold_dirs": [d.name for _, d in folds],
            "rules": rules,
            "fold_rules": fold_rules,
            "metrics": {k: _stats([flat.get(k, math.nan) for flat in flats]) for k in keys},
        }
        if not summary["experiment"]:
            summary["experiment"] = path.name
        return summary
    if not (path / "metrics.json").is_file():
        raise CompareError(
            f"{path} holds neither metrics.json nor fold*/metrics.json; {_evaluate_hint(path)}"
        )
    metrics = _read_json(path / "metrics.json")
    fold = metrics.get("fold")
    summary = {
        "path": str(path),
        "kind": "run",
        **_describe(metrics, _read_config(path), {}),
        "split": metrics.get("split"),
        "classes": list(metrics.get("classes") or []),
        "threshold": metrics.get("threshold"),
        "folds": [fold] if isinstance(fold, int) else [],
        "fold_dirs": [],
        "rules": _rules(metrics),
        "fold_rules": {},
        "metrics": {
            k: _stats([v]) for k, v in _flat_metrics(path / "metrics.json", metrics).items()
        },
    }
    if not summary["experiment"]:
        summary["experiment"] = path.name
    return summary


def _flat_metrics(path: Path, metrics: dict) -> dict:
    """`flatten_metrics`, refusing a metrics.json that holds none (an empty table, exit 0)."""
    flat = flatten_metrics(metrics)
    if not flat:
        raise CompareError(f"{path} holds no metrics; {_evaluate_hint(path.parent)}")
    return flat


def load_summaries(paths: Sequence[str | Path]) -> list[dict]:
    """`load_summary` of each path; raises CompareError when they disagree on classes or split."""
    if not paths:
        raise CompareError("no run folders given")
    seen = {}
    for p in paths:
        key = Path(p).resolve()
        if key in seen:  # one row would hide the other (a traceback, before)
            raise CompareError(f"{p} is given twice (as {seen[key]} before): compare other runs")
        seen[key] = p
    summaries = [load_summary(p) for p in paths]
    items = [(Path(s["path"]), s) for s in summaries]
    _check_agree(items, "classes", "runs")
    _check_agree(items, "split", "runs")
    return summaries


# ----------------------------------------------------------------------------- naming


def ablation_label(architecture: str, loss: str) -> str:
    """The row name of Table 7: the paper's ladder names, else a readable model name."""
    if (architecture, loss) in ABLATION_LADDER:
        return ABLATION_LADDER[(architecture, loss)][1]
    name = ARCHITECTURE_NAMES.get(architecture, architecture)
    if architecture == "seresnet_classifier":  # no segmentation loss to name
        return name
    if loss == "hybrid":
        return f"{name} + hybrid loss"
    if architecture == "coarse_refine" or loss not in ("bce", "hybrid"):
        return f"{name} ({loss} loss)"
    return name


def _ladder_rank(summary: dict) -> int:
    rung = ABLATION_LADDER.get((summary["architecture"], summary["loss"]))
    return rung[0] if rung else len(ABLATION_LADDER)


def display_names(summaries: Sequence[dict], names: Sequence[str] | None = None) -> list[str]:
    """Row names: `names` when given, else experiment names; clashes use the folder name."""
    if names is not None:
        names = list(names)
        if len(names) != len(summaries):
            raise CompareError(f"{len(names)} names given for {len(summaries)} runs")
        if any(not n.strip() for n in names):
            raise CompareError("names must not be empty")
        names = [n.strip() for n in names]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # the tables and the JSON key rows by name: one would hide the other
            raise CompareError(f"names must differ: {', '.join(twice)} given twice")
        return names
    result = [str(s["experiment"]) for s in summaries]
    for attempt in (lambda s: Path(s["path"]).name, lambda s: s["path"]):
        clashes = {n for n in result if result.count(n) > 1}
        result = [attempt(s) if n in clashes else n for s, n in zip(summaries, result)]
    return result


# ----------------------------------------------------------------------------- tables


@dataclasses.dataclass
class Table:
    """A titled table of text cells, rendered as markdown or aligned plain text."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def format_cell(stat: dict | None, kind: str = "run", num_folds: int | None = None) -> str:
    """ "0.812" for a run, "0.812 ± 0.031" for a cross-validation mean, "n/a" for NaN.

    A cross-validation mean over fewer non-NaN folds than `num_folds` says how many, e.g.
    "0.812 ± 0.031 (n=4)"; one over a single fold has no SD: "0.812 (n=1)".
    """
    if stat is None or not stat["n"] or math.isnan(stat["mean"]):
        return "n/a"
    cell = f"{stat['mean']:.3f}"
    if kind != "cv":
        return cell
    if stat["n"] >= 2:
        cell += f" ± {stat['sd']:.3f}"
    if stat["n"] < 2 or (num_folds is not None and stat["n"] < num_folds):
        cell += f" (n={stat['n']})"
    return cell


def _cell(summary: dict, key: str) -> str:
    return format_cell(summary["metrics"].get(key), summary["kind"], len(summary["folds"]))


def _has_segmentation(summary: dict) -> bool:
    return any(k.startswith("segmentation/") for k in summary["metrics"])


def _left_out(names: Sequence[str], what: str) -> list[str]:
    return [f"Left out ({what}): {', '.join(names)}."] if names else []


def _cv_note(summaries: Sequence[dict]) -> list[str]:
    if any(s["kind"] == "cv" for s in summaries):
        return ["Cross-validation rows: mean ± sample SD over folds; (n=k): folds with a value."]
    return []


def table4(
    summaries: Sequence[dict], names: Sequence[str] | None = None, per_lesion: bool = False
) -> list[Table]:
    """Table 4: per lesion type Dice / IoU / precision / recall, one row per run.

    Returns one wide table, or with `per_lesion` one table per lesion type (narrower, for a
    terminal). Runs without segmentation metrics are left out with a note.
    """
    names = display_names(summaries, names)
    kept = [(n, s) for n, s in zip(names, summaries) if _has_segmentation(s)]
    notes = _left_out(
        [n for n, s in zip(names, summaries) if not _has_segmentation(s)], "no segmentation metrics"
    )
    notes += _cv_note([s for _, s in kept])
    classes = summaries[0]["classes"] if summaries else []
    title = "Table 4: segmentation per lesion type"
    if not per_lesion:
        header = ["run"] + [f"{c} {label}" for c in classes for _, label in TABLE4_METRICS]
        rows = [
            [n] + [_cell(s, f"segmentation/{c}/{m}") for c in classes for m, _ in TABLE4_METRICS]
            for n, s in kept
        ]
        return [Table(title, header, rows, notes)]
    tables = []
    for i, c in enumerate(classes):
        header = ["run"] + [label for _, label in TABLE4_METRICS]
        rows = [
            [n] + [_cell(s, f"segmentation/{c}/{m}") for m, _ in TABLE4_METRICS] for n, s in kept
        ]
        tables.append(Table(f"{title}: {c}", header, rows, notes if i == len(classes) - 1 else []))
    return tables


def _rule_label(summary: dict, rule: str) -> str:
    if rule == "any_slice":
        return "any slice"
    if rule == "lesion_burden":
        return "lesion burden (segmentation)"
    stat = summary["metrics"].get(f"classification/{rule}/min_slices")
    values = {v for v in stat["values"] if not math.isnan(v)} if stat else set()
    if len(values) > 1:
        return f"{rule} (chosen per fold)"
    if values:
        k = values.pop()
        return f"{rule} (>= {int(k) if float(k).is_integer() else k} slices)"
    return rule


def table6(summaries: Sequence[dict], names: Sequence[str] | None = None) -> Table:
    """Table 6: patient-level accuracy / recall / precision / F1 per run and rule.

    One row per run for the any-slice rule and one more for the robust rule where the
    evaluation has it. Runs without classification metrics are left out with a note.
    """
    names = display_names(summaries, names)
    rows, missing = [], []
    for name, s in zip(names, summaries):
        rules = [
            r for r in RULES if any(k.startswith(f"classification/{r}/") for k in s["metrics"])
        ]
        if not rules:
            missing.append(name)
        for rule in rules:
            cells = [_cell(s, f"classification/{rule}/{m}") for m, _ in TABLE6_METRICS]
            patients = s["metrics"].get(f"classification/{rule}/patients")
            total = str(int(np.nansum(patients["values"]))) if patients and patients["n"] else "n/a"
            rows.append([name, _rule_label(s, rule), *cells, total])
    header = ["run", "rule", *(label for _, label in TABLE6_METRICS), "patients"]
    notes = _left_out(missing, "no classification metrics")
    notes += _cv_note([s for s in summaries if any(k.startswith("classif") for k in s["metrics"])])
    if rows and any(s["kind"] == "cv" for s in summaries):
        notes.append("patients: total over the folds' test patients.")
    return Table("Table 6: patient-level classification", header, rows, notes)


def table7(summaries: Sequence[dict], names: Sequence[str] | None = None) -> Table:
    """Table 7: the ablation ladder, Dice per lesion type and their mean.

    Rows are labelled by architecture and loss (see `ablation_label`) and ordered along the
    ladder, other models after in the given order. Runs without segmentation are left out.
    """
    names = display_names(summaries, names)
    kept = [(n, s) for n, s in zip(names, summaries) if _has_segmentation(s)]
    kept.sort(key=lambda item: _ladder_rank(item[1]))
    classes = summaries[0]["classes"] if summaries else []
    header = ["model", "run", *(f"{c} Dice" for c in classes), "mean Dice"]
    rows = [
        [ablation_label(s["architecture"], s["loss"]), n]
        + [_cell(s, f"segmentation/{c}/dice") for c in classes]
        + [_cell(s, MEAN_DICE)]
        for n, s in kept
    ]
    notes = _left_out(
        [n for n, s in zip(names, summaries) if not _has_segmentation(s)], "no segmentation metrics"
    )
    notes += _cv_note([s for _, s in kept])
    if any(s["kind"] == "cv" for _, s in kept):
        notes.append("mean Dice of a cross-validation row: mean over folds of each fold's mean.")
    return Table("Table 7: ablation (Dice)", header, rows, notes)


def render_markdown(table: Table) -> str:
    """The table as a GitHub markdown section (title, table, notes in italics)."""

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [f"## {table.title}", ""]
    if table.rows:
        lines += [line(table.header), "|" + "---|" * len(table.header)]
        lines += [line(r) for r in table.rows]
    else:
        lines.append("_No run has these metrics._")
    lines += [""] + [f"_{n}_" for n in table.notes] + ([""] if table.notes else [])
    return "\n".join(lines)


def render_text(table: Table) -> str:
    """The table as aligned plain text for a terminal."""
    lines = [table.title, "=" * len(table.title)]
    if table.rows:
        widths = [
            max(len(str(r[i])) for r in [table.header, *table.rows])
            for i in range(len(table.header))
        ]
        numeric = [
            i > 0 and all(r[i][:1].isdigit() or r[i] == "n/a" for r in table.rows)
            for i in range(len(table.header))
        ]

        def line(cells):
            return "  ".join(
                str(c).rjust(w) if num else str(c).ljust(w)
                for c, w, num in zip(cells, widths, numeric)
            ).rstrip()

        lines += [line(table.header), "  ".join("-" * w for w in widths)]
        lines += [line(r) for r in table.rows]
    else:
        lines.append("(no run has these metrics)")
    lines += table.notes
    return "\n".join(lines)


# ----------------------------------------------------------------------------- outputs


def _json(data) -> str:
    return json_text(data) + "\n"


def cv_metrics(summary: dict) -> dict:
    """The content of cv_metrics.json for a cross-validation summary (NaN as null)."""
    keys = ("experiment", "architecture", "loss", "split", "classes", "threshold")
    return plain(
        {
            **{k: summary[k] for k in keys},
            "folds": summary["folds"],
            "fold_dirs": summary["fold_dirs"],
            "num_folds": len(summary["folds"]),
            "statistic": "mean and sample SD (ddof=1) over folds, NaN folds left out; n: "
            "folds used; values: per fold, in the order of folds (null: NaN or absent)",
            "rules": summary["rules"],
            "fold_rules": summary["fold_rules"],
            "disclaimer": DISCLAIMER,
            "metrics": summary["metrics"],
        }
    )


def _fold_value(summary: dict, key: str, index: int) -> str:
    stat = summary["metrics"].get(key)
    value = stat["values"][index] if stat else math.nan
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def render_cv_report(summary: dict) -> str:
    """cv_report.md: the cross-validation summary as markdown."""
    classes, folds = summary["classes"], summary["folds"]
    lines = [
        f"# {summary['experiment']}: {len(folds)}-fold cross-validation on the "
        f"{summary['split']} split",
        "",
        f"**{DISCLAIMER}**",
        "",
        f"Model: {ablation_label(summary['architecture'], summary['loss'])} "
        f"({summary['architecture']}, {summary['loss']} loss). Cells: mean ± sample SD over "
        f"folds {', '.join(map(str, folds))}; (n=k): folds with a value.",
        "",
    ]
    if _has_segmentation(summary):
        seg = Table(
            "Segmentation (Table 4)",
            ["lesion", "Dice", "IoU", "precision", "recall", "Dice per lesion slice"],
            [
                [c] + [_cell(summary, f"segmentation/{c}/{m}") for m in SEGMENTATION_METRICS]
                for c in classes
            ]
            + [["mean", _cell(summary, MEAN_DICE), "", "", "", ""]],
        )
        per_fold = Table(
            "Dice per fold",
            ["fold", *classes, "mean"],
            [
                [str(f)]
                + [
                    _fold_value(summary, k, i)
                    for k in [f"segmentation/{c}/dice" for c in classes] + [MEAN_DICE]
                ]
                for i, f in enumerate(folds)
            ],
        )
        lines += [render_markdown(seg), render_markdown(per_fold)]
    rows = []
    for rule in RULES:
        if any(k.startswith(f"classification/{rule}/") for k in summary["metrics"]):
            rows.append(
                [_rule_label(summary, rule)]
                + [_cell(summary, f"classification/{rule}/{m}") for m, _ in TABLE6_METRICS]
            )
    if rows:
        notes = []
        for rule, texts in summary["fold_rules"].items():
            if len({t for t in texts if t is not None}) == 1:
                notes.append(f"{rule}: {summary['rules'][rule]}")
            else:
                notes += [f"{rule}, fold {f}: {t}" for f, t in zip(folds, texts) if t is not None]
        header = ["rule", *(label for _, label in TABLE6_METRICS)]
        lines.append(
            render_markdown(Table("Patient-level classification (Table 6)", header, rows, notes))
        )
    return "\n".join(lines).rstrip() + "\n"


def write_cv_summary(cv_dir: str | Path) -> dict:
    """Writes cv_metrics.json and cv_report.md into a cross-validation folder.

    Args:
        cv_dir: Folder holding evaluated ``fold0/``, ``fold1/``, ...

    Returns:
        The content written to cv_metrics.json (see `cv_metrics`).

    Raises:
        CompareError: `cv_dir` is not an evaluated cross-validation folder.
    """
    cv_dir = Path(cv_dir)
    summary = load_summary(cv_dir)
    if summary["kind"] != "cv":
        raise CompareError(f"{cv_dir} is a single run, not a cross-validation folder (fold*/)")
    content = cv_metrics(summary)
    atomic_write_text(cv_dir / "cv_metrics.json", _json(content))
    atomic_write_text(cv_dir / "cv_report.md", render_cv_report(summary))
    return content


def comparison(summaries: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """Tables 4, 6 and 7 of the summaries, for markdown, the terminal and JSON."""
    names = display_names(summaries, names)
    return {
        "names": names,
        "markdown": [*table4(summaries, names), table6(summaries, names), table7(summaries, names)],
        "text": [
            *table4(summaries, names, per_lesion=True),
            table6(summaries, names),
            table7(summaries, names),
        ],
    }


def render_comparison_markdown(summaries: Sequence[dict], names: Sequence[str]) -> str:
    tables = comparison(summaries, names)["markdown"]
    lines = [
        f"# Comparison of {len(summaries)} run(s) on the {summaries[0]['split']} split",
        "",
        f"**{DISCLAIMER}**",
        "",
        "| run | folder | kind | model | architecture | loss | folds | threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in zip(names, summaries):
        kind = f"{len(s['folds'])}-fold CV" if s["kind"] == "cv" else "run"
        folds = ", ".join(map(str, s["folds"])) or "n/a"
        lines.append(
            f"| {name} | {s['path']} | {kind} | {ablation_label(s['architecture'], s['loss'])} | "
            f"{s['architecture']} | {s['loss']} | {folds} | {s['threshold']} |"
        )
    lines.append("")
    lines += [render_markdown(t) for t in tables]
    return "\n".join(lines).rstrip() + "\n"


def comparison_json(summaries: Sequence[dict], names: Sequence[str]) -> dict:
    keys = ("path", "kind", "experiment", "architecture", "loss", "split", "classes")
    keys += ("threshold", "folds", "fold_dirs", "rules", "fold_rules", "metrics")
    tables = comparison(summaries, names)["markdown"]
    return plain(
        {
            "disclaimer": DISCLAIMER,
            "runs": [
                {"name": n, "model": ablation_label(s["architecture"], s["loss"])}
                | {k: s[k] for k in keys}
                for n, s in zip(names, summaries)
            ],
            "tables": {
                "table4": tables[0].as_dict(),
                "table6": tables[1].as_dict(),
                "table7": tables[2].as_dict(),
            },
        }
    )
