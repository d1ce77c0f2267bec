"""A small phantom cohort and its records, made once per test session."""

from __future__ import annotations

import pytest

from data_tools.conversion.pipeline import convert
from data_tools.phantom import make_cohort

SALT = "test-salt"
# The first patient carries identifiers the privacy test looks for in every output byte.
KNOWN_ID, KNOWN_NAME = "MRN-7654321", "DOE^JOHNATHAN"
COHORT = dict(patients=6, seed=5, size=64)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    identities = [(KNOWN_ID, KNOWN_NAME)] + [
        (f"PHANTOM-{i:04d}", f"PHANTOM^CASE{i:04d}") for i in range(1, COHORT["patients"])
    ]
    make_cohort(root, COHORT["patients"], COHORT["seed"], COHORT["size"], identities=identities)
    return root


@pytest.fixture(scope="session")
def records(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    summary = convert(cohort, out, size=64, salt=SALT, progress=False)
    return out, summary
