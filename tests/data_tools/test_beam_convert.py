"""data_tools.convert --runner direct: the Beam pipeline writes the local converter's output."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from data_tools.conversion.discovery import ConversionError
from data_tools.conversion.pipeline import convert
from data_tools.convert import main

from .conftest import SALT


def _digest(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def local_two_shards(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    convert(cohort, out, size=64, salt=SALT, shards=2, progress=False)
    return out


def test_direct_runner_writes_the_local_converters_bytes(cohort, local_two_shards, tmp_path):
    """Same shards (every example, in the same order) and the same manifest, byte for byte:
    the pipeline converts each study with the local code and writes each shard whole."""
    summary = convert(cohort, tmp_path, size=64, salt=SALT, shards=2, progress=False,
                      runner="direct")  # fmt: skip
    assert _digest(tmp_path) == _digest(local_two_shards)
    assert len(_digest(tmp_path)) == 3  # two shards and the manifest
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert summary["slices"] == manifest["num_slices"] > 0
    assert summary["patients"] == len(manifest["patients"])
    assert not list(tmp_path.glob(".partial-*"))


def test_parallel_direct_runner_and_the_command_line(cohort, local_two_shards, tmp_path, capsys):
    """The command with a runner option: bundles on several threads, the same bytes."""
    code = main([
        "--input", str(cohort), "--out", str(tmp_path), "--size", "64", "--shards", "2",
        "--salt", SALT, "--runner", "direct",
        "--pipeline-option", "direct_num_workers=2",
        "--pipeline-option", "direct_running_mode=multi_threading",
    ])  # fmt: skip
    assert code == 0
    assert _digest(tmp_path) == _digest(local_two_shards)
    assert "converted 6 patients" in capsys.readouterr().out


def test_bad_runner_options_are_refused_before_anything_is_written(cohort, tmp_path, capsys):
    for args, message in (
        (["--pipeline-option", "a=b"], "--pipeline-option needs --runner"),
        (["--runner", "direct", "--workers", "2"], "direct_num_workers=N"),
    ):
        with pytest.raises(SystemExit):
            main(["--input", str(cohort), "--out", str(tmp_path / "x"), *args])
        assert message in capsys.readouterr().err
    with pytest.raises(ConversionError, match="takes KEY=VALUE, got 'oops'"):
        convert(cohort, tmp_path / "y", salt=SALT, runner="direct", pipeline_options=["oops"])
    # Beam dropped an unknown option with a log line and ran; a bad value printed its
    # 132-line usage; a second runner in the options was taken without a word.
    for option, message in (
        ("no_such_option=3", "'no_such_option=3': Apache Beam knows no such option"),
        ("direct_num_workers=abc", "--direct_num_workers: invalid int value: 'abc'"),
        ("runner=DataflowRunner", "choose the runner with --runner"),
    ):
        argv = ["--input", str(cohort), "--out", str(tmp_path / "z"), "--runner", "direct"]
        assert main([*argv, "--pipeline-option", option]) == 2
        err = capsys.readouterr().err
        assert message in err and "usage" not in err and len(err.strip().splitlines()) == 1, err
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


def test_a_study_that_fails_under_strict_leaves_the_output_untouched(cohort, tmp_path):
    import shutil

    src = tmp_path / "in"
    shutil.copytree(cohort / "case_0001", src / "good")
    shutil.copytree(cohort / "case_0002", src / "broken")
    ct = sorted((src / "broken" / "ct").glob("*.dcm"))
    ct[2].write_bytes(ct[2].read_bytes()[:-3000])  # truncated pixel data: fails at reading
    out = tmp_path / "out"
    with pytest.raises(Exception, match="--strict"):
        convert(src, out, size=64, salt=SALT, strict=True, progress=False, runner="direct")
    assert not out.exists() or not [p for p in out.iterdir()]


def test_python_m_reports_a_pipeline_error_in_one_line(cohort, tmp_path):
    """`python -m data_tools.convert` ran a second copy of the module, so the error the
    pipeline raised (the imported module's class) escaped main's handler as a traceback."""
    import shutil
    import subprocess
    import sys

    src = tmp_path / "in"
    shutil.copytree(cohort / "case_0001", src / "broken")
    ct = sorted((src / "broken" / "ct").glob("*.dcm"))
    ct[2].write_bytes(ct[2].read_bytes()[:-3000])
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools.convert", "--input", str(src), "--out",
         str(tmp_path / "out"), "--size", "64", "--salt", SALT, "--strict", "--runner", "direct"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --strict: broken/ct")


def test_the_workers_read_the_headers_not_the_launcher(
    cohort, local_two_shards, tmp_path, monkeypatch
):
    """The launching process only lists the files: reading a header there fails here,
    and the pipeline's worker processes (their own imports) read them all; the output is
    still the local converter's, byte for byte."""
    from data_tools import dicom_io

    def not_here(path):
        raise AssertionError(f"the launcher read the header of {path}")

    monkeypatch.setattr(dicom_io, "scan_compact", not_here)
    convert(cohort, tmp_path, size=64, salt=SALT, shards=2, progress=False, runner="direct",
            pipeline_options=["direct_num_workers=2",
                              "direct_running_mode=multi_processing"])  # fmt: skip
    assert _digest(tmp_path) == _digest(local_two_shards)


def test_ctrl_c_in_a_step_is_the_commands_one_line_and_leaves_nothing(
    cohort, tmp_path, capsys, monkeypatch
):
    """Beam hands a step's KeyboardInterrupt back as a RuntimeError: the command printed
    its 100-line traceback and exited 1 (without Beam: one line, exit 130)."""
    from data_tools import beam_convert

    def interrupted(indexed):
        raise KeyboardInterrupt

    monkeypatch.setattr(beam_convert, "_convert_study", interrupted)
    out = tmp_path / "out"
    args = ["--input", str(cohort), "--out", str(out), "--size", "64", "--salt", SALT]
    assert main([*args, "--runner", "direct"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().startswith("interrupted:")
    assert not out.exists() or not list(out.iterdir())
    assert beam_convert._interrupted(RuntimeError("KeyboardInterrupt [while running 'Convert']"))
    assert not beam_convert._interrupted(RuntimeError("ValueError: a KeyboardInterrupt name"))


def test_an_error_in_a_worker_process_is_the_converters_one_line(tmp_path, capsys):
    """A step's ConversionError comes back from worker processes inside the runner's
    own error (a traceback's text): the command still says it in one line, exit 2."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "notes.bin").write_bytes(b"not DICOM")  # a header to read, nothing usable
    code = main([
        "--input", str(src), "--out", str(tmp_path / "out"), "--salt", SALT,
        "--runner", "direct", "--pipeline-option", "direct_num_workers=2",
        "--pipeline-option", "direct_running_mode=multi_processing",
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no usable CT series") and "notes.bin" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_shard_steps_see_a_small_layout_not_the_plan(cohort, tmp_path):
    """The steps that group and write shards read a side input on every worker: the
    studies' shards and the shards' names, not the plan with every study's headers."""
    import pickle

    from data_tools.beam_convert import _layout
    from data_tools.conversion.pipeline import Job, plan_conversion
    from data_tools.privacy import Redactor

    job = Job(cohort, tmp_path, 64, 2, 1, 5, 0, ("ggo", "consolidation", "fibrosis"), "",
               False, SALT.encode(), "unknown", "unknown", False, 0.0)  # fmt: skip
    plan = plan_conversion(job, Redactor())
    shards, names = _layout(plan)
    assert shards == [plan.shard_of(i) for i in range(len(plan.jobs))]
    assert names == plan.shard_names and set(shards) == {0, 1}
    assert len(pickle.dumps((shards, names))) * 100 < len(pickle.dumps(plan))


def test_a_retried_manifest_step_writes_the_same_manifest(cohort, tmp_path):
    """The final step may run again on the same side input: skipped files and warnings
    were added to the plan in place, so a second run listed each twice."""
    from data_tools.beam_convert import (
        _convert_study,
        _layout,
        _manifest,
        _study_jobs,
        _write_shard,
    )
    from data_tools.conversion.pipeline import MANIFEST, Job, partial_folder, plan_conversion
    from data_tools.privacy import Redactor

    src = tmp_path / "in"
    shutil.copytree(cohort / "case_0001", src / "p")
    (src / "junk.dcm").write_text("not dicom")  # a skipped file
    ct = sorted((src / "p" / "ct").glob("*.dcm"))
    ct[len(ct) // 2].write_bytes(ct[len(ct) // 2].read_bytes()[:-3000])  # a read-time gap
    out = tmp_path / "out"
    job = Job(src, out, 64, 1, 1, 5, 0, ("ggo", "consolidation", "fibrosis"), "",
               False, SALT.encode(), "unknown", "unknown", False, 0.0)  # fmt: skip
    plan = plan_conversion(job, Redactor())
    manifests = []
    for _ in range(2):
        partial = partial_folder(job)
        items = [_convert_study(item) for item in _study_jobs(plan, partial)]
        layout = _layout(plan)
        _write_shard((0, items), partial, layout)  # one shard: every study's
        _manifest(items, job, plan, partial)
        manifests.append(json.loads((out / MANIFEST).read_text()))
    assert len(manifests[0]["skipped"]) == 2 and len(manifests[0]["warnings"]) == 1
    assert manifests[1] == manifests[0]
