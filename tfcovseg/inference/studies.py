"""What `predict` reads: a DICOM folder (series grouped, sorted, gap-free runs, HU) or a
NIfTI volume, as `Volume`s with pseudonyms, and the files skipped with their reasons."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from data_tools import dicom_io
from data_tools.conversion.discovery import IMAGE_SUFFIXES
from data_tools.conversion.reading import read_nifti_volume
from data_tools.ct_values import ct_value_problem
from data_tools.dicom_io import SkipFile
from data_tools.privacy import Redactor, pseudonym, resolve_salt
from tfcovseg.inference.errors import PredictionError

DICOM_SUFFIXES_IGNORED = (".csv", ".txt", ".md", ".json", ".png", ".jpg", ".jpeg", ".html")


@dataclasses.dataclass
class Volume:
    """One series or volume, ready to predict: HU [K, H, W] and how to write results back."""

    kind: str  # dicom | nifti
    hu: np.ndarray
    spacing_mm: tuple[float, float, float]  # row, column, slice
    patient: str  # pseudonyms
    series: str
    series_obj: dicom_io.DicomSeries | None = None  # DICOM: the kept slices, sorted
    datasets: list | None = None  # DICOM: headers of the kept slices (for the SEG)
    affine: np.ndarray | None = None  # NIfTI: canonical (RAS+) affine of the input
    unreadable: list = dataclasses.field(default_factory=list)  # slice indices left empty
    skipped: list = dataclasses.field(default_factory=list)  # (file, reason)
    warnings: list = dataclasses.field(default_factory=list)
    tilt_deg: float = 0.0  # angle between the slice normal and the patient's long axis

    def fingerprint(self) -> str:
        """SHA-256 of what is predicted: the HU voxels, their geometry and the slices left
        empty. A rerun keeps a series' results only for the same input (slices that
        arrived or changed since are another input)."""
        h = hashlib.sha256(np.ascontiguousarray(self.hu).tobytes())
        affine = None if self.affine is None else np.asarray(self.affine).tolist()
        geometry = [list(self.hu.shape), [float(v) for v in self.spacing_mm], affine]
        h.update(json.dumps([geometry, sorted(int(i) for i in self.unreadable)]).encode())
        return h.hexdigest()


def _scan(root: Path, redactor) -> tuple[list, list]:
    """(header, dataset) of every DICOM image under `root`, and the files skipped."""
    skipped, headers = [], []
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        rel = path.name if root.is_file() else path.relative_to(root).as_posix()
        if path.name.startswith("."):
            continue  # hidden files (.DS_Store, ...)
        if path.suffix.lower() in DICOM_SUFFIXES_IGNORED or path.name.endswith(
            (".nii", ".nii.gz")  # masks beside a series
        ):
            skipped.append((rel, "not a DICOM file (by its name), ignored"))
            continue
        try:
            kind, item, ds = dicom_io.scan_file(path, redactor)
        except SkipFile as e:
            skipped.append((rel, str(e)))
            continue
        if kind == "seg":
            skipped.append((rel, "a DICOM SEG object, not an image"))
            continue
        headers.append((item, ds))
    return headers, skipped


def _chosen_series(series_list, series_uid, salt, skipped) -> list:
    """The series `--series` names (UID or pseudonym; all when None); the others are
    listed in `skipped`."""
    if series_uid is None:
        return series_list
    chosen = [s for s in series_list if series_uid in (s.uid, pseudonym("S", s.uid, salt))]
    if not chosen:
        names = ", ".join(pseudonym("S", s.uid, salt) for s in series_list) or "none"
        raise PredictionError(
            f"--series {series_uid} is not among the {len(series_list)} CT series of "
            f"the input (pseudonyms: {names})"
        )
    for s in series_list:
        if s not in chosen:
            skipped.append((f"series {pseudonym('S', s.uid, salt)}", "not the --series chosen"))
    return chosen


def _dicom_volumes(root: Path, series_uid: str | None, salt: bytes, redactor) -> tuple[list, list]:
    """Reads every CT series under `root` (or the one chosen); (volumes, skipped files).

    The identities met in the headers are taught to `redactor`."""
    headers, skipped = _scan(root, redactor)
    series_list, dropped = dicom_io.build_series(headers)
    base = root.parent if root.is_file() else root
    skipped += [(p.relative_to(base).as_posix(), r) for p, r in dropped]
    by_path = {h.path: ds for h, ds in headers}
    volumes = []
    for series in _chosen_series(series_list, series_uid, salt, skipped):
        volume = _series_volume(series, base, by_path, salt, redactor, skipped)
        if volume is not None:
            volumes.append(volume)
    return volumes, [(redactor(f), redactor(r)) for f, r in skipped]


def _series_volume(series, base, by_path, salt, redactor, skipped):
    """One series as a `Volume` (its longest gap-free run of slices, unreadable slices
    left as air), or None with the reason added to `skipped`."""
    pseudo = pseudonym("S", series.uid, salt)
    own_skips, warnings = [], []
    # Gaps are in the geometry (the header positions), not in which files decode.
    block, gap = dicom_io.gap_free_run(series.positions)
    for i, header in enumerate(series.slices):
        if not block.start <= i < block.stop:
            own_skips.append(
                (
                    header.path.relative_to(base).as_posix(),
                    "beyond a gap in slice positions (the longest gap-free run is kept)",
                )
            )
    if gap:
        warnings.append(f"{gap}: kept the longest run of {block.stop - block.start} slices")
    sub = dataclasses.replace(
        series, slices=series.slices[block], positions=series.positions[block]
    )
    hu, unreadable = [], []
    for i, header in enumerate(sub.slices):
        try:
            hu.append(header.read_hu())
        except SkipFile as e:
            # Kept in place (as air, not segmented) so the grid stays regular.
            hu.append(np.full((header.rows, header.columns), dicom_io.HU_FLOOR, np.float32))
            unreadable.append(i)
            own_skips.append(
                (header.path.relative_to(base).as_posix(), f"{e}; left empty in the outputs")
            )
    if len(unreadable) == len(sub.slices):
        skipped += own_skips
        skipped.append((f"series {pseudo}", "no slice of the series could be read"))
        return None
    problem = ct_value_problem(np.stack(hu))
    if problem:
        skipped += own_skips
        skipped.append((f"series {pseudo}", problem))
        return None
    if unreadable:
        warnings.append(
            f"{len(unreadable)} unreadable slice(s) left empty: lesion and lung volumes "
            "leave them out"
        )
    first = sub.slices[0]
    return Volume(
        kind="dicom",
        hu=np.stack(hu).astype(np.float32),
        spacing_mm=(first.spacing[0], first.spacing[1], abs(sub.slice_spacing)),
        patient=pseudonym("P", f"dicom:{series.patient_id or series.uid}", salt),
        series=pseudo,
        series_obj=sub,
        datasets=[by_path[h.path] for h in sub.slices],
        unreadable=unreadable,
        skipped=[(redactor(f), redactor(r)) for f, r in own_skips],
        warnings=[redactor(w) for w in warnings],
        tilt_deg=dicom_io.tilt_deg(sub.normal),
    )


def read_input(path, series_uid=None, salt=None, redactor=None) -> tuple[list[Volume], list]:
    """The volumes to predict on and the files skipped, from a DICOM folder or a NIfTI file.

    ``redactor``: a `Redactor` to teach the input's identities (for the console).

    Raises:
        PredictionError: missing input, nothing usable in it, or a NIfTI volume that is
            not CT in Hounsfield units (`data_tools.ct_values`).
    """
    path = Path(path)
    salt = resolve_salt(salt)
    redactor = Redactor() if redactor is None else redactor
    if not path.exists():
        raise PredictionError(f"--input {path} does not exist")
    if path.is_file() and (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        try:
            hu, spacing, affine = read_nifti_volume(path)
        except SkipFile as e:
            raise PredictionError(f"{path.name}: {e}") from None
        problem = ct_value_problem(hu)
        if problem:
            raise PredictionError(f"{path.name} is refused: {problem}")
        key = path.resolve().as_posix()
        volume = Volume(
            kind="nifti",
            hu=np.maximum(hu.astype(np.float32), dicom_io.HU_FLOOR),
            spacing_mm=spacing,
            patient=pseudonym("P", f"nifti:{key}", salt),
            series=pseudonym("S", key, salt),
            affine=affine,
            tilt_deg=dicom_io.tilt_deg(affine[:3, 2]),
        )
        return [volume], []
    volumes, skipped = _dicom_volumes(path, series_uid, salt, redactor)
    if not volumes:
        reasons = "; ".join(f"{f}: {r}" for f, r in skipped[:5]) or "no files"
        raise PredictionError(f"no usable CT series in {path} ({reasons}){_hint(path)}")
    return volumes, skipped


def _hint(path: Path) -> str:
    """What a file given as --input may have been meant as, when it is no DICOM slice."""
    if not path.is_file():
        return ""
    if path.suffix.lower() in (".txt", ".csv", ".lst"):
        return "; a list of studies is read by the batch prediction: add --runner direct"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "; PNG/JPEG slices are read as a folder: give the folder that holds them"
    return ""


# Patient axes (LPS: +x left, +y posterior, +z superior) and the letter of each end.
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))


def _letter(direction) -> str:
    """The patient direction a voxel axis mostly points to (LPS vector): R/L, A/P, I/S."""
    d = np.asarray(direction, np.float64)
    axis = int(np.argmax(np.abs(d)))
    return _AXIS_LETTERS[axis][int(d[axis] > 0)]


_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "I": "S", "S": "I"}


def display_geometry(volume: Volume) -> tuple[dict, list[float]]:
    """Orientation letters at a slice's edges and each slice's z (mm, superior +).

    DICOM: from the series geometry (rows follow the column direction cosines); NIfTI: the
    display orientation `read_nifti_volume` gives (rows anterior to posterior, columns the
    patient's right to left) and the canonical affine's z of each slice.
    """
    k = volume.hu.shape[0]
    if volume.kind == "dicom":
        affine = volume.series_obj.affine_lps()
        down, across = _letter(affine[:3, 0]), _letter(affine[:3, 1])
    else:
        affine = volume.affine
        down, across = "P", "L"
    centre = np.array([volume.hu.shape[1] / 2, volume.hu.shape[2] / 2])
    z = []
    for i in range(k):
        if volume.kind == "dicom":
            z.append(float((affine @ [centre[0], centre[1], i, 1.0])[2]))
        else:  # display slice i is canonical voxel plane k = i
            z.append(float((affine @ [centre[1], centre[0], i, 1.0])[2]))
    markers = {"top": _OPPOSITE[down], "bottom": down, "left": _OPPOSITE[across], "right": across}
    return markers, z
