"""The conversion from input folder to records: plan (studies, patients, shards), convert
every study (here, in a process pool, or as Beam's steps), collect, write the manifest last.

See `data_tools.convert` (the command) for what is read and written."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from data_tools.conversion.discovery import (
    ConversionError,
    Discovery,
    discover,
    input_files,
    pool_scan,
)
from data_tools.conversion.shards import Records, StudyJob, progress, safe_process
from data_tools.conversion.swap import MANIFEST, discard_partial, swap_in
from data_tools.features import LESION_CLASSES
from data_tools.files import OutputError, check_output_dir, exclusive_folder
from data_tools.folds import assign_subgroups, fold_splits
from data_tools.privacy import Redactor, printable, pseudonym, redacted_warnings, resolve_salt
from data_tools.workers import ordered_map, worker_pool

RECORDS_FORMAT = "tfcovseg-records"  # the manifest's "format"


def _check_earlier_manifest(out_dir: Path) -> None:
    """A ``manifest.json`` in --out must be an earlier conversion's (which this one
    replaces): another tool's file of that name was overwritten without a word."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return
    try:
        ours = json.loads(path.read_text(encoding="utf-8")).get("format") == RECORDS_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConversionError(
            f"--out {out_dir} holds a {MANIFEST} that no conversion wrote: choose another "
            "folder (the converter writes its manifest there)"
        )


def _strict_problems(found: Discovery, redactor) -> str:
    """What ``--strict`` refuses before converting: skipped files and studies with warnings."""
    problems = [f"{p}: {r}" for p, r in found.skipped]
    problems += [f"{s.rel}: {w}" for s in found.studies for w in s.warnings]
    return redactor("; ".join(problems))


def convert(
    input_dir,
    out_dir,
    size=512,
    shards=None,
    workers=1,
    folds=5,
    seed=0,
    classes=LESION_CLASSES,
    compression="",
    strict=False,
    salt=None,
    default_diagnosis="unknown",
    default_severity="unknown",
    progress=True,
    runner=None,
    pipeline_options=(),
) -> dict:
    """Converts every usable study under `input_dir`; returns the run summary.

    `runner` ("direct", "flink", "spark", "dataflow"): run it as an Apache Beam pipeline
    (`data_tools.beam_convert`) with `pipeline_options` (``KEY=VALUE`` items) instead of
    `workers` local processes; the same output either way.

    Raises:
        ConversionError: nothing usable, bad arguments or output folder, or under
            `strict` a skipped file or a warning (a cropped mask, a gap in a series).
    """
    start = time.perf_counter()
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    classes = tuple(classes)
    if size < 32:
        raise ConversionError(f"--size must be at least 32, got {size}")
    if compression not in ("", "GZIP"):
        raise ConversionError(f"--compression must be '' or GZIP, got {compression!r}")
    if folds < 2:  # checked before converting: the folds are made last
        raise ConversionError(f"--folds must be at least 2 (cross-validation), got {folds}")
    if out_dir.resolve() == input_dir.resolve():
        raise ConversionError(
            f"--out {out_dir} is the input folder: give a new folder (beside the input, or "
            "inside it: the converter leaves its own output out of the input)"
        )
    _refuse_output_among_inputs(input_dir, out_dir)
    try:
        check_output_dir(out_dir)
    except OutputError as e:
        raise ConversionError(str(e)) from None
    _check_earlier_manifest(out_dir)
    job = Job(
        input_dir,
        out_dir,
        size,
        shards,
        workers,
        folds,
        seed,
        classes,
        compression,
        strict,
        resolve_salt(salt),
        default_diagnosis,
        default_severity,
        progress,
        start,
    )
    redactor = Redactor()
    with exclusive_folder(out_dir, error=ConversionError):
        if runner is not None:
            from data_tools.beam_convert import convert_with_beam

            with redacted_warnings(redactor):
                return convert_with_beam(job, redactor, runner, pipeline_options)
        with redacted_warnings(redactor) as held, worker_pool(job.workers) as pool:
            return _convert(job, redactor, held, pool)


@dataclasses.dataclass(frozen=True)
class Job:
    """The arguments of one `convert` call, checked."""

    input_dir: Path
    out_dir: Path
    size: int
    shards: int | None
    workers: int
    folds: int
    seed: int
    classes: tuple
    compression: str
    strict: bool
    key: bytes
    default_diagnosis: str
    default_severity: str
    progress: bool
    start: float


@dataclasses.dataclass
class Plan:
    """What to convert, decided before converting (`plan_conversion`): the same for the
    local process pool and the Beam pipeline (`data_tools.beam_convert`)."""

    found: Discovery
    jobs: list  # StudyJob, patient by patient in pseudonym order
    owners: list  # (patient rank, patient pseudonym) of each job
    shard_names: list

    def shard_of(self, index: int) -> int:
        """The shard of job `index`: patients go round the shards in pseudonym order."""
        return self.owners[index][0] % len(self.shard_names)


DICOM_SUFFIX = re.compile(r"|\.dcm|\.dicom|\.ima|\.\d+")  # "", GE's I.001, Siemens .IMA


def _refuse_output_among_inputs(input_dir: Path, out_dir: Path) -> None:
    """An --out inside the input is left out of it; one that holds input files (an
    `Imgs/` folder, a series) would drop them from the input and mix records among them."""
    out = out_dir.resolve()
    if not out.is_dir() or input_dir.resolve() not in out.parents:
        return
    files = input_files(out)
    dicom = [p for p in files.candidates if DICOM_SUFFIX.fullmatch(p.suffix.lower())]
    # Not the converter's own: a killed run's .partial-*/ (its files have no suffix).
    inputs = [
        p
        for p in files.images + files.niftis + dicom
        if not any(part.startswith(".") for part in p.relative_to(out).parts)
    ]
    if inputs:
        raise ConversionError(
            f"--out {out_dir} lies inside the input and holds {len(inputs)} input files "
            "(images, DICOM or NIfTI), which the conversion would leave out: give an output "
            "folder of its own"
        )


def plan_conversion(job: Job, redactor: Redactor, scan=None, files=None) -> Plan:
    """Finds the studies (`discover`, with `scan` and `files`), names their patients
    (pseudonyms) and shards; refuses an input with nothing usable (or, under ``--strict``,
    with anything unusable)."""
    found = discover(
        job.input_dir,
        job.classes,
        job.default_diagnosis,
        job.default_severity,
        exclude=job.out_dir,
        redactor=redactor,
        scan=scan,
        files=files,
    )
    studies, skipped = found.studies, found.skipped
    patients = {}
    for study in studies:  # before any message: a slice's file name is its patient's id
        pid = pseudonym("P", study.patient_key, job.key)
        redactor.add(study.patient_key.split(":", 1)[1], pid)
        patients.setdefault(pid, []).append(study)
    if job.strict and (skipped or any(s.warnings for s in studies)):
        raise ConversionError("--strict: " + _strict_problems(found, redactor))
    if not studies:
        detail = (
            f" ({len(skipped)} files skipped, e.g. {redactor(skipped[0][0])}: "
            f"{redactor(skipped[0][1])})"
            if skipped
            else ""
        )
        if found.ignored:
            detail += f"; {len(found.ignored)} ignored, e.g. {redactor(found.ignored[0][0])}: "
            detail += redactor(found.ignored[0][1])
        raise ConversionError(
            "no usable CT series, NIfTI volume or PNG/JPG slice found under "
            f"{job.input_dir}{detail}"
        )
    expected_slices = sum(len(s.series.slices) if s.series else 1 for s in studies)
    n_shards = job.shards or max(1, min(len(patients), math.ceil(expected_slices / 256)))
    suffix = ".tfrecord.gz" if job.compression == "GZIP" else ".tfrecord"
    order = sorted(patients)
    return Plan(
        found,
        [
            StudyJob(s, job.size, job.classes, pid, job.key, job.compression, None)
            for pid in order
            for s in patients[pid]
        ],
        [(rank, pid) for rank, pid in enumerate(order) for _ in patients[pid]],
        [f"slices-{i:05d}-of-{n_shards:05d}{suffix}" for i in range(n_shards)],
    )


def partial_folder(job: Job) -> Path:
    """A fresh temporary folder in the output folder; earlier runs' ones, left by a kill,
    are removed (`convert` holds the folder: no other run is writing there), after the
    output one of them had set aside is put back (`restore_previous`)."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    for stale in job.out_dir.glob(".partial-*"):
        discard_partial(job.out_dir, stale)
    partial = job.out_dir / f".partial-{os.getpid()}"
    partial.mkdir()
    return partial


def spilling_jobs(plan: Plan, partial: Path) -> list:
    """The plan's jobs, each writing its examples to a file of its own in
    ``partial/chunks`` (made here; there already when a Beam step runs again) for the
    shard writer to append."""
    (partial / "chunks").mkdir(exist_ok=True)
    return [
        dataclasses.replace(j, spill=partial / "chunks" / f"{i:06d}.chunk")
        for i, j in enumerate(plan.jobs)
    ]


def appending_jobs(plan: Plan, partial: Path, done: Path) -> list:
    """`spilling_jobs` that append to their shard themselves when their turn there has
    come (`StudyJob.shard`; the files of `done`, made here, say whose turn it is):
    writing a file and appending it cost 2 ms of a 512x512 slice."""
    done.mkdir()
    last = {}  # shard: its latest job so far
    jobs = []
    for i, job in enumerate(spilling_jobs(plan, partial)):
        shard = plan.shard_of(i)
        before = last.get(shard)
        last[shard] = i
        after = None if before is None else done / f"{before:06d}"
        name = partial / plan.shard_names[shard]
        jobs.append(dataclasses.replace(job, shard=name, after=after, done=done / f"{i:06d}"))
    return jobs


def _convert(job: Job, redactor: Redactor, held: list, pool) -> dict:
    scan = pool_scan(pool, job.workers, held, job.input_dir)
    plan = plan_conversion(job, redactor, scan)
    partial = partial_folder(job)
    done = None if pool is None else partial / "done"
    records = Records(partial, plan.shard_names, job.classes, job.compression, done=done)
    # Workers append to the shards or leave their examples in files (`safe_process`).
    pool_jobs = None if pool is None else appending_jobs(plan, partial, done)
    try:
        results = ordered_map(safe_process, plan.jobs, pool, job.workers, pool_jobs)
        collect_results(job, plan, records, results, held, write=True)
        shard_bytes = records.close()
    except BaseException:
        with contextlib.suppress(OSError):
            records.close()
        if pool is not None:  # its workers may still be writing into the folder
            pool.shutdown(wait=True, cancel_futures=True)
        discard_partial(job.out_dir, partial)
        raise
    return finish(job, records, shard_bytes, plan.found)


def collect_results(job: Job, plan: Plan, records: Records, results, held, write: bool):
    """Takes the studies' results (`safe_process`'s, in job order) into the manifest's
    entries and, with `write`, their examples into the shards; what cannot be used goes
    to ``found.skipped``.

    Raises:
        ConversionError: under ``--strict`` at the first unusable study or file, or when
            no study could be used.
    """
    found = plan.found
    redactor, skipped = found.redactor, found.skipped
    for index, (result, reason, said) in enumerate(results):
        study, (_, pid) = plan.jobs[index].study, plan.owners[index]
        held.extend(said)
        if write:
            if result is not None:
                records.write(plan.shard_of(index), result)
            records.mark(index)
        if result is None:
            skipped.append((study.rel, reason))
            if job.strict:
                raise ConversionError(f"--strict: {redactor(study.rel)}: {redactor(reason)}")
            continue
        skipped += [(f"{study.rel}/{name}", r) for name, r in result.skipped]
        if job.strict and result.skipped:
            name, reason = result.skipped[0]
            raise ConversionError(
                f"--strict: {redactor(f'{study.rel}/{name}')}: {redactor(reason)}"
            )
        # The manifest's and summary's, after discovery's (under --strict the unreadable
        # slices behind them have stopped the run above).
        study.warnings.extend(result.warnings)
        records.note(study, pid, plan.shard_of(index), result)
        if job.progress:
            progress(index + 1, len(plan.jobs), records.total, job.start)
    if job.progress:
        progress(len(plan.jobs), len(plan.jobs), records.total, job.start, final=True)
    if not records.patients:
        raise ConversionError(
            f"no usable study under {job.input_dir}: all {len(plan.jobs)} failed, e.g. "
            f"{redactor(skipped[-1][0])}: {redactor(skipped[-1][1])}"
        )


def finish(job: Job, records: Records, shard_bytes: dict, found: Discovery) -> dict:
    """Folds, the manifest, the shards moved into place (the manifest last); the summary."""
    manifest_patients = records.finish_patients()
    subgroups = assign_subgroups(
        [(pid, e["diagnosis"], e["severity"]) for pid, e in manifest_patients.items()],
        job.folds,
        job.seed,
    )
    for pid, group in subgroups.items():
        manifest_patients[pid]["subgroup"] = group
    splits = fold_splits(subgroups, job.folds)
    warnings = [(s.rel, w) for s in found.studies for w in s.warnings]

    def redacted(items, field):
        return [{"path": found.redactor(p), field: found.redactor(r)} for p, r in items]

    manifest = {
        "format": RECORDS_FORMAT,
        "version": 1,
        "classes": list(job.classes),
        "size": job.size,
        "compression": job.compression,
        "shards": records.shard_names,
        "shard_bytes": shard_bytes,
        "num_patients": len(manifest_patients),
        "num_slices": records.total,
        "num_lesion_slices": records.with_lesions,
        "folds": {
            "num_folds": job.folds,
            "seed": job.seed,
            "splits": {str(k): v for k, v in splits.items()},
        },
        "patients": manifest_patients,
        "slices": records.slices,
        "skipped": redacted(found.skipped, "reason"),
        "warnings": redacted(warnings, "warning"),
        "ignored": redacted(found.ignored, "reason"),
    }
    swap_in(job.out_dir, records.partial, records.shard_names, manifest)
    return summarize(job, manifest)


SAME_WARNING_SHOWN = 5  # studies named per warning text; the rest counted (manifest: all)


def _print_warnings(items) -> None:
    """The studies' warnings, at most `SAME_WARNING_SHOWN` studies per text (an empty
    GT/ folder beside 1,600 slices gave 1,600 lines)."""
    shown: dict[str, int] = {}
    for item in items:
        n = shown[item["warning"]] = shown.get(item["warning"], 0) + 1
        if n <= SAME_WARNING_SHOWN:
            print(printable(f"warning: {item['path']}: {item['warning']}"))
    for text, n in shown.items():
        if n > SAME_WARNING_SHOWN:
            more = n - SAME_WARNING_SHOWN
            print(printable(f"warning: {more} more with the same warning ({text}); "
                            "all are in manifest.json"))  # fmt: skip


def summarize(job: Job, manifest: dict) -> dict:
    """The run's summary (`print_summary`), from the manifest it wrote."""
    splits = manifest["folds"]["splits"]
    empty = [f"fold {k} {s}" for k, v in splits.items() for s, ids in v.items() if not ids]
    patients = manifest["patients"]
    annotated = [e["lesion_pixels"] for e in manifest["slices"] if e["annotated"]]
    totals = np.sum(annotated, axis=0) if annotated else []
    # A class no mask marks while others are: are the masks silent about it (COVID-SemiSeg
    # has no fibrosis) rather than showing it absent? Its zeros are recorded as truth.
    unmarked = [c for c, n in zip(manifest["classes"], totals) if n == 0] if any(totals) else []
    return {
        "out": str(job.out_dir),
        "patients": len(patients),
        "series": sum(len(e["series"]) for e in patients.values()),
        "slices": manifest["num_slices"],
        "lesion_slices": manifest["num_lesion_slices"],
        "unlabelled_slices": sum(not s["annotated"] for s in manifest["slices"]),
        "shards": len(manifest["shards"]),
        "seconds": time.perf_counter() - job.start,
        "skipped": manifest["skipped"],
        "warnings": manifest["warnings"],
        "ignored": manifest["ignored"],
        "empty_splits": empty,
        "unmarked_classes": unmarked,
        "classes": list(manifest["classes"]),
    }


def print_summary(summary: dict) -> None:
    unlabelled = summary.get("unlabelled_slices", 0)
    rate = summary["slices"] / max(summary["seconds"], 1e-9)
    print(
        printable(
            f"converted {summary['patients']} patients ({summary['series']} series), "
            f"{summary['slices']} slices ({summary['lesion_slices']} with lesions"
            + (f", {unlabelled} unlabelled: no lesion mask" if unlabelled else "")
            + f") into {summary['shards']} shards in {summary['out']} in "
            f"{summary['seconds']:.1f} s ({rate:.{0 if rate >= 10 else 1}f} slices/s)"
        )
    )
    if summary["shards"] > summary["patients"]:
        print(
            f"warning: --shards {summary['shards']} for {summary['patients']} patients: "
            f"{summary['shards'] - summary['patients']} shards are empty (a patient's slices "
            "stay in one shard)"
        )
    if summary["empty_splits"]:
        print(
            f"warning: too few patients for every split: {', '.join(summary['empty_splits'])} empty"
        )
    unmarked = summary.get("unmarked_classes") or []
    if unmarked:
        classes = summary.get("classes", [])
        kept = classes[: len(classes) - len(unmarked)]
        # Mask labels 1, 2, ... are the classes in order: only the last ones can go.
        advice = (
            f"convert with --classes {','.join(kept)}"
            if kept and classes[len(kept) :] == unmarked
            else "mask labels 1, 2, ... stand for --classes in that order"
        )
        print(
            f"warning: no mask marks {', '.join(unmarked)}: every annotated slice records it "
            f"as absent; if the masks do not annotate it, {advice}"
        )
    _print_warnings(summary.get("warnings", []))
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} files:")
        for item in summary["skipped"]:
            print(printable(f"  {item['path']}: {item['reason']}"))
    if summary.get("ignored"):
        print(f"ignored {len(summary['ignored'])} paths that are not CT input:")
        for item in summary["ignored"]:
            print(printable(f"  {item['path']}: {item['reason']}"))
