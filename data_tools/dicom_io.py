"""Reading CT series from DICOM: grouping, geometric sorting, Hounsfield units.

A series is the set of files sharing a SeriesInstanceUID, sorted by the position of each
slice along the slice normal (the cross product of the ImageOrientationPatient row and
column directions), never by file name or InstanceNumber, which scanners and exporters
do not keep consistent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

HU_FLOOR = -1024.0  # air; padding and outside-field-of-view pixels become this
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

CODECS_HINT = 'install the codecs extra: pip install "tfcovseg[codecs]"'


class SkipFile(Exception):
    """A file or series that cannot be used; the message is the reason shown to the user."""


@dataclasses.dataclass
class SliceHeader:
    """What is needed of one DICOM file before reading its pixels."""

    path: Path
    series_uid: str
    sop_uid: str
    position: np.ndarray  # ImagePositionPatient (mm, LPS)
    orientation: np.ndarray  # ImageOrientationPatient: row direction, column direction
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns (mm)
    rows: int
    columns: int
    thickness: float


@dataclasses.dataclass
class DicomSeries:
    """A CT series sorted along its slice normal.

    Attributes:
        uid: SeriesInstanceUID (kept in memory only; outputs use a pseudonym).
        patient_id, patient_name: Originals, kept in memory only to pseudonymise and redact.
        slices: Headers sorted by `positions`.
        positions: Position of each slice along the normal (mm), increasing.
    """

    uid: str
    study_uid: str
    patient_id: str
    patient_name: str
    slices: list[SliceHeader]
    positions: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.slices), self.slices[0].rows, self.slices[0].columns)

    @property
    def normal(self) -> np.ndarray:
        o = self.slices[0].orientation
        return np.cross(o[:3], o[3:])

    @property
    def slice_spacing(self) -> float:
        if len(self.positions) > 1:
            return float(np.median(np.diff(self.positions)))
        return float(self.slices[0].thickness or 1.0)

    def affine_lps(self) -> np.ndarray:
        """4x4 map from voxel (row, column, slice) indices to patient LPS millimetres."""
        first = self.slices[0]
        row_dir, col_dir = first.orientation[:3], first.orientation[3:]
        dr, dc = first.spacing
        affine = np.eye(4)
        # Moving down one row follows the column direction; one column, the row direction.
        affine[:3, 0] = col_dir * dr
        affine[:3, 1] = row_dir * dc
        if len(self.slices) > 1:
            affine[:3, 2] = (self.slices[-1].position - first.position) / (len(self.slices) - 1)
        else:
            affine[:3, 2] = self.normal * self.slice_spacing
        affine[:3, 3] = first.position
        return affine


def _unreadable(e: OSError) -> SkipFile:
    """The reason for a file the system will not read (permissions, I/O), as it is."""
    reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
    return SkipFile(f"cannot read the file ({reason})")


def _ends_in_header(path: Path) -> bool:
    """Whether the file ends before its pixel data (a copy or download cut short)."""
    try:
        full = pydicom.dcmread(path, defer_size=1024, force=True)
    except Exception:  # cut inside an element: truncated
        return True
    return "PixelData" not in full


def _dataset(path: Path) -> pydicom.Dataset:
    """The header of a DICOM file (no pixels), or the reason it is not one."""
    try:
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            # Older exporters omit the 128-byte preamble; accept such files only when they
            # parse into a dataset with a SOP class.
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if "SOPClassUID" not in ds:
                raise SkipFile("not a DICOM file") from None
            return ds
    except SkipFile:
        raise
    except OSError as e:
        raise _unreadable(e) from None
    except Exception as e:  # truncated or corrupt files raise many kinds of errors
        raise SkipFile(f"corrupt DICOM file ({type(e).__name__}: {e})") from None


def read_header(path: Path) -> tuple[str, pydicom.Dataset]:
    """Reads a DICOM header and classifies it.

    Returns:
        ("ct", dataset) for a CT image, ("seg", dataset) for a DICOM SEG object.

    Raises:
        SkipFile: unreadable, not DICOM, truncated, not an image, or not CT; the reason
            names which.
    """
    ds = _dataset(path)
    modality = str(ds.get("Modality", ""))
    meta = ds.get("file_meta") or {}
    sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
    if modality == "SEG" or sop_class == SEG_STORAGE:
        return "seg", ds
    is_ct = modality == "CT" or sop_class == CT_IMAGE_STORAGE
    if "Rows" not in ds or "Columns" not in ds:
        if is_ct or (not modality and _ends_in_header(path)):
            raise SkipFile("corrupt or truncated file: it ends inside its header")
        raise SkipFile(
            f"not an image (SOP class {sop_class or 'unknown'}, modality {modality or 'unknown'})"
        )
    if modality != "CT":
        raise SkipFile(f"modality {modality or 'unknown'} is not CT")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SkipFile("multi-frame (enhanced) CT is not supported; export single-frame slices")
    for key in (
        "SeriesInstanceUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
    ):
        if key not in ds:
            if _ends_in_header(path):
                raise SkipFile("corrupt or truncated file: it ends inside its header")
            raise SkipFile(f"CT image without {key}")
    return "ct", ds


IDENTITY_KEYS = ("PatientID", "PatientName", "OtherPatientIDs", "PatientBirthDate")
# Identifiers that exporters also put into file and folder names.
UID_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "AccessionNumber",
)


def scan_file(path: Path, redactor=None):
    """Reads one file's header for grouping: ``("ct", SliceHeader, ds)`` or ``("seg",
    path, ds)``; the patient identities it holds are taught to `redactor` (its ``add``).

    Raises:
        SkipFile: not DICOM, not an image, not CT (`read_header`).
    """
    kind, ds = read_header(path)
    if redactor is not None:
        for key in IDENTITY_KEYS:
            if key in ds:
                redactor.add(str(ds.get(key)), "<patient>")
        for key in UID_KEYS:
            if ds.get(key):
                redactor.add(str(ds.get(key)), "<uid>")
    if kind == "seg":
        return kind, path, ds
    try:
        return kind, slice_header(path, ds), ds
    except (ValueError, TypeError, IndexError) as e:
        raise SkipFile(f"malformed geometry tags ({type(e).__name__}: {e})") from None


def slice_header(path: Path, ds: pydicom.Dataset) -> SliceHeader:
    """The geometry of one CT file.

    Raises:
        ValueError: ImagePositionPatient without 3 values, ImageOrientationPatient without
            6, PixelSpacing without 2 positive ones, or a zero image size.
    """
    position = [float(v) for v in ds.ImagePositionPatient]
    orientation = [float(v) for v in ds.ImageOrientationPatient]
    spacing = [float(v) for v in ds.PixelSpacing]
    if len(position) != 3 or len(orientation) != 6 or len(spacing) != 2 or min(spacing) <= 0:
        raise ValueError(
            f"ImagePositionPatient {position}, ImageOrientationPatient {orientation}, "
            f"PixelSpacing {spacing}"
        )
    if int(ds.Rows) < 1 or int(ds.Columns) < 1:
        raise ValueError(f"image size {ds.Rows} x {ds.Columns}")
    return SliceHeader(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.get("SOPInstanceUID", path.name)),
        position=np.array(position),
        orientation=np.array(orientation),
        spacing=(spacing[0], spacing[1]),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        thickness=float(ds.get("SliceThickness", 0) or 0),
    )


def build_series(headers: Iterable[tuple[SliceHeader, pydicom.Dataset]]):
    """Groups CT headers into series sorted along the slice normal.

    Returns:
        (series, skipped): list of `DicomSeries`, and (path, reason) for files left out
        (inconsistent size or orientation within their series, duplicate positions).
    """
    groups: dict[str, list[tuple[SliceHeader, pydicom.Dataset]]] = {}
    for header, ds in headers:
        groups.setdefault(header.series_uid, []).append((header, ds))
    series, skipped = [], []
    for uid, members in sorted(groups.items()):
        first_header, first_ds = members[0]
        kept = []
        for header, _ in members:
            if (header.rows, header.columns) != (first_header.rows, first_header.columns):
                skipped.append((header.path, "slice size differs from the rest of its series"))
            elif not np.allclose(header.orientation, first_header.orientation, atol=1e-3):
                skipped.append((header.path, "orientation differs from the rest of its series"))
            else:
                kept.append(header)
        o = first_header.orientation
        normal = np.cross(o[:3], o[3:])
        kept.sort(key=lambda h: (float(np.dot(h.position, normal)), h.sop_uid))
        positions, unique = [], []
        for header in kept:
            p = float(np.dot(header.position, normal))
            if positions and abs(p - positions[-1]) < 1e-3:
                skipped.append((header.path, "duplicate slice position in its series"))
                continue
            positions.append(p)
            unique.append(header)
        series.append(
            DicomSeries(
                uid=uid,
                study_uid=str(first_ds.get("StudyInstanceUID", "")),
                patient_id=str(first_ds.get("PatientID", "")),
                patient_name=str(first_ds.get("PatientName", "")),
                slices=unique,
                positions=np.array(positions),
            )
        )
    return series, skipped


GAP_FACTOR = 1.5  # a step between slices over 1.5x the median step is a gap


def gap_free_run(positions: np.ndarray) -> tuple[slice, str | None]:
    """The longest run of slices without a gap, and a description of the gap(s) or None.

    A gap is a step between neighbouring slice positions over `GAP_FACTOR` times the
    median step: a missing file, or slices of two scan ranges in one series.
    """
    if len(positions) < 3:
        return slice(0, len(positions)), None
    steps = np.diff(positions)
    step = float(np.median(steps))
    breaks = np.nonzero(steps > GAP_FACTOR * step)[0]
    if not len(breaks):
        return slice(0, len(positions)), None
    bounds = [0, *(int(b) + 1 for b in breaks), len(positions)]
    runs = [(bounds[i + 1] - bounds[i], bounds[i]) for i in range(len(bounds) - 1)]
    length, start = max(runs, key=lambda r: (r[0], -r[1]))
    gaps = ", ".join(f"{steps[b]:.1f} mm after slice {b}" for b in breaks)
    return slice(start, start + length), (
        f"gap in slice positions ({gaps}; regular step {step:.1f} mm)"
    )


def read_hu(path: Path) -> np.ndarray:
    """Pixel data of one CT file in Hounsfield units (float32 [rows, columns]).

    Applies the stored-value interpretation (signed or unsigned, BitsStored), the modality
    LUT (RescaleSlope, RescaleIntercept) and maps PixelPaddingValue (and anything below
    -1024 HU, e.g. outside the reconstruction circle) to -1024 HU.

    Raises:
        SkipFile: the pixel data cannot be decoded; a missing codec is named with the
            package extra that provides it.
    """
    try:
        ds = pydicom.dcmread(path)
    except OSError as e:
        raise _unreadable(e) from None
    except Exception as e:
        raise SkipFile(f"corrupt DICOM file ({type(e).__name__}: {e})") from None
    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(ds) else None
    try:
        stored = ds.pixel_array
    except Exception as e:  # pydicom raises RuntimeError/NotImplementedError/ValueError
        name = getattr(syntax, "name", str(syntax))
        if syntax is not None and syntax.is_compressed:
            raise SkipFile(
                f"cannot decode {name} ({syntax}) pixel data: {e}. If a codec is missing, "
                f"{CODECS_HINT}"
            ) from None
        raise SkipFile(f"cannot decode pixel data ({type(e).__name__}: {e})") from None
    stored = np.asarray(stored)
    if stored.ndim != 2:
        raise SkipFile(f"expected one 2-D frame, got pixel array of shape {stored.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = stored.astype(np.float32) * slope + intercept
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        pad = _as_stored(int(padding), ds)
        limit = ds.get("PixelPaddingRangeLimit")
        if limit is not None:
            lo, hi = sorted((pad, _as_stored(int(limit), ds)))
            hu[(stored >= lo) & (stored <= hi)] = HU_FLOOR
        else:
            hu[stored == pad] = HU_FLOOR
    np.maximum(hu, HU_FLOOR, out=hu)
    return hu


def _as_stored(value: int, ds: pydicom.Dataset) -> int:
    """A padding value as the pixel array holds it (US/SS VR ambiguity resolved)."""
    if int(ds.get("PixelRepresentation", 0)) == 1 and value >= 2 ** (int(ds.BitsAllocated) - 1):
        return value - 2 ** int(ds.BitsAllocated)
    return value
