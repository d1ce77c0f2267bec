"""python -m tfcovseg.predict --runner direct: an archive of studies through Beam's
RunInference, with the single-study command's outputs."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from tfcovseg.inference.archive import archive_inputs, predict_archive
from tfcovseg.inference.errors import PredictionError
from tfcovseg.inference.predict import predict

SALT = "test-salt"
QUIET = dict(salt=SALT, log=lambda *a: None)
CASES = ("case_0000", "case_0003", "case_0005")


@pytest.fixture(scope="module")
def studies(phantom_run, tmp_path_factory):
    """A study list (one of the cohort's DICOM folders per line) and the single-study
    command's results for the same studies, one predict call each."""
    root = tmp_path_factory.mktemp("archive")
    listing = root / "studies.txt"
    listing.write_text("# phantom studies\n" + "".join(
        f"{phantom_run.cohort / case}\n" for case in CASES
    ))  # fmt: skip
    return listing, root


@pytest.fixture(scope="module")
def both(studies, phantom_export, phantom_run):
    listing, root = studies
    single_out, beam_out = root / "single", root / "beam"
    for case in CASES:
        predict(phantom_export, phantom_run.cohort / case, single_out, **QUIET)
    index = predict_archive(phantom_export, listing, beam_out, "direct", **QUIET)
    return single_out, beam_out, index


def _comparable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("timings_s", "created")}


def _assert_close(ours, theirs, where="report"):
    """Equal structures; numbers within 1e-5: Beam batches slices its own way (and by
    load), and a convolution over another batch differs in the 7th digit."""
    if isinstance(theirs, dict):
        assert sorted(ours) == sorted(theirs), where
        for k in theirs:
            _assert_close(ours[k], theirs[k], f"{where}.{k}")
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_close(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-5), where
    else:
        assert ours == theirs, where


def _assert_labels_agree(a, b):
    """Label volumes equal but where a probability lies within 1e-4 of the threshold."""
    ours = np.asanyarray(nib.load(b / "lesions.nii.gz").dataobj)
    theirs = np.asanyarray(nib.load(a / "lesions.nii.gz").dataobj)
    differ = ours != theirs
    if differ.any():
        probs = np.stack([nib.load(p).get_fdata() for p in sorted(a.glob("probability_*"))])
        assert (np.abs(probs[:, differ] - 0.5) < 1e-4).any(axis=0).all()


def test_every_series_gets_the_single_study_commands_files(both):
    single_out, beam_out, index = both
    folders = sorted(p.name for p in single_out.iterdir() if p.is_dir())
    assert len(folders) == len(CASES)
    assert sorted(p.name for p in beam_out.iterdir() if p.is_dir()) == folders
    for name in folders:
        a, b = single_out / name, beam_out / name
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        _assert_labels_agree(a, b)
        for prob in a.glob("probability_*.nii.gz"):
            np.testing.assert_allclose(
                nib.load(prob).get_fdata(), nib.load(b / prob.name).get_fdata(), atol=1e-5
            )
        ours = json.loads((b / "report.json").read_text())
        theirs = json.loads((a / "report.json").read_text())
        _assert_close(_comparable(ours), _comparable(theirs))
        # no inference time per series in a pipeline: null rather than a made-up 0
        assert ours["timings_s"]["inference"] is None and theirs["timings_s"]["inference"] > 0
    single_index = json.loads((single_out / "index.json").read_text())
    key = lambda e: e["series"]  # noqa: E731
    _assert_close(sorted(index["series"], key=key), sorted(single_index["series"], key=key))


def test_summary_table_has_a_row_per_series(both):
    _, beam_out, index = both
    lines = (beam_out / "summary.csv").read_text().splitlines()
    assert lines[0] == "# Research use, not a medical device."
    rows = list(csv.DictReader(lines[1:]))
    assert sorted(r["series"] for r in rows) == sorted(e["series"] for e in index["series"])
    assert {"verdict", "severity", "lesion_percent_of_lung", "slices"} <= set(rows[0])
    assert "PHANTOM" not in (beam_out / "summary.csv").read_text()  # pseudonyms only


def test_a_rerun_keeps_finished_series_and_refuses_other_settings(both, studies, phantom_export):
    listing, _ = studies
    _, beam_out, _ = both
    reports = sorted(beam_out.glob("*/report.json"))
    before = [p.stat().st_mtime_ns for p in reports]
    predict_archive(phantom_export, listing, beam_out, "direct", **QUIET)
    assert [p.stat().st_mtime_ns for p in reports] == before
    with pytest.raises(PredictionError, match="other settings"):
        predict_archive(phantom_export, listing, beam_out, "direct", threshold=0.99, **QUIET)


def test_inputs_from_a_list_a_pattern_or_a_folder_of_studies(phantom_run, studies, tmp_path):
    listing, _ = studies
    assert [p.name for p in archive_inputs(listing)] == list(CASES)
    pattern = archive_inputs(f"{phantom_run.cohort}/case_000[0-2]")
    assert [p.name for p in pattern] == ["case_0000", "case_0001", "case_0002"]
    folder = archive_inputs(phantom_run.cohort)
    assert len(folder) == 8 and all(p.is_dir() for p in folder)
    one = archive_inputs(phantom_run.cohort / "case_0000" / "ct")  # DICOM files: one study
    assert one == [phantom_run.cohort / "case_0000" / "ct"]
    (tmp_path / "bad.txt").write_text("nowhere/study\n")
    with pytest.raises(PredictionError, match="do not exist"):
        archive_inputs(tmp_path / "bad.txt")
    # A list inside a list was skipped with "add --runner direct" (it was given).
    (tmp_path / "outer.txt").write_text(f"{phantom_run.cohort / 'case_0000'}\n{listing}\n")
    with pytest.raises(PredictionError, match="lists do not nest"):
        archive_inputs(tmp_path / "outer.txt")
    case = phantom_run.cohort / "case_0000"
    (tmp_path / "twice.txt").write_text(f"{case}\n{case}  # again\n")
    assert archive_inputs(tmp_path / "twice.txt") == [case]  # predicted (and counted) once


def test_the_command_with_a_runner(studies, phantom_export, phantom_run, tmp_path, capsys):
    from tfcovseg.cli.predict import main

    pattern = f"{phantom_run.cohort}/case_000[1]"
    base = ["--model", str(phantom_export), "--out", str(tmp_path / "out"), "--salt", SALT]
    assert main([*base, "--input", pattern, "--runner", "direct"]) == 0
    printed = capsys.readouterr().out
    assert "1 studies on the direct runner" in printed and "summary:" in printed
    assert printed.strip().endswith("Research use, not a medical device.")
    assert len(list((tmp_path / "out").glob("*/report.json"))) == 1
    for extra, message in (
        (["--pipeline-option", "a=b"], "--pipeline-option needs --runner"),
        (["--runner", "direct", "--series", "1.2.3"], "single-study options"),
        (["--runner", "direct", "--threshold", "2"], "--threshold must be in [0, 1]"),
        (["--runner", "direct", "--pipeline-option", "oops"], "takes KEY=VALUE"),
    ):
        args = [*base[:2], "--out", str(tmp_path / "x"), "--input", pattern, *extra]
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_study_without_a_usable_series_is_skipped_not_fatal(
    phantom_export, phantom_run, tmp_path
):
    """One unreadable study of an archive is listed by its place in the input (a folder
    name may be a patient id) and the others are predicted."""
    broken = tmp_path / "DOE_JOHN_12345"
    broken.mkdir()
    (broken / "notes.dcm").write_text("not DICOM")
    listing = tmp_path / "studies.txt"
    listing.write_text(f"{phantom_run.cohort / 'case_0002'}\n{broken}\n")
    said = []
    index = predict_archive(phantom_export, listing, tmp_path / "out", "direct", salt=SALT,
                            log=said.append)  # fmt: skip
    assert len(index["series"]) == 1
    (failed,) = [s for s in index["skipped"] if s["file"] == "input 2 of 2"]
    assert "no usable CT series" in failed["reason"]
    written = "".join(p.read_text() for p in (tmp_path / "out").glob("*.*"))
    assert "DOE_JOHN" not in written + " ".join(said)
    assert any("skipped input 2 of 2" in line for line in said)
    # Nothing usable at all: an error, not an empty summary.csv and exit code 0.
    alone = tmp_path / "alone.txt"
    alone.write_text(f"{broken}\n")
    with pytest.raises(PredictionError, match="none of the 1 studies has a usable CT series"):
        predict_archive(phantom_export, alone, tmp_path / "out2", "direct", salt=SALT,
                        log=said.append)  # fmt: skip
