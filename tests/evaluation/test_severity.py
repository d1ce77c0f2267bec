"""Table 5 statistics: lesion / lung ratio by severity over the COVID-19 patients."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from tfcovseg.evaluation.severity import (
    SEVERITY_ORDER,
    covid_cohort,
    group_summary,
    kruskal_test,
    ratio_statistics,
    spearman_test,
)

CLASSES = ["ggo", "consolidation", "fibrosis"]
GGO = {"mild": [0.01, 0.02, 0.03], "moderate": [0.10, 0.12, 0.15], "severe": [0.30, 0.35, 0.40]}


def _cohort():
    """COVID patients whose GGO grows with severity, constant fibrosis, and controls."""
    ratios = {}
    for severity, values in GGO.items():
        for i, v in enumerate(values):
            ratios[f"{severity}-{i}"] = {
                "diagnosis": "covid",
                "severity": severity,
                "true": {"ggo": v, "consolidation": v / 2 + 0.001 * i, "fibrosis": 0.0},
                "pred": {"ggo": v * 1.1, "consolidation": v / 3, "fibrosis": 0.0},
            }
    for d in ("healthy", "bacterial", "viral"):
        # huge ratios: they would break the monotone trend if they were not excluded
        ratios[f"control-{d}"] = {
            "diagnosis": d,
            "severity": "none",
            "true": dict.fromkeys(CLASSES, 0.9),
            "pred": dict.fromkeys(CLASSES, 0.9),
        }
    return ratios


def test_monotone_cohort_matches_scipy():
    out = ratio_statistics(_cohort(), CLASSES)
    assert out["patients"] == 9
    assert out["excluded"] == {"not_covid": 3, "unknown_severity": 0}
    ggo = out["classes"]["ggo"]["true"]
    expected_kw = stats.kruskal(*GGO.values())
    assert ggo["kruskal"]["h"] == pytest.approx(expected_kw.statistic)
    assert ggo["kruskal"]["p"] == pytest.approx(expected_kw.pvalue)
    assert ggo["kruskal"]["p"] < 0.05 and ggo["kruskal"]["groups"] == 3
    ranks = [1] * 3 + [2] * 3 + [3] * 3
    expected_rho = stats.spearmanr(ranks, sum(GGO.values(), []))
    # severity ranks are tied within a group, so a perfectly monotone trend gives rho < 1
    assert ggo["spearman"]["rho"] == pytest.approx(expected_rho.statistic)
    assert ggo["spearman"]["rho"] > 0.9
    assert ggo["spearman"]["p"] == pytest.approx(expected_rho.pvalue)
    assert ggo["spearman"]["n"] == 9
    pred = out["classes"]["ggo"]["pred"]["spearman"]
    assert pred["rho"] == pytest.approx(expected_rho.statistic)


def test_one_patient_per_severity_gives_rho_one():
    ratios = {
        s: {"diagnosis": "covid", "severity": s, "true": {"ggo": v}, "pred": {"ggo": 1 - v}}
        for s, v in (("none", 0.0), ("mild", 0.05), ("moderate", 0.2), ("severe", 0.5))
    }
    out = ratio_statistics(ratios, ["ggo"])["classes"]["ggo"]
    assert out["true"]["spearman"]["rho"] == pytest.approx(1.0)
    assert out["pred"]["spearman"]["rho"] == pytest.approx(-1.0)
    assert out["true"]["spearman"]["p"] == pytest.approx(
        stats.spearmanr([0, 1, 2, 3], [0.0, 0.05, 0.2, 0.5]).pvalue
    )
    assert out["true"]["kruskal"]["groups"] == 4
    # Groups of one patient: no Kruskal-Wallis p-value, and the reason names them.
    assert out["true"]["kruskal"]["p"] is None and out["true"]["kruskal"]["h"] is None
    assert (
        "a group of one patient (none, mild, moderate, severe)" in out["true"]["kruskal"]["reason"]
    )
    one = kruskal_test({"mild": [0.1, 0.2], "moderate": [0.3], "severe": [0.5, 0.6]})
    assert one["p"] is None and "(moderate)" in one["reason"]
    assert kruskal_test({"mild": [0.1, 0.2], "severe": [0.5, 0.6]})["p"] is not None


def test_group_summaries():
    out = ratio_statistics(_cohort(), CLASSES)
    groups = out["classes"]["ggo"]["true"]["groups"]
    assert list(groups) == list(SEVERITY_ORDER)
    assert groups["none"] == {
        "n": 0,
        "median": None,
        "mean": None,
        "q1": None,
        "q3": None,
        "iqr": None,
    }
    moderate = groups["moderate"]
    assert moderate["n"] == 3
    assert moderate["median"] == pytest.approx(0.12)
    assert moderate["mean"] == pytest.approx(np.mean(GGO["moderate"]))
    q1, q3 = np.percentile(GGO["moderate"], [25, 75])
    assert moderate["q1"] == pytest.approx(q1) and moderate["q3"] == pytest.approx(q3)
    assert moderate["iqr"] == pytest.approx(q3 - q1)


def test_total_is_the_sum_of_the_classes():
    ratios = _cohort()
    out = ratio_statistics(ratios, CLASSES)
    assert list(out["classes"]) == CLASSES + ["total"]
    severe = [r for r in ratios.values() if r.get("severity") == "severe"]
    totals = [sum(r["true"].values()) for r in severe]
    assert out["classes"]["total"]["true"]["groups"]["severe"]["median"] == pytest.approx(
        np.median(totals)
    )


def test_constant_class_has_no_p_value_but_a_reason():
    out = ratio_statistics(_cohort(), CLASSES)
    fib = out["classes"]["fibrosis"]["true"]
    assert fib["kruskal"]["p"] is None and fib["kruskal"]["h"] is None
    assert "identical" in fib["kruskal"]["reason"]
    assert fib["spearman"]["rho"] is None and fib["spearman"]["p"] is None
    assert "constant" in fib["spearman"]["reason"]


def test_output_is_strict_json():
    out = ratio_statistics(_cohort(), CLASSES)
    text = json.dumps(out, allow_nan=False)  # no NaN, no numpy types
    assert json.loads(text) == out


def test_single_group_and_too_few_patients():
    assert "2 severity groups" in kruskal_test({"mild": [0.1, 0.2], "severe": []})["reason"]
    assert "3 patients" in spearman_test([1, 2], [0.1, 0.2])["reason"]
    assert "same severity" in spearman_test([2, 2, 2], [0.1, 0.2, 0.3])["reason"]
    out = ratio_statistics(
        {
            f"p{i}": {"diagnosis": "covid", "severity": "mild", "true": {"ggo": 0.1 * i}}
            for i in range(4)
        },
        ["ggo"],
    )
    ggo = out["classes"]["ggo"]
    assert "pred" not in ggo  # no predicted ratios in the input
    assert ggo["true"]["kruskal"]["p"] is None and ggo["true"]["kruskal"]["groups"] == 1
    assert ggo["true"]["spearman"]["p"] is None


def test_unknown_severity_nan_ratios_and_empty_input():
    ratios = _cohort()
    ratios["x"] = {"diagnosis": "COVID", "true": dict.fromkeys(CLASSES, 0.5)}
    ratios["y"] = {"diagnosis": "covid", "severity": "critical", "true": {}}
    ratios["mild-0"]["true"]["ggo"] = math.nan
    out = ratio_statistics(ratios, CLASSES)
    assert out["excluded"]["unknown_severity"] == 2
    ggo = out["classes"]["ggo"]["true"]
    assert ggo["missing"] == 1 and ggo["groups"]["mild"]["n"] == 2
    finite = [(r, v) for r, vs in zip((1, 2, 3), GGO.values()) for v in vs][1:]
    expected = stats.spearmanr([r for r, _ in finite], [v for _, v in finite])
    assert ggo["spearman"]["rho"] == pytest.approx(expected.statistic)
    assert ggo["spearman"]["n"] == 8
    json.dumps(out, allow_nan=False)

    empty = ratio_statistics({}, CLASSES)
    assert empty["patients"] == 0
    assert empty["classes"]["ggo"]["true"]["kruskal"]["p"] is None
    json.dumps(empty, allow_nan=False)


def test_helpers():
    assert group_summary([])["n"] == 0
    assert group_summary([0.2])["iqr"] == 0.0
    patients, excluded = covid_cohort(_cohort(), CLASSES)
    assert len(patients) == 9 and excluded["not_covid"] == 3
    assert patients[0]["true"]["total"] == pytest.approx(
        sum(patients[0]["true"][c] for c in CLASSES)
    )


# ------------------------------------------------------------------ severity thresholds


def test_fit_thresholds_separates_grades_at_gap_midpoints():
    from tfcovseg.evaluation.severity import fit_severity_thresholds, grade_severity

    rows = {f"m{i}": ("mild", v) for i, v in enumerate([0.002, 0.004, 0.008])}
    rows |= {f"o{i}": ("moderate", v) for i, v in enumerate([0.012, 0.02])}
    rows |= {f"s{i}": ("severe", v) for i, v in enumerate([0.06, 0.08])}
    rows["control"] = ("none", 0.5)  # not a COVID grade: ignored
    rule = fit_severity_thresholds(rows)
    assert rule["fitted"] and rule["training_accuracy"] == 1.0
    assert rule["thresholds"] == pytest.approx([0.010, 0.040])
    assert rule["per_grade"] == {"mild": 3, "moderate": 2, "severe": 2}
    assert [grade_severity(r, rule) for r in (0.0, 0.001, 0.0099, 0.01, 0.039, 0.04, 0.9)] == [
        "none",
        "mild",
        "mild",
        "moderate",
        "moderate",
        "severe",
        "severe",
    ]
    json.dumps(rule)  # plain values only


def test_fit_thresholds_minimises_misgrading_with_overlap():
    from tfcovseg.evaluation.severity import fit_severity_thresholds

    # One moderate patient sits among the mild ones: the best rule misgrades only it.
    rows = {
        "a": ("mild", 0.01),
        "b": ("mild", 0.02),
        "c": ("moderate", 0.015),
        "d": ("moderate", 0.05),
        "e": ("moderate", 0.06),
        "f": ("severe", 0.2),
    }
    rule = fit_severity_thresholds(rows)
    assert rule["training_accuracy"] == pytest.approx(5 / 6)
    t1, t2 = rule["thresholds"]
    assert 0.02 < t1 < 0.05 and 0.06 < t2 < 0.2


def test_fit_thresholds_refuses_a_missing_grade():
    from tfcovseg.evaluation.severity import fit_severity_thresholds, grade_severity

    rule = fit_severity_thresholds({"a": ("mild", 0.01), "b": ("severe", 0.2)})
    assert not rule["fitted"] and rule["thresholds"] is None
    assert "moderate" in rule["reason"]
    assert grade_severity(0.1, rule) == "unknown"
    assert grade_severity(0.0, rule) == "none"


def test_severity_rule_from_manifest_uses_covid_training_patients():
    from tfcovseg.evaluation.severity import severity_rule_from_manifest

    def entry(diagnosis, severity, ggo, cons=0.0):
        return {
            "diagnosis": diagnosis,
            "severity": severity,
            "annotated": True,
            "lesion_lung_ratio": {"ggo": ggo, "consolidation": cons},
        }

    manifest = {
        "patients": {
            "P1": entry("covid", "mild", 0.004, 0.001),
            "P2": entry("covid", "moderate", 0.015, 0.005),
            "P3": entry("covid", "severe", 0.05, 0.03),
            "P4": entry("covid", "severe", 0.9),  # a test patient: not passed in
            "P5": entry("healthy", "none", 0.0),
        }
    }
    rule = severity_rule_from_manifest(manifest, ["P1", "P2", "P3", "P5"])
    assert rule["patients"] == 3
    # totals 0.005, 0.02, 0.08: cuts at the midpoints
    assert rule["thresholds"] == pytest.approx([0.0125, 0.05])
