"""DICOM reading on real files: HU conversion, codecs, padding, sorting and skip reasons."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from data_tools.dicom_io import (
    HU_FLOOR,
    HounsfieldRule,
    InexactHU,
    SkipFile,
    build_series,
    read_header,
    read_hu,
    scan_file,
    slice_header,
)
from data_tools.phantom import make_patient, write_patient

ROOT = Path(__file__).resolve().parents[2]


def _reference_hu(name):
    """HU as pydicom (with the pylibjpeg plugins) gives them, floored at -1024."""
    ds = pydicom.dcmread(get_testdata_file(name))
    hu = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )
    return np.maximum(hu, HU_FLOOR), ds


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "693_UNCR.dcm", "693_J2KR.dcm", "bad_sequence.dcm", "explicit_VR-UN.dcm"],
)
def test_hu_match_pydicom_with_plugins(name):
    expected, ds = _reference_hu(name)
    hu = read_hu(Path(get_testdata_file(name)))
    assert hu.dtype == np.float32 and hu.shape == (ds.Rows, ds.Columns)
    padding = ds.get("PixelPaddingValue")
    keep = np.ones_like(hu, bool) if padding is None else ds.pixel_array != padding
    np.testing.assert_array_equal(hu[keep], expected[keep])


def test_jpeg2000_lossless_equals_the_uncompressed_original():
    compressed = read_hu(Path(get_testdata_file("693_J2KR.dcm")))
    original = read_hu(Path(get_testdata_file("693_UNCR.dcm")))
    np.testing.assert_array_equal(compressed, original)


def test_padding_value_becomes_air():
    path = Path(get_testdata_file("693_UNCR.dcm"))
    ds = pydicom.dcmread(path)
    padded = ds.pixel_array == ds.PixelPaddingValue
    assert padded.sum() > 1000  # outside the reconstruction circle
    hu = read_hu(path)
    assert (hu[padded] == HU_FLOOR).all()
    assert hu.min() == HU_FLOOR


def _variant(tmp_path, name, **changes):
    """A copy of a pydicom test file with some attributes changed (None: deleted)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        elif key == "PixelPaddingRangeLimit":  # US or SS: say which
            ds.add_new(0x00280121, "SS", value)
        else:
            setattr(ds, key, value)
    path = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.dcm"
    ds.save_as(path)
    return path


def _native_cases(tmp_path):
    yield Path(get_testdata_file("CT_small.dcm"))  # explicit VR, signed, 16 bits stored
    yield Path(get_testdata_file("693_UNCR.dcm"))  # 14 bits stored, padding
    yield Path(get_testdata_file("693_UNCI.dcm"))  # implicit VR
    # Unsigned 12-bit values under noise in the 4 unused bits, which pydicom clears.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    stored = ds.pixel_array.astype(np.int32) + 2000
    noisy = (stored | (np.random.default_rng(0).integers(0, 16, stored.shape) << 12)).astype("<u2")
    yield _variant(
        tmp_path,
        "CT_small.dcm",
        PixelRepresentation=0,
        BitsStored=12,
        HighBit=11,
        PixelData=noisy.tobytes(),
        PixelPaddingValue=None,
        RescaleIntercept=-3024,
    )
    # A padding range and a fractional slope.
    yield _variant(tmp_path, "693_UNCR.dcm", PixelPaddingRangeLimit=100, RescaleSlope=0.5)


def test_native_pixels_read_from_their_offset_as_pydicom_reads_them(tmp_path):
    for path in _native_cases(tmp_path):
        kind, header, _ = scan_file(path)
        assert kind == "ct" and header.pixels is not None, path.name
        fast = read_hu(path, header.pixels)
        np.testing.assert_array_equal(fast, read_hu(path), err_msg=path.name)
        assert fast.dtype == np.float32
        out = np.zeros((2, *fast.shape), np.float32)
        header.read_hu(out=out[1])
        np.testing.assert_array_equal(out[1], fast)


def test_int16_reads_equal_the_float_ones(tmp_path):
    """An int16 `out` receives the float32 HU exactly where they are integers int16 holds,
    computed in integers (on real files and on random frames across stored types,
    intercepts beyond int16 and padding above and below -1024 HU), and refuses others."""
    for path in _native_cases(tmp_path):
        _, header, _ = scan_file(path)
        hu = read_hu(path)
        out = np.zeros(hu.shape, np.int16)
        if header.integer_hu:
            assert header.read_hu(out=out) is out
            np.testing.assert_array_equal(out, hu, err_msg=path.name)
        else:  # the fractional slope
            with pytest.raises(InexactHU, match="not integers that int16 holds"):
                header.read_hu(out=out)
    rng = np.random.default_rng(3)
    exact = [
        HounsfieldRule(1.0, -1024.0, None),
        HounsfieldRule(1.0, 0.0, (-2000, -1500)),  # padding below the floor anyway
        HounsfieldRule(1.0, 0.0, (1000, 1200)),  # padding that must be masked
        HounsfieldRule(1.0, -40000.0, None),  # an intercept beyond int16
    ]
    stored_types = [
        ("<u2", 0, 4096),
        ("<i2", -2000, 3000),
        (">i2", -900, 900),
        ("<u2", 40000, 65536),
    ]
    for rule in exact:
        for dtype, low, high in stored_types:
            stored = rng.integers(low, high, (8, 9)).astype(dtype)
            hu = rule.apply(stored)
            if not rule.exact_in_int16(int(stored.min()), int(stored.max())):
                continue
            out = rule.apply(stored, np.empty(stored.shape, np.int16))
            np.testing.assert_array_equal(out, hu, err_msg=f"{rule} {dtype}")
    assert HounsfieldRule(1.0, -40000.0, None).exact_in_int16(40000, 65535)
    assert HounsfieldRule(1.0, -1024.0, None).exact_in_int16(0, 4095)
    assert not HounsfieldRule(1.0, -1024.0, None).exact_in_int16(0, 65535)
    for rule in (HounsfieldRule(0.5, -1024.0, None), HounsfieldRule(1.0, -1024.5, None)):
        with pytest.raises(InexactHU):
            rule.apply(np.arange(6, dtype="<u2"), np.empty(6, np.int16))
    with pytest.raises(InexactHU):  # float pixel data (NaN, say) is never taken as integers
        HounsfieldRule(1.0, 0.0, None).apply(np.array([0.0, np.nan]), np.empty(2, np.int16))


def test_pixels_pydicom_must_decode_have_no_native_location(tmp_path):
    for name in ("693_J2KR.dcm", "bad_sequence.dcm"):  # JPEG 2000, JPEG lossless
        assert scan_file(Path(get_testdata_file(name)))[1].pixels is None
    bits8 = _variant(
        tmp_path,
        "CT_small.dcm",
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelData=np.zeros((128, 128), np.uint8).tobytes(),
    )
    assert scan_file(bits8)[1].pixels is None


def test_a_file_changed_since_its_header_was_read_is_read_again(tmp_path):
    path = tmp_path / "slice.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), path)
    header = scan_file(path)[1]
    # Rewritten with a longer header: the pixels moved, the stored offset is stale.
    ds = pydicom.dcmread(path)
    ds.ImageComments = "x" * 301
    ds.PixelData = (ds.pixel_array + 7).astype("<i2").tobytes()
    ds.save_as(path)
    np.testing.assert_array_equal(header.read_hu(), read_hu(path))
    assert header.read_hu()[0, 0] == read_hu(Path(get_testdata_file("CT_small.dcm")))[0, 0] + 7


def test_native_pixels_of_a_file_cut_short_are_refused(tmp_path):
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:-5000])
    header = scan_file(cut)[1]
    assert header.pixels is not None  # the header announces the full frame
    with pytest.raises(SkipFile, match="corrupt or truncated file: its pixel data ends early"):
        header.read_hu()


def test_missing_codec_is_named(tmp_path):
    """Without the pylibjpeg plugins, a JPEG-lossless CT names the codecs extra."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pylibjpeg', 'libjpeg', 'openjpeg', 'gdcm'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pathlib import Path\n"
        "from pydicom.data import get_testdata_file\n"
        "from data_tools.dicom_io import read_hu, SkipFile\n"
        "try:\n"
        "    read_hu(Path(get_testdata_file('bad_sequence.dcm')))\n"
        "except SkipFile as e:\n"
        "    print('SKIP', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SKIP" in proc.stdout
    assert "JPEG Lossless" in proc.stdout and 'pip install "tfcovseg[codecs]"' in proc.stdout


def test_skip_reasons(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("not an image")
    with pytest.raises(SkipFile, match="not a DICOM file"):
        read_header(text)
    with pytest.raises(SkipFile, match="modality MR is not CT"):
        read_header(Path(get_testdata_file("MR_small.dcm")))
    with pytest.raises(SkipFile, match="not an image"):
        read_header(Path(get_testdata_file("rtplan.dcm")))
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:700])  # inside the header
    with pytest.raises(SkipFile, match="corrupt or truncated"):
        read_header(truncated)
    truncated.write_bytes(data[:-5000])  # inside the pixel data: the header still reads
    assert read_header(truncated)[0] == "ct"
    with pytest.raises(SkipFile, match="pixel data|corrupt"):
        read_hu(truncated)
    kind, ds = read_header(Path(get_testdata_file("CT_small.dcm")))
    assert kind == "ct" and ds.Modality == "CT"


def _damaged(tmp_path, name, find: bytes, offset: int, replacement: bytes) -> Path:
    """CT_small.dcm with a patient name, bytes at `offset` past `find` replaced."""
    import io

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID = "SECRETNAME^JOHN", "SECRETID123"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    raw = bytearray(buffer.getvalue())
    at = raw.find(find, 132) + offset
    raw[at : at + len(replacement)] = replacement
    path = tmp_path / name
    path.write_bytes(bytes(raw))
    return path


def test_a_damaged_element_skips_its_file_without_quoting_the_patient(tmp_path, capsys):
    """One flipped byte in a VR (PatientBirthDate's) stopped the whole conversion with a
    NotImplementedError traceback; a damaged length (SOPClassUID's) made pydicom warn
    with the 1,900 header bytes it took for the UID, the patient's name among them, from
    a file whose identities were never learnt (its header did not parse)."""
    import struct

    from data_tools.convert import main as convert
    from data_tools.privacy import Redactor

    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), study / "good.dcm")
    _damaged(study, "vr.dcm", b"\x10\x00\x30\x00DA", 4, b"\x44\xa5")
    _damaged(study, "length.dcm", b"\x08\x00\x16\x00UI", 6, struct.pack("<H", 1920))
    with pytest.raises(SkipFile, match="corrupt DICOM file .PatientBirthDate cannot be read"):
        scan_file(study / "vr.dcm", Redactor())
    # Modality's length past its value: pydicom gave the next elements as the modality,
    # which "modality ... is not CT" printed, the patient's name with it.
    _damaged(study, "modality.dcm", b"\x08\x00\x60\x00CS", 6, struct.pack("<H", 300))
    # A damaged VR in a geometry or rescale element is corrupt, not "malformed geometry".
    _damaged(study, "slope.dcm", b"\x28\x00\x53\x10DS", 4, b"\x44\xa5")
    assert convert(["--input", str(study), "--out", str(tmp_path / "records")]) == 0
    out, err = capsys.readouterr()
    assert "converted 1 patients (1 series), 1 slices" in out
    assert "vr.dcm: corrupt DICOM file (PatientBirthDate cannot be read" in out
    assert "length.dcm: corrupt DICOM file (SOPClassUID holds bytes that are not text" in out
    assert "modality.dcm: corrupt DICOM file (Modality holds bytes that are not text" in out
    assert "slope.dcm: corrupt DICOM file (RescaleSlope cannot be read" in out
    assert "<header bytes not shown>" in err  # pydicom's warning, its quote elided
    assert "SECRET" not in out + err


def test_elide_raw_keeps_plain_values_and_drops_spilled_bytes():
    from data_tools.privacy import elide_raw

    plain = "Invalid value for VR UI: '1.2.840.10008.1.2&1'. See the table"
    assert elide_raw(plain) == plain
    spilled = repr("1.2.3\x00\x10\x00PN\x10\x00SECRETNAME^JOHN 'x")  # both quotes: escaped
    text = elide_raw(f"Invalid value for VR UI: {spilled}. See the table")
    assert text == "Invalid value for VR UI: <header bytes not shown>. See the table"
    spilled_bytes = repr(b"CT\x08\x00p\x00SECRET")
    assert "SECRET" not in elide_raw(f"length 300: {spilled_bytes} read")
    # Long paths, Windows' doubled backslashes and apostrophes are no header bytes.
    for kept in (f"file '{'a/' * 40}x.dcm'", "in 'C:\\\\temp\\\\new.dcm'", "the file's 'ok'"):
        assert elide_raw(kept) == kept


def test_a_localizer_is_skipped(tmp_path):
    # A scout (ImageType ...\\LOCALIZER) is a projection: predict and the converter
    # segmented it as if it were an axial slice.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(tmp_path / "scout.dcm")
    with pytest.raises(SkipFile, match="localizer"):
        read_header(tmp_path / "scout.dcm")


def test_reasons_name_the_real_cause(tmp_path, monkeypatch):
    # A CT file cut anywhere inside its header is truncated, never "not an image" or
    # "without PixelSpacing"; a file the system will not read is not "corrupt".
    p = make_patient(2, 32, "healthy", "none", n_slices=3)
    write_patient(p, tmp_path / "s", patient_id="P1", patient_name="A^B")
    data = (tmp_path / "s" / "ct" / "IM0000.dcm").read_bytes()
    header_end = data.index(b"\xe0\x7f\x10\x00")  # the (7FE0,0010) pixel data tag
    cut = tmp_path / "cut.dcm"
    reasons = set()
    for end in range(200, header_end, 40):
        cut.write_bytes(data[:end])
        try:
            read_header(cut)  # cut after every tag a CT header needs: the pixels fail later
        except SkipFile as e:
            reasons.add(str(e))
        else:
            with pytest.raises(SkipFile, match="pixel data"):
                read_hu(cut)
    assert reasons == {"corrupt or truncated file: it ends inside its header"}

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(cut))

    monkeypatch.setattr(pydicom, "dcmread", refused)
    for read in (read_header, read_hu):
        with pytest.raises(SkipFile, match=r"^cannot read the file \(permission denied\)$"):
            read(cut)


def _write_series(folder, seed, n=6, patient_id="P1"):
    p = make_patient(seed, 32, "healthy", "none", n_slices=n)
    write_patient(p, folder, patient_id=patient_id, patient_name="A^B", seed=seed)
    return p


def _headers(folder):
    out = []
    for path in sorted(folder.rglob("*.dcm")):
        kind, ds = read_header(path)
        out.append((slice_header(path, ds), ds))
    return out


def test_sorting_follows_geometry_not_names_or_instance_numbers(tmp_path):
    p = _write_series(tmp_path / "a", seed=1)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    rng = np.random.default_rng(0)
    originals = sorted((tmp_path / "a" / "ct").glob("*.dcm"))
    for i, src in zip(rng.permutation(len(originals)), originals):
        shutil.copy(src, shuffled / f"x{(i * 7919) % 1000:03d}_{rng.integers(1e6)}.dcm")
    (series,), skipped = build_series(_headers(shuffled))
    assert not skipped
    assert np.all(np.diff(series.positions) > 0)
    for z, header in enumerate(series.slices):
        np.testing.assert_array_equal(
            read_hu(header.path)[10:20, 10:20], np.rint(p.hu[z])[10:20, 10:20]
        )
    instance = [int(pydicom.dcmread(h.path).InstanceNumber) for h in series.slices]
    assert instance == sorted(instance, reverse=True)  # InstanceNumber runs the other way


def test_two_series_in_one_folder(tmp_path):
    _write_series(tmp_path / "one", seed=1, n=4)
    _write_series(tmp_path / "two", seed=2, n=5)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, f in enumerate(sorted(tmp_path.glob("[ot]*/ct/*.dcm"))):
        shutil.copy(f, mixed / f"{i:03d}.dcm")
    series, skipped = build_series(_headers(mixed))
    assert sorted(len(s.slices) for s in series) == [4, 5]
    assert not skipped


def test_duplicate_positions_are_skipped(tmp_path):
    _write_series(tmp_path, seed=3, n=4)
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    shutil.copy(files[0], tmp_path / "ct" / "copy.dcm")
    ds = pydicom.dcmread(tmp_path / "ct" / "copy.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "ct" / "copy.dcm")
    (series,), skipped = build_series(_headers(tmp_path))
    assert len(series.slices) == 4
    assert [r for _, r in skipped] == ["duplicate slice position in its series"]


def test_a_slice_of_another_spacing_or_patient_leaves_its_series(tmp_path):
    """One slice of 0.7 mm pixels among 2.8 mm ones set the series' spacing (lungs of
    456 mL for 6.7 L); another patient's scan with the same series UID was merged in;
    and an odd first file had every other slice of its series skipped."""
    _write_series(tmp_path / "a", seed=5, n=5, patient_id="P1")
    _write_series(tmp_path / "b", seed=6, n=5, patient_id="P2")
    files = sorted((tmp_path / "a" / "ct").glob("*.dcm"))
    odd = pydicom.dcmread(files[0])  # the first file read: it set the reference before
    odd.PixelSpacing = [0.7, 0.7]
    odd.save_as(files[0])
    uid = str(pydicom.dcmread(files[1]).SeriesInstanceUID)
    other = sorted((tmp_path / "b" / "ct").glob("*.dcm"))[2]
    ds = pydicom.dcmread(other)
    ds.SeriesInstanceUID = uid  # one series UID for two patients' scans
    ds.ImagePositionPatient = [float(v) + 0.5 for v in ds.ImagePositionPatient]
    ds.save_as(tmp_path / "a" / "ct" / "zz_other.dcm")
    (series,), skipped = build_series(_headers(tmp_path / "a"))
    assert len(series.slices) == 4 and series.patient_id == "P1"
    assert sorted((p.name, r) for p, r in skipped) == [
        (files[0].name, "pixel spacing differs from the rest of its series"),
        ("zz_other.dcm", "patient or study differs from the rest of its series"),
    ]
    assert {h.spacing for h in series.slices} == {series.slices[0].spacing}


def test_series_affine_maps_voxels_to_patient_space(tmp_path):
    _write_series(tmp_path, seed=4, n=3)
    (series,), _ = build_series(_headers(tmp_path))
    affine = series.affine_lps()
    for k, header in enumerate(series.slices):
        np.testing.assert_allclose(affine @ [0, 0, k, 1], [*header.position, 1], atol=1e-6)
    dr, dc = series.slices[0].spacing
    np.testing.assert_allclose(
        affine @ [2, 3, 0, 1] - affine @ [0, 0, 0, 1], [3 * dc, 2 * dr, 0, 0], atol=1e-6
    )


def test_padding_range_becomes_air(tmp_path):
    path = _variant(tmp_path, "693_UNCR.dcm", PixelPaddingRangeLimit=100, RescaleSlope=0.5)
    stored = pydicom.dcmread(path).pixel_array.astype(np.float32)
    padded = (stored >= -2000) & (stored <= 100)  # PixelPaddingValue -2000 to the limit
    assert padded.any() and (~padded).any()
    for hu in (read_hu(path), scan_file(path)[1].read_hu()):  # pydicom's read and the offset
        assert (hu[padded] == HU_FLOOR).all()
        np.testing.assert_array_equal(
            hu[~padded], np.maximum(stored[~padded] * 0.5 - 1024, HU_FLOOR)
        )


def test_a_rescale_slope_of_zero_is_refused_not_taken_as_one():
    """RescaleSlope 0 maps every pixel to the intercept: it was read as 1, silently."""
    ds = pydicom.Dataset()
    assert HounsfieldRule.of(ds).slope == 1.0  # absent: the stored values are HU
    ds.RescaleSlope, ds.RescaleIntercept = "2.5", "-1024"
    assert (HounsfieldRule.of(ds).slope, HounsfieldRule.of(ds).intercept) == (2.5, -1024.0)
    ds.RescaleSlope = "0"
    with pytest.raises(SkipFile, match="RescaleSlope 0"):
        HounsfieldRule.of(ds)
