"""Patient-level cross-validation folds, stratified by diagnosis and severity.

Patients are dealt into ``2 * num_folds`` subgroups of about equal size: within each
stratum (diagnosis, severity) in a seeded random order, continuing the deal across strata
so the subgroups stay balanced. Fold k then takes subgroups 2k and 2k+1 as test (20 % for 5
folds), subgroup 2k+2 as validation (10 %) and the rest as training (70 %). The test sets of
the folds partition the cohort, and a patient is never in two splits of one fold.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

SPLITS = ("train", "validation", "test")


def assign_subgroups(
    patients: Iterable[tuple[str, str, str]], num_folds: int = 5, seed: int = 0
) -> dict[str, int]:
    """Subgroup (0 .. 2*num_folds-1) of each patient.

    Args:
        patients: (pseudonym, diagnosis, severity) per patient.
        num_folds: Number of folds (>= 2).
        seed: Makes the assignment reproducible.
    """
    if num_folds < 2:
        raise ValueError(f"need at least 2 folds, got {num_folds}")
    strata: dict[tuple[str, str], list[str]] = {}
    for pid, diagnosis, severity in patients:
        strata.setdefault((diagnosis, severity), []).append(pid)
    rng = random.Random(seed)
    n_groups = 2 * num_folds
    out, position = {}, 0
    for key in sorted(strata):
        members = sorted(strata[key])
        rng.shuffle(members)
        for pid in members:
            out[pid] = position % n_groups
            position += 1
    return out


def fold_splits(subgroups: dict[str, int], num_folds: int = 5) -> dict[int, dict[str, list]]:
    """Train / validation / test patient lists of every fold."""
    n_groups = 2 * num_folds
    folds = {}
    for k in range(num_folds):
        test = {(2 * k) % n_groups, (2 * k + 1) % n_groups}
        validation = {(2 * k + 2) % n_groups}
        folds[k] = {
            "train": sorted(p for p, g in subgroups.items() if g not in test | validation),
            "validation": sorted(p for p, g in subgroups.items() if g in validation),
            "test": sorted(p for p, g in subgroups.items() if g in test),
        }
    return folds
