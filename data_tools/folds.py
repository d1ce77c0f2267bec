"""Patient-level cross-validation folds, stratified by diagnosis and severity.

Patients are dealt into ``2 * num_folds`` subgroups of about equal size: within each
stratum (diagnosis, severity) in a seeded random order, continuing the deal across strata
so the subgroups stay balanced. Fold k then takes subgroups 2k and 2k+1 as test (20 % for 5
folds), subgroup 2k+2 as validation (10 %) and the rest as training (70 %). The test sets of
the folds partition the cohort, and a patient is never in two splits of one fold.

The deal visits the subgroups with a stride of 3 (0, 3, 6, 9, 2, ... for 5 folds), not in
turn: a fold's test and validation subgroups are three consecutive ones, so dealing in turn
put the first three patients of a stratum all outside one fold's training split (a cohort
with three bacterial pneumonias trained fold 0 on none). With the stride, any three
consecutive patients of a stratum land at most one in each fold's held-out window, so a
stratum of three or more patients always has at least two in every training split.
"""

from __future__ import annotations

import math
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
    order = deal_order(num_folds)
    out, position = {}, 0
    for key in sorted(strata):
        members = sorted(strata[key])
        rng.shuffle(members)
        for pid in members:
            out[pid] = order[position % len(order)]
            position += 1
    return out


def deal_order(num_folds: int) -> list[int]:
    """The subgroups in the order patients are dealt to them (a permutation).

    A stride coprime with the number of subgroups, at least 3 where one exists, so that
    consecutive patients of a stratum skip past a fold's three held-out subgroups.
    """
    n_groups = 2 * num_folds
    stride = next((s for s in range(3, n_groups) if math.gcd(s, n_groups) == 1), 1)
    return [(i * stride) % n_groups for i in range(n_groups)]


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
