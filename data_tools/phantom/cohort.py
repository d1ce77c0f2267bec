"""A cohort of phantom patients on disk, and its command line.

python -m data_tools.phantom --out DIR --patients N --seed S [--size 512] [--mix default]
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from data_tools import __version__
from data_tools.files import OutputError, check_output_dir
from data_tools.phantom.dicom import write_patient
from data_tools.phantom.render import SLICE_RANGE, check_slice_range, make_patient

# A balanced cohort pattern: half COVID-19 (mild, moderate, severe), half other diagnoses.
COHORT_PATTERN = (
    ("covid", "mild"),
    ("covid", "moderate"),
    ("covid", "severe"),
    ("healthy", "none"),
    ("bacterial", "none"),
    ("covid", "mild"),
    ("covid", "moderate"),
    ("viral", "none"),
    ("covid", "severe"),
    ("healthy", "none"),
)
# Half COVID-19, a tenth healthy and four tenths bacterial or viral pneumonia: more of the
# hard negatives (patterns a segmenter can take for COVID-19 lesions) for small cohorts.
PNEUMONIA_PATTERN = (
    ("covid", "mild"),
    ("covid", "moderate"),
    ("covid", "severe"),
    ("bacterial", "none"),
    ("viral", "none"),
    ("covid", "mild"),
    ("covid", "moderate"),
    ("bacterial", "none"),
    ("viral", "none"),
    ("healthy", "none"),
)
COHORT_MIXES = {"default": COHORT_PATTERN, "pneumonia": PNEUMONIA_PATTERN}


def phantom_patient_id(seed: int, index: int) -> str:
    """The (fake) PatientID that `make_cohort` writes for patient `index` of cohort `seed`."""
    return f"PHANTOM-{seed:04d}-{index:04d}"


def cohort_plan(patients: int, seed: int, mix: str = "default"):
    """(diagnosis, severity) of each patient: the mix's pattern in a seeded order.

    Args:
        patients: Number of patients.
        seed: Seed of the order.
        mix: "default" (6 COVID-19 : 2 healthy : 1 bacterial : 1 viral) or "pneumonia"
            (5 COVID-19 : 1 healthy : 2 bacterial : 2 viral).
    """
    if mix not in COHORT_MIXES:
        raise ValueError(f"unknown cohort mix {mix!r}; choose one of {sorted(COHORT_MIXES)}")
    pattern = COHORT_MIXES[mix]
    plan = [pattern[i % len(pattern)] for i in range(patients)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(patients)
    return [plan[i] for i in order]


CASE_RE = re.compile(r"^case_\d{4}$")
MAX_SIZE = 2048  # a 512x512 CT is the usual; larger runs out of memory (37 GiB at 100,000)


def _clear_earlier_cohort(out: Path) -> None:
    """Removes a cohort written to `out` before (its ``case_NNNN`` folders and manifest,
    complete or cut by a kill), so that the new one is whole: a smaller cohort written
    over a larger one left the extra cases, and the converter took them in.

    Raises:
        ValueError: `out` holds anything else (the user's files are never removed).
    """
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    foreign = [e.name for e in entries if e.name != "manifest.csv" and not (
        e.is_dir() and CASE_RE.match(e.name))]  # fmt: skip
    if foreign:
        shown = ", ".join(sorted(foreign)[:3])
        raise ValueError(
            f"{out} is not empty and holds no phantom cohort ({shown}): choose a new or "
            "empty folder"
        )
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def make_cohort(
    out: Path,
    patients: int,
    seed: int = 0,
    size: int = 512,
    identities=None,
    progress=None,
    mix: str = "default",
    slices: tuple[int, int] = SLICE_RANGE,
) -> Path:
    """Writes a cohort of synthetic patients and its manifest.csv; returns the manifest path.

    Args:
        out: Destination folder.
        patients: Number of patients.
        seed: Cohort seed.
        size: Slice size in pixels.
        identities: Optional list of (patient_id, patient_name) to write instead of the
            generated fake ones (the privacy tests use this).
        progress: Optional callable(done, total).
        mix: Diagnosis mix of the cohort (`cohort_plan`).
        slices: Range of slices per patient (`make_patient`'s `slice_range`); fewer,
            thicker slices give more patients for the same number of slices.
    """
    plan = cohort_plan(patients, seed, mix)
    slices = check_slice_range(slices)
    out = Path(out)
    _clear_earlier_cohort(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (diagnosis, severity) in enumerate(plan):
        pid, name = (
            identities[i] if identities else (phantom_patient_id(seed, i), f"PHANTOM^CASE{i:04d}")
        )
        patient = make_patient(seed * 100_003 + i, size, diagnosis, severity, slice_range=slices)
        write_patient(
            patient,
            out / f"case_{i:04d}",
            patient_id=pid,
            patient_name=name,
            seed=seed,
            signed=bool(i % 2 == 0),
        )
        rows.append(
            {
                "patient": pid,
                "diagnosis": diagnosis,
                "severity": severity,
                "slices": patient.hu.shape[0],
            }
        )
        if progress:
            progress(i + 1, patients)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["patient", "diagnosis", "severity", "slices"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.phantom",
        description="Write a synthetic chest-CT cohort (DICOM + NIfTI lesion masks).",
    )
    parser.add_argument("--version", action="version", version=f"tfcovseg {__version__}")
    parser.add_argument("--out", type=Path, required=True, help="destination folder")
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="slice size in pixels")
    parser.add_argument(
        "--mix",
        choices=sorted(COHORT_MIXES),
        default="default",
        help="diagnosis mix: default (6 COVID-19 : 2 healthy : 1 bacterial : 1 viral) or "
        "pneumonia (5 : 1 : 2 : 2)",
    )
    parser.add_argument(
        "--slices",
        type=int,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=list(SLICE_RANGE),
        help="slices per patient, drawn per patient from [LOW, HIGH] (default %(default)s); "
        "they always cover 300 mm, so fewer slices are thicker",
    )
    args = parser.parse_args(argv)
    if args.patients < 1:
        parser.error("--patients must be at least 1")
    if not 32 <= args.size <= MAX_SIZE or args.size % 2:
        parser.error(f"--size must be an even number from 32 to {MAX_SIZE}")
    if not 0 <= args.seed < 2**32:
        parser.error("--seed must be in [0, 2**32 - 1]")
    try:
        check_output_dir(args.out)
    except OutputError as e:
        parser.error(str(e))
    try:
        check_slice_range(args.slices)
    except ValueError as e:
        parser.error(f"--slices: {e}")
    start = time.perf_counter()

    def progress(done, total):
        print(f"\rphantom: {done}/{total} patients", end="", file=sys.stderr, flush=True)

    try:  # a folder of other files is refused before any patient is drawn
        manifest = make_cohort(
            args.out,
            args.patients,
            args.seed,
            args.size,
            progress=progress,
            mix=args.mix,
            slices=tuple(args.slices),
        )
    except ValueError as e:
        parser.error(str(e))
    print(file=sys.stderr)
    with manifest.open() as f:
        slices = sum(int(r["slices"]) for r in csv.DictReader(f))
    elapsed = time.perf_counter() - start
    print(
        f"wrote {args.patients} patients, {slices} slices at {args.size}x{args.size} to "
        f"{args.out} in {elapsed:.1f} s ({slices / elapsed:.0f} slices/s); "
        f"manifest: {manifest}"
    )
    return 0
