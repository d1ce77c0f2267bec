"""The patient rules chosen on validation patients, in one place for evaluate and export."""

from __future__ import annotations

import pytest

from tfcovseg.evaluation.calibration import burden_rule_from
from tfcovseg.evaluation.run import burden_results

BURDENS = {"a": 0.001, "b": 0.02, "c": 0.05}


def test_the_burden_rule_separates_the_validation_patients():
    rule = burden_rule_from(BURDENS, {"a": "healthy", "b": "covid", "c": "covid"})
    assert 0.001 < rule["threshold"] < 0.02 and rule["validation_accuracy"] == 1.0


@pytest.mark.parametrize("diagnosis", ["covid", "bacterial"])
def test_one_kind_of_validation_patient_chooses_no_burden_rule(diagnosis):
    """Evaluate chose "lesion volume >= 45 % of the lung" on one COVID-19 patient and
    scored the test patients with it, where the export said the rule cannot be chosen."""
    rule = burden_rule_from(BURDENS, dict.fromkeys(BURDENS, diagnosis))
    assert rule["threshold"] is None and "off: every validation patient is" in rule["method"]
    # Evaluate's rows come from the same rule: no calls, the reason instead.
    rows = burden_results(
        None, None, BURDENS, dict.fromkeys(BURDENS, diagnosis), "validation", 0, 0.5, 8
    )
    assert rows["threshold"] is None and "accuracy" not in rows
    assert "every validation patient is" in rows["rule"]
    assert burden_rule_from({}, {})["threshold"] is None
