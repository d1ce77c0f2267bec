"""One patient-level verdict per study, the rule that made it, and the others as evidence.

A study gets two patient calls: the slice classifier's (the paper's gate network, any
slice at or above `patient_rule`'s threshold) and the segmentation's (total lesion / lung
ratio at or above the export's lesion-burden threshold, `tfcovseg.inference.measures.burden_call`).
Reporting both side by side left readers with contradictions ("COVID-19 probability 0.75:
yes", "lesion burden: no", "severity mild"). The verdict takes one of them:

1. the slice classifier, when the export validated it (its gate is on: the validation
   slice AUC was measured and reached the export's minimum), as the paper does;
2. otherwise the lesion-burden rule, when the export chose its threshold and the study
   supports a ratio;
3. otherwise no call, saying why.

The rule not taken is kept as evidence with its own figure. A severity grade is given only
to a patient called COVID-19 (`severity_for_verdict`).

Research use, not a medical device.
"""

from __future__ import annotations

COVID = "COVID-19"
NOT_COVID = "not COVID-19"
NO_CALL = "no call"
CLASSIFIER = "slice classifier"
BURDEN = "lesion burden"
# A model without a slice classifier scores a slice by its highest lesion probability:
# the same any-slice rule, but not a COVID-19 probability (a bacterial pneumonia's
# consolidation scores as high). The export records which (``slice_score``).
LESION_SCORE = "highest lesion probability"
SLICE_SCORES = {"classifier": "COVID-19 probability", "lesion": LESION_SCORE}
# What `tfcovseg.evaluation.calibration.SEGMENTER_SCORER` puts in a calibrated gate's reason.
NO_CLASSIFIER = "the run has no classifier"


def slice_score(metadata: dict) -> str:
    """What an export's ``covid_probability`` is: "classifier" (the slice classifier's
    COVID-19 probability) or "lesion" (the highest lesion probability of the slice's mask,
    the model having no classifier). Exports before the key recorded none: "lesion" where
    their calibrated gate says the run had no classifier, else "classifier"."""
    score = metadata.get("slice_score")
    if score is None:  # older exports: the gate's reason names a run without a classifier
        gate = metadata.get("gate")
        method = str(gate.get("method", "")) if isinstance(gate, dict) else ""
        return "lesion" if NO_CLASSIFIER in method else "classifier"
    return _known_score(score)


def _known_score(score) -> str:
    """`score` if it names a slice score (`SLICE_SCORES`), else ValueError."""
    if not isinstance(score, str) or score not in SLICE_SCORES:
        raise ValueError(f"slice_score must be one of {sorted(SLICE_SCORES)}, got {score!r}")
    return score


def slice_score_name(metadata: dict) -> str:
    """The slice score's name for a reader ("COVID-19 probability", `LESION_SCORE`)."""
    return SLICE_SCORES[slice_score(metadata)]


def classifier_problem(gate: dict) -> str | None:
    """Why the slice classifier cannot make the call (None: the export validated it)."""
    auc = gate.get("validation_slice_auc")
    if auc is not None and float(gate.get("threshold") or 0.0) > 0.0:
        return None
    if gate.get("method") == "given":
        return "the gate threshold was given by hand, not validated"
    if auc is None:
        return "its validation slice AUC could not be measured"
    return f"its validation slice AUC {float(auc):.3f} is below the export's minimum"


def _evidence(rule: str, figure: str, positive, validated: bool, note: str) -> dict:
    return {"rule": rule, "figure": figure, "positive": positive, "validated": validated,
            "note": note}  # fmt: skip


def patient_verdict(covid: dict, gate: dict, burden: dict, score: str = "classifier") -> dict:
    """The study's verdict.

    Args:
        covid: The classifier's call: ``probability``, ``threshold``, ``positive``, ``rule``.
        gate: The export's gate metadata (``threshold``, ``method``, validation figures).
        burden: `tfcovseg.inference.measures.burden_call`'s result (``positive`` None: no call).
        score: What the slice probabilities are (`slice_score`): with "lesion" the first
            rule is named `LESION_SCORE`, not the slice classifier the model lacks.

    Returns:
        ``call`` (`COVID`, `NOT_COVID` or `NO_CALL`), ``rule`` (`CLASSIFIER`,
        `LESION_SCORE`, `BURDEN` or None), ``why`` (a sentence) and ``evidence`` (both
        rules' figures, the deciding rule first).
    """
    problem = classifier_problem(gate)
    _known_score(score)
    first = CLASSIFIER if score == "classifier" else LESION_SCORE
    figure = "highest slice probability" if score == "classifier" else "highest slice"
    classifier = _evidence(
        first,
        f"{figure} {covid['probability']:.3f}, threshold {covid['threshold']:.3f}",
        bool(covid["positive"]),
        problem is None,
        covid["rule"] if problem is None else f"not validated: {problem}",
    )
    t = burden.get("threshold")
    percent = burden["percent_of_lung"]  # the figure report.json's total holds
    digits = _digits(percent, None if t is None else 100.0 * t)
    lesion = _evidence(
        BURDEN,
        f"lesions {percent:.{digits}f} % of lung"
        + ("" if t is None else f", threshold {100.0 * t:.{digits}f} %"),
        burden.get("positive"),
        burden.get("positive") is not None,
        burden["rule"],
    )
    if problem is None:
        auc = float(gate["validation_slice_auc"])
        return _decided(classifier, [classifier, lesion], f"validated (slice AUC {auc:.3f})")
    if lesion["positive"] is not None:
        return _decided(lesion, [lesion, classifier], f"the {first}: {problem}")
    return {
        "call": NO_CALL,
        "rule": None,
        "why": f"the {first} is not validated ({problem}); the {BURDEN} makes no "
        f"call: {burden['rule'].removeprefix('no call: ')}",
        "evidence": [classifier, lesion],
    }


def _digits(value: float, threshold: float | None, least: int = 2) -> int:
    """Decimals that tell a value from its threshold ("lesions 1.45 %, threshold 1.45 %:
    not COVID-19" was 1.448 against 1.453)."""
    digits = least
    # Equal within float noise: the value is rounded to its stored precision, t is not.
    while threshold is not None and digits < 6 and abs(value - threshold) > 1e-9:
        if round(value, digits) != round(threshold, digits):
            break
        digits += 1
    return digits


def _decided(entry: dict, evidence: list, context: str) -> dict:
    return {
        "call": COVID if entry["positive"] else NOT_COVID,
        "rule": entry["rule"],
        "why": f"the {entry['rule']}: {entry['figure']} ({context})",
        "evidence": evidence,
    }


def severity_for_verdict(severity: dict, verdict: dict) -> dict:
    """The severity estimate, its grade withheld unless the patient is called COVID-19."""
    if verdict["call"] == COVID or severity.get("grade") is None:
        return severity
    return {
        **severity,
        "grade": None,
        "not_graded": [*severity.get("not_graded", []), f"the verdict is {verdict['call']}"],
    }


def summary(verdict: dict) -> str:
    """One line for a console: the call, the rule and its figure."""
    if verdict["rule"] is None:
        return f"verdict {NO_CALL}: {verdict['why']}"
    figure = verdict["evidence"][0]["figure"]
    return f"verdict {verdict['call']} by the {verdict['rule']} ({figure})"
