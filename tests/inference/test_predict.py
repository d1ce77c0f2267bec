"""python -m tfcovseg.predict: a DICOM study or NIfTI volume to masks, SEG, overlay, report."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from data_tools import dicom_io
from data_tools.lung import LESION_RULE, lesions_in_lung, lung_mask
from data_tools.masks import nifti_labels_on_series, seg_labels_on_series
from tfcovseg.cli.predict import main
from tfcovseg.constants import DISCLAIMER
from tfcovseg.evaluation.burden import burden_percent
from tfcovseg.evaluation.verdict import classifier_problem
from tfcovseg.inference.errors import PredictionError
from tfcovseg.inference.measures import burden_call
from tfcovseg.inference.predict import _label_volume, predict
from tfcovseg.inference.predictors import open_model
from tfcovseg.inference.studies import read_input

SALT = "test-salt"
QUIET = dict(salt=SALT, log=lambda *a: None)


@pytest.fixture(scope="module")
def model(phantom_export):
    return open_model(phantom_export)


def _series(folder: Path) -> dicom_io.DicomSeries:
    headers = []
    for path in sorted(folder.glob("*.dcm")):
        _, ds = dicom_io.read_header(path)
        headers.append((dicom_io.slice_header(path, ds), ds))
    (series,), _ = dicom_io.build_series(headers)
    return series


def _only_folder(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def test_dicom_study_outputs_align_with_the_series(model, phantom_run, tmp_path):
    case = phantom_run.cohort / "case_0000"
    index = predict(model, case, tmp_path / "out", gate=False, **QUIET)
    folder = _only_folder(tmp_path / "out")
    assert [s["folder"] for s in index["series"]] == [folder.name]
    for name in (
        "lesions.nii.gz",
        "probability_ggo.nii.gz",
        "probability_consolidation.nii.gz",
        "probability_fibrosis.nii.gz",
        "overlay.png",
        "report.json",
        "report.html",
    ):
        assert (folder / name).is_file(), name
    report = json.loads((folder / "report.json").read_text())
    series = _series(case / "ct")
    hu = np.stack([dicom_io.read_hu(s.path) for s in series.slices])
    raw = _label_volume(model.segment(hu), hu.shape, 0.5)
    # Only lesions in the lung (within the margin of a lung mask computed here) count.
    spacing = report["study"]["spacing_mm"]
    lung = lung_mask(hu, spacing[:2])
    counted, dropped = lesions_in_lung(raw > 0, lung, spacing[:2])
    expected = np.where(counted, raw, 0)
    assert dropped > 0 and (raw > 0).sum() > dropped  # the untrained network marks the body
    voxel_ml = np.prod(spacing) / 1000
    assert report["outside_lung"]["volume_ml"] == pytest.approx(dropped * voxel_ml, abs=1e-2)
    # The label volume lands on the series grid (read back through both affines) ...
    np.testing.assert_array_equal(
        nifti_labels_on_series(folder / "lesions.nii.gz", series), expected
    )
    # ... and in the physical space of the phantom's own lesion NIfTI, written independently.
    ours = nib.as_closest_canonical(nib.load(folder / "lesions.nii.gz"))
    theirs = nib.as_closest_canonical(nib.load(case / "lesions.nii.gz"))
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)
    prob = nib.load(folder / "probability_ggo.nii.gz")
    assert prob.shape == (64, 64, len(series.slices)) and prob.get_data_dtype() == np.float32
    # Volumes: voxels x voxel size; percentages of the lung; the severity from the rule.
    voxel_ml = np.prod(report["study"]["spacing_mm"]) / 1000
    for c, name in enumerate(report["model"]["classes"]):
        assert report["lesions"][name]["volume_ml"] == pytest.approx(
            (expected == c + 1).sum() * voxel_ml, abs=1e-2
        )
        assert report["lesions"][name]["slices"] == [
            int(z) for z in np.nonzero((expected == c + 1).any(axis=(1, 2)))[0]
        ]
    assert report["gate"] == {
        "enabled": False,
        "threshold": report["gate"]["threshold"],
        "method": "--no-gate",
        "slices_segmented": len(series.slices),
        "slices_unreadable": 0,
    }
    assert report["disclaimer"] == DISCLAIMER and DISCLAIMER in (folder / "report.html").read_text()
    assert report["model"]["model_version"] == 1
    assert report["severity"]["grade"] in (None, "none", "mild", "moderate", "severe", "unknown")
    assert len(report["covid"]["slice_probabilities"]) == len(series.slices)
    # The lesion-burden call: this study's total lesion / lung ratio against the export's t.
    call, rule = report["covid"]["lesion_burden"], model.metadata["burden_rule"]
    assert call["ratio"] == report["severity"]["total_lesion_lung_ratio"]
    assert call["threshold"] == pytest.approx(rule["threshold"])
    assert call["positive"] is (call["ratio"] >= rule["threshold"])
    # One verdict, by the rule the export validated, the other rule's figure as evidence.
    verdict = report["verdict"]
    expected_rule = (
        "lesion burden" if classifier_problem(model.metadata["gate"]) else ("slice classifier")
    )
    assert verdict["rule"] == expected_rule and verdict["evidence"][0]["rule"] == expected_rule
    assert {e["rule"] for e in verdict["evidence"]} == {"lesion burden", "slice classifier"}
    if verdict["rule"] == "lesion burden":
        assert verdict["call"] == ("COVID-19" if call["positive"] else "not COVID-19")
    if verdict["call"] != "COVID-19":
        assert report["severity"]["grade"] is None
    page = (folder / "report.html").read_text()
    assert f"Verdict: <strong>{verdict['call']}</strong>" in page and "Evidence (each rule" in page
    # The total's percentage is the verdict's own figure, rounded once.
    percent = report["total"]["percent_of_lung"]
    assert percent == call["percent_of_lung"] == burden_percent(call["ratio"])
    assert f"<td><strong>total</strong></td><td>{report['total']['volume_ml']:.1f}</td>" in page
    assert f"</td><td>{percent:.2f}</td>" in page.split("<strong>total</strong>")[1]
    # The DICOM SEG references the source instances and holds the same labels.
    assert expected.any()  # the untrained network marks plenty
    seg = pydicom.dcmread(folder / "segmentation.dcm")
    assert seg.Modality == "SEG"
    referenced = {
        r.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence
        for r in item.ReferencedInstanceSequence
    }
    assert referenced == {s.sop_uid for s in series.slices}
    np.testing.assert_array_equal(
        seg_labels_on_series(folder / "segmentation.dcm", series, report["model"]["classes"]),
        expected,
    )


def test_burden_call_against_the_exports_threshold():
    counted = {"lesion_rule": LESION_RULE}
    assert burden_call(0.004, {"threshold": 0.003} | counted)["positive"] is True
    assert burden_call(0.002, {"threshold": 0.003} | counted)["positive"] is False
    assert burden_call(0.003, {"threshold": 0.003} | counted)["positive"] is True  # at t
    # Models exported before the rule existed (or without validation records) make no call.
    for rule in (None, {}, {"threshold": None, "method": "off"}):
        call = burden_call(0.5, rule)
        assert call["positive"] is None and call["threshold"] is None and call["ratio"] == 0.5
        assert call["rule"].startswith("no call: the export chose no threshold, as ")
    # The reason flat, without nested brackets (the verdict wraps it in its own sentence).
    assert (
        burden_call(0.1, {"method": "off: every patient is COVID-19"})["rule"]
        == "no call: the export chose no threshold, as every patient is COVID-19"
    )
    # t holds at the mask threshold it was chosen at; another one makes no call.
    rule = {"threshold": 0.003, "mask_threshold": 0.5} | counted
    assert burden_call(0.004, rule, 0.5)["positive"] is True
    other = burden_call(0.004, rule, 0.3)
    assert other["positive"] is None and "mask threshold 0.5" in other["rule"]
    # ... and for ratios counted the same way: a t chosen on all predicted voxels (exports
    # before lesions outside the lung were dropped) makes no call.
    old = burden_call(0.004, {"threshold": 0.003, "mask_threshold": 0.5}, 0.5)
    assert old["positive"] is None and "export the model again" in old["rule"]
    # A study that cannot support a ratio makes none either.
    single = burden_call(0.004, rule, 0.5, ["a single slice"])
    assert single["positive"] is None and "a single slice" in single["rule"]


def test_no_phi_in_names_or_reports(model, phantom_run, tmp_path):
    predict(model, phantom_run.cohort / "case_0001", tmp_path / "out", **QUIET)
    ds = pydicom.dcmread(next((phantom_run.cohort / "case_0001" / "ct").glob("*.dcm")))
    secrets = [
        str(ds.PatientName),
        str(ds.PatientID),
        str(ds.PatientBirthDate),
        ds.SeriesInstanceUID,
    ]
    for path in (tmp_path / "out").rglob("*"):
        assert not any(s in path.name for s in secrets), path
        if path.suffix in (".json", ".html"):
            text = path.read_text()
            assert not any(s in text for s in secrets + ["PHANTOM^CASE"]), path


def test_the_gate_segments_only_the_slices_it_passes(model, phantom_run, tmp_path):
    case = phantom_run.cohort / "case_0002"
    predict(model, case, tmp_path / "all", gate=False, **QUIET)
    full = json.loads((_only_folder(tmp_path / "all") / "report.json").read_text())
    probs = np.array(full["covid"]["slice_probabilities"])
    t = float(np.median(probs))
    predict(model, case, tmp_path / "gated", threshold=t, **QUIET)
    folder = _only_folder(tmp_path / "gated")
    gated = json.loads((folder / "report.json").read_text())
    passed = probs >= t - 1e-4
    assert 0 < gated["gate"]["slices_segmented"] < len(probs)
    assert abs(gated["gate"]["slices_segmented"] - passed.sum()) <= 1
    labels = np.asarray(nib.load(folder / "lesions.nii.gz").dataobj)  # [rows, cols, slices]
    full_labels = np.asarray(nib.load(_only_folder(tmp_path / "all") / "lesions.nii.gz").dataobj)
    # Slices clearly below the threshold were not segmented; those clearly above were,
    # exactly as without the gate.
    assert not labels[..., probs < t - 1e-4].any() and full_labels[..., probs < t - 1e-4].any()
    sure = probs >= t + 1e-4
    np.testing.assert_array_equal(labels[..., sure], full_labels[..., sure])
    # A gate nothing passes: no lesion, no SEG, and the report says so.
    predict(model, case, tmp_path / "none", threshold=1.0, **QUIET)
    report = json.loads((_only_folder(tmp_path / "none") / "report.json").read_text())
    assert report["gate"]["slices_segmented"] == 0 and report["total"]["volume_ml"] == 0
    # No lesion: not called COVID-19, so no severity grade (the grade says why).
    call = report["verdict"]["call"]
    assert call != "COVID-19" and report["severity"]["grade"] is None
    assert f"the verdict is {call}" in report["severity"]["not_graded"]
    assert "dicom_seg" not in report["outputs"] and any(
        "no DICOM SEG" in w for w in report["warnings"]
    )


def test_run_folder_and_savedmodel_agree(model, phantom_run, tmp_path):
    case = phantom_run.cohort / "case_0003"
    predict(model, case, tmp_path / "saved", gate=False, **QUIET)
    predict(phantom_run.run, case, tmp_path / "run", gate=False, **QUIET)
    a = json.loads((_only_folder(tmp_path / "saved") / "report.json").read_text())
    b = json.loads((_only_folder(tmp_path / "run") / "report.json").read_text())
    np.testing.assert_allclose(
        a["covid"]["slice_probabilities"], b["covid"]["slice_probabilities"], atol=1e-3
    )
    assert b["model"]["source"].startswith("run folder")
    assert a["gate"]["threshold"] == pytest.approx(b["gate"]["threshold"], abs=1e-5)
    for name in a["lesions"]:
        assert a["lesions"][name]["volume_ml"] == pytest.approx(
            b["lesions"][name]["volume_ml"], rel=0.01, abs=1.0
        )


def test_nifti_input_gives_the_same_result_as_its_dicom(model, phantom_run, tmp_path):
    case = phantom_run.cohort / "case_0004"
    series = _series(case / "ct")
    hu = np.stack([dicom_io.read_hu(s.path) for s in series.slices])
    # The CT as NIfTI on the series geometry (voxel (row, column, slice), RAS affine).
    from data_tools.masks import RAS_FROM_LPS

    affine = RAS_FROM_LPS @ series.affine_lps()
    nib.save(nib.Nifti1Image(np.moveaxis(hu, 0, 2), affine), tmp_path / "ct.nii.gz")
    predict(model, case, tmp_path / "dicom", gate=False, **QUIET)
    predict(model, tmp_path / "ct.nii.gz", tmp_path / "nifti", gate=False, **QUIET)
    from_dicom = nib.as_closest_canonical(
        nib.load(_only_folder(tmp_path / "dicom") / "lesions.nii.gz")
    )
    from_nifti = nib.load(_only_folder(tmp_path / "nifti") / "lesions.nii.gz")
    np.testing.assert_allclose(from_nifti.affine, from_dicom.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(from_nifti.dataobj), np.asarray(from_dicom.dataobj))
    report = json.loads((_only_folder(tmp_path / "nifti") / "report.json").read_text())
    assert report["study"]["input"] == "nifti" and "dicom_seg" not in report["outputs"]
    # Slices 100 times too far apart (a wrong pixdim): lungs of ~150 L were graded
    # "severe" without a word; they are named and left ungraded.
    nib.save(nib.Nifti1Image(np.moveaxis(hu, 0, 2), affine @ np.diag([1, 1, 100, 1])),
             tmp_path / "far.nii.gz")  # fmt: skip
    predict(model, tmp_path / "far.nii.gz", tmp_path / "far", gate=False, **QUIET)
    far = json.loads((_only_folder(tmp_path / "far") / "report.json").read_text())
    assert any("above the 12000 mL" in w and "spacing" in w for w in far["warnings"])
    assert far["severity"]["grade"] in (None, "not graded")


def test_several_series_corrupt_files_gaps_and_other_modalities(model, phantom_run, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(phantom_run.cohort / "case_0005" / "ct", study / "a")
    shutil.copytree(phantom_run.cohort / "case_0006" / "ct", study / "b")
    (study / "a" / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 50)
    (study / "notes.txt").write_text("reading notes")
    (study / ".DS_Store").write_bytes(b"\x00")
    mr = pydicom.dcmread(next((study / "b").glob("*.dcm")))
    mr.Modality = "MR"
    mr.SeriesInstanceUID = "1.2.3.4.5"
    mr.save_as(study / "mr.dcm")
    files_b = sorted(
        (study / "b").glob("*.dcm"), key=lambda p: int(pydicom.dcmread(p).ImagePositionPatient[2])
    )
    files_b[4].unlink()  # a gap after the fifth slice: the first four slices go
    index = predict(model, study, tmp_path / "out", **QUIET)
    assert len(index["series"]) == 2
    skipped = {s["file"]: s["reason"] for s in index["skipped"]}
    assert "modality MR is not CT" in skipped["mr.dcm"]
    assert "broken.dcm" in " ".join(skipped)
    assert skipped["notes.txt"] == "not a DICOM file (by its name), ignored"
    assert ".DS_Store" not in skipped  # hidden files are not worth a line
    reports = [
        json.loads((tmp_path / "out" / s["folder"] / "report.json").read_text())
        for s in index["series"]
    ]
    gapped = [r for r in reports if r["warnings"] and "gap" in r["warnings"][0]]
    assert len(gapped) == 1
    assert gapped[0]["study"]["slices"] == len(files_b) - 1 - 4
    assert len([s for s in gapped[0]["skipped"] if "gap" in s["reason"]]) == 4
    # Each series' report also says what of the study was left out, and why.
    for report in reports:
        study_level = {s["file"]: s["reason"] for s in report["skipped"] if s["scope"] == "study"}
        assert "modality MR is not CT" in study_level["mr.dcm"]
    # --series picks one (by its pseudonym, as the reports show it).
    chosen = index["series"][0]["series"]
    one = predict(model, study, tmp_path / "one", series_uid=chosen, **QUIET)
    assert [s["series"] for s in one["series"]] == [chosen]
    with pytest.raises(PredictionError, match="is not among"):
        predict(model, study, tmp_path / "bad", series_uid="9.9.9", **QUIET)


def test_real_dicom_ct_file(model, tmp_path):
    """pydicom's CT_small.dcm: a real scanner slice (128 x 128, one slice)."""
    folder = tmp_path / "ct"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "slice.dcm")
    index = predict(model, folder, tmp_path / "out", gate=False, **QUIET)
    report = json.loads(
        (tmp_path / "out" / index["series"][0]["folder"] / "report.json").read_text()
    )
    assert report["study"]["slices"] == 1 and report["study"]["rows"] == 128
    assert nib.load(tmp_path / "out" / index["series"][0]["folder"] / "lesions.nii.gz").shape == (
        128,
        128,
        1,
    )


def test_errors_exit_2_and_keep_what_exists(phantom_export, phantom_run, tmp_path, capsys):
    args = ["--model", str(phantom_export), "--salt", SALT]
    assert main(args + ["--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.dcm").write_bytes(b"not dicom at all")
    assert main(args + ["--input", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert "no usable CT series" in capsys.readouterr().err
    # A list of studies or one image given as --input: what to do instead is named.
    for name, hint in (("studies.txt", "add --runner direct"), ("slice.jpg", "as a folder")):
        (tmp_path / name).write_text("x")
        assert main(args + ["--input", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        assert hint in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--input", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert "neither a SavedModel" in capsys.readouterr().err
    case = str(phantom_run.cohort / "case_0007")
    assert main(args + ["--input", case, "--out", str(tmp_path / "o"), "--threshold", "0.2"]) == 0
    folder = _only_folder(tmp_path / "o")
    before = (folder / "report.json").read_bytes()
    assert main(args + ["--input", case, "--out", str(tmp_path / "o")]) == 2
    assert "already holds results" in capsys.readouterr().err
    assert (folder / "report.json").read_bytes() == before
    assert main(args + ["--input", case, "--out", str(tmp_path / "p"), "--threshold", "2"]) == 2
    # Another tool's index.json (valid JSON) raised a TypeError after the series was written.
    for text in ("[1, 2, 3]", '{"series": "oops"}', '{"series": [1]}'):
        other = tmp_path / f"other{len(text)}"
        other.mkdir()
        (other / "index.json").write_text(text)
        assert main(args + ["--input", case, "--out", str(other)]) == 2
        assert "is not an index predict wrote" in capsys.readouterr().err
        assert sorted(p.name for p in other.iterdir()) == ["index.json"]


def test_read_input_redacts_identifiers_from_skip_reasons(phantom_run, tmp_path):
    ds = pydicom.dcmread(next((phantom_run.cohort / "case_0000" / "ct").glob("*.dcm")))
    folder = tmp_path / "in"
    shutil.copytree(phantom_run.cohort / "case_0000" / "ct", folder)
    name = str(ds.PatientName).replace("^", "_")
    (folder / f"{name}.dcm").write_bytes(b"garbage")
    volumes, skipped = read_input(folder, salt=SALT)
    assert len(volumes) == 1 and len(skipped) == 1
    assert name not in skipped[0][0] and "<patient>" in skipped[0][0]


def test_unreadable_slices_stay_in_place_and_bad_headers_are_skipped(model, phantom_run, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(phantom_run.cohort / "case_0002" / "ct", study)
    files = sorted(
        study.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])
    )
    n = len(files)
    # Pixel data cut short: the header reads, the pixels do not.
    broken = files[n // 2]
    broken.write_bytes(broken.read_bytes()[:-4000])
    # A copy with a one-value PixelSpacing, named by its UID (as PACS exports do).
    bad = pydicom.dcmread(files[0])
    bad.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    bad.PixelSpacing = [0.7]
    bad.save_as(study / f"{bad.SOPInstanceUID}.dcm")
    index = predict(model, study, tmp_path / "out", gate=False, **QUIET)
    folder = tmp_path / "out" / index["series"][0]["folder"]
    report = json.loads((folder / "report.json").read_text())
    assert report["study"]["slices"] == n  # the grid stays whole
    assert any("unreadable" in w for w in report["warnings"])
    # The slice left empty is neither segmented nor scored (it was, as air).
    assert report["gate"]["slices_unreadable"] == 1
    assert report["gate"]["slices_segmented"] == n - 1
    assert report["covid"]["slice_probabilities"][n // 2] == 0.0
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert "left empty" in reasons[broken.name]
    assert any("malformed geometry" in r for r in reasons.values())
    text = (tmp_path / "out" / "index.json").read_text() + json.dumps(report)
    assert bad.SOPInstanceUID not in text and "<uid>" in text
    labels = np.asarray(nib.load(folder / "lesions.nii.gz").dataobj)
    assert not labels[..., n // 2].any()


def test_index_keeps_earlier_studies(model, phantom_run, tmp_path):
    out = tmp_path / "out"
    predict(model, phantom_run.cohort / "case_0003", out, gate=False, **QUIET)
    predict(model, phantom_run.cohort / "case_0004", out, gate=False, **QUIET)
    index = json.loads((out / "index.json").read_text())
    assert len(index["series"]) == 2
    assert sorted(s["folder"] for s in index["series"]) == sorted(
        p.name for p in out.iterdir() if p.is_dir()
    )
    report = json.loads((out / index["series"][0]["folder"] / "report.json").read_text())
    assert report["gate"]["enabled"] is False and report["gate"]["method"] == "--no-gate"


def test_display_geometry_and_lung_sides_follow_the_series_orientation(phantom_run):
    import types

    from tfcovseg.inference.measures import lung_sides
    from tfcovseg.inference.studies import Volume, display_geometry

    (volume,), _ = read_input(phantom_run.cohort / "case_0001" / "ct", salt=SALT)
    markers, z = display_geometry(volume)
    # The phantom is written in the usual axial orientation: rows anterior to posterior,
    # columns the patient's right to left; z is each slice's position (superior +).
    assert markers == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    files = sorted(
        (pydicom.dcmread(f, stop_before_pixels=True) for f in (phantom_run.cohort / "case_0001"
         / "ct").glob("*.dcm")),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )  # fmt: skip
    np.testing.assert_allclose(z, [float(ds.ImagePositionPatient[2]) for ds in files], atol=1e-3)
    # A series stored mirrored (rows run right to left): the letters and sides follow.
    mirrored = np.eye(4)  # rows toward posterior (+y), columns toward the right (-x)
    mirrored[:3, :3] = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    flipped = Volume("dicom", volume.hu, volume.spacing_mm, "P", "S",
                     series_obj=types.SimpleNamespace(affine_lps=lambda: mirrored))  # fmt: skip
    assert display_geometry(flipped)[0] == {"top": "A", "bottom": "P", "left": "L", "right": "R"}
    lung = np.zeros((1, 4, 10), bool)
    lung[0, :, 1:3] = lung[0, :, 7:9] = True  # two lungs, midline between columns 4 and 5
    sides = lung_sides(lung, dataclasses.replace(volume, hu=np.zeros((1, 4, 10))))
    assert sides["right"][0, 0].nonzero()[0].tolist() == [1, 2]  # image left: patient right
    assert lung_sides(lung, dataclasses.replace(flipped, hu=np.zeros((1, 4, 10))))["right"][
        0, 0
    ].nonzero()[0].tolist() == [7, 8]
    # NIfTI slices are in display orientation; z from the affine.
    nifti = Volume(
        "nifti", np.zeros((3, 4, 4)), (1, 1, 2), "P", "S", affine=np.diag([1, 1, 2, 1.0])
    )
    assert display_geometry(nifti) == (markers, [0.0, 2.0, 4.0])


def test_lesions_per_lung_side_and_mean_hu(model, phantom_run):
    from tfcovseg.inference.measures import lung_sides, measure

    (volume,), _ = read_input(phantom_run.cohort / "case_0001" / "ct", salt=SALT)
    lung = lung_mask(volume.hu, volume.spacing_mm[:2])
    left = lung_sides(lung, volume)["left"]
    labels = np.zeros(volume.hu.shape, np.uint8)
    labels[left] = 1  # GGO over the whole left lung, nothing on the right
    measured, _ = measure(volume, labels, model.metadata["class_names"], None)
    ggo = measured["lesions"]["ggo"]
    assert ggo["percent_of_each_lung"]["right"] == 0.0
    assert ggo["percent_of_each_lung"]["left"] > 90.0
    assert ggo["mean_hu"] == pytest.approx(float(volume.hu[left].mean()), abs=0.1)
    assert measured["lesions"]["consolidation"]["mean_hu"] is None  # none found
    assert measured["total"]["percent_of_each_lung"] == ggo["percent_of_each_lung"]


def test_the_overlay_sheet_has_captions_legend_and_no_black_cells():
    from PIL import Image

    from tfcovseg.reporting.figures import TILE_PIXELS, class_colours, tile_sheet

    tiles = [np.full((64, 80, 3), 0.0, np.float32) for _ in range(5)]  # black CT tiles
    png = tile_sheet(tiles, [f"slice {i}" for i in range(5)], ["ggo", "consolidation"],
                     {"top": "A", "bottom": "P", "left": "R", "right": "L"})  # fmt: skip
    sheet = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    cell_w, cell_h = 80 + 2, 64 + 16
    assert sheet.shape[:2] == (2 * cell_h + 24, 4 * cell_w) and 80 <= TILE_PIXELS
    # Row 2 holds one tile: the three free cells are white background, not black tiles.
    assert (sheet[cell_h : cell_h + 64, cell_w:] == 255).all()
    # Each tile carries its orientation letters (yellow), each caption is written beneath.
    assert (np.abs(sheet[:64, :80].astype(int) - [255, 255, 0]).sum(-1) < 60).any()
    assert (sheet[64:cell_h, :80] < 128).any()
    # The legend strip shows every class in its overlay colour.
    legend = sheet[2 * cell_h :]
    for colour in class_colours(["ggo", "consolidation"]):
        rgb = np.round(np.asarray(colour) * 255).astype(int)
        assert (np.abs(legend.astype(int) - rgb).sum(-1) == 0).any(), colour


def test_the_console_prints_the_verdicts_lesion_percentage(tmp_path):
    """A ratio of 0.014449 printed "lesions 1.45 % of lung" (the total's percentage, 1.445,
    rounded again) beside the verdict's "lesions 1.44 % of lung". The total's stored
    percentage is now the one every output prints."""
    from types import SimpleNamespace

    from tfcovseg.evaluation.verdict import patient_verdict
    from tfcovseg.inference.predict import write_series

    rule = {"threshold": 0.02, "method": "m", "lesion_rule": LESION_RULE}
    burden = burden_call(0.014449, rule)
    covid = {"probability": 0.1, "threshold": 0.5, "positive": False, "rule": "any",
             "lesion_burden": burden}  # fmt: skip
    gate = {"threshold": 0.0, "method": "off", "validation_slice_auc": 0.7}
    report = {
        "study": {"slices": 3}, "gate": {"slices_segmented": 3}, "covid": covid,
        "total": {"percent_of_lung": burden_percent(0.014449)},
        "severity": {"grade": None}, "warnings": [],
        "verdict": patient_verdict(covid, gate, burden),
    }  # fmt: skip
    lines = []
    volume = SimpleNamespace(series="S1", warnings=[])
    write_series(tmp_path, volume, lambda folder: report, lines.append)
    assert (
        "lesions 1.44 % of lung; verdict not COVID-19 by the lesion burden (lesions 1.44 %"
        in (lines[-1])
    ), lines[-1]
