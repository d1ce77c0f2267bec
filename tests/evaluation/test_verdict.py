"""One patient verdict: the validated rule decides, the other is evidence."""

from __future__ import annotations

import pytest

from tfcovseg.evaluation.burden import burden_percent
from tfcovseg.evaluation.verdict import (
    BURDEN,
    CLASSIFIER,
    COVID,
    LESION_SCORE,
    NO_CALL,
    NOT_COVID,
    classifier_problem,
    patient_verdict,
    severity_for_verdict,
    slice_score,
    slice_score_name,
    summary,
)

VALIDATED = {"threshold": 0.2, "method": "highest threshold ...", "validation_slice_auc": 0.97}
LOW_AUC = {
    "threshold": 0.0,
    "method": "off: the classifier's validation slice AUC 0.764 is below 0.9",
    "validation_slice_auc": 0.764,
}


def _covid(p, threshold=0.5):
    return {"probability": p, "threshold": threshold, "positive": p >= threshold, "rule": "any"}


def _burden(ratio, t):
    # The call as measures.burden_call makes it: the percentage at its stored precision.
    positive = None if t is None else ratio >= t
    percent = burden_percent(ratio)
    return {
        "ratio": ratio,
        "percent_of_lung": percent,
        "threshold": t,
        "positive": positive,
        "rule": "ratio >= t",
    }


def test_a_validated_classifier_decides_and_burden_is_evidence():
    v = patient_verdict(_covid(0.9), VALIDATED, _burden(0.001, 0.0034))
    assert v["call"] == COVID and v["rule"] == CLASSIFIER
    assert [e["rule"] for e in v["evidence"]] == [CLASSIFIER, BURDEN]
    assert v["evidence"][1]["positive"] is False and "0.10 %" in v["evidence"][1]["figure"]
    line = "verdict COVID-19 by the slice classifier (highest slice probability 0.900, "
    assert summary(v) == line + "threshold 0.500)"
    assert v["why"].endswith("(validated (slice AUC 0.970))")
    assert patient_verdict(_covid(0.1), VALIDATED, _burden(0.2, 0.0034))["call"] == NOT_COVID


def test_an_unvalidated_classifier_leaves_the_call_to_the_lesion_burden():
    # The quickstart's bacterial pneumonia patient: the classifier says 0.747, the lesion
    # burden says no; one verdict, the classifier's figure kept as evidence.
    v = patient_verdict(_covid(0.747), LOW_AUC, _burden(0.0012, 0.0034))
    assert v["call"] == NOT_COVID and v["rule"] == BURDEN
    assert v["evidence"][1]["rule"] == CLASSIFIER and v["evidence"][1]["positive"] is True
    assert v["evidence"][1]["validated"] is False and "0.764" in v["evidence"][1]["note"]
    assert v["why"].startswith("the lesion burden: lesions 0.12 % of lung, threshold 0.34 %")
    assert "AUC 0.764 is below" in v["why"]
    for gate in ({"threshold": 0.3, "method": "given"}, {"threshold": 0.0, "method": "off"}, {}):
        assert classifier_problem(gate) is not None
    assert "by hand" in classifier_problem({"threshold": 0.3, "method": "given"})
    assert "could not be measured" in classifier_problem({"threshold": 0.0, "method": "off"})
    assert classifier_problem(VALIDATED) is None


def test_a_model_without_a_classifier_names_its_slice_score_not_a_classifier():
    # The shipped real-CT model: no classifier, the slice score is its highest lesion
    # probability (0.999 on a non-COVID crop); it was shown as the slice classifier's.
    v = patient_verdict(_covid(0.999), LOW_AUC, _burden(0.05, None), score="lesion")
    assert v["call"] == NO_CALL and [e["rule"] for e in v["evidence"]] == [LESION_SCORE, BURDEN]
    assert v["evidence"][0]["figure"] == "highest slice 0.999, threshold 0.500"
    assert summary(patient_verdict(_covid(0.9), VALIDATED, _burden(0.02, 0.0034), "lesion")) == (
        "verdict COVID-19 by the highest lesion probability (highest slice 0.900, threshold 0.500)"
    )
    assert CLASSIFIER not in v["why"] and "highest lesion probability is not validated" in v["why"]
    decided = patient_verdict(_covid(0.9), LOW_AUC, _burden(0.02, 0.0034), score="lesion")
    assert decided["rule"] == BURDEN and CLASSIFIER not in decided["why"]
    assert slice_score({}) == "classifier" and slice_score_name({}) == "COVID-19 probability"
    # Exports before the key: a calibrated gate's reason says when the run had no classifier.
    from tfcovseg.evaluation.calibration import SEGMENTER_SCORER

    old = {"gate": {"method": f"highest threshold at which {SEGMENTER_SCORER} recall ..."}}
    assert (
        slice_score(old) == "lesion" and slice_score({"gate": {"method": "given"}}) == "classifier"
    )
    assert slice_score_name({"slice_score": "lesion"}) == LESION_SCORE
    with pytest.raises(ValueError, match="slice_score must be one of"):
        slice_score({"slice_score": "lesions"})


def test_no_rule_no_call():
    v = patient_verdict(_covid(0.99), LOW_AUC, _burden(0.05, None))
    assert v["call"] == NO_CALL and v["rule"] is None
    assert "not validated" in v["why"] and "ratio >= t" in v["why"]
    assert summary(v).startswith("verdict no call: the slice classifier")


def test_severity_only_for_a_patient_called_covid():
    graded = {"grade": "mild", "not_graded": [], "total_lesion_lung_ratio": 0.02}
    covid = patient_verdict(_covid(0.9), VALIDATED, _burden(0.02, 0.0034))
    assert severity_for_verdict(graded, covid) == graded
    other = patient_verdict(_covid(0.1), VALIDATED, _burden(0.02, 0.0034))
    withheld = severity_for_verdict(graded, other)
    assert withheld["grade"] is None and withheld["not_graded"] == ["the verdict is not COVID-19"]
    assert withheld["total_lesion_lung_ratio"] == 0.02 and graded["grade"] == "mild"
    # A study that could not be graded keeps its own reasons.
    limited = {"grade": None, "not_graded": ["a single slice"]}
    assert severity_for_verdict(limited, other) == limited


def test_the_figures_tell_the_ratio_from_its_threshold():
    """ "lesions 1.45 % of lung, threshold 1.45 %" came with "not COVID-19" (1.448 % < 1.453 %)."""
    v = patient_verdict(_covid(0.9), LOW_AUC, _burden(0.01448, 0.014531))
    assert v["call"] == NOT_COVID
    assert v["why"].startswith("the lesion burden: lesions 1.448 % of lung, threshold 1.453 %")
    # Two decimals when they tell the two apart, or when the two are equal.
    apart = patient_verdict(_covid(0.9), LOW_AUC, _burden(0.0012, 0.0034))
    assert "lesions 0.12 % of lung, threshold 0.34 %" in apart["why"]
    at = patient_verdict(_covid(0.9), LOW_AUC, _burden(0.0034, 0.0034))
    assert at["call"] == COVID and "lesions 0.34 % of lung, threshold 0.34 %" in at["why"]
