"""`data_tools.files`: one run at a time in an output folder (`exclusive_folder`), output
folders checked before work starts (`check_output_dir`)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from data_tools.files import OutputError, check_output_dir, exclusive_folder


def test_a_held_folder_refuses_a_second_holder_and_is_free_again_after(tmp_path):
    out = tmp_path / "a" / "out"
    with exclusive_folder(out):
        assert out.is_dir()
        (out / "x").write_text("work")
        with pytest.raises(OutputError, match=f"--out {out} is being written by another run"):
            with exclusive_folder(out):
                pass
    with exclusive_folder(out):  # released
        pass
    assert (out / "x").read_text() == "work"


def test_a_folder_made_for_a_run_that_wrote_nothing_is_removed(tmp_path):
    made, kept = tmp_path / "made", tmp_path / "kept"
    kept.mkdir()
    for folder in (made, kept):
        with pytest.raises(RuntimeError), exclusive_folder(folder):
            raise RuntimeError("the run failed before writing")
    assert not made.exists() and kept.is_dir()  # one that was there before stays


def test_file_systems_without_locks_go_on_unlocked(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")  # no flock on Windows: nothing is locked there

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with exclusive_folder(tmp_path / "nfs") as out:
        (out / "x").write_text("written")
    assert (tmp_path / "nfs" / "x").read_text() == "written"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_file_is_named_for_that(tmp_path):
    # /proc answers ENOENT to a new file: "No such file or directory" blamed /proc itself.
    with pytest.raises(OutputError, match=r"--out /proc/x cannot be written \(/proc: no file"):
        check_output_dir("/proc/x")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="lies under the file"):
        check_output_dir(tmp_path / "f" / "sub")
