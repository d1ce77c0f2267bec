"""Convert CT studies into sharded TFRecords plus a manifest with patient-level folds.

    python -m data_tools.convert --input DIR --out DIR [--size 512] [--shards N]
        [--workers K] [--folds 5] [--seed S] [--classes ggo,consolidation,fibrosis]
        [--compression GZIP] [--strict] [--salt SECRET] [--default-diagnosis covid]

What it finds under ``--input``:

- DICOM CT series (grouped by SeriesInstanceUID, sorted along the slice normal), with
  lesion masks from a DICOM SEG object that references the series, or else from a NIfTI
  label volume named like ``*lesion*``, ``*mask*``, ``*seg*`` or ``*label*`` in the
  series folder or a folder above it, given to the one series whose voxel grid it fits
  (never shared, never borrowed: an ambiguous mask is skipped);
- NIfTI CT volumes, with a mask next to them named ``<stem>_mask`` (``_seg``,
  ``_lesions``, ``_label``) or with ``im`` replaced by ``mask`` (``tr_im`` -> ``tr_mask``);
- 2-D slice datasets in the COVID-SemiSeg layout: ``Imgs/N.jpg`` (already windowed 8-bit)
  with ``GT/N.png`` (0 background, 1 GGO, 2 consolidation), or without ``GT/`` (unlabelled
  slices: records with ``mask/annotated`` 0); each slice is its own patient, except that
  slices named ``<volume>_<k>`` (COVID-SemiSeg's ``Data-1_coronacases_org_001_10``) are
  one patient per volume;
- patient labels in ``manifest.csv`` or ``labels.csv`` at the input root (columns
  patient, diagnosis, severity; the phantom writes one).

What it writes to ``--out``: ``slices-XXXXX-of-YYYYY.tfrecord[.gz]`` shards (one
`tf.train.Example` per slice, spec in `data_tools.features`) and ``manifest.json`` (classes,
shards, per-patient and per-slice statistics, the fold assignment, skipped files). Shards are
written under a temporary folder and moved into place when complete, and the manifest last,
so an interrupted run leaves the previous output intact; re-running gives byte-identical
output and never duplicates. Identifiers are pseudonymised (`data_tools.privacy`).

Files that cannot be used (corrupt, not DICOM, not CT, not an image, an undecodable or
unsupported codec, a mask that does not fit) are skipped with their reason and listed at
the end; ``--strict`` makes any of them fatal. Nothing usable is an error (exit code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from data_tools import __version__, dicom_io, masks, tfrecord
from data_tools.ct_values import check_ct_values
from data_tools.dicom_io import SkipFile
from data_tools.features import DIAGNOSES, LESION_CLASSES, SEVERITIES
from data_tools.files import OutputError, atomic_write_json, check_output_dir, exclusive_folder
from data_tools.folds import assign_subgroups, fold_splits
from data_tools.lung import lung_mask
from data_tools.privacy import (
    Redactor,
    held_warnings,
    printable,
    pseudonym,
    redacted_warnings,
    resolve_salt,
)
from data_tools.resize import resize_bilinear
from data_tools.workers import (
    ordered_map,
    oversubscribed,
    reuse_freed_memory,
    scan_chunk,
    worker_pool,
)

MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^slices-\d{5}-of-\d{5}\.tfrecord(\.gz)?$")
MASK_WORDS = ("lesion", "mask", "seg", "label", "gt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Diagnoses whose masks are empty by definition: such a series needs no mask file.
LESION_FREE_DIAGNOSES = ("healthy",)


def dicom_patient_key(patient_id: str) -> str:
    """The in-memory key of a DICOM patient; its pseudonym is ``pseudonym("P", key, salt)``."""
    return f"dicom:{patient_id}"


class ConversionError(Exception):
    """Conversion cannot go on; the message says why (exit code 2 on the command line)."""


@dataclasses.dataclass
class Study:
    """One unit of conversion: a DICOM series, a NIfTI volume or a PNG/JPG slice."""

    kind: str  # dicom | nifti | png
    rel: str  # path relative to the input root, for messages
    patient_key: str  # original patient identifier (memory only)
    series_key: str  # original series identifier (memory only)
    series: dicom_io.DicomSeries | None = None
    image_path: Path | None = None
    mask_path: Path | None = None
    mask_kind: str | None = None  # nifti | seg | png
    mask_fit: masks.MaskFit | None = None  # a NIfTI mask of a DICOM series: its voxels
    diagnosis: str = "unknown"
    severity: str = "unknown"
    warnings: list[str] = dataclasses.field(default_factory=list)  # converted, but say so


@dataclasses.dataclass
class StudyResult:
    """A converted study, ready to write (numpy arrays at the output size)."""

    hu: np.ndarray  # [K, S, S] float32, or int16 when read as integers
    lesions: np.ndarray  # [K, S, S, C] uint8
    lung: np.ndarray  # [K, S, S] uint8
    positions: list[float]
    slice_keys: list[str]
    spacing_mm: tuple[float, float, float]
    annotated: bool
    pre_windowed: bool
    skipped: list[tuple[str, str]]
    warnings: list[str] = dataclasses.field(default_factory=list)  # found while reading


@dataclasses.dataclass
class EncodedStudy:
    """A converted study as serialized examples and their manifest entries
    (`encode_study`). A worker writes the examples to a file (`path`) and sends the rest:
    the converting process then only appends that file to its shard."""

    slices: list[dict]  # the manifest's per-slice entries, in slice order
    series_id: str
    spacing_mm: tuple[float, float, float]
    annotated: bool
    skipped: list[tuple[str, str]]
    examples: list[bytes] | None = None  # serialized `tf.train.Example`s, in slice order
    path: str | None = None  # or the file holding them (`data_tools.tfrecord.write`)
    appended: bool = False  # or already in the shard (`_StudyJob.shard`)
    warnings: list[str] = dataclasses.field(default_factory=list)  # the study's, read


# ----------------------------------------------------------------------------- discovery


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(".nii") or path.name.endswith(".nii.gz")


def _nifti_stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


def looks_like_mask(path: Path) -> bool:
    tokens = [t for t in re.split(r"[^a-z]+", _nifti_stem(path).lower()) if t]
    return any(t.startswith(word) for t in tokens for word in MASK_WORDS)


def _labels_file(root: Path) -> Path | None:
    """The input's labels file: ``manifest.csv``, else ``labels.csv``, else None."""
    return next((root / n for n in ("manifest.csv", "labels.csv") if (root / n).is_file()), None)


def _read_labels(path: Path | None) -> dict:
    """{patient: (diagnosis, severity)} of a labels file (`_labels_file`; None: none)."""
    labels = {}
    if path is None:
        return labels
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = {k.lower(): k for k in reader.fieldnames or []}
        if "patient" not in fields:
            raise ConversionError(f"{path} needs a 'patient' column, has {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            diagnosis = (row.get(fields.get("diagnosis", ""), "") or "unknown").strip().lower()
            severity = (row.get(fields.get("severity", ""), "") or "unknown").strip().lower()
            if diagnosis not in DIAGNOSES:
                raise ConversionError(
                    f"{path} line {line}: diagnosis {diagnosis!r} is not one of {DIAGNOSES}"
                )
            if severity not in SEVERITIES:
                raise ConversionError(
                    f"{path} line {line}: severity {severity!r} is not one of {SEVERITIES}"
                )
            labels[row[fields["patient"]].strip()] = (diagnosis, severity)
    return labels


@dataclasses.dataclass
class Discovery:
    """What `discover` found under an input folder.

    studies: sorted by relative path. skipped: (relative path, reason) of files or series
    that cannot be used (fatal under ``--strict``). ignored: (relative path, reason) of
    files that are not input by design (images outside a slice-dataset layout).
    redactor: knows every original patient id / name / UID met.
    """

    studies: list
    skipped: list
    ignored: list
    redactor: Redactor


@dataclasses.dataclass
class InputFiles:
    """The files under an input folder, by kind (`input_files`)."""

    niftis: list
    images: list
    candidates: list  # possibly DICOM, whatever their names
    # (relative path, reason): links and folders the listing does not enter or read
    ignored: list = dataclasses.field(default_factory=list)


def _files_under(root: Path, excluded: Path | None, ignored: list):
    """The files under `root` as ``rglob("*")`` and ``is_file()`` find them (symbolic links
    to files included, linked folders not entered, unreadable folders passed over), less
    those whose real path lies in the folder `excluded` (resolved). What is passed over
    goes to `ignored` as (relative path, reason), dot files aside: rglob said nothing.

    One ``scandir`` per folder, its entries' types from the listing, and one ``resolve``
    per folder (per file only for links): the pathlib calls cost a stat and a resolve per
    file, 55 µs, 0.06 s of a 1,035-file input (a tenth of its discovery, in one process
    whatever the workers) and minutes of a hospital archive's."""

    def outside(real: Path) -> bool:
        return excluded is None or not (real == excluded or excluded in real.parents)

    folders = [root]
    while folders:
        folder = folders.pop()
        if not outside(folder.resolve()):
            continue
        try:
            entries = list(os.scandir(folder))
        except PermissionError as e:
            ignored.append((folder, f"folder not read: {e.strerror or 'permission denied'}"))
            continue
        for entry in entries:
            path = folder / entry.name
            if entry.is_dir(follow_symlinks=False):
                folders.append(path)
            elif not entry.is_symlink():
                if entry.is_file(follow_symlinks=False):
                    yield path
            elif path.is_file():  # pathlib's errors, as rglob's
                if outside(path.resolve()):
                    yield path
            elif not entry.name.startswith("."):
                why = "to a folder: not followed" if path.is_dir() else "that leads to no file"
                ignored.append((path, f"a link {why} (give the files themselves)"))


def input_files(root: Path, exclude: Path | None = None) -> InputFiles:
    """Lists the files under `root` by kind, sorted, leaving out `exclude` (an output
    folder inside the input), dot files, text and JSON files and the labels file.

    Raises:
        ConversionError: `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"input {root} is not a directory")
    labels_path = _labels_file(root)
    files = InputFiles([], [], [])
    excluded = Path(exclude).resolve() if exclude is not None else None
    passed_over = []
    for path in sorted(_files_under(root, excluded, passed_over)):
        if path == labels_path or path.name.startswith("."):
            continue
        if _is_nifti(path):
            files.niftis.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            files.images.append(path)
        elif path.suffix.lower() not in (".csv", ".txt", ".md", ".json"):
            files.candidates.append(path)
    files.ignored = sorted((p.relative_to(root).as_posix(), why) for p, why in passed_over)
    return files


def discover(
    root: Path,
    classes=LESION_CLASSES,
    default_diagnosis="unknown",
    default_severity="unknown",
    exclude: Path | None = None,
    redactor: Redactor | None = None,
    scan=None,
    files: InputFiles | None = None,
) -> Discovery:
    """Finds the studies under `root` (see the module docstring for the layouts).

    `redactor` (default: a new one) learns every patient identity and UID met. `scan` maps
    a list of files to their `dicom_io.ScannedFile`s in order (default: one by one here;
    the converter shares them with its workers). `files`: `input_files(root, exclude)`,
    when listed already (the Beam pipeline's launcher lists, its workers read)."""
    root = Path(root)
    files = input_files(root, exclude) if files is None else files
    labels = _read_labels(_labels_file(root))
    found = Discovery([], [], list(files.ignored), Redactor() if redactor is None else redactor)
    headers, segs = [], []
    niftis, images, candidates = files.niftis, files.images, files.candidates
    for path, scanned in zip(candidates, (scan or _scan_here)(candidates)):
        for value, placeholder in scanned.identities:
            found.redactor.add(value, placeholder)
        if scanned.kind == "skip":
            found.skipped.append((path.relative_to(root).as_posix(), scanned.reason))
        else:
            (segs if scanned.kind == "seg" else headers).append((scanned.item, scanned.fields))
    series_list, dropped = dicom_io.build_series(headers)
    found.skipped += [(p.relative_to(root).as_posix(), r) for p, r in dropped]

    def label_of(*keys):
        """The labels.csv row of the first key that has one, else the defaults."""
        for key in keys:
            if key in labels:
                return labels[key]
        return default_diagnosis, default_severity

    mask_niftis = [p for p in niftis if looks_like_mask(p)]
    # A mask named after a NIfTI volume beside it is that volume's; the rest may be a
    # DICOM series'.
    volume_masks = _volume_masks(niftis, mask_niftis)
    free = [p for p in mask_niftis if p not in volume_masks.values()]
    found.studies += _dicom_studies(root, series_list, segs, free, label_of, found)
    found.studies += _nifti_studies(root, volume_masks, label_of)
    used = {s.mask_path for s in found.studies}
    reported = {p for p, _ in found.skipped}
    for path in mask_niftis:
        rel = path.relative_to(root).as_posix()
        if path not in used and rel not in reported:
            found.skipped.append((rel, "mask with no matching CT series or volume"))
    found.studies += _image_studies(root, images, label_of, found)
    found.studies.sort(key=lambda s: s.rel)
    return found


def _scan_here(paths):
    return map(dicom_io.scan_compact, paths)


def pool_scan(pool, workers: int, held: list, root: Path | None = None, chunk: int = 32):
    """A `discover` scan that reads the headers in `pool` (None: all here) and here alike
    (`ordered_map`), `chunk` files at a time; their warnings go to `held`, each with its
    file (relative to `root`)."""
    read = functools.partial(scan_chunk, root=root)

    def scan(paths):
        chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
        answers = ordered_map(read, chunks, pool, workers, hold=len(chunks), redo=True)
        for scanned, said in answers:
            held.extend(said)
            yield from scanned

    return scan


def _dicom_studies(root, series_list, segs, mask_niftis, label_of, found) -> list:
    """A study per DICOM series, with its DICOM SEG or its one geometry-matched NIfTI mask."""
    seg_by_series = {}
    for path, ds in segs:
        for uid in ds["referenced_series"]:
            seg_by_series[uid] = path
    nifti_for = _match_nifti_masks(root, series_list, mask_niftis, seg_by_series, found)
    studies = []
    for series in series_list:
        folder = series.slices[0].path.parent
        mask_path, mask_kind = seg_by_series.get(series.uid), "seg"
        warnings = []
        fit = None
        if mask_path is None and series.uid in nifti_for:
            (mask_path, fit), mask_kind = nifti_for[series.uid], "nifti"
            if fit.status == "cropped":
                warnings.append(f"mask {mask_path.name} cropped to the series: {fit.reason}")
        _, gap = dicom_io.gap_free_run(series.positions)
        if gap:
            warnings.append(_gap_warning(gap))
        diagnosis, severity = label_of(series.patient_id)
        studies.append(
            Study(
                kind="dicom",
                rel=folder.relative_to(root).as_posix() or ".",
                patient_key=dicom_patient_key(series.patient_id or series.uid),
                series_key=series.uid,
                series=series,
                mask_path=mask_path,
                mask_kind=mask_kind if mask_path else None,
                mask_fit=fit,
                diagnosis=diagnosis,
                severity=severity,
                warnings=warnings,
            )
        )
    return studies


def _match_nifti_masks(root, series_list, mask_niftis, seg_by_series, found) -> dict:
    """{series uid: (mask path, MaskFit)}: each NIfTI mask goes to the one series under its
    folder whose voxel grid it matches; masks that match none, or several series, and
    series that several masks match are skipped with the reason (never shared)."""
    claims: dict[str, list] = {}
    under: dict[Path, list] = {}  # folder: the series under it (a dict, not a search per
    for series in series_list:  # mask: an archive's masks x series would be quadratic)
        for folder in series.slices[0].path.parents:
            under.setdefault(folder, []).append(series)
    for path in mask_niftis:
        rel = path.relative_to(root).as_posix()
        scope = under.get(path.parent, [])
        if not scope:
            continue
        try:
            header = masks.load_label_header(path)  # once per mask: no voxels read
        except SkipFile as e:
            found.skipped.append((rel, str(e)))
            continue
        fits = [(s, masks.fit_on_series(header, s)) for s in scope]
        matched = [(s, f) for s, f in fits if f.status != "none"]
        if len(matched) == 1:
            claims.setdefault(matched[0][0].uid, []).append((path, matched[0][1]))
        elif len(matched) > 1:
            patients = len({s.patient_id for s, _ in matched})
            found.skipped.append(
                (
                    rel,
                    f"mask fits the grids of {len(matched)} series ({patients} patient(s)) "
                    "in its folder: ambiguous, used for none (put it in its series' folder "
                    "beside that series alone)",
                )
            )
        elif fits:
            which = "the series" if len(fits) == 1 else f"any of the {len(fits)} series"
            found.skipped.append(
                (rel, f"mask does not fit {which} in its folder: {fits[0][1].reason}")
            )
    chosen = {}
    for uid, claimed in claims.items():
        names = ", ".join(p.relative_to(root).as_posix() for p, _ in claimed)
        if uid in seg_by_series:
            for path, _ in claimed:
                found.skipped.append(
                    (path.relative_to(root).as_posix(), "not used: its series has a DICOM SEG")
                )
        elif len(claimed) > 1:
            for path, _ in claimed:
                found.skipped.append(
                    (
                        path.relative_to(root).as_posix(),
                        f"{len(claimed)} masks ({names}) fit the same series: ambiguous, used none",
                    )
                )
        else:
            chosen[uid] = claimed[0]
    return chosen


def _volume_masks(niftis, mask_niftis) -> dict:
    """{NIfTI CT volume: its mask or None}: ``<stem>_mask`` (``_seg``, ``_lesions``,
    ``_label``), or ``im`` replaced by ``mask``, in the volume's folder."""
    out = {}
    for path in niftis:
        if path in mask_niftis:
            continue
        stem = _nifti_stem(path)
        names = [f"{stem}_{w}" for w in ("mask", "seg", "lesions", "label")]
        names.append(re.sub(r"(^|_)im($|_)", r"\1mask\2", stem))
        out[path] = next(
            (p for p in mask_niftis if _nifti_stem(p) in names and p.parent == path.parent), None
        )
    return out


def _nifti_studies(root, volume_masks: dict, label_of) -> list:
    """A study per NIfTI CT volume, with its mask (`_volume_masks`)."""
    studies = []
    for path, mask in volume_masks.items():
        rel = path.relative_to(root).as_posix()
        diagnosis, severity = label_of(_nifti_stem(path))
        studies.append(
            Study(
                kind="nifti",
                rel=rel,
                patient_key=f"nifti:{rel}",
                series_key=rel,
                image_path=path,
                mask_path=mask,
                mask_kind="nifti" if mask else None,
                diagnosis=diagnosis,
                severity=severity,
            )
        )
    return studies


_VOLUME_SLICE = re.compile(r"^(?P<volume>.*[^\d_].*?)_(?P<index>\d+)$")


def slice_volume(stem: str) -> str | None:
    """The CT volume in a slice file's name ``<volume>_<k>`` (COVID-SemiSeg's unlabelled
    ``Data-1_coronacases_org_001_10`` -> ``Data-1_coronacases_org_001``), or None for a
    name without one (``10``: the slice is its own patient)."""
    match = _VOLUME_SLICE.match(stem)
    return match.group("volume") if match else None


def _image_studies(root, images, label_of, found) -> list:
    """A study per PNG/JPEG slice of a slice-dataset layout (``Imgs/N`` with ``GT/N``).

    Images anywhere else (screenshots beside DICOM series, exported previews) are not CT
    in Hounsfield units: they are listed as ignored, never converted."""
    studies = []
    for path in images:
        rel = path.relative_to(root).as_posix()
        folder = path.parent.name.lower()
        if folder in ("gt", "masks", "labels"):
            continue  # read with their images
        if folder not in ("imgs", "images"):
            found.ignored.append(
                (rel, "image file outside a slice-dataset folder (Imgs/ with GT/): ignored")
            )
            continue
        gt = None
        for gt_dir in ("GT", "gt", "Masks", "masks"):
            for suffix in (".png", path.suffix):
                candidate = path.parent.parent / gt_dir / (path.stem + suffix)
                if candidate.is_file():
                    gt = candidate
                    break
            if gt:
                break
        volume = slice_volume(path.stem)
        # A labels.csv row may name the slice or its volume.
        diagnosis, severity = label_of(path.stem, *([volume] if volume else []))
        where = path.parent.relative_to(root).as_posix()
        studies.append(
            Study(
                kind="png",
                rel=rel,
                # Slices of one CT volume are one patient (patient-level folds).
                patient_key=f"png:{where}/{volume}" if volume else f"png:{rel}",
                series_key=rel,
                image_path=path,
                mask_path=gt,
                mask_kind="png" if gt else None,
                diagnosis=diagnosis,
                severity=severity,
            )
        )
    return studies


# ----------------------------------------------------------------------------- per study


def _resize(image: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if image.shape == (size, size):
        return image
    from PIL import Image

    if nearest:
        return np.asarray(
            Image.fromarray(image.astype(np.uint8)).resize((size, size), Image.NEAREST)
        )
    # The serving graph resizes with the same weights (`tfcovseg.data.dataset.resize_image`).
    return resize_bilinear(image, (size, size))


def read_nifti_volume(path: Path):
    """A NIfTI volume: [Z, H, W] slices in display orientation, (row, column, slice)
    spacing in mm and the canonical (RAS+) affine the slices were taken from."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as e:
        raise SkipFile(f"cannot read NIfTI ({type(e).__name__}: {e})") from None
    shape = tuple(image.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise SkipFile(f"expected a 3-D volume, got shape {shape}")
    # nibabel's reorientation fails on this with an OrientationError that says nothing.
    if not abs(np.linalg.det(np.asarray(image.affine)[:3, :3])) > 1e-12:
        raise SkipFile("its affine (sform/qform) is degenerate: no voxel size or direction")
    try:
        image = nib.as_closest_canonical(image)  # RAS+
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as e:
        raise SkipFile(f"cannot read NIfTI ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SkipFile(f"expected a 3-D volume, got shape {data.shape}")
    # RAS (i right->left reversed, j posterior->anterior) to rows anterior->posterior,
    # columns patient right->left: the usual axial display.
    slices = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))
    zooms = image.header.get_zooms()[:3]
    return slices, (float(zooms[1]), float(zooms[0]), float(zooms[2])), image.affine


@dataclasses.dataclass
class _Volume:
    """A study as read, before lung masks and resizing."""

    hu: np.ndarray  # [K, H, W] float32, or int16 (DICOM with integer HU)
    labels: np.ndarray | None  # [K, H, W] class labels, None: no mask
    spacing: tuple[float, float, float]
    positions: list[float]
    keys: list[str]
    pre_windowed: bool = False
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


def _gap_warning(gap: str) -> str:
    return f"{gap}: lesion and lung volumes do not count the missing slices"


def _read_slices(series, dtype) -> tuple[np.ndarray, list, list]:
    """The series' readable slices in HU (filled in place: stacking copied 0.5 ms a
    slice), their indices, and (file name, reason) for the others."""
    hu = np.empty(series.shape, dtype)
    kept, skipped = [], []
    for i, header in enumerate(series.slices):
        try:
            header.read_hu(out=hu[len(kept)])
            kept.append(i)
        except SkipFile as e:
            skipped.append((header.path.name, str(e)))
    if not kept:
        raise SkipFile(f"no slice of the series could be read ({skipped[0][1]})")
    return hu[: len(kept)], kept, skipped


def _read_dicom_study(study: Study, classes) -> _Volume:
    series = study.series
    # Integer HU stay integers, as the records store them (float32 and back cost 0.4 ms a
    # 512x512 slice); a file changed since its header promised them is read again.
    integer = all(header.integer_hu for header in series.slices)
    try:
        hu, kept, skipped = _read_slices(series, np.int16 if integer else np.float32)
    except dicom_io.InexactHU:
        hu, kept, skipped = _read_slices(series, np.float32)
    check_ct_values(hu)
    labels = None
    if study.mask_kind == "nifti":
        labels = masks.nifti_labels_on_series(study.mask_path, series, study.mask_fit)[kept]
    elif study.mask_kind == "seg":
        labels = masks.seg_labels_on_series(study.mask_path, series, classes)[kept]
    first = series.slices[0]
    spacing = (first.spacing[0], first.spacing[1], abs(series.slice_spacing))
    positions = [float(series.positions[i]) for i in kept]
    keys = [series.slices[i].sop_uid for i in kept]
    warnings = []
    if skipped:  # slices whose pixels could not be read may leave a gap discovery did not see
        if dicom_io.gap_bounds(positions) - dicom_io.gap_bounds(series.positions):
            _, gap = dicom_io.gap_free_run(np.asarray(positions))
            warnings.append(_gap_warning(f"{gap}, once the unreadable slices were left out"))
    return _Volume(hu, labels, spacing, positions, keys, skipped=skipped, warnings=warnings)


def _read_nifti_study(study: Study) -> _Volume:
    hu, spacing, affine = read_nifti_volume(study.image_path)
    check_ct_values(hu)
    # As for DICOM: padding and outside-field-of-view values (often -3024) become air.
    hu = np.maximum(hu, dicom_io.HU_FLOOR)
    labels = None
    if study.mask_path is not None:
        mask, _, mask_affine = read_nifti_volume(study.mask_path)
        if mask.shape != hu.shape or not np.allclose(mask_affine, affine, atol=1e-3):
            raise SkipFile(
                f"mask {study.mask_path.name} has shape {mask.shape} / affine "
                f"different from the volume's {hu.shape}"
            )
        labels = np.rint(mask).astype(np.uint8)
    positions = [k * spacing[2] for k in range(hu.shape[0])]
    keys = [f"{study.series_key}#{k}" for k in range(hu.shape[0])]
    return _Volume(hu, labels, spacing, positions, keys)


def _read_image_study(study: Study, num_classes: int, binary_class) -> _Volume:
    hu = masks.read_image_slice(study.image_path)[None]
    labels = None
    if study.mask_path is not None:
        labels = masks.read_png_labels(study.mask_path, num_classes, binary_class)[None]
        if labels.shape != hu.shape:
            raise SkipFile(
                f"mask {study.mask_path.name} has shape {labels.shape[1:]}, image {hu.shape[1:]}"
            )
    return _Volume(hu, labels, (1.0, 1.0, 1.0), [0.0], [study.series_key], pre_windowed=True)


def process_study(study: Study, size: int, classes, binary_class: int | None = None) -> StudyResult:
    """Reads a study, aligns its masks, computes lung masks and resizes to `size`.

    `binary_class` (1-based) is the class a binary 0/255 PNG mask stands for; without it
    such a mask is refused when there are several classes (`masks.read_png_labels`).
    """
    num_classes = len(classes)
    if study.kind == "dicom":
        read = _read_dicom_study(study, classes)
    elif study.kind == "nifti":
        read = _read_nifti_study(study)
    else:
        read = _read_image_study(study, num_classes, binary_class)
    hu, labels, spacing = read.hu, read.labels, read.spacing
    if labels is not None and labels.max(initial=0) > num_classes:
        raise SkipFile(
            f"mask has label {int(labels.max())} but only {num_classes} classes "
            f"({', '.join(classes)})"
        )
    # Lesion-free is never inferred from a missing mask: only a mask (of zeros, say) or a
    # diagnosis without lesions makes the masks ground truth.
    annotated = labels is not None or study.diagnosis in LESION_FREE_DIAGNOSES
    if labels is None:
        labels = np.zeros(hu.shape, np.uint8)
    lung = lung_mask(hu, spacing[:2], lesions=labels > 0, pre_windowed=read.pre_windowed)
    k, h, w = hu.shape
    out_spacing = (spacing[0] * h / size, spacing[1] * w / size, spacing[2])
    if hu.shape[1:] == (size, size):  # nothing to resize: no copies
        hu_out, labels_out, lung_out = hu, labels, lung.view(np.uint8)
    else:
        hu_out = np.stack([_resize(s, size, nearest=False) for s in hu])
        labels_out = np.stack([_resize(s, size, nearest=True) for s in labels])
        lung_out = np.stack([_resize(s.astype(np.uint8), size, nearest=True) for s in lung])
    return StudyResult(
        hu=hu_out,
        lesions=masks.labels_to_channels(labels_out, num_classes),
        lung=lung_out,
        positions=read.positions,
        slice_keys=read.keys,
        spacing_mm=out_spacing,
        annotated=annotated,
        pre_windowed=read.pre_windowed,
        skipped=read.skipped,
        warnings=read.warnings,
    )


def encode_study(study: Study, pid: str, result: StudyResult, classes, key: bytes) -> EncodedStudy:
    """The study's slices as serialized `tf.train.Example`s (`data_tools.features`) and
    their manifest entries; identified by pseudonyms only (`pid`: the patient's)."""
    from data_tools.features import encode_example, slice_fields

    sid = pseudonym("S", study.series_key, key)
    examples, entries = [], []
    for z in range(result.hu.shape[0]):
        fields = slice_fields(
            result.hu[z],
            result.lesions[z],
            result.lung[z],
            slice_index=z,
            position_mm=result.positions[z],
            spacing_mm=result.spacing_mm,
            slice_id=pseudonym("I", f"{study.series_key}/{result.slice_keys[z]}", key),
            series_id=sid,
            patient_id=pid,
            diagnosis=study.diagnosis,
            severity=study.severity,
            annotated=result.annotated,
            pre_windowed=result.pre_windowed,
        )
        examples.append(encode_example(fields))
        lesion_pixels = _channel_counts(result.lesions[z])
        entries.append(
            {
                "patient": pid,
                "series": sid,
                "index": z,
                "label": int(any(lesion_pixels)),
                "annotated": bool(result.annotated),
                "lung_pixels": int(np.count_nonzero(result.lung[z])),
                "lesion_pixels": lesion_pixels,
            }
        )
    return EncodedStudy(
        entries,
        sid,
        result.spacing_mm,
        result.annotated,
        result.skipped,
        examples=examples,
        warnings=result.warnings,
    )


def _channel_counts(lesions: np.ndarray) -> list[int]:
    """Pixels of each channel of one slice's 0/1 lesion masks [H, W, C]: OpenCV's sum of
    each channel (0.03 ms at 512x512 with 3 channels; NumPy's count of each strided
    channel took 0.27 ms, a sum over the interleaved channels 5 ms)."""
    channels = lesions.shape[-1]
    if 1 <= channels <= 4:  # an OpenCV scalar holds four
        return [int(v) for v in cv2.sumElems(lesions)[:channels]]
    return [int(np.count_nonzero(lesions[..., c])) for c in range(channels)]


@dataclasses.dataclass(frozen=True)
class _StudyJob:
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


def _safe_process(job: _StudyJob):
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


def _progress(done, total, slices, start, final=False):
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


class _Records:
    """The shards being written into a temporary folder, and the manifest's entries."""

    def __init__(
        self, partial: Path, shard_names, classes, compression="", open_shards=True, done=None
    ):
        self.partial, self.shard_names = partial, list(shard_names)
        self.compression = compression
        # Unbuffered: chunks a worker wrote are appended by the kernel (`tfrecord.append_file`);
        # appending (O_APPEND): workers append to the same files (`_StudyJob.shard`). Not
        # opened where the shards were written elsewhere (the Beam pipeline's steps).
        self.writers = (
            [open(partial / n, "ab", buffering=0) for n in shard_names]  # noqa: SIM115
            if open_shards
            else []
        )
        self.done = done  # the folder of `_StudyJob.done` files, or None
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
    try:
        check_output_dir(out_dir)
    except OutputError as e:
        raise ConversionError(str(e)) from None
    job = _Job(
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
class _Job:
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
    jobs: list  # _StudyJob, patient by patient in pseudonym order
    owners: list  # (patient rank, patient pseudonym) of each job
    shard_names: list

    def shard_of(self, index: int) -> int:
        """The shard of job `index`: patients go round the shards in pseudonym order."""
        return self.owners[index][0] % len(self.shard_names)


def plan_conversion(job: _Job, redactor: Redactor, scan=None, files=None) -> Plan:
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
    patients = {}
    for study in studies:
        pid = pseudonym("P", study.patient_key, job.key)
        redactor.add(study.patient_key.split(":", 1)[1], pid)
        patients.setdefault(pid, []).append(study)
    expected_slices = sum(len(s.series.slices) if s.series else 1 for s in studies)
    n_shards = job.shards or max(1, min(len(patients), math.ceil(expected_slices / 256)))
    suffix = ".tfrecord.gz" if job.compression == "GZIP" else ".tfrecord"
    order = sorted(patients)
    return Plan(
        found,
        [
            _StudyJob(s, job.size, job.classes, pid, job.key, job.compression, None)
            for pid in order
            for s in patients[pid]
        ],
        [(rank, pid) for rank, pid in enumerate(order) for _ in patients[pid]],
        [f"slices-{i:05d}-of-{n_shards:05d}{suffix}" for i in range(n_shards)],
    )


def partial_folder(job: _Job) -> Path:
    """A fresh temporary folder in the output folder; earlier runs' ones, left by a kill,
    are removed (`convert` holds the folder: no other run is writing there)."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    for stale in job.out_dir.glob(".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
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
    come (`_StudyJob.shard`; the files of `done`, made here, say whose turn it is):
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


def _convert(job: _Job, redactor: Redactor, held: list, pool) -> dict:
    scan = pool_scan(pool, job.workers, held, job.input_dir)
    plan = plan_conversion(job, redactor, scan)
    partial = partial_folder(job)
    done = None if pool is None else partial / "done"
    records = _Records(partial, plan.shard_names, job.classes, job.compression, done=done)
    # Workers append to the shards or leave their examples in files (`_safe_process`).
    pool_jobs = None if pool is None else appending_jobs(plan, partial, done)
    try:
        results = ordered_map(_safe_process, plan.jobs, pool, job.workers, pool_jobs)
        collect_results(job, plan, records, results, held, write=True)
        shard_bytes = records.close()
    except BaseException:
        with contextlib.suppress(OSError):
            records.close()
        if pool is not None:  # its workers may still be writing into the folder
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return _finish(job, records, shard_bytes, plan.found)


def collect_results(job: _Job, plan: Plan, records: _Records, results, held, write: bool):
    """Takes the studies' results (`_safe_process`'s, in job order) into the manifest's
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
            _progress(index + 1, len(plan.jobs), records.total, job.start)
    if job.progress:
        _progress(len(plan.jobs), len(plan.jobs), records.total, job.start, final=True)
    if not records.patients:
        raise ConversionError(
            f"no usable study under {job.input_dir}: all {len(plan.jobs)} failed, e.g. "
            f"{redactor(skipped[-1][0])}: {redactor(skipped[-1][1])}"
        )


def _finish(job: _Job, records: _Records, shard_bytes: dict, found: Discovery) -> dict:
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
        "format": "tfcovseg-records",
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
    # Move the finished shards in, drop shards of an earlier run, then the manifest.
    for name in records.shard_names:
        os.replace(records.partial / name, job.out_dir / name)
    for old in job.out_dir.iterdir():
        if SHARD_RE.match(old.name) and old.name not in records.shard_names:
            old.unlink()
    atomic_write_json(job.out_dir / MANIFEST, manifest, indent=1)
    shutil.rmtree(records.partial, ignore_errors=True)
    return summarize(job, manifest)


def summarize(job: _Job, manifest: dict) -> dict:
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
    for item in summary.get("warnings", []):
        print(printable(f"warning: {item['path']}: {item['warning']}"))
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} files:")
        for item in summary["skipped"]:
            print(printable(f"  {item['path']}: {item['reason']}"))
    if summary.get("ignored"):
        print(f"ignored {len(summary['ignored'])} paths that are not CT input:")
        for item in summary["ignored"]:
            print(printable(f"  {item['path']}: {item['reason']}"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.convert",
        description="Convert DICOM / NIfTI / PNG CT studies into sharded TFRecords.",
    )
    parser.add_argument("--version", action="version", version=f"tfcovseg {__version__}")
    parser.add_argument("--input", type=Path, required=True, help="folder of studies")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--size", type=int, default=512, help="slice size of the records")
    parser.add_argument("--shards", type=int, help="number of shards (default: ~256 slices each)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    parser.add_argument(
        "--classes",
        default=",".join(LESION_CLASSES),
        help="lesion classes in label order (default: %(default)s)",
    )
    parser.add_argument("--compression", default="", choices=["", "GZIP"])
    parser.add_argument(
        "--strict",
        action="store_true",
        help="write nothing if any file is unusable or any study has a warning (all listed)",
    )
    parser.add_argument(
        "--salt",
        help="pseudonymisation secret (default: $TFCOVSEG_SALT or "
        "~/.config/tfcovseg/pseudonym.key)",
    )
    parser.add_argument(
        "--default-diagnosis",
        default="unknown",
        choices=DIAGNOSES,
        help="diagnosis of patients missing from manifest.csv/labels.csv",
    )
    parser.add_argument("--default-severity", default="unknown", choices=SEVERITIES)
    parser.add_argument(
        "--runner",
        choices=("direct", "flink", "spark", "dataflow"),
        help='run as an Apache Beam pipeline on this runner (pip install "tfcovseg[beam]")',
    )
    parser.add_argument(
        "--pipeline-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Beam pipeline option, repeated (e.g. direct_num_workers=2, "
        "flink_master=host:8081, project=P, region=R, temp_location=gs://B/tmp)",
    )
    args = parser.parse_args(argv)
    if args.pipeline_option and not args.runner:
        parser.error("--pipeline-option needs --runner")
    if args.runner and args.workers != 1:
        parser.error(
            "--workers is the local process pool's: with --runner give the runner's "
            "parallelism as a pipeline option (--pipeline-option direct_num_workers=N)"
        )
    if args.shards is not None and args.shards < 1:
        parser.error("--shards must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    too_many = oversubscribed(args.workers)
    if too_many:
        print(f"warning: {too_many}", file=sys.stderr)
    # Mask label k is the k-th name: an empty one dropped would shift the labels after it.
    classes = tuple(c.strip() for c in args.classes.split(","))
    if not all(classes) or len(set(classes)) != len(classes):
        parser.error(f"--classes must name distinct, non-empty classes, got {args.classes!r}")
    try:
        summary = convert(
            args.input,
            args.out,
            args.size,
            args.shards,
            args.workers,
            args.folds,
            args.seed,
            classes,
            args.compression,
            args.strict,
            args.salt,
            args.default_diagnosis,
            args.default_severity,
            runner=args.runner,
            pipeline_options=args.pipeline_option,
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from a worker's wait
        print(
            "\ninterrupted: a conversion that did not finish leaves the output folder as "
            "it was: run the command again",
            file=sys.stderr,
        )
        return 130
    print_summary(summary)
    return 0


def run(argv=None) -> int:
    """The command line as its own process runs it (`python -m data_tools.convert`, the
    `tfcovseg-convert` script): `main`, with glibc reusing freed memory
    (`reuse_freed_memory`: the process ends with the conversion). Code that calls `main`
    in a longer-lived process keeps its allocator as it was."""
    reuse_freed_memory()
    return main(argv)


if __name__ == "__main__":
    # `python -m data_tools.convert`: run the imported module's command, not this copy's,
    # so that errors raised by code importing `data_tools.convert` (the Beam pipeline's)
    # are the classes main catches.
    from data_tools.convert import run as _run

    sys.exit(_run())
