"""The synthetic CT phantom: anatomy, lesions by severity, DICOM and NIfTI files."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from data_tools.dicom_io import read_hu
from data_tools.phantom import LABELS, cohort_plan, main, make_patient, write_patient


def test_deterministic_for_a_seed():
    a = make_patient(11, 64, "covid", "moderate")
    b = make_patient(11, 64, "covid", "moderate")
    c = make_patient(12, 64, "covid", "moderate")
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.lesions, b.lesions)
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)


def test_anatomy_intensities():
    p = make_patient(3, 128, "healthy", "none")
    assert 20 <= p.hu.shape[0] <= 40
    lungs = ndimage.binary_erosion(p.lung, iterations=2)
    assert -900 < np.median(p.hu[lungs]) < -800  # lung parenchyma
    corner = p.hu[:, :10, :10]
    assert abs(np.median(corner) + 1000) < 30  # air around the patient
    assert (p.hu > 500).sum() > 0  # bone: ribs, spine, sternum
    body = p.hu[:, 64, :]
    assert ((body > -150) & (body < -50)).any()  # subcutaneous fat
    assert not p.lesions.any()


@pytest.mark.parametrize("kind, low, high", [("ggo", -750, -250), ("consolidation", -150, 100)])
def test_lesion_intensities(kind, low, high):
    p = make_patient(4, 256, "covid", "severe")
    pixels = p.lesions == LABELS[kind]
    assert pixels.sum() > 50
    assert low < np.median(p.hu[pixels]) < high


def test_burden_grows_with_severity_and_lesions_cover_some_slices():
    burden = {}
    for severity in ("mild", "moderate", "severe"):
        ratios = []
        for seed in range(4):
            p = make_patient(100 + seed, 64, "covid", severity)
            ratios.append((p.lesions > 0).sum() / p.lung.sum())
            with_lesion = (p.lesions > 0).any(axis=(1, 2))
            assert 0 < with_lesion.sum() < len(with_lesion)
        burden[severity] = np.mean(ratios)
    assert burden["mild"] < burden["moderate"] < burden["severe"]
    severe = make_patient(7, 128, "covid", "severe")
    assert (severe.lesions == LABELS["fibrosis"]).any()


def test_other_pneumonias_are_not_labelled_but_visible():
    # Same seed, same anatomy (patients differ only in their lesions).
    healthy = make_patient(21, 128, "healthy", "none")
    bacterial = make_patient(21, 128, "bacterial", "none")
    viral = make_patient(21, 128, "viral", "none")
    np.testing.assert_array_equal(healthy.lung, bacterial.lung)
    for p in (healthy, bacterial, viral):
        assert not p.lesions.any()

    def dense_lung(p, low, high):
        return ((p.hu > low) & (p.hu < high) & p.lung).sum()

    # Bacterial: consolidation (soft-tissue density where the healthy twin has aerated
    # lung), in one lung, with air bronchograms: air enclosed by the consolidation.
    assert dense_lung(bacterial, -200, 200) > 1.5 * dense_lung(healthy, -200, 200) + 500
    gained = (bacterial.hu > -200) & (healthy.hu < -500) & bacterial.lung
    columns = gained.sum(axis=(0, 1))
    middle = len(columns) // 2
    assert max(columns[:middle].sum(), columns[middle:].sum()) > 0.9 * columns.sum()

    def enclosed_air(p):
        dense = (p.hu > -200) & p.lung
        closed = ndimage.binary_closing(dense, structure=np.ones((1, 5, 5)))
        return ((p.hu < -500) & closed & ~dense & p.lung).sum()

    assert enclosed_air(bacterial) > 1.5 * enclosed_air(healthy) + 50
    # Viral: thickened bronchial walls and tree-in-bud (soft tissue in the lung beyond a
    # healthy lung's vessels), faint peribronchovascular ground glass.
    assert dense_lung(viral, -350, 100) > 1.2 * dense_lung(healthy, -350, 100) + 100
    assert dense_lung(viral, -700, -450) > dense_lung(healthy, -700, -450) + 300


def test_anatomy_structures():
    """Spine, heart, trachea, bronchial and vascular trees, ribs: where a chest has them."""
    p = make_patient(3, 256, "healthy", "none")
    z_count = p.hu.shape[0]
    middle = p.hu[z_count // 2]
    rows, cols = middle.shape
    # Vertebral body behind the mediastinum, bone density, on the midline.
    spine = middle[int(rows * 0.6) :, cols // 2 - 8 : cols // 2 + 8]
    assert (spine > 400).sum() > 30
    # The trachea, air in the mediastinum, in the upper chest only.
    top = p.hu[int(z_count * 0.85)]
    centre = top[rows // 3 : 2 * rows // 3, cols // 2 - 10 : cols // 2 + 10]
    assert (centre < -900).sum() > 10
    # Vessels: soft-tissue density inside the lungs, more of it near the hila than at
    # the periphery (they taper as they branch outwards).
    lung = p.lung
    distance = ndimage.distance_transform_edt(lung, sampling=(1e3, 1.4, 1.4))  # in-plane
    vessel = lung & (p.hu > -300)
    lateral = np.abs(np.arange(cols) - cols / 2) > 0.3 * cols  # away from the hila
    deep, shallow = lung & (distance > 15), lung & (distance < 6) & lateral
    assert vessel[deep].mean() > 2 * vessel[shallow].mean() > 0
    # Lungs are denser towards the back (supine), as real lungs are.
    z = z_count // 2
    ys = np.nonzero(lung[z])[0]
    front = lung[z] & (np.arange(rows)[:, None] < np.percentile(ys, 30))
    back = lung[z] & (np.arange(rows)[:, None] > np.percentile(ys, 70))
    assert np.median(p.hu[z][back]) > np.median(p.hu[z][front]) + 15
    # Ribs on the chest wall: several separate bone pieces around the lungs.
    assert ndimage.label(middle > 400)[1] >= 10


@pytest.mark.parametrize("signed", [True, False])
def test_written_series_decodes_to_the_phantom(tmp_path, signed):
    p = make_patient(5, 64, "covid", "moderate", n_slices=6)
    write_patient(p, tmp_path, patient_id="X-1", patient_name="TEST^ONE", signed=signed)
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    assert len(files) == 6
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.PixelRepresentation == (1 if signed else 0)
    assert float(ds.RescaleIntercept) == (0.0 if signed else -1024.0)
    assert ds.InstanceNumber == 6  # head first: numbering runs against z
    yy, xx = np.mgrid[:64, :64]
    fov = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 <= 32**2
    for z, f in enumerate(files):
        hu = read_hu(f)
        np.testing.assert_array_equal(hu[fov], np.rint(p.hu[z])[fov])
        assert float(pydicom.dcmread(f).ImagePositionPatient[2]) == pytest.approx(
            -150 + z * p.spacing_mm[2]
        )
    mask = nib.load(tmp_path / "lesions.nii.gz")
    np.testing.assert_array_equal(np.asarray(mask.dataobj).transpose(2, 1, 0), p.lesions)


def test_cli_writes_cohort_and_manifest(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--patients", "3", "--seed", "2", "--size", "32"]) == 0
    with (tmp_path / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["diagnosis"], r["severity"]) for r in rows] == cohort_plan(3, 2)
    for i, row in enumerate(rows):
        assert len(list((tmp_path / f"case_{i:04d}" / "ct").glob("*.dcm"))) == int(row["slices"])
    assert "slices/s" in capsys.readouterr().out


def test_pneumonia_mix_has_more_hard_negatives(tmp_path):
    plan = cohort_plan(30, 0, "pneumonia")
    diagnoses = [d for d, _ in plan]
    counts = {d: diagnoses.count(d) for d in ("covid", "healthy", "bacterial", "viral")}
    assert counts == {"covid": 15, "healthy": 3, "bacterial": 6, "viral": 6}
    covid = [s for d, s in plan if d == "covid"]
    assert (covid.count("mild"), covid.count("moderate"), covid.count("severe")) == (6, 6, 3)
    with pytest.raises(ValueError, match="unknown cohort mix 'lots'"):
        cohort_plan(10, 0, "lots")
    args = ["--out", str(tmp_path), "--patients", "4", "--seed", "2", "--size", "32"]
    assert main([*args, "--mix", "pneumonia"]) == 0
    with (tmp_path / "manifest.csv").open() as f:
        rows = [(r["diagnosis"], r["severity"]) for r in csv.DictReader(f)]
    assert rows == cohort_plan(4, 2, "pneumonia") != cohort_plan(4, 2)


def test_slice_range_sets_slices_per_patient_over_the_same_chest(tmp_path, capsys):
    thin = make_patient(5, 32, "covid", "severe")
    thick = make_patient(5, 32, "covid", "severe", slice_range=(6, 8))
    assert 20 <= thin.hu.shape[0] <= 40 and 6 <= thick.hu.shape[0] <= 8
    # Same 300 mm of chest: the spacing grows as the slices get fewer.
    for p in (thin, thick):
        assert p.spacing_mm[2] * p.hu.shape[0] == pytest.approx(300.0)
    assert thick.lesions.any()  # the lesions are still cut by the fewer slices
    args = ["--out", str(tmp_path), "--patients", "3", "--seed", "2", "--size", "32"]
    assert main([*args, "--slices", "5", "7"]) == 0
    with (tmp_path / "manifest.csv").open() as f:
        counts = [int(r["slices"]) for r in csv.DictReader(f)]
    assert counts and all(5 <= n <= 7 for n in counts)
    for bad in (["3", "8"], ["9", "8"]):
        with pytest.raises(SystemExit):
            main([*args, "--slices", *bad])
        assert "--slices: slices per patient must satisfy 4 <= low <= high" in (
            capsys.readouterr().err
        )


def test_cohort_plan_is_balanced():
    plan = cohort_plan(20, 0)
    diagnoses = [d for d, _ in plan]
    assert diagnoses.count("covid") == 12
    assert {d for d in diagnoses} == {"covid", "healthy", "bacterial", "viral"}
    covid = [s for d, s in plan if d == "covid"]
    assert covid.count("mild") == covid.count("moderate") == covid.count("severe") == 4


def test_the_phantom_figure_shows_one_slice_per_diagnosis_and_severity(tmp_path, capsys):
    from PIL import Image

    from data_tools.phantom_figure import CASES, main, pick_slice

    assert len({d for d, _ in CASES}) == 4 and [s for d, s in CASES if d == "covid"] == [
        "mild", "moderate", "severe"
    ]  # fmt: skip
    out = tmp_path / "docs" / "phantom.png"
    assert main(["--out", str(out), "--size", "64"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height
    assert not list(out.parent.glob(".*tmp"))
    # The slice with the most labelled lesion; without labels, the most dense lung.
    hu = np.full((3, 4, 4), -900.0, np.float32)
    lung = np.ones((3, 4, 4), bool)
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[1, :2] = 1
    labels[2, 0, 0] = 2
    hu[2] = -300.0
    assert pick_slice(hu, labels, lung) == 1
    assert pick_slice(hu, np.zeros_like(labels), lung) == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err


def test_the_figure_refuses_what_it_cannot_write(tmp_path, capsys):
    """A .jpg name got PNG bytes; a file in the way and a negative seed were tracebacks."""
    from data_tools.phantom_figure import main as figure_main

    (tmp_path / "afile").write_text("x")
    for argv, message in (
        (["--out", str(tmp_path / "f.jpg")], "name it *.png"),
        (["--out", str(tmp_path / "afile" / "f.png")], "is a file"),
        (["--out", str(tmp_path / "f.png"), "--seed", "-1"], "--seed must be in"),
    ):
        with pytest.raises(SystemExit) as stop:
            figure_main([*argv, "--size", "32"])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "f.jpg").exists() and not (tmp_path / "f.png").exists()


def test_the_cohort_command_refuses_bad_outputs_and_replaces_its_own(tmp_path, capsys):
    """--out a file, a huge --size (37 GiB) and a negative seed were tracebacks; a smaller
    cohort written over a larger one left its extra cases for the converter to take in."""
    small = ["--size", "32", "--slices", "4", "5"]
    (tmp_path / "afile").write_text("x")
    for argv, message in (
        (["--out", str(tmp_path / "afile")], "is a file"),
        (["--out", str(tmp_path / "big"), "--size", "100000"], "--size must be an even number"),
        (["--out", str(tmp_path / "neg"), "--seed", "-1"], "--seed must be in"),
    ):
        with pytest.raises(SystemExit) as stop:
            main([*argv, *small[2:]] if "--size" in argv else [*argv, *small])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "big").exists()
    out = tmp_path / "cohort"
    assert main(["--out", str(out), "--patients", "3", *small]) == 0
    assert main(["--out", str(out), "--patients", "1", *small]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case_0000", "manifest.csv"]
    # A folder of the user's own files is never cleared.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        main(["--out", str(mine), "--patients", "1", *small])
    assert "holds no phantom cohort (notes.txt)" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"
