"""Lesion burden by clinical severity: the statistics behind Table 5 of the paper.

For the COVID-19 patients of an evaluation (diagnosis ``"covid"``; healthy, bacterial and
viral pneumonia patients are left out) `ratio_statistics` relates the lesion / lung area
ratio of each lesion type to the patient's clinical severity (``"none"``, ``"mild"``,
``"moderate"``, ``"severe"``). For every lesion class, for a ``"total"`` pseudo-class (the
sum of the lesion classes) and for both the ground-truth (``"true"``) and the predicted
(``"pred"``) ratios it gives:

- per severity group: the number of patients, the median, mean, first and third quartile
  and the interquartile range (q3 - q1) of the ratio;
- the Kruskal-Wallis H test across the severity groups that have at least one patient
  (do the ratio distributions differ between severities?);
- Spearman's rank correlation between the ordinal severity (none=0, mild=1, moderate=2,
  severe=3) and the ratio (does the lesion burden grow with severity?).

A test that is undefined (fewer than two groups, fewer than three patients, all values
identical, a constant severity) gives ``None`` for its statistic and p-value and a
``"reason"`` string instead of NaN. The result holds only plain ``float``, ``int``, ``str``
and ``None`` values, so ``json.dumps`` writes it as standard JSON.

`fit_severity_thresholds` turns the total lesion / lung ratios of training patients into
a severity rule: two cut points that split the ratio axis into mild, moderate and severe
with the fewest training patients on the wrong side; `grade_severity` applies it to a new
patient's (predicted) ratio. The thresholds travel with an exported model
(`tfcovseg.export`) and grade every study `tfcovseg.predict` reads.

Pure NumPy / SciPy; no TensorFlow or Keras. Research use, not a medical device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import stats

from tfcovseg.constants import SEVERITY_ORDER, TOTAL

SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITY_ORDER)}
KINDS = ("true", "pred")
COVID = "covid"


def _float(value) -> float | None:
    """A plain float, or None for None / NaN / infinity."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def group_summary(values) -> dict:
    """n, median, mean, q1, q3 and IQR of a group of ratios (None where empty)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"n": 0, "median": None, "mean": None, "q1": None, "q3": None, "iqr": None}
    q1, median, q3 = np.percentile(values, [25.0, 50.0, 75.0])
    return {
        "n": int(values.size),
        "median": _float(median),
        "mean": _float(values.mean()),
        "q1": _float(q1),
        "q3": _float(q3),
        "iqr": _float(q3 - q1),
    }


def kruskal_test(groups: Mapping[str, Iterable[float]]) -> dict:
    """Kruskal-Wallis H test across the non-empty groups.

    Returns ``{"h", "p", "groups"}``; h and p are None with a ``"reason"`` when the test is
    undefined, or when a group holds a single patient: its rank says nothing about its
    group's spread, and scipy's p-value for such groups is not one to report.
    """
    samples = {k: np.asarray(list(v), np.float64) for k, v in groups.items()}
    samples = {k: v for k, v in samples.items() if v.size}
    out = {"h": None, "p": None, "groups": len(samples)}
    if len(samples) < 2:
        return out | {
            "reason": f"needs at least 2 severity groups with patients, has {len(samples)}"
        }
    pooled = np.concatenate(list(samples.values()))
    if np.all(pooled == pooled[0]):
        return out | {"reason": "all ratios are identical"}
    single = [k for k, v in samples.items() if v.size == 1]
    if single:
        return out | {
            "reason": f"a group of one patient ({', '.join(single)}): no p-value; "
            "each group needs at least 2"
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.kruskal(*samples.values())
    h, p = _float(result.statistic), _float(result.pvalue)
    if h is None or p is None:
        return out | {"reason": "scipy.stats.kruskal gave no finite result"}
    return out | {"h": h, "p": p}


def spearman_test(severity_ranks, values) -> dict:
    """Spearman's rho and p between ordinal severities and ratios.

    Returns ``{"rho", "p", "n"}``; rho and p are None with a ``"reason"`` when undefined.
    """
    x = np.asarray(severity_ranks, np.float64)
    y = np.asarray(values, np.float64)
    out = {"rho": None, "p": None, "n": int(x.size)}
    if x.size < 3:
        return out | {"reason": f"needs at least 3 patients, has {x.size}"}
    if np.all(x == x[0]):
        return out | {"reason": "all patients have the same severity"}
    if np.all(y == y[0]):
        return out | {"reason": "the ratio is constant"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.spearmanr(x, y)
    rho, p = _float(result.statistic), _float(result.pvalue)
    if rho is None or p is None:
        return out | {"reason": "scipy.stats.spearmanr gave no finite result"}
    return out | {"rho": rho, "p": p}


def covid_cohort(ratios: Mapping, classes) -> tuple[list[dict], dict]:
    """The COVID-19 patients with a known severity, and counts of those left out.

    Returns (patients, excluded): each patient is ``{"id", "severity", "true": {...},
    "pred": {...}}`` with the class ratios and their ``"total"``; a kind missing from the
    input is left out. ``excluded`` counts the non-COVID patients and the COVID patients
    whose severity is missing or not one of SEVERITY_ORDER.
    """
    classes = [c for c in classes if c != TOTAL]
    patients = []
    excluded = {"not_covid": 0, "unknown_severity": 0}
    for pid, entry in ratios.items():
        if str(entry.get("diagnosis", "")).lower() != COVID:
            excluded["not_covid"] += 1
            continue
        severity = str(entry.get("severity", "")).lower()
        if severity not in SEVERITY_RANK:
            excluded["unknown_severity"] += 1
            continue
        patient = {"id": str(pid), "severity": severity}
        for kind in KINDS:
            if isinstance(entry.get(kind), Mapping):
                values = {c: float(entry[kind].get(c, math.nan)) for c in classes}
                values[TOTAL] = float(sum(values.values()))
                patient[kind] = values
        patients.append(patient)
    return patients, excluded


def ratio_statistics(ratios: Mapping, classes) -> dict:
    """Table 5 statistics of lesion / lung ratios by severity, over COVID-19 patients.

    Args:
        ratios: ``{patient id: {"diagnosis", "severity", "true": {class: ratio},
            "pred": {class: ratio}}}`` as in the evaluation's ``lesion_lung_ratio``.
        classes: Lesion class names, in order; a ``"total"`` pseudo-class is added.

    Returns:
        ``{"patients", "excluded", "severity_order", "severity_rank", "classes": {name:
        {"true"|"pred": {"groups": {severity: group_summary}, "kruskal": ..., "spearman":
        ...}}}}``. Patients whose ratio of a class is NaN are left out of that class's
        statistics (counted in ``"missing"``).
    """
    names = [c for c in classes if c != TOTAL] + [TOTAL]
    patients, excluded = covid_cohort(ratios, classes)
    result = {
        "patients": len(patients),
        "excluded": excluded,
        "severity_order": list(SEVERITY_ORDER),
        "severity_rank": dict(SEVERITY_RANK),
        "classes": {},
    }
    for name in names:
        per_kind = {}
        for kind in KINDS:
            rows = [(p["severity"], p[kind][name]) for p in patients if kind in p]
            if not rows and patients:
                continue
            finite = [(s, v) for s, v in rows if math.isfinite(v)]
            groups = {s: [v for g, v in finite if g == s] for s in SEVERITY_ORDER}
            per_kind[kind] = {
                "groups": {s: group_summary(groups[s]) for s in SEVERITY_ORDER},
                "kruskal": kruskal_test(groups),
                "spearman": spearman_test(
                    [SEVERITY_RANK[s] for s, _ in finite], [v for _, v in finite]
                ),
                "missing": len(rows) - len(finite),
            }
        result["classes"][name] = per_kind
    return result


GRADES = ("mild", "moderate", "severe")


def fit_severity_thresholds(ratios: Mapping[str, tuple[str, float]]) -> dict:
    """Fits the two total-ratio cut points that grade COVID-19 patients by severity.

    The rule is ordinal: ratio < t1 is mild, t1 <= ratio < t2 moderate, ratio >= t2
    severe. Every pair of cut points between consecutive distinct ratios is tried; the
    pair that misgrades the fewest patients wins, ties going to the pair with the widest
    gaps around its cut points (the most room on both sides), each cut at the midpoint of
    its gap. Exhaustive: n patients give O(n^2) pairs, instant for any cohort a run has.

    Args:
        ratios: ``{patient: (severity, total lesion / lung ratio)}``; patients whose
            severity is not mild, moderate or severe (controls, unknown) are ignored.

    Returns:
        ``{"fitted": True, "thresholds": [t1, t2], "grades": [...], "patients": n,
        "per_grade": {grade: n}, "training_accuracy": acc}``, or ``{"fitted": False,
        "thresholds": None, "reason": ...}`` when some grade has no patient (its cut point
        would be a guess).
    """
    rows = [
        (GRADES.index(str(sev).lower()), float(r))
        for sev, r in ratios.values()
        if str(sev).lower() in GRADES and math.isfinite(float(r))
    ]
    per_grade = {g: sum(1 for k, _ in rows if k == i) for i, g in enumerate(GRADES)}
    base = {"grades": list(GRADES), "patients": len(rows), "per_grade": per_grade}
    missing = [g for g, n in per_grade.items() if n == 0]
    if missing:
        return base | {
            "fitted": False,
            "thresholds": None,
            "reason": f"no training patient graded {', '.join(missing)}",
        }
    grades = np.array([k for k, _ in rows])
    values = np.array([v for _, v in rows])
    distinct = np.unique(values)
    # Candidate cuts: below everything, between each pair of neighbours, above everything.
    # A cut's "room" is the width of the gap it sits in (0 outside the observed range).
    cuts = [(distinct[0], 0.0)]
    cuts += [((a + b) / 2, b - a) for a, b in zip(distinct[:-1], distinct[1:])]
    cuts += [(np.nextafter(distinct[-1], np.inf), 0.0)]
    best = None
    for i, (t1, room1) in enumerate(cuts):
        below = values < t1
        for t2, room2 in cuts[i:]:
            predicted = np.where(below, 0, np.where(values < t2, 1, 2))
            key = (int((predicted == grades).sum()), min(room1, room2), room1 + room2)
            if best is None or key > best[0]:
                best = (key, float(t1), float(t2))
    (correct, _, _), t1, t2 = best
    return base | {
        "fitted": True,
        "thresholds": [t1, t2],
        "training_accuracy": correct / len(rows),
    }


def grade_severity(total_ratio: float, severity_rule: Mapping | None) -> str:
    """The severity grade of a total lesion / lung ratio under a fitted rule.

    Returns "none" for a lesion-free patient (ratio 0), "mild", "moderate" or "severe"
    otherwise, and "unknown" when the rule is missing or was not fitted.
    """
    if total_ratio <= 0:
        return "none"
    if not severity_rule or not severity_rule.get("fitted"):
        return "unknown"
    t1, t2 = severity_rule["thresholds"]
    if total_ratio < t1:
        return "mild"
    return "moderate" if total_ratio < t2 else "severe"


def severity_rule_from_manifest(manifest: Mapping, patients: Iterable[str]) -> dict:
    """Fits the severity rule on the ground-truth ratios of some patients of a record set.

    The converter's ``manifest.json`` holds every patient's lesion / lung ratio per class
    (from the annotated masks); their sum over classes is the total ratio graded here, the
    same quantity `tfcovseg.predict` measures on a new study. Only COVID-19 patients with
    annotated masks count.
    """
    entries = manifest.get("patients", {})
    rows = {}
    for pid in patients:
        entry = entries.get(pid)
        if not entry or str(entry.get("diagnosis", "")).lower() != COVID:
            continue
        if not entry.get("annotated", True):
            continue
        total = float(sum(entry.get("lesion_lung_ratio", {}).values()))
        rows[pid] = (entry.get("severity", "unknown"), total)
    rule = fit_severity_thresholds(rows)
    rule["source"] = "ground-truth lesion/lung ratios of the patients given (training + validation)"
    return rule
