"""The converter on inputs that used to pass silently: masks on the wrong series, stray
images, cropped masks, gaps, reruns in other processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from data_tools.conversion.discovery import ConversionError
from data_tools.conversion.pipeline import convert
from data_tools.convert import main
from tests.data_tools.conftest import SALT

ROOT = Path(__file__).resolve().parents[2]


def _as_other_patient(src: Path, dst: Path, patient_id: str) -> None:
    """A copy of the CT series in `src` as another patient's series (same geometry)."""
    dst.mkdir(parents=True)
    series = generate_uid(entropy_srcs=[patient_id, "series"])
    for path in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = patient_id, f"OTHER^{patient_id}"
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[patient_id, path.name])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dst / path.name)


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _slice_counts(cohort: Path) -> dict:
    return {p.name: len(list((p / "ct").glob("*.dcm"))) for p in sorted(cohort.glob("case_*"))}


def _two_patients_of_different_length(cohort: Path):
    counts = _slice_counts(cohort)
    first = next(iter(counts))
    other = next(n for n, k in counts.items() if k != counts[first])
    return first, other


def _lesion_volumes(manifest: dict) -> dict:
    """{annotated: total lesion mL} per patient, keyed by slice count (patients are
    pseudonyms)."""
    return {
        e["num_slices"]: (e["annotated"], sum(v for k, v in e["volume_ml"].items() if k != "lung"))
        for e in manifest["patients"].values()
    }


def test_a_mask_belongs_to_the_one_series_whose_grid_it_fits(cohort, tmp_path):
    # Two patients' series in one study folder, one mask beside them: it is the first
    # patient's (its grid), and the other patient must not borrow it.
    first, other = _two_patients_of_different_length(cohort)
    src = tmp_path / "in" / "study"
    shutil.copytree(cohort / first / "ct", src / "a")
    shutil.copytree(cohort / other / "ct", src / "b")
    shutil.copy(cohort / first / "lesions.nii.gz", src / "lesions.nii.gz")
    convert(tmp_path / "in", tmp_path / "out", size=64, salt=SALT, strict=True, progress=False)
    volumes = _lesion_volumes(_manifest(tmp_path / "out"))
    counts = _slice_counts(cohort)
    truth = nib.load(cohort / first / "lesions.nii.gz").get_fdata() > 0
    assert volumes[counts[first]][0] is True and volumes[counts[first]][1] > 0
    assert truth.any()
    # Not annotated (no mask of its own): lesions unknown, not "none".
    assert volumes[counts[other]] == (False, 0.0)


def test_a_mask_that_fits_two_patients_is_used_for_none(cohort, tmp_path):
    first = next(iter(_slice_counts(cohort)))
    src = tmp_path / "in" / "study"
    shutil.copytree(cohort / first / "ct", src / "a")
    _as_other_patient(cohort / first / "ct", src / "b", "HEALTHY-0001")
    shutil.copy(cohort / first / "lesions.nii.gz", src / "lesions.nii.gz")
    summary = convert(tmp_path / "in", tmp_path / "out", size=64, salt=SALT, progress=False)
    reasons = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert "ambiguous" in reasons["study/lesions.nii.gz"]
    assert "2 patient(s)" in reasons["study/lesions.nii.gz"]
    manifest = _manifest(tmp_path / "out")
    assert [e["annotated"] for e in manifest["patients"].values()] == [False, False]
    with pytest.raises(ConversionError, match="ambiguous"):
        convert(tmp_path / "in", tmp_path / "o2", size=64, salt=SALT, strict=True, progress=False)
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_lesion_free_only_from_a_mask_or_the_diagnosis(cohort, tmp_path):
    first, other = _two_patients_of_different_length(cohort)
    src = tmp_path / "in"
    shutil.copytree(cohort / first / "ct", src / "p1")
    shutil.copytree(cohort / other / "ct", src / "p2")
    ids = {n: str(pydicom.dcmread(next((src / n).glob("*.dcm"))).PatientID) for n in ("p1", "p2")}
    (src / "labels.csv").write_text(
        f"patient,diagnosis,severity\n{ids['p1']},healthy,none\n{ids['p2']},covid,moderate\n"
    )
    convert(src, tmp_path / "out", size=64, salt=SALT, progress=False)
    manifest = _manifest(tmp_path / "out")
    by_diagnosis = {e["diagnosis"]: e for e in manifest["patients"].values()}
    assert by_diagnosis["healthy"]["annotated"] is True
    assert by_diagnosis["covid"]["annotated"] is False
    assert by_diagnosis["covid"]["annotated_slices"] == 0
    covid_slices = [s for s in manifest["slices"] if not s["annotated"]]
    assert len(covid_slices) == by_diagnosis["covid"]["num_slices"]


def test_images_outside_a_slice_dataset_are_ignored(cohort, tmp_path):
    from PIL import Image

    first = next(iter(_slice_counts(cohort)))
    src = tmp_path / "in"
    shutil.copytree(cohort / first, src / first)
    shot = np.zeros((40, 60, 3), np.uint8)
    Image.fromarray(shot).save(src / first / "screenshot.png")
    Image.fromarray(shot).save(src / "preview.jpg")
    summary = convert(src, tmp_path / "out", size=64, salt=SALT, strict=True, progress=False)
    assert summary["patients"] == 1 and summary["series"] == 1
    ignored = {i["path"]: i["reason"] for i in summary["ignored"]}
    assert set(ignored) == {f"{first}/screenshot.png", "preview.jpg"}
    assert all("ignored" in r for r in ignored.values())
    manifest = _manifest(tmp_path / "out")
    assert all(s["series"] == manifest["slices"][0]["series"] for s in manifest["slices"])


def test_a_cropped_mask_and_a_gap_are_reported_and_fatal_when_strict(cohort, tmp_path, capsys):
    first = next(iter(_slice_counts(cohort)))
    src = tmp_path / "in"
    shutil.copytree(cohort / first, src / first)
    mask = nib.load(src / first / "lesions.nii.gz")
    longer = np.concatenate([np.asarray(mask.dataobj), np.zeros((64, 64, 3), np.uint8)], axis=2)
    nib.save(nib.Nifti1Image(longer, mask.affine), src / first / "lesions.nii.gz")
    files = sorted((src / first / "ct").glob("*.dcm"))  # IM0000 is mask plane 0
    files[len(files) // 2].unlink()
    labels = np.asarray(mask.dataobj)
    kept = np.delete(labels, len(files) // 2, axis=2)
    args = ["--input", str(src), "--size", "64", "--salt", SALT]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "3 mask plane(s) beyond the series, 1 in its gaps (no slice there)" in printed
    assert "gap in slice positions" in printed
    manifest = _manifest(tmp_path / "out")
    assert len(manifest["warnings"]) == 2
    assert next(iter(manifest["patients"].values()))["annotated"] is True
    # Slice by slice on its own position: the slices after the gap keep their masks.
    per_slice = [sum(s["lesion_pixels"]) for s in manifest["slices"]]
    assert per_slice == [int((kept[:, :, k] > 0).sum()) for k in range(kept.shape[2])]
    assert main([*args, "--out", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "--strict" in err and "beyond the series" in err and "gap in slice positions" in err
    assert not (tmp_path / "strict" / "manifest.json").exists()


def _convert_in_a_process(src: Path, out: Path, hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = ["--input", str(src), "--out", str(out), "--size", "64", "--salt", SALT]
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools.convert", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_reruns_in_two_processes_are_byte_identical(cohort, tmp_path):
    src = tmp_path / "in"
    for name in list(_slice_counts(cohort))[:2]:
        shutil.copytree(cohort / name, src / name)
    _convert_in_a_process(src, tmp_path / "a", "1")
    _convert_in_a_process(src, tmp_path / "b", "2")

    def digests(folder):
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
        }

    first, second = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert len(first) >= 2 and first == second


def _children(pid: int) -> set[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid) and fields.get("State", "")[:1] != "Z":
            found.add(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state


@contextlib.contextmanager
def _converting_with_workers(cohort, out, workers: int, **popen):
    """The converter in a process of its own, once two of its children (pool workers)
    run: yields (process, their pids); all are killed on the way out."""
    import signal
    import time

    args = ["--input", str(cohort), "--out", str(out), "--size", "64", "--salt", SALT]
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_tools.convert", *args, "--workers", str(workers)],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.DEVNULL,
        **popen,
    )
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and len(children) < 2:
            children = _children(proc.pid)
            time.sleep(0.05)
        assert len(children) >= 2, "the converter never started its workers"
        yield proc, children
    finally:
        proc.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _outliving(pids, seconds=15.0) -> list[int]:
    """The processes still alive after up to `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_workers_end_when_the_converter_is_killed(cohort, tmp_path):
    import signal

    with _converting_with_workers(cohort, tmp_path / "out", 2, stderr=subprocess.DEVNULL) as (
        proc,
        workers,
    ):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not _outliving(workers), "workers outlived the converter"
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_ctrl_c_stops_the_workers_without_their_tracebacks(cohort, tmp_path):
    """A Ctrl-C in a terminal reaches every process of the group: each pool worker
    printed a KeyboardInterrupt traceback (one still importing, too) above the
    converter's one tidy line, and the converter then waited for the studies already
    queued to its workers."""
    import signal

    def as_a_terminal_job():
        # Ctrl-C's default action, as in a terminal: a test run started in the background
        # of a script (`.ci/run ... &`) hands its children SIGINT ignored, and the
        # converter then rightly finished its work (exit 0).
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    # Its own process group, as a terminal's job is: the signal reaches every process.
    popen = dict(
        stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=as_a_terminal_job
    )
    with _converting_with_workers(cohort, tmp_path / "out", 3, **popen) as (proc, workers):
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert not _outliving(workers), "workers outlived the converter"
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "interrupted" in stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    "shape, header, reason",
    [
        ((16, 16), {}, "expected a 3-D volume, got shape (16, 16)"),
        ((16, 16, 4, 2), {}, "expected a 3-D volume"),
        ((16, 16, 4), {"zero_sform": True}, "degenerate"),
    ],
)
def test_nifti_files_that_are_no_volume_are_named(tmp_path, shape, header, reason):
    """A 2-D NIfTI or a zero affine said "cannot read NIfTI
    (OrientationError: ...)", which named nothing a user could check."""
    import nibabel as nib

    from data_tools.conversion.reading import read_nifti_volume
    from data_tools.dicom_io import SkipFile

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(None, code=0)
    hdr.set_sform(None, code=0)
    if header.get("zero_sform"):
        hdr["sform_code"] = 2
        for row in ("srow_x", "srow_y", "srow_z"):
            hdr[row] = 0.0
    path = tmp_path / "ct.nii"
    nib.save(nib.Nifti1Image(np.full(shape, -800, np.int16), None, header=hdr), path)
    with pytest.raises(SkipFile, match=re.escape(reason)):
        read_nifti_volume(path)


def test_a_truncated_nifti_is_named_on_one_line(tmp_path):
    """nibabel's "Expected 8192 bytes, got 48 bytes from ... - could the file be
    damaged?" breaks its text across lines: the reason printed as two lines."""
    import nibabel as nib

    from data_tools.conversion.reading import read_nifti_volume
    from data_tools.dicom_io import SkipFile

    path = tmp_path / "ct.nii"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.int16), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(SkipFile, match="cannot read NIfTI") as error:
        read_nifti_volume(path)
    assert "\n" not in str(error.value)


def test_a_mask_named_after_a_nifti_volume_is_that_volumes_alone(cohort, tmp_path):
    # dcm2niix beside the DICOM series: ct.nii.gz and its ct_mask.nii.gz fit the series'
    # grid too, but the mask is the volume's; the series does not borrow it.
    from data_tools.dicom_io import read_hu

    first = next(iter(_slice_counts(cohort)))
    src = tmp_path / "in" / "p"
    shutil.copytree(cohort / first / "ct", src / "ct")
    mask = nib.load(cohort / first / "lesions.nii.gz")
    files = sorted((src / "ct").glob("*.dcm"))  # IM0000 is the mask's plane 0
    hu = np.stack([read_hu(f) for f in files])  # [slice, row, column]
    volume = np.ascontiguousarray(hu.transpose(2, 1, 0))  # as the mask: column, row, slice
    nib.save(nib.Nifti1Image(volume, mask.affine), src / "ct.nii.gz")
    shutil.copy(cohort / first / "lesions.nii.gz", src / "ct_mask.nii.gz")
    summary = convert(tmp_path / "in", tmp_path / "out", size=64, salt=SALT, progress=False)
    assert summary["patients"] == 2 and not summary["skipped"]
    annotated = sorted(e["annotated"] for e in _manifest(tmp_path / "out")["patients"].values())
    assert annotated == [False, True]


def test_the_input_listing_is_rglobs_less_the_output_folder(tmp_path):
    """`input_files` lists by scandir (one resolve per folder): the files
    ``rglob("*")`` + ``is_file()`` find, in the same order, less those whose real path is
    in the output folder: through links to files, not into linked folders, dot files,
    broken links, a link to itself and one through a file as before."""
    from data_tools.conversion.discovery import _files_under, input_files

    root = tmp_path / "in"
    for rel in ["a/1.dcm", "a/b/2.dcm", "a/.hidden", "c/3", "out/slices.tfrecord", "z.nii.gz"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / ".dot" / "4.dcm").parent.mkdir()
    (root / ".dot" / "4.dcm").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "5.dcm").write_bytes(b"x")
    (root / "link-file.dcm").symlink_to(elsewhere / "5.dcm")
    (root / "link-folder").symlink_to(elsewhere, target_is_directory=True)
    (root / "broken.dcm").symlink_to(tmp_path / "nothing")
    (root / "c" / "into-out.dcm").symlink_to(root / "out" / "slices.tfrecord")
    (root / "c" / "loop.dcm").symlink_to(root / "c" / "loop.dcm")  # ELOOP: not a file
    (root / "c" / "not-a-folder.dcm").symlink_to(root / "a" / "1.dcm" / "x")  # ENOTDIR
    out = root / "out"

    reference = sorted(p for p in root.rglob("*") if p.is_file() and out not in p.resolve().parents)
    assert sorted(_files_under(root, out.resolve(), [])) == reference
    assert sorted(_files_under(root, None, [])) == sorted(p for p in root.rglob("*") if p.is_file())
    assert root / "link-file.dcm" in reference and root / "c" / "into-out.dcm" not in reference
    listed = input_files(root, exclude=out)
    assert [p.relative_to(root).as_posix() for p in listed.candidates] == [
        ".dot/4.dcm",
        "a/1.dcm",
        "a/b/2.dcm",
        "c/3",
        "link-file.dcm",
    ]
    assert listed.niftis == [root / "z.nii.gz"]
    # What rglob passed over in silence is listed as ignored, with the reason.
    assert [path for path, _ in listed.ignored] == [
        "broken.dcm",
        "c/loop.dcm",
        "c/not-a-folder.dcm",
        "link-folder",
    ]
    reasons = dict(listed.ignored)
    assert "leads to no file" in reasons["c/loop.dcm"]
    assert "to a folder: not followed" in reasons["link-folder"]


def test_a_folder_that_cannot_be_read_is_ignored_with_its_reason(tmp_path, monkeypatch):
    """(As root every folder can be read: the refusal is the system's, simulated.)"""
    from data_tools.conversion import discovery as module

    for rel in ["a/1.dcm", "a/b/2.dcm"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    scandir = os.scandir

    def refusing(path):
        if Path(path).name == "b":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(module.os, "scandir", refusing)
    listed = module.input_files(tmp_path)
    assert listed.candidates == [tmp_path / "a" / "1.dcm"]
    assert listed.ignored == [("a/b", "folder not read: Permission denied")]


def test_arguments_that_cannot_work_stop_before_anything_is_written(cohort, tmp_path, capsys):
    """--folds 1 failed after converting everything (a traceback, 61 MB left in a
    .partial folder); --out equal to --input said "no usable CT series"."""
    src = tmp_path / "in"
    shutil.copytree(cohort / "case_0001", src / "p")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    args = ["--input", str(src), "--size", "64", "--salt", SALT]
    assert main([*args, "--out", str(tmp_path / "o"), "--folds", "1"]) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main([*args, "--out", str(src)]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    # An --out inside the input that holds some of it (its series' folder) said "no
    # usable CT series ... under in", the series being left out as the output.
    series = next(p.parent for p in src.rglob("*.dcm"))
    assert main([*args, "--out", str(series)]) == 2
    err = capsys.readouterr().err
    assert "lies inside the input and holds" in err and "no usable" not in err
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    # Only the converter's own files (a killed run's .partial-*/done/ markers have no
    # suffix): a rerun goes on. A DICOM file named as GE names them (I.001) is input.
    inner = src / "records"
    (inner / ".partial-7" / "done").mkdir(parents=True)
    (inner / ".partial-7" / "done" / "000000").write_bytes(b"")
    assert main([*args, "--out", str(inner)]) == 0
    capsys.readouterr()
    (inner / "I.001").write_bytes(b"x")
    assert main([*args, "--out", str(inner)]) == 2
    assert "holds 1 input files" in capsys.readouterr().err
    shutil.rmtree(inner)
    # An empty class name was dropped: mask label 2 (consolidation) became "fibrosis".
    for classes in ("ggo,,fibrosis", "ggo,consolidation,"):
        with pytest.raises(SystemExit) as stop:
            main([*args, "--out", str(tmp_path / "o"), "--classes", classes])
        assert stop.value.code == 2
        assert "distinct, non-empty classes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # More workers than CPUs ran without a word (slower than fewer, and more memory).
    from data_tools.workers import usable_cpus

    many = str(usable_cpus() + 2)
    assert main([*args, "--out", str(tmp_path / "o"), "--folds", "1", "--workers", many]) == 2
    assert f"--workers {many} on {usable_cpus()} usable CPU(s)" in capsys.readouterr().err
    # Another tool's manifest.json in --out was replaced without a word; an earlier
    # conversion's is replaced by the next one.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "my dataset"}')
    assert main([*args, "--out", str(foreign)]) == 2
    assert "holds a manifest.json that no conversion wrote" in capsys.readouterr().err
    assert (foreign / "manifest.json").read_text() == '{"name": "my dataset"}'
    assert sorted(p.name for p in foreign.iterdir()) == ["manifest.json"]
    again = tmp_path / "again"
    assert main([*args, "--out", str(again)]) == 0
    assert main([*args, "--out", str(again)]) == 0


def test_a_slice_unreadable_when_converting_is_named_and_its_gap_warned(cohort, tmp_path):
    """A file whose pixels end early is found only when its study is read: --strict named
    its folder, not the file, and the gap it left was not warned of (one left out at
    discovery is)."""
    src = tmp_path / "in"
    shutil.copytree(cohort / "case_0001", src / "p")
    ct = sorted((src / "p" / "ct").glob("*.dcm"))
    middle = ct[len(ct) // 2]
    middle.write_bytes(middle.read_bytes()[:-3000])  # its header reads, its pixels do not
    summary = convert(src, tmp_path / "out", size=64, salt=SALT, progress=False)
    assert summary["slices"] == len(ct) - 1
    warned = {w["path"]: w["warning"] for w in summary["warnings"]}
    assert "once the unreadable slices were left out" in warned["p/ct"]
    manifest = _manifest(tmp_path / "out")
    assert [w["warning"] for w in manifest["warnings"]] == [warned["p/ct"]]
    with pytest.raises(ConversionError, match=f"--strict: p/ct/{middle.name}: corrupt"):
        convert(src, tmp_path / "strict", size=64, salt=SALT, strict=True, progress=False)
    # A gap discovery saw (a file missing) is not warned of twice when an unreadable
    # slice elsewhere shifts the slice numbers in its description.
    shutil.rmtree(src / "p")
    shutil.copytree(cohort / "case_0001", src / "p")
    ct[len(ct) // 2].unlink()
    ct[0].write_bytes(ct[0].read_bytes()[:-3000])
    summary = convert(src, tmp_path / "out2", size=64, salt=SALT, progress=False)
    gaps = [w["warning"] for w in summary["warnings"] if "gap in slice positions" in w["warning"]]
    assert len(gaps) == 1 and "unreadable" not in gaps[0]


def test_file_names_that_are_not_utf8_print(cohort, tmp_path):
    """A skipped file and a link to nowhere whose names are not UTF-8: the summary prints
    them escaped on a strict UTF-8 console (it raised UnicodeEncodeError once written)."""
    import io

    from data_tools.conversion.pipeline import print_summary

    src = tmp_path / "in"
    shutil.copytree(cohort / "case_0001", src / "p")
    os.symlink(b"/nonexistent", os.fsencode(src) + b"/link-\xff.dcm")
    (Path(os.fsdecode(os.fsencode(src) + b"/junk-\xfe.dcm"))).write_text("not dicom")
    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/out-\xfd"))
    summary = convert(src, out, size=64, salt=SALT, progress=False)
    console = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    with contextlib.redirect_stdout(console):
        print_summary(summary)
    console.flush()
    printed = console.buffer.getvalue().decode("utf-8")
    assert "link-\\udcff.dcm: a link that leads to no file" in printed
    assert "junk-\\udcfe.dcm: not a DICOM file" in printed
    assert "shards in " in printed and "out-\\udcfd in " in printed.splitlines()[0]


def test_more_shards_than_patients_are_warned_of(cohort, tmp_path, capsys):
    """--shards 100 on 10 patients wrote 90 empty shards without a word."""
    from data_tools.conversion.pipeline import print_summary

    src = tmp_path / "in"
    shutil.copytree(cohort / "case_0001", src / "p")
    summary = convert(src, tmp_path / "out", size=64, salt=SALT, shards=3, progress=False)
    print_summary(summary)
    assert "warning: --shards 3 for 1 patients: 2 shards are empty" in capsys.readouterr().out


@pytest.mark.parametrize("salt", ["", "  "])
def test_an_empty_salt_is_refused_by_both_commands(tmp_path, capsys, salt):
    """--salt "$UNSET" fell back to the key file without a word (other pseudonyms than
    the user meant, a key file written into their home)."""
    from tfcovseg.cli.predict import main as predict_main

    common = ["--input", str(tmp_path), "--out", str(tmp_path / "o"), "--salt", salt]
    for command, args in ((main, common), (predict_main, [*common, "--model", str(tmp_path)])):
        with pytest.raises(SystemExit) as stop:
            command(args)
        assert stop.value.code == 2
        assert "--salt: must not be empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
