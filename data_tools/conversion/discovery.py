"""What the converter finds under ``--input``: studies (DICOM series with their SEG or
NIfTI masks, NIfTI volumes with theirs, 2-D slice datasets), the patients' labels, and the
files skipped with their reasons (`data_tools.convert` has the whole list)."""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import re
from pathlib import Path

from data_tools import dicom_io, masks
from data_tools.dicom_io import SkipFile
from data_tools.features import DIAGNOSES, LESION_CLASSES, SEVERITIES
from data_tools.privacy import Redactor
from data_tools.workers import ordered_map, scan_chunk

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
            warnings.append(gap_warning(gap))
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
        if folder in MASK_FOLDERS:
            continue  # read with their images
        if folder not in ("imgs", "images"):
            found.ignored.append(
                (rel, "image file outside a slice-dataset folder (Imgs/ with GT/): ignored")
            )
            continue
        gt, warnings = _slice_mask(path), []
        if gt is None and _mask_folders(path.parent.parent):
            # A labelled layout with one mask missing: the slice would quietly train as
            # unlabelled, so say so (and --strict refuses it).
            warnings.append("no mask beside it in the GT/ folder: converted as unlabelled")
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
                warnings=warnings,
            )
        )
    return studies


MASK_FOLDERS = ("gt", "masks", "labels")  # beside Imgs/, in any case


def _mask_folders(dataset: Path) -> list[Path]:
    return sorted(p for p in dataset.iterdir() if p.is_dir() and p.name.lower() in MASK_FOLDERS)


def _slice_mask(image: Path) -> Path | None:
    """The mask of a slice-dataset image: ``GT/<stem>.png`` (or the image's suffix; the
    folder and the suffix in any case)."""
    suffixes = dict.fromkeys(s for x in (".png", image.suffix) for s in (x, x.lower(), x.upper()))
    for folder in _mask_folders(image.parent.parent):
        for suffix in suffixes:
            candidate = folder / (image.stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def gap_warning(gap: str) -> str:
    return f"{gap}: lesion and lung volumes do not count the missing slices"
