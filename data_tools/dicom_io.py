"""Reading CT series from DICOM: grouping, geometric sorting, Hounsfield units.

A series is the set of files sharing a SeriesInstanceUID, sorted by the position of each
slice along the slice normal (the cross product of the ImageOrientationPatient row and
column directions), never by file name or InstanceNumber, which scanners and exporters
do not keep consistent.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from data_tools.dicom_header import CorruptElement, Header
from data_tools.privacy import elide_raw

HU_FLOOR = -1024.0  # air; padding and outside-field-of-view pixels become this
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

CODECS_HINT = 'install the codecs extra: pip install "tfcovseg[codecs]"'


class SkipFile(Exception):
    """A file or series that cannot be used; the message is the reason shown to the user."""


def one_line(error: BaseException) -> str:
    """A library's error text on one line (nibabel's break mid-sentence), for a reason."""
    return " ".join(str(error).split())


class InexactHU(ValueError):
    """HU asked for in int16 that are not integers int16 holds (`HounsfieldRule.apply`)."""


# Uncompressed little-endian transfer syntaxes: implicit and explicit VR.
NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
# Values larger than this are skipped while a header is read (their offset is kept).
HEADER_DEFER_SIZE = "64 KB"


@dataclasses.dataclass(frozen=True)
class HounsfieldRule:
    """How one file's stored pixel values become Hounsfield units: the modality LUT
    (RescaleSlope, RescaleIntercept) and the stored values that are padding (air)."""

    slope: float
    intercept: float
    padding: tuple[int, int] | None  # lowest and highest stored padding value

    @classmethod
    def of(cls, ds: pydicom.Dataset | Header) -> HounsfieldRule:
        ds = Header.of(ds)
        value = ds.get("RescaleSlope")
        slope = 1.0 if value is None or value == "" else float(value)  # absent: stored = HU
        if not (math.isfinite(slope) and slope != 0):
            # Every pixel would be the intercept (it was taken as 1, silently).
            raise SkipFile(f"RescaleSlope {value} cannot map stored values to HU")
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        padding = ds.get("PixelPaddingValue")
        if padding is None:
            return cls(slope, intercept, None)
        pad = _as_stored(int(padding), ds)
        limit = ds.get("PixelPaddingRangeLimit")
        bounds = (pad, pad) if limit is None else tuple(sorted((pad, _as_stored(int(limit), ds))))
        return cls(slope, intercept, bounds)

    @property
    def integer(self) -> bool:
        """Whether integer stored values give integer HU (slope 1, an integer intercept)."""
        return self.slope == 1 and float(self.intercept).is_integer()

    def exact_in_int16(self, low: int, high: int) -> bool:
        """Whether the HU of stored values `low`..`high` are integers that int16 holds."""
        if not self.integer:
            return False
        return -(2**15) <= low + self.intercept and high + self.intercept < 2**15

    def apply(self, stored: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """HU (float32) of a stored frame, padding and anything below -1024 HU as air.

        An int16 `out` takes HU that are integers int16 holds (most CT: slope 1, an integer
        intercept; `exact_in_int16` of the stored values), computed in integers, without
        float32 (the records store int16); other values raise `InexactHU`."""
        hu = np.empty(stored.shape, np.float32) if out is None else out
        if hu.dtype == np.int16:
            return self._apply_int16(stored, hu)
        hu[...] = stored
        if self.slope != 1:  # x * 1 and x + 0 are x: skipped
            hu *= np.float32(self.slope)
        if self.intercept:
            hu += np.float32(self.intercept)
        self._floor(stored, hu)
        return hu

    def _apply_int16(self, stored: np.ndarray, out: np.ndarray) -> np.ndarray:
        integers = stored.dtype.kind in "iu"
        low, high = (int(stored.min()), int(stored.max())) if integers and stored.size else (0, 0)
        if not integers or not self.exact_in_int16(low, high):
            raise InexactHU(
                f"HU of {stored.dtype} values {low}..{high} (slope {self.slope:g}, intercept "
                f"{self.intercept:g}) are not integers that int16 holds"
            )
        fits = -(2**15) <= min(low, self.intercept) and max(high, self.intercept) < 2**15
        if fits:  # int16 arithmetic is exact: 5x faster than in int64
            same_bits = stored.dtype.itemsize == 2 and stored.dtype.isnative
            as16 = stored.view(np.int16) if same_bits else stored.astype(np.int16)
            np.add(as16, np.int16(self.intercept), out=out)
        else:
            np.add(stored, np.int64(self.intercept), out=out, casting="unsafe")
        self._floor(stored, out)
        return out

    def _floor(self, stored: np.ndarray, hu: np.ndarray) -> None:
        """Padding and anything below -1024 HU become -1024 (a masked copy: NumPy's
        maximum took 0.10 ms of a 512x512 frame, this 0.03)."""
        floor = np.array(HU_FLOOR, hu.dtype)
        if self.padding is not None and not self._padding_below_floor():
            lo, hi = self.padding
            np.copyto(
                hu, floor, where=stored == lo if lo == hi else (stored >= lo) & (stored <= hi)
            )
        np.copyto(hu, floor, where=hu < floor)

    def _padding_below_floor(self) -> bool:
        """Whether every padding value's HU is below the floor anyway (it then needs no
        mask of its own): computed as `apply` does, in float32."""
        f32 = np.float32
        return self.slope > 0 and f32(self.padding[1]) * f32(self.slope) + f32(
            self.intercept
        ) <= f32(HU_FLOOR)


@dataclasses.dataclass(frozen=True)
class NativePixels:
    """Where an uncompressed 16-bit frame lies in its file, found while its header was
    read: the converter then reads the pixels without parsing the header a second time
    (pydicom's full read and decode took 2 ms of a 512x512 slice, this 0.2 ms)."""

    offset: int
    dtype: str  # "<i2" or "<u2"
    shape: tuple[int, int]
    bits_stored: int  # the bits above these are cleared (unsigned) or the sign (signed)
    rule: HounsfieldRule
    file_size: int  # the file as read: another one at the path is read by pydicom
    mtime_ns: int


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
    pixels: NativePixels | None = None  # None: read the pixels through pydicom

    def read_hu(self, out: np.ndarray | None = None) -> np.ndarray:
        """This slice in HU (`read_hu`), straight from the file when its pixels are native."""
        return read_hu(self.path, self.pixels, out=out)

    @property
    def integer_hu(self) -> bool:
        """Whether the header promises integer HU (native pixels, rescale slope 1 and an
        integer intercept): `read_hu` into int16 then loses nothing."""
        return self.pixels is not None and self.pixels.rule.integer


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
    """The header of a DICOM file (large values such as the pixels deferred: not read,
    their offsets kept), or the reason it is not one."""
    try:
        try:
            return pydicom.dcmread(path, defer_size=HEADER_DEFER_SIZE)
        except InvalidDicomError:
            # Older exporters omit the 128-byte preamble; accept such files only when they
            # parse into a dataset with a SOP class.
            ds = pydicom.dcmread(path, defer_size=HEADER_DEFER_SIZE, force=True)
            if "SOPClassUID" not in ds:
                raise SkipFile("not a DICOM file") from None
            return ds
    except SkipFile:
        raise
    except OSError as e:
        raise _unreadable(e) from None
    except Exception as e:  # truncated or corrupt files raise many kinds of errors
        raise _corrupt(f"{type(e).__name__}: {e}") from None


def _values(value) -> list[str]:
    """A multi-valued string attribute (ImageType) as upper-case strings."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        value = str(value).split("\\")
    return [str(v).strip().upper() for v in value]


MAX_TILT_DEG = 30.0  # slices tilted more than this from axial are not an axial series


def tilt_deg(direction) -> float:
    """Degrees between a slice normal (any length, LPS or RAS) and the head-feet axis."""
    direction = np.asarray(direction, np.float64)
    cos = abs(direction[2]) / max(float(np.linalg.norm(direction)), 1e-12)
    return float(np.degrees(np.arccos(min(cos, 1.0))))


def read_header(path: Path) -> tuple[str, pydicom.Dataset]:
    """Reads a DICOM header and classifies it.

    Returns:
        ("ct", dataset) for a CT image, ("seg", dataset) for a DICOM SEG object.

    Raises:
        SkipFile: unreadable, not DICOM, truncated, not an image, or not CT; the reason
            names which.
    """
    kind, header = _read_header(path)
    return kind, header.dataset


def _corrupt(e) -> SkipFile:
    return SkipFile(f"corrupt DICOM file ({elide_raw(e)})")


def _read_header(path: Path) -> tuple[str, Header]:
    """`read_header` with the dataset's values as a `Header`."""
    try:
        return _classify(path)
    except CorruptElement as e:
        raise _corrupt(e) from None


def _classify(path: Path) -> tuple[str, Header]:
    ds = Header(_dataset(path))
    modality = str(ds.get("Modality", ""))
    meta = ds.meta()
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
    if "LOCALIZER" in _values(ds.get("ImageType")):
        # A scout is a projection, not a cross-section: segmenting it means nothing.
        raise SkipFile("a localizer (scout) image, not an axial slice")
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
    kind, item, header = _scan(path, redactor)
    return kind, item, header.dataset


def _scan(path: Path, redactor) -> tuple[str, object, Header]:
    """`scan_file` with the dataset's values as a `Header`."""
    try:
        return _scan_header(path, redactor)
    except CorruptElement as e:
        raise _corrupt(e) from None


def _scan_header(path: Path, redactor) -> tuple[str, object, Header]:
    kind, ds = _classify(path)
    if redactor is not None:
        for key in IDENTITY_KEYS:
            value = ds.get(key)
            if value is not None or key in ds:
                redactor.add(str(value), "<patient>")
        for key in UID_KEYS:
            value = ds.get(key)
            if value:
                redactor.add(str(value), "<uid>")
    if kind == "seg":
        return kind, path, ds
    try:
        return kind, slice_header(path, ds), ds
    except CorruptElement:
        raise  # a damaged element, not a malformed one: `_scan` says so
    except (ValueError, TypeError, IndexError) as e:
        raise SkipFile(f"malformed geometry tags ({type(e).__name__}: {e})") from None


# What grouping needs of a header besides its geometry (`build_series`, the SEG's series).
GROUPING_KEYS = ("StudyInstanceUID", "PatientID", "PatientName")


@dataclasses.dataclass
class ScannedFile:
    """`scan_file`'s answer in a form small enough to send between processes (the pydicom
    dataset itself took longer to unpickle than to read from the file).

    kind: "ct", "seg" or "skip". item: the `SliceHeader` (ct) or the path (seg). fields:
    the `GROUPING_KEYS` of a CT header as strings, or ``referenced_series`` (the series
    UIDs a SEG annotates). identities: (value, placeholder) pairs for the redactor.
    reason: why the file was skipped.
    """

    kind: str
    item: object = None
    fields: dict = dataclasses.field(default_factory=dict)
    identities: list = dataclasses.field(default_factory=list)
    reason: str | None = None


class _Identities(list):
    def add(self, value, placeholder):  # the redactor's interface, recorded
        self.append((value, placeholder))


def scan_compact(path: Path) -> ScannedFile:
    """`scan_file` for another process: never raises `SkipFile` (kind "skip")."""
    identities = _Identities()
    try:
        kind, item, ds = _scan(path, identities)
        if kind == "seg":
            series = [str(r.SeriesInstanceUID) for r in ds.get("ReferencedSeriesSequence", [])]
            fields = {"referenced_series": series}
        else:
            fields = {key: str(ds.get(key, "")) for key in GROUPING_KEYS}
    except CorruptElement as e:
        return ScannedFile("skip", identities=list(identities), reason=str(_corrupt(e)))
    except SkipFile as e:
        return ScannedFile("skip", identities=list(identities), reason=str(e))
    return ScannedFile(kind, item, fields, list(identities))


def _floats(value) -> list[float]:
    """A DS value as a list of floats (one value is a list of one)."""
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


def slice_header(path: Path, ds: pydicom.Dataset) -> SliceHeader:
    """The geometry of one CT file.

    Raises:
        ValueError: ImagePositionPatient without 3 values, ImageOrientationPatient without
            6, PixelSpacing without 2 positive ones, or a zero image size.
    """
    ds = Header.of(ds)
    position = _floats(ds.get("ImagePositionPatient"))
    orientation = _floats(ds.get("ImageOrientationPatient"))
    spacing = _floats(ds.get("PixelSpacing"))
    if len(position) != 3 or len(orientation) != 6 or len(spacing) != 2 or min(spacing) <= 0:
        raise ValueError(
            f"ImagePositionPatient {position}, ImageOrientationPatient {orientation}, "
            f"PixelSpacing {spacing}"
        )
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if int(rows) < 1 or int(columns) < 1:
        raise ValueError(f"image size {rows} x {columns}")
    return SliceHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID")),
        sop_uid=str(ds.get("SOPInstanceUID", path.name)),
        position=np.array(position),
        orientation=np.array(orientation),
        spacing=(spacing[0], spacing[1]),
        rows=int(rows),
        columns=int(columns),
        thickness=float(ds.get("SliceThickness", 0) or 0),
        pixels=native_pixels(path, ds),
    )


def native_pixels(path: Path, ds: pydicom.Dataset) -> NativePixels | None:
    """The location of a single uncompressed little-endian 16-bit frame, or None when the
    pixels need pydicom's decoders (compressed, big-endian, other bit depths, frames)."""
    ds = Header.of(ds)
    meta = ds.meta()
    try:
        element = ds.dataset.get_item(0x7FE00010, keep_deferred=True)
        rows, columns = int(ds.get("Rows")), int(ds.get("Columns"))
        native = (
            str(meta.get("TransferSyntaxUID", "")) in NATIVE_SYNTAXES
            and int(ds.get("BitsAllocated", 0)) == 16
            and 1 <= int(ds.get("BitsStored", 0)) <= 16
            and int(ds.get("SamplesPerPixel", 1)) == 1
            and int(ds.get("NumberOfFrames", 1) or 1) == 1
            and int(ds.get("PixelRepresentation", -1)) in (0, 1)
            and element is not None
            and element.length == rows * columns * 2
        )
        if not native:
            return None
        offset = element.value_tell if hasattr(element, "value_tell") else element.file_tell
        stat = os.stat(path)
    except (TypeError, ValueError, AttributeError, OSError):
        return None  # pydicom will say what is wrong when it reads the pixels
    if offset is None:
        return None
    return NativePixels(
        offset=int(offset),
        dtype="<i2" if int(ds.get("PixelRepresentation")) == 1 else "<u2",
        shape=(rows, columns),
        bits_stored=int(ds.get("BitsStored")),
        rule=HounsfieldRule.of(ds),
        file_size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
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
        first_header, first_ds = _reference(members)
        kept = []
        for header, ds in members:
            problem = _differs(header, ds, first_header, first_ds)
            if problem:
                skipped.append((header.path, f"{problem} differs from the rest of its series"))
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


def _owner(ds) -> tuple[str, str]:
    return str(ds.get("PatientID", "")), str(ds.get("StudyInstanceUID", ""))


def _reference(members):
    """The (header, dataset) a series' slices are held to: one of the most common size,
    orientation, pixel spacing and patient (the first file read set them all, so one odd
    first slice had every other one skipped)."""

    def key(item):
        h, ds = item
        coarse = tuple(np.round(np.r_[h.orientation, h.spacing], 2))
        return (h.rows, h.columns, coarse, _owner(ds))

    keys = [key(m) for m in members]
    wanted = collections.Counter(keys).most_common(1)[0][0]
    return members[keys.index(wanted)]


def _differs(header, ds, ref, ref_ds) -> str | None:
    """What of a slice differs from its series' reference (`_reference`), or None."""
    if (header.rows, header.columns) != (ref.rows, ref.columns):
        return "slice size"
    if not np.allclose(header.orientation, ref.orientation, atol=1e-3):
        return "orientation"
    # Volumes, lung sides and resizing take the series' spacing: one slice of another
    # spacing (0.7 mm among 2.8 mm) made lungs of 456 mL out of 6.7 L.
    if not np.allclose(header.spacing, ref.spacing, rtol=1e-3, atol=1e-4):
        return "pixel spacing"
    if _owner(ds) != _owner(ref_ds):  # one series UID given to two patients' scans
        return "patient or study"
    return None


GAP_FACTOR = 1.5  # a step between slices over 1.5x the median step is a gap


def _gaps(positions) -> tuple[np.ndarray, float, np.ndarray]:
    """(steps, the regular step, indices of the steps that are gaps) of slice positions."""
    positions = np.asarray(positions, dtype=float)
    if len(positions) < 3:
        return np.diff(positions), 0.0, np.zeros(0, int)
    steps = np.diff(positions)
    step = float(np.median(steps))
    return steps, step, np.nonzero(steps > GAP_FACTOR * step)[0]


def gap_bounds(positions) -> set[tuple[float, float]]:
    """The positions on either side of each gap (`gap_free_run`'s gaps), to compare the
    gaps of two sets of slices whatever their indices."""
    positions = np.asarray(positions, dtype=float)
    return {(float(positions[b]), float(positions[b + 1])) for b in _gaps(positions)[2]}


def gap_free_run(positions: np.ndarray) -> tuple[slice, str | None]:
    """The longest run of slices without a gap, and a description of the gap(s) or None.

    A gap is a step between neighbouring slice positions over `GAP_FACTOR` times the
    median step: a missing file, or slices of two scan ranges in one series.
    """
    steps, step, breaks = _gaps(positions)
    if not len(breaks):
        return slice(0, len(positions)), None
    bounds = [0, *(int(b) + 1 for b in breaks), len(positions)]
    runs = [(bounds[i + 1] - bounds[i], bounds[i]) for i in range(len(bounds) - 1)]
    length, start = max(runs, key=lambda r: (r[0], -r[1]))
    gaps = ", ".join(f"{steps[b]:.1f} mm after slice {b}" for b in breaks)
    return slice(start, start + length), (
        f"gap in slice positions ({gaps}; regular step {step:.1f} mm)"
    )


def read_hu(
    path: Path, pixels: NativePixels | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """Pixel data of one CT file in Hounsfield units (float32 [rows, columns]).

    Applies the stored-value interpretation (signed or unsigned, BitsStored), the modality
    LUT (RescaleSlope, RescaleIntercept) and maps PixelPaddingValue (and anything below
    -1024 HU, e.g. outside the reconstruction circle) to -1024 HU (`HounsfieldRule`).
    With `pixels` (from the header, `native_pixels`) the frame is read from its offset,
    unless the file changed since; `out` receives the result when given.

    Raises:
        SkipFile: the pixel data cannot be decoded; a missing codec is named with the
            package extra that provides it.
    """
    if pixels is not None and _unchanged(path, pixels):
        stored = _read_native(path, pixels)
        unused = 16 - pixels.bits_stored
        if unused:  # as pydicom does for native pixel data (its correct_unused_bits)
            np.left_shift(stored, unused, out=stored)
            np.right_shift(stored, unused, out=stored)
        return pixels.rule.apply(stored.reshape(pixels.shape), out)
    try:
        ds = pydicom.dcmread(path)
    except OSError as e:
        raise _unreadable(e) from None
    except Exception as e:
        raise _corrupt(f"{type(e).__name__}: {e}") from None
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
    try:
        rule = HounsfieldRule.of(ds)
    except CorruptElement as e:
        raise _corrupt(e) from None
    return rule.apply(stored, out)


def _read_native(path: Path, pixels: NativePixels) -> np.ndarray:
    """The stored frame, read from its offset into a new array (np.fromfile took 0.32 ms
    of a 512x512 frame, this 0.06)."""
    stored = np.empty(pixels.shape, pixels.dtype)
    view, got = memoryview(stored).cast("B"), 0
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(pixels.offset)
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise SkipFile("corrupt or truncated file: its pixel data ends early")
                got += n
    except OSError as e:
        raise _unreadable(e) from None
    return stored


def _unchanged(path: Path, pixels: NativePixels) -> bool:
    try:
        stat = os.stat(path)
    except OSError:
        return False  # pydicom's read names the problem
    return (stat.st_size, stat.st_mtime_ns) == (pixels.file_size, pixels.mtime_ns)


def _as_stored(value: int, ds: pydicom.Dataset) -> int:
    """A padding value as the pixel array holds it (US/SS VR ambiguity resolved)."""
    bits = ds.get("BitsAllocated")
    if int(ds.get("PixelRepresentation", 0)) == 1 and value >= 2 ** (int(bits) - 1):
        return value - 2 ** int(bits)
    return value
