"""Patient-level folds: 70/10/20, stratified, deterministic, no patient in two splits."""

from __future__ import annotations

import itertools

import pytest

from data_tools.folds import assign_subgroups, deal_order, fold_splits

STRATA = [
    ("covid", "mild"),
    ("covid", "moderate"),
    ("covid", "severe"),
    ("healthy", "none"),
    ("bacterial", "none"),
    ("viral", "none"),
]


def _patients(n=100):
    return [(f"P{i:03d}", *STRATA[i % len(STRATA)]) for i in range(n)]


def test_splits_are_disjoint_and_test_sets_partition_the_cohort():
    patients = _patients()
    splits = fold_splits(assign_subgroups(patients, 5, seed=1), 5)
    everyone = {p for p, *_ in patients}
    tests = []
    for k, fold in splits.items():
        train, val, test = (set(fold[s]) for s in ("train", "validation", "test"))
        assert not (train & val or train & test or val & test), k
        assert train | val | test == everyone
        assert (len(train), len(val), len(test)) == (70, 10, 20)
        tests.append(test)
    assert set().union(*tests) == everyone
    assert all(not (a & b) for a, b in itertools.combinations(tests, 2))


def test_stratified_by_diagnosis_and_severity():
    patients = _patients(120)
    groups = assign_subgroups(patients, 5, seed=2)
    for stratum in STRATA:
        members = [p for p, *s in patients if tuple(s) == stratum]
        counts = [sum(groups[p] == g for p in members) for g in range(10)]
        assert max(counts) - min(counts) <= 1, stratum


def test_deterministic_by_seed():
    patients = _patients(40)
    assert assign_subgroups(patients, 5, 3) == assign_subgroups(list(reversed(patients)), 5, 3)
    assert assign_subgroups(patients, 5, 3) != assign_subgroups(patients, 5, 4)


def test_needs_two_folds():
    with pytest.raises(ValueError, match="at least 2"):
        assign_subgroups(_patients(5), 1)


@pytest.mark.parametrize("seed", range(6))
def test_small_strata_keep_most_patients_in_every_training_split(seed):
    # The phantom quickstart's cohort: 18 COVID-19 in three severities, 6 healthy and only
    # 3 bacterial and 3 viral pneumonias. Every fold must train on at least two of each.
    pattern = [("covid", "mild")] * 6 + [("covid", "moderate")] * 6
    pattern += [("covid", "severe")] * 6 + [("healthy", "none")] * 6
    pattern += [("bacterial", "none")] * 3 + [("viral", "none")] * 3
    patients = [(f"P{i:02d}", *s) for i, s in enumerate(pattern)]
    splits = fold_splits(assign_subgroups(patients, 5, seed=seed), 5)
    for k, fold in splits.items():
        train = set(fold["train"])
        for stratum in set(pattern):
            members = {p for p, *s in patients if tuple(s) == stratum}
            assert len(members & train) >= 2, (k, stratum, sorted(members & train))


@pytest.mark.parametrize("folds", [2, 3, 4, 5, 10])
def test_deal_order_is_a_permutation(folds):
    assert sorted(deal_order(folds)) == list(range(2 * folds))
    if folds == 5:
        assert deal_order(5)[:4] == [0, 3, 6, 9]
