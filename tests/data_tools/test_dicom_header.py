"""`Header` decodes a scan's simple values as pydicom does, on real and edge-case files."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.data.data_manager import external_data_sources
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from data_tools.dicom_header import _DECODED, Header
from data_tools.dicom_io import HEADER_DEFER_SIZE, IDENTITY_KEYS, UID_KEYS

KEYWORDS = sorted(
    {pydicom.datadict.keyword_for_tag(t) for t in _DECODED}
    | set(IDENTITY_KEYS)
    | set(UID_KEYS)
    | {"PixelPaddingValue", "ReferencedSeriesSequence", "NoSuchKeyword"}
)


def _same(ours, theirs) -> bool:
    if isinstance(theirs, (list, pydicom.multival.MultiValue)):
        return (
            type(ours) is type(theirs)
            and len(ours) == len(theirs)
            and all(_same(a, b) for a, b in zip(ours, theirs))
        )
    if isinstance(theirs, float):
        same_nan = math.isnan(theirs) and math.isnan(ours)
        return type(ours) in (float, type(theirs)) and (ours == theirs or same_nan)
    if isinstance(theirs, int):
        return isinstance(ours, int) and ours == theirs
    if isinstance(theirs, str):  # UID, str
        return isinstance(ours, str) and ours == theirs
    return ours == theirs


def _read(path):
    return pydicom.dcmread(path, defer_size=HEADER_DEFER_SIZE, force=True)


def _said(action) -> tuple[object, list]:
    """What `action()` returns (or raises) and the warnings it gives, in order."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            value = action()
        except Exception as e:  # noqa: BLE001 - compared, not hidden
            value = f"raised {type(e).__name__}"
    return value, [str(w.message) for w in said]


def _compare(path) -> int:
    """Compares every keyword of one file, presence first (which decodes nothing), then
    the value and the warnings it gives; returns how many values the file holds."""
    held = 0
    header, reference = Header(_read(path)), _read(path)
    for keyword in KEYWORDS:
        assert _said(lambda k=keyword: k in header) == _said(lambda k=keyword: k in reference), (
            path,
            keyword,
        )
        held += keyword in reference
    for keyword in KEYWORDS:
        ours, our_warnings = _said(lambda k=keyword: header.get(k))
        theirs, their_warnings = _said(lambda k=keyword: reference.get(k))
        assert _same(ours, theirs), (path, keyword, ours, theirs)
        assert our_warnings == their_warnings, (path, keyword)
    meta, reference_meta = header.meta(), getattr(reference, "file_meta", FileMetaDataset())
    for keyword in ("TransferSyntaxUID", "MediaStorageSOPClassUID"):
        assert _same(meta.get(keyword), reference_meta.get(keyword)), (path, keyword)
    return held


def _test_files() -> list:
    """pydicom's test files and pydicom-data's (its `get_testdata_files` tries to
    download more first: 15 s without a network)."""
    folders = [Path(pydicom.data.__file__).parent / "test_files"]
    folders += [Path(s.data_path) for s in external_data_sources().values()]
    return sorted(p for folder in folders for p in folder.rglob("*") if p.is_file())


def test_values_equal_pydicoms_on_its_test_files():
    """Every DICOM file pydicom (and pydicom-data) ships that it reads: implicit and
    explicit VR, big-endian, compressed, deflated, broken values."""
    checked, values = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in _test_files():
            try:
                _read(path).get("Modality")
            except Exception:  # not DICOM, or too broken for pydicom itself
                continue
            values += _compare(path)
            checked += 1
    assert checked > 100 and values > 1000, (checked, values)


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_edge_values_fall_back_or_decode_alike(tmp_path, syntax):
    """Padding, spaces, several values, empty values, IS written as a decimal, a VR the
    file gives otherwise than the dictionary: each as pydicom reads it."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = syntax
    raw = {
        "ImagePositionPatient": b" -1.5\\2e2 \\+3 ",
        "SliceThickness": b"  ",  # empty after the spaces
        "PixelSpacing": b"0.5\\",  # an empty second value
        "NumberOfFrames": b"1.0 ",  # IS as a decimal
        "SeriesInstanceUID": b"1.2.3\x00",
        "FrameOfReferenceUID": b"1.2.3.4\n",  # invalid: UID() strips it, pydicom warns
        "StudyInstanceUID": b"1.2\\3.4",  # two UIDs
        "Modality": b"CT ",
        "RescaleSlope": b"nan ",
        "RescaleIntercept": b"-1024.00",
    }
    for keyword, value in raw.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        vr = pydicom.datadict.dictionary_VR(tag)
        ds[tag] = pydicom.DataElement(tag, vr, value.decode("latin-1"))
    del ds.Rows  # absent
    ds.add_new(0x00280011, "US", None)  # Columns, empty
    path = tmp_path / "edge.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(
            path,
            ds,
            little_endian=syntax != ExplicitVRBigEndian,
            implicit_vr=syntax == ImplicitVRLittleEndian,
            force_encoding=True,
        )
        assert _compare(path) > 10
    header = Header(_read(path))
    assert header.get("ImagePositionPatient") == [-1.5, 200.0, 3.0]
    assert header.get("SeriesInstanceUID") == "1.2.3"
    assert header.get("Rows", "none") == "none" and "Rows" not in header
    assert "Columns" in header and header.get("Columns", 0) is None


def test_an_invalid_value_warns_as_pydicom_does(tmp_path):
    """Values pydicom's rules call invalid go to pydicom, which warns (the converter shows
    its warnings, redacted): here a UID with letters."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = "1.2.840.SECRET"
    path = tmp_path / "invalid.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path)
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        value = Header(_read(path)).get("StudyInstanceUID")
    assert value == "1.2.840.SECRET"


def test_presence_decodes_nothing(tmp_path):
    """``in`` answers from the element's tag, as pydicom's: an MR file whose Rows holds 3
    bytes (undecodable) is skipped as not CT, not a crash, and no warning is given for a
    value nobody asked for."""
    from data_tools.dicom_io import SkipFile, read_header

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = 0x1234
    ds.SeriesInstanceUID = "1.02.3"  # invalid: pydicom warns when it is decoded
    path = tmp_path / "mr.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    rows = b"\x28\x00\x10\x00US\x02\x00\x34\x12"
    data = path.read_bytes()
    assert data.count(rows) == 1
    path.write_bytes(data.replace(rows, b"\x28\x00\x10\x00US\x03\x00\x34\x12\x00"))
    header = Header(_read(path))
    assert _said(lambda: ("Rows" in header, "SeriesInstanceUID" in header)) == ((True, True), [])
    with pytest.raises(SkipFile, match="modality MR is not CT"):
        read_header(path)
