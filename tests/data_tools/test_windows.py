"""Estimating the HU window of 8-bit windowed slices from tissue peaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from data_tools import windows
from data_tools.dicom_io import read_hu

ROOT = Path(__file__).resolve().parents[2]
SEMISEG = ROOT.parent / "shared" / "data" / "covid-semiseg" / "train" / "Imgs"


def _chest_hu(rng, n=4, size=48):
    """Slices in HU: soft tissue around 40 HU with two lungs around -850 HU."""
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        hu = rng.normal(40, 15, (size, size))
        for cx in (size * 0.3, size * 0.7):
            lung = ((xx - cx) / (size * 0.15)) ** 2 + ((yy - size / 2) / (size * 0.3)) ** 2 < 1
            hu[lung] = rng.normal(-850, 20, lung.sum())
        out.append(hu.astype(np.float32))
    return np.stack(out)


def test_the_window_of_windowed_slices_is_recovered():
    hu = _chest_hu(np.random.default_rng(0))
    truth = (-1200.0, 300.0)
    grey = np.rint(windows.apply_window(hu, truth))  # 8-bit, as a JPEG stores it
    estimate = windows.window_from_peaks(windows.grey_peaks(grey), windows.hu_peaks(hu))
    assert estimate == pytest.approx(truth, abs=40)


def test_soft_tissue_darker_than_lung_is_refused():
    with pytest.raises(ValueError, match="not brighter"):
        windows.window_from_peaks(
            {"lung": 200, "soft_tissue": 150}, {"lung": -850, "soft_tissue": 40}
        )


@pytest.mark.skipif(not SEMISEG.is_dir(), reason=f"COVID-SemiSeg slices not found at {SEMISEG}")
def test_real_ct_windowed_by_the_estimate_looks_like_the_jpegs(capsys):
    """pydicom's CT_small (real HU CT) through the window estimated from the COVID-SemiSeg
    JPEGs puts lung and soft tissue at the JPEGs' grey levels."""
    assert windows.main(["--images", str(SEMISEG)]) == 0
    printed = capsys.readouterr().out
    low, high = (float(v) for v in printed.split("window: [")[1].split("]")[0].split(","))
    assert -1150 < low < -900 and 100 < high < 350  # a wide lung window
    grey = windows.grey_peaks(*windows._read_images(SEMISEG))
    ct = windows.apply_window(read_hu(Path(get_testdata_file("CT_small.dcm"))), (low, high))
    seen = windows.grey_peaks([ct])
    assert seen["lung"] == pytest.approx(grey["lung"], abs=4)
    assert seen["soft_tissue"] == pytest.approx(grey["soft_tissue"], abs=4)


def test_bad_folders_are_named(tmp_path, capsys):
    assert windows.main(["--images", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no .png/.jpg images" in capsys.readouterr().err
    assert windows.main(["--images", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_the_image_or_ct_at_fault_is_named(tmp_path, capsys):
    """A 16-bit slice, a blank slice, a --ct that is no DICOM file or is missing: the
    errors named none of them ("no value between 5 and 128")."""
    from PIL import Image

    rng = np.random.default_rng(0)
    good = windows.apply_window(_chest_hu(rng, n=1)[0], (-1000.0, 200.0)).astype(np.uint8)
    folder = tmp_path / "slices"
    folder.mkdir()
    Image.fromarray(good).save(folder / "a.png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(folder / "blank.png")
    assert windows.main(["--images", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"--images {folder}: blank.png: 1 grey level: a mask, label or blank image" in err
    (folder / "blank.png").unlink()
    Image.fromarray(good.astype(np.uint16) * 200).save(folder / "deep.png")
    assert windows.main(["--images", str(folder)]) == 2
    assert "deep.png: " in capsys.readouterr().err
    (folder / "deep.png").unlink()
    (tmp_path / "notes.dcm").write_text("not dicom")
    for ct in (tmp_path / "notes.dcm", tmp_path / "missing.dcm"):
        assert windows.main(["--images", str(folder), "--ct", str(ct)]) == 2
        assert f"error: --ct {ct}: " in capsys.readouterr().err
