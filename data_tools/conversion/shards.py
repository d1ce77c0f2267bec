"""The converter's units of work and its output: a study's job (run in a worker or here,
its failure a reason, never an exception) and the shard files the examples are appended to."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from data_tools import tfrecord
from data_tools.conversion.discovery import Study
from data_tools.conversion.reading import EncodedStudy, encode_study, process_study
from data_tools.dicom_io import SkipFile
from data_tools.privacy import held_warnings

SHARD_RE = re.compile(r"^slices-\d{5}-of-\d{5}\.tfrecord(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class StudyJob:
    """One study to convert, and where a worker leaves its examples (None: send them).

    With `shard` (a pool worker of the local converter), the worker appends the examples
    to that shard itself once the study before it in the shard is in (the file `after`
    exists; None: it is the shard's first) and says so by creating `done`; else it leaves
    them in `spill`.
    """

    study: Study
    size: int
    classes: tuple
    pid: str
    key: bytes
    compression: str
    spill: Path | None
    shard: Path | None = None
    after: Path | None = None
    done: Path | None = None


def safe_process(job: StudyJob):
    """(encoded study, None) or (None, reason), and the warnings the study raised: held
    back (in a worker process too) for the converter to show redacted. A worker writes
    the examples to ``job.spill`` (the converting process appends that file to its shard
    in the kernel, instead of receiving ~1.5 MB a slice through a pipe)."""
    with held_warnings() as held, _one_thread():
        try:
            result = process_study(job.study, job.size, job.classes)
            encoded = encode_study(job.study, job.pid, result, job.classes, job.key)
            if job.shard is not None and (job.after is None or job.after.exists()):
                with open(job.shard, "ab", buffering=0) as f:  # its turn: nobody else writes
                    tfrecord.write(encoded.examples, f, job.compression)
                job.done.touch()
                encoded.examples, encoded.appended = None, True
            elif job.spill is not None:
                with open(job.spill, "wb") as f:
                    tfrecord.write(encoded.examples, f, job.compression)
                encoded.examples, encoded.path = None, str(job.spill)
            reason = None
        except SkipFile as e:
            encoded, reason = None, str(e)
        except Exception as e:  # a bug or an unforeseen file problem must not stop the run
            encoded, reason = None, f"unexpected error ({type(e).__name__}: {e})"
    return encoded, reason, list(held)


@contextlib.contextmanager
def _one_thread():
    """OpenCV and the BLAS (NumPy's matrix products: the resize) on one thread while a
    study converts: a worker is one core. Their default thread pools spin while idle: with
    two workers resizing 512x512 slices to 128, OpenBLAS's took two workers from 180 slices/s
    down to 100, slower than one; OpenCV's spun ~2.5 s of CPU per 1,000 slices, with no
    measurable gain in wall time (3 alternating runs, 1 and 2 workers)."""
    from threadpoolctl import threadpool_limits

    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        cv2.setNumThreads(before)


# ----------------------------------------------------------------------------- writing


def progress(done, total, slices, start, final=False):
    if not sys.stderr.isatty():
        return
    rate = slices / max(time.perf_counter() - start, 1e-9)
    end = "\n" if final else ""
    print(
        f"\rconvert: {done}/{total} studies, {slices} slices ({rate:.0f} slices/s)",
        end=end,
        file=sys.stderr,
        flush=True,
    )


class Records:
    """The shards being written into a temporary folder, and the manifest's entries."""

    def __init__(
        self, partial: Path, shard_names, classes, compression="", open_shards=True, done=None
    ):
        self.partial, self.shard_names = partial, list(shard_names)
        self.compression = compression
        # Unbuffered: chunks a worker wrote are appended by the kernel (`tfrecord.append_file`);
        # appending (O_APPEND): workers append to the same files (`StudyJob.shard`). Not
        # opened where the shards were written elsewhere (the Beam pipeline's steps).
        self.writers = (
            [open(partial / n, "ab", buffering=0) for n in shard_names]  # noqa: SIM115
            if open_shards
            else []
        )
        self.done = done  # the folder of `StudyJob.done` files, or None
        self.classes = tuple(classes)
        self.patients, self.slices = {}, []
        self.total = self.with_lesions = 0

    def close(self) -> dict:
        """Closes the shards (once); returns {shard name: bytes} for the manifest."""
        for w in self.writers:
            w.close()
        self.writers = []
        return {n: (self.partial / n).stat().st_size for n in self.shard_names}

    def write(self, shard: int, encoded: EncodedStudy) -> None:
        """Appends the study's examples to its shard (unless a worker did)."""
        if encoded.appended:
            return
        if encoded.path is not None:
            tfrecord.append_file(Path(encoded.path), self.writers[shard])
            os.unlink(encoded.path)
        else:
            tfrecord.write(encoded.examples, self.writers[shard], self.compression)

    def mark(self, index: int) -> None:
        """Study `index` is in its shard (or failed): the next one there may be appended."""
        if self.done is not None:
            (self.done / f"{index:06d}").touch()

    def note(self, study: Study, pid: str, shard: int, encoded: EncodedStudy) -> None:
        """Takes the study into the manifest's patient and slice entries."""
        entry = self.patients.setdefault(
            pid,
            {
                "diagnosis": study.diagnosis,
                "severity": study.severity,
                "shard": shard,
                "series": [],
                "num_slices": 0,
                "lesion_slices": 0,
                "annotated_slices": 0,
                "annotated": True,
                "volume_ml": {name: 0.0 for name in ("lung", *self.classes)},
            },
        )
        entry["series"].append(encoded.series_id)
        entry["annotated"] = entry["annotated"] and encoded.annotated
        voxel_ml = float(np.prod(encoded.spacing_mm)) / 1000.0
        for item in encoded.slices:
            self.slices.append(item)
            label = item["label"]
            entry["num_slices"] += 1
            entry["lesion_slices"] += label
            entry["annotated_slices"] += int(encoded.annotated)
            entry["volume_ml"]["lung"] += item["lung_pixels"] * voxel_ml
            for c, name in enumerate(self.classes):
                entry["volume_ml"][name] += item["lesion_pixels"][c] * voxel_ml
            self.total += 1
            self.with_lesions += label

    def finish_patients(self) -> dict:
        """The patients' entries with rounded volumes and lesion / lung ratios."""
        for entry in self.patients.values():
            lung = entry["volume_ml"]["lung"]
            entry["volume_ml"] = {k: round(v, 3) for k, v in entry["volume_ml"].items()}
            entry["lesion_lung_ratio"] = {
                name: round(entry["volume_ml"][name] / lung, 6) if lung > 0 else 0.0
                for name in self.classes
            }
        return dict(sorted(self.patients.items()))
