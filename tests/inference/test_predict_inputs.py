"""predict on inputs a user may well give it: one slice, a sagittal series, an abdomen, NaN,
a label volume, tagged files (privacy), an interrupted run, an --out that is a file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from data_tools.phantom import make_patient, write_patient
from tfcovseg.cli.predict import main
from tfcovseg.data.intensity import match_to_scale
from tfcovseg.inference.errors import PredictionError
from tfcovseg.inference.images import ImageInputError, Slice, intensity_setting, predict_images
from tfcovseg.inference.predict import predict
from tfcovseg.inference.predictors import open_model

SALT = "test-salt"
QUIET = dict(salt=SALT, log=lambda *a: None)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(phantom_export):
    return open_model(phantom_export)


def _strict(path: Path) -> dict:
    """A JSON file read by a strict parser (no NaN / Infinity)."""

    def refuse(name):
        raise ValueError(f"{path.name} holds {name}: not standard JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _reports(out: Path) -> list[dict]:
    return [_strict(p) for p in sorted(out.glob("*/report.json"))]


def _sagittal_copy(src: Path, dst: Path) -> None:
    """The series of `src` re-labelled as sagittal slices (same pixels)."""
    dst.mkdir(parents=True)
    files = sorted(src.glob("*.dcm"))
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [float(k) * 5.0, -150.0, 150.0]
        ds.save_as(dst / path.name)


def _abdomen(path: Path) -> None:
    """A NIfTI slab of soft tissue with a little bowel gas: a CT without lungs."""
    rng = np.random.default_rng(4)
    z, h, w = 12, 64, 64
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - 32) / 26) ** 2 + ((xx - 32) / 30) ** 2 <= 1
    hu = np.full((z, h, w), -1000.0, np.float32)
    hu[:, body] = 40.0
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)
    hu[:, 30:33, 28:31] = -950.0  # gas
    affine = np.diag([5.0, 5.0, 5.0, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine), path)


def test_studies_that_cannot_support_a_grade_get_none_and_say_why(model, phantom_run, tmp_path):
    case = phantom_run.cohort / "case_0000" / "ct"
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(sorted(case.glob("*.dcm"))[10], one)
    _sagittal_copy(case, tmp_path / "sagittal")
    _abdomen(tmp_path / "abdomen.nii.gz")
    expected = {
        "one": "a single slice",
        "sagittal": "not an axial series",
        "abdomen.nii.gz": "lung",  # no lung found, or lungs far too small
    }
    for name, why in expected.items():
        out = tmp_path / f"out-{name}"
        printed = []
        predict(model, tmp_path / name, out, gate=False, salt=SALT, log=printed.append)
        (report,) = _reports(out)
        severity = report["severity"]
        assert severity["grade"] is None, name
        assert any(why in r for r in severity["not_graded"]), (name, severity)
        assert report["covid"]["lesion_burden"]["positive"] is None
        assert any("no severity grade" in w for w in report["warnings"])
        assert any("no severity grade" in line and why in line for line in printed), printed
        index = _strict(out / "index.json")
        assert index["series"][0]["severity"] is None
        assert "not graded" in (out / report["study"]["series"] / "report.html").read_text()
    # The abdomen is not reported as lesions on 100 % of a lung.
    (report,) = _reports(tmp_path / "out-abdomen.nii.gz")
    assert report["total"]["percent_of_lung"] < 100.0 or report["lung_volume_ml"] == 0


def _nifti_like(phantom_run, path: Path, data: np.ndarray) -> None:
    affine = nib.load(phantom_run.cohort / "case_0000" / "lesions.nii.gz").affine
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)


def test_nan_and_non_ct_volumes_are_refused_with_the_reason(model, phantom_run, tmp_path, capsys):
    labels = np.asarray(nib.load(phantom_run.cohort / "case_0000" / "lesions.nii.gz").dataobj)
    hu = np.where(labels > 0, -500.0, -1000.0) + np.arange(labels.size).reshape(labels.shape) % 50
    hu[0, 0, 0] = np.nan
    stored = 1024.0 + np.arange(labels.size).reshape(labels.shape) % 3000  # no rescale to HU
    cases = {
        "nan.nii.gz": (hu, "NaN or infinite"),
        "labels.nii.gz": (labels, "distinct values"),
        "stored.nii.gz": (stored, "no air"),
    }
    for name, (data, reason) in cases.items():
        _nifti_like(phantom_run, tmp_path / name, data)
        args = ["--model", str(model.path), "--salt", SALT, "--input", str(tmp_path / name)]
        assert main(args + ["--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert reason in err and name in err, err
    assert not (tmp_path / "out").exists()


def _tagged_patient(folder: Path) -> dict:
    """A phantom series whose headers carry identifiers to look for on the console."""
    ids = {
        "name": "A072894",  # one component: highdicom warns about it, quoting it
        "id": "MRN-55512345",
        "birth": "19711203",
        "accession": "ACC-9988776",
    }
    p = make_patient(21, 64, "covid", "severe", n_slices=6)
    write_patient(
        p, folder, patient_id=ids["id"], patient_name=ids["name"], birth_date=ids["birth"]
    )
    study = generate_uid(entropy_srcs=["tagged-study"])
    for path in sorted((folder / "ct").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.AccessionNumber, ds.StudyInstanceUID = ids["accession"], study
        ds.save_as(path)
    ds = pydicom.dcmread(next((folder / "ct").glob("*.dcm")))
    ids |= {"study": study, "series": ds.SeriesInstanceUID, "sop": ds.SOPInstanceUID}
    return ids


def _run(module: str, *args) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TFCOVSEG_SALT": SALT}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_no_identifier_reaches_the_console(phantom_export, tmp_path):
    ids = _tagged_patient(tmp_path / "in" / "patient")
    (tmp_path / "in" / "patient" / "ct" / "IM0002.dcm").write_bytes(b"broken")  # a skip line
    records = tmp_path / "records"
    convert = ["--input", str(tmp_path / "in"), "--out", str(records), "--workers", "2"]
    printed = _run("data_tools.convert", *convert)
    series = tmp_path / "in" / "patient" / "ct"
    args = ["--model", str(phantom_export), "--input", str(series), "--no-gate"]
    printed += _run("tfcovseg.predict", *args, "--out", str(tmp_path / "pred"))
    assert "skipped" in printed and "series S" in printed  # the commands did speak
    for kind, value in ids.items():
        assert value not in printed, f"the {kind} {value} was printed"
    seg = pydicom.dcmread(next((tmp_path / "pred").glob("*/segmentation.dcm")))
    assert str(seg.PatientName) == ids["name"]  # the SEG keeps the source identity by default


def test_a_rerun_keeps_finished_series_and_finishes_the_rest(model, phantom_run, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(phantom_run.cohort / "case_0003" / "ct", study / "a")
    shutil.copytree(phantom_run.cohort / "case_0004" / "ct", study / "b")
    out = tmp_path / "out"
    index = predict(model, study, out, gate=False, **QUIET)
    first, second = [s["series"] for s in index["series"]]
    kept = (out / first / "report.json").read_bytes()
    # As after a kill during the second series: its folder is a hidden partial one.
    shutil.rmtree(out / second)
    (out / f".{second}-x1y2").mkdir()
    (out / f".{second}-x1y2" / "lesions.nii.gz").write_bytes(b"half")
    index["series"] = index["series"][:1]
    (out / "index.json").write_text(json.dumps(index))
    printed = []
    index = predict(model, study, out, gate=False, salt=SALT, log=printed.append)
    assert any("already predicted" in line for line in printed)
    assert (out / first / "report.json").read_bytes() == kept
    assert (out / second / "report.json").is_file()
    assert not list(out.glob(".*"))
    assert [s["series"] for s in _strict(out / "index.json")["series"]] == [first, second]
    # Results made with other settings are never overwritten or mixed.
    with pytest.raises(PredictionError, match="other settings.*mask_threshold"):
        predict(model, study, out, gate=False, mask_threshold=0.3, **QUIET)
    with pytest.raises(PredictionError, match="other settings.*research_seg"):
        predict(model, study, out, gate=False, research_seg=True, **QUIET)
    # --intensity means nothing for HU studies: said, and the finished series are kept.
    printed = []
    predict(model, study, out, gate=False, intensity="as-is", salt=SALT, log=printed.append)
    assert any("--intensity ignored" in line for line in printed)
    assert (out / first / "report.json").read_bytes() == kept
    # A series predicted before the verdict existed is kept as well (no verdict indexed).
    old = json.loads(kept)
    assert old["verdict"]["call"] in ("COVID-19", "not COVID-19", "no call")
    del old["verdict"]
    (out / first / "report.json").write_text(json.dumps(old))
    index = predict(model, study, out, gate=False, **QUIET)
    entry = next(s for s in index["series"] if s["series"] == first)
    assert entry["verdict"] is None and entry["covid_probability"] == old["covid"]["probability"]


def test_a_rerun_never_keeps_results_of_other_input_or_another_model(
    model, phantom_run, phantom_export, tmp_path
):
    """The kept-results check compared the series pseudonym and the settings only: a
    series that had lost a slice since, or another model copied under the same folder
    name, kept the old results ("already predicted ..., kept")."""
    study = tmp_path / "study"
    shutil.copytree(phantom_run.cohort / "case_0003" / "ct", study / "a")
    out = tmp_path / "out"
    predict(model, study, out, gate=False, **QUIET)
    (series,) = [p for p in out.iterdir() if p.is_dir()]
    kept = (series / "report.json").read_bytes()
    first = sorted((study / "a").glob("*.dcm"))[0]
    first.unlink()  # the same series (UID), one slice fewer
    with pytest.raises(PredictionError, match="predicted from other input"):
        predict(model, study, out, gate=False, **QUIET)
    assert (series / "report.json").read_bytes() == kept
    shutil.copytree(phantom_run.cohort / "case_0003" / "ct", study / "a", dirs_exist_ok=True)
    predict(model, study, out, gate=False, **QUIET)  # the same input again: kept
    assert (series / "report.json").read_bytes() == kept
    # Another model under the same name: files differ, so the model does.
    other = tmp_path / "models" / phantom_export.parent.name / phantom_export.name
    shutil.copytree(phantom_export, other)
    (other / "assets" / "extra.txt").write_text("not the same export")
    with pytest.raises(PredictionError, match="other settings.*model_sha256"):
        predict(open_model(other), study, out, gate=False, **QUIET)
    # Images: one added since the first run is another input.
    from PIL import Image

    images = tmp_path / "Imgs"
    images.mkdir()
    grey = np.random.default_rng(0).integers(0, 256, (2, 48, 48), dtype=np.uint8)
    Image.fromarray(grey[0]).save(images / "a.png")
    predict(model, images, out, **QUIET)
    Image.fromarray(grey[1]).save(images / "b.png")
    with pytest.raises(PredictionError, match="made otherwise.*input_files"):
        predict(model, images, out, **QUIET)


def test_an_out_that_is_a_file_is_a_one_line_error(phantom_export, phantom_run, tmp_path, capsys):
    from data_tools.convert import main as convert_main

    (tmp_path / "file").write_text("x")
    case = str(phantom_run.cohort / "case_0000")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        args = ["--model", str(phantom_export), "--input", case, "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out") and str(out) in err
        assert len(err.strip().splitlines()) == 1
        assert convert_main(["--input", case, "--out", str(out), "--salt", SALT]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out") and len(err.strip().splitlines()) == 1


def _grey_pngs(folder: Path, rng) -> list[np.ndarray]:
    """Two 64x64 slices and one 48x40 (another size), windowed like COVID-SemiSeg's, plus
    a text file and a corrupt image that predict must skip and name."""
    from PIL import Image

    folder.mkdir(parents=True)
    greys = []
    for name, shape in (
        ("case_01.png", (64, 64)),
        ("case_02.jpg", (64, 64)),
        ("small.png", (48, 40)),
    ):
        grey = rng.integers(0, 256, shape).astype(np.uint8)
        grey[8:-8, 6:18] = 20  # a dark lung-like region
        Image.fromarray(grey).save(folder / name, quality=100)
        greys.append(np.asarray(Image.open(folder / name).convert("L"), np.float32))
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return greys


def test_a_folder_of_png_jpeg_slices_gives_pngs_named_like_the_inputs(model, tmp_path, rng):
    from PIL import Image

    greys = _grey_pngs(tmp_path / "Imgs", rng)
    out = tmp_path / "out"
    index = predict(model, tmp_path / "Imgs", out, **QUIET)
    (entry,) = index["series"]
    folder = out / entry["folder"]
    report = _strict(folder / "report.json")
    assert [s["file"] for s in report["slices"]] == ["case_01.png", "case_02.png", "small.png"]
    assert {s["file"] for s in report["skipped"]} == {"notes.txt", "broken.png"}
    assert "no severity grade" in report["warnings"][0] and "mL" in report["warnings"][0]
    classes = model.metadata["class_names"]
    reference = model.metadata["grey_levels"]["reference"]
    assert report["intensity"]["mode"] == "match" and report["intensity"]["reference"] == reference
    for grey, name in zip(greys, ("case_01.png", "case_02.png", "small.png")):
        # By default each image is matched to the training slices' grey levels first.
        _, masks = model.serve_image(match_to_scale(grey[None], reference))
        labels = np.asarray(Image.open(folder / "labels" / name))
        assert labels.shape == grey.shape and labels.dtype == np.uint8
        on = masks[0] >= 0.5
        expected = np.where(on.any(-1), np.argmax(np.where(on, masks[0], -1), -1) + 1, 0)
        np.testing.assert_array_equal(labels, expected)
        for c, cls in enumerate(classes):
            prob = np.asarray(Image.open(folder / f"probability_{cls}" / name))
            np.testing.assert_array_equal(prob, np.round(masks[0, ..., c] * 255).astype(np.uint8))
        infection = np.asarray(Image.open(folder / "probability_infection" / name))
        assert np.abs(infection.astype(int) - np.round(masks[0].max(-1) * 255)).max() <= 0
    html_text = (folder / "report.html").read_text()
    assert "not a medical device" in html_text and "small.png" in html_text
    # A rerun keeps the results; one with another threshold is refused, nothing changed.
    before = (folder / "report.json").read_bytes()
    predict(model, tmp_path / "Imgs", out, **QUIET)
    assert (folder / "report.json").read_bytes() == before
    with pytest.raises(PredictionError, match="made otherwise"):
        predict(model, tmp_path / "Imgs", out, mask_threshold=0.3, **QUIET)
    with pytest.raises(PredictionError, match="made otherwise"):
        predict(model, tmp_path / "Imgs", out, intensity="as-is", **QUIET)
    assert (folder / "report.json").read_bytes() == before
    # Options that mean nothing for 2-D slices are named, not silently dropped.
    said = []
    predict(model, tmp_path / "Imgs", out, gate=False, salt=SALT, log=said.append)
    assert any("--no-gate ignored" in line for line in said)
    # --series picks what is segmented: refused (a whole folder was segmented, exit 0).
    with pytest.raises(PredictionError, match="--series picks one DICOM series"):
        predict(model, tmp_path / "Imgs", tmp_path / "other", series_uid="1.2.3", **QUIET)
    assert not (tmp_path / "other").exists()


def _probabilities(report_folder: Path, name: str, classes) -> np.ndarray:
    from PIL import Image

    return np.stack(
        [np.asarray(Image.open(report_folder / f"probability_{c}" / name)) for c in classes], -1
    ).astype(int)


def test_matched_intensity_reads_a_rewindowed_slice_like_the_original(model, tmp_path, rng):
    # The same slice windowed another way (half the contrast, shifted: as COVID-SemiSeg's
    # unlabelled slices are against its training ones) reaches the model as the original
    # when matched, and differently as-is.
    grey = rng.integers(0, 256, (64, 64)).astype(np.float32)
    grey[8:-8, 6:18] = 20.0
    slices = [
        Slice("a.png", "a.png", grey.shape, pixels=grey),
        Slice("b.png", "b.png", grey.shape, pixels=0.5 * grey + 10.0),
    ]
    classes = model.metadata["class_names"]
    probs = {}
    for mode in ("match", "as-is"):
        report = predict_images(model, slices, [], tmp_path / mode, intensity=mode)
        assert report["intensity"]["mode"] == mode
        assert report["slices"][1]["grey_percentiles"] == pytest.approx(
            [0.5 * v + 10.0 for v in report["slices"][0]["grey_percentiles"]], abs=0.01
        )
        probs[mode] = [_probabilities(tmp_path / mode, n, classes) for n in ("a.png", "b.png")]
    assert np.abs(probs["match"][0] - probs["match"][1]).max() <= 1
    assert np.abs(probs["as-is"][0] - probs["as-is"][1]).max() > 1


def test_images_are_read_when_predicted_and_a_changed_file_is_named(model, tmp_path, rng):
    from tfcovseg.inference.images import read_image_folder

    _grey_pngs(tmp_path / "Imgs", rng)
    slices, _ = read_image_folder(tmp_path / "Imgs")
    assert all(s.pixels is None and s.path.is_file() for s in slices)  # not held in memory
    assert [s.shape for s in slices] == [(64, 64), (64, 64), (48, 40)]
    (tmp_path / "Imgs" / "case_02.jpg").write_bytes(b"truncated")  # changed since listed
    with pytest.raises(ImageInputError, match="case_02.jpg cannot be read any more"):
        predict_images(model, slices, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_classifier_never_calls_its_slice_score_covid(
    model, phantom_run, tmp_path, rng, monkeypatch
):
    # The shipped real-CT model has no classifier: its slice score is the highest lesion
    # probability, which the reports showed as "COVID-19 probability" and as the slice
    # classifier's figure (0.999 on a CT crop without COVID-19).
    monkeypatch.setitem(model.metadata, "slice_score", "lesion")
    _grey_pngs(tmp_path / "Imgs", rng)
    index = predict(model, tmp_path / "Imgs", tmp_path / "images", **QUIET)
    folder = tmp_path / "images" / index["series"][0]["folder"]
    said = _strict(folder / "report.json")["model"]
    assert (
        said["slice_score"] == "lesion" and said["slice_score_name"] == "highest lesion probability"
    )
    page = (folder / "report.html").read_text()
    assert "<th>highest lesion probability</th>" in page and "COVID-19 probability" not in page
    index = predict(model, phantom_run.cohort / "case_0000", tmp_path / "study", **QUIET)
    report = _strict(tmp_path / "study" / index["series"][0]["folder"] / "report.json")
    rules = [e["rule"] for e in report["verdict"]["evidence"]]
    assert "highest lesion probability" in rules and "slice classifier" not in rules
    assert report["covid"]["slice_score"] == "lesion"
    assert index["series"][0]["slice_score"] == "lesion"  # index.json and summary.csv
    # Metadata naming another score is refused when the model is opened, not mid-study.
    monkeypatch.setitem(model.metadata, "slice_score", "lesions")
    with pytest.raises(PredictionError, match="slice_score must be one of"):
        predict(model, phantom_run.cohort / "case_0000", tmp_path / "again", **QUIET)


def test_metadata_predict_cannot_honour_is_refused_before_any_study():
    import types

    from tfcovseg.inference.predictors import check_metadata

    def model(**meta):
        return types.SimpleNamespace(metadata=meta, source="SavedModel m/1")

    check_metadata(model(pre_windowed=True, windowing={}, slice_score="lesion"))
    with pytest.raises(PredictionError, match="m/1 was trained on 8-bit .* export its run again"):
        check_metadata(model(pre_windowed=True))
    with pytest.raises(PredictionError, match="m/1: its metadata's slice_score must be one of"):
        check_metadata(model(slice_score="lesions"))


def test_a_model_without_training_grey_levels_uses_images_as_they_are(tmp_path):
    assert intensity_setting({"class_names": ["ggo"]}, "as-is") == {"mode": "as-is"}
    old = intensity_setting({"class_names": ["ggo"]}, "match")
    assert old["mode"] == "as-is" and "export its run again" in old["warning"]
    with pytest.raises(ImageInputError, match="--intensity must be one of match, as-is"):
        intensity_setting({"grey_levels": {"reference": [1, 2]}}, "auto")


def test_a_slice_dataset_folder_predicts_its_imgs_only(model, tmp_path, rng):
    # Imgs/ beside GT/ (COVID-SemiSeg's layout): the masks are not taken for slices.
    _grey_pngs(tmp_path / "data" / "Imgs", rng)
    _grey_pngs(tmp_path / "data" / "GT", rng)
    index = predict(model, tmp_path / "data", tmp_path / "out", **QUIET)
    report = _strict(tmp_path / "out" / index["series"][0]["folder"] / "report.json")
    assert [s["source"] for s in report["slices"]] == [
        "Imgs/case_01.png",
        "Imgs/case_02.jpg",
        "Imgs/small.png",
    ]
    # The masks folder is named once, with its count, not file by file.
    skipped = {s["file"] for s in report["skipped"]}
    assert skipped == {"GT/ (5 files)", "Imgs/notes.txt", "Imgs/broken.png"}


def test_deep_images_are_skipped_and_names_that_are_not_utf8_are_shown(
    phantom_export, tmp_path, capsys
):
    """A 16-bit PNG became all white (Pillow's "L" clips at 255) and was predicted as
    such; a file name that is not UTF-8 made report.html's write raise, and the console
    line that named it."""
    from PIL import Image

    folder = tmp_path / "Imgs"
    folder.mkdir()
    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    Image.fromarray(grey).save(folder / "a.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "deep.png")
    odd = Path(os.fsdecode(os.fsencode(folder) + b"/b\xe9\xff.png"))
    Image.fromarray(grey).save(odd, format="PNG")
    out = tmp_path / "out"
    assert main(["--model", str(phantom_export), "--input", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "deep.png" in printed and "more than 8 bits" in printed
    (report,) = _reports(out)
    assert {s["file"] for s in report["skipped"]} == {"deep.png"}
    assert len(report["slices"]) == 2
    html_text = next(out.glob("*/report.html")).read_text()
    assert "b\\xe9\\xff.png" in html_text or "b\\udce9\\udcff" in html_text


def test_masks_and_colour_images_are_not_predicted_as_slices(tmp_path):
    """A folder of GT/ masks (1-bit, or 0/1/2 labels) and a colour-mapped screenshot were
    read as grey slices and segmented, with nothing said; a grey slice saved as an RGB
    JPEG is still a slice."""
    from PIL import Image

    from tfcovseg.inference.images import read_image_folder

    folder = tmp_path / "slices"
    folder.mkdir()
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (48, 48), dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(folder / "rgb.jpg", quality=90)
    Image.fromarray(grey > 128).save(folder / "mask.png")  # mode "1"
    Image.fromarray((grey // 100).astype(np.uint8)).save(folder / "labels.png")
    jet = np.stack([grey, 255 - grey, np.full_like(grey, 128)], -1)
    Image.fromarray(jet).save(folder / "jet.png")
    tinted = np.stack([grey, grey, grey], -1).astype(np.int16)
    tinted[..., 0] += 9  # a red tint of 9 grey levels
    Image.fromarray(np.clip(tinted, 0, 255).astype(np.uint8)).save(folder / "tint.png")
    mask = np.zeros((256, 256), np.uint8)  # the size of a real mask: ringing at its edges
    mask[60:120, 80:170] = 255
    Image.fromarray(mask).save(folder / "mask.jpg", quality=90)  # 0/255 and JPEG ringing
    slices, skipped = read_image_folder(folder)
    assert [s.source for s in slices] == ["rgb.jpg"]
    reasons = dict(skipped)
    assert reasons["mask.png"].startswith("2 grey levels: a mask, label or blank image")
    assert reasons["labels.png"].startswith("3 grey levels: a mask")
    assert "% of the pixels at two grey levels: a mask" in reasons["mask.jpg"]
    assert reasons["jet.png"].startswith("a colour image (its red, green and blue")
    assert reasons["tint.png"].startswith("a colour image (its red, green and blue 8.8 grey")


def test_an_image_folder_without_a_readable_image_is_refused(model, tmp_path):
    (tmp_path / "Imgs").mkdir()
    (tmp_path / "Imgs" / "broken.jpg").write_bytes(b"no jpeg")
    with pytest.raises(PredictionError, match="no readable .png/.jpg image.*broken.jpg"):
        predict(model, tmp_path / "Imgs", tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_montage_keeps_only_the_slices_with_the_most_lesion():
    from tfcovseg.inference.images import MONTAGE_SLICES, _keep_top

    kept = {}
    areas = [3, 0, 7, 1, 9, 2, 8, 5, 6, 4, 10]
    for i, area in enumerate(areas):
        labels = np.zeros((8, 8), np.uint8)
        labels.flat[:area] = 1
        _keep_top(kept, i, labels, np.full((8, 8), float(i), np.float32))
    top = sorted(range(len(areas)), key=lambda i: -areas[i])[:MONTAGE_SLICES]
    assert sorted(kept) == sorted(top)  # the empty slice and the two smallest are dropped
    assert all(kept[i][2][0, 0] == i for i in kept)  # with their own grey levels


def test_a_second_predict_into_a_folder_being_written_is_refused(model, phantom_run, tmp_path):
    from data_tools.files import exclusive_folder

    study = phantom_run.cohort / "case_0003" / "ct"
    out = tmp_path / "out"
    series = predict(model, study, out, gate=False, **QUIET)["series"][0]["series"]
    shutil.rmtree(out)
    with exclusive_folder(out):  # a first predict, still writing the series
        work = out / f".{series}-x1y2"
        work.mkdir()
        (work / "lesions.nii.gz").write_bytes(b"in progress")
        with pytest.raises(PredictionError, match=f"--out {out} is being written by another run"):
            predict(model, study, out, gate=False, **QUIET)
        assert (work / "lesions.nii.gz").read_bytes() == b"in progress"
    # Once it has ended (here: killed, its series half-written), a rerun finishes it.
    predict(model, study, out, gate=False, **QUIET)
    assert (out / series / "report.json").is_file() and not work.exists()
