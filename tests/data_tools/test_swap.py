"""A finished conversion swapped into its output folder, killed at every step."""

import json
import os

import pytest

from data_tools.conversion import swap
from data_tools.conversion.discovery import ConversionError


class Killed(BaseException):
    """A SIGKILL: nothing after it runs, no cleanup."""


def _shard(i, n):
    return f"slices-{i:05d}-of-{n:05d}.tfrecord"


def _conversion(folder, tag, n):
    """A conversion's files: `n` shards holding `tag`, and the manifest listing them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [_shard(i, n) for i in range(n)]
    for name in names:
        (folder / name).write_text(f"{tag}:{name}")
    return names, {"tag": tag, "shards": names}


def _state(out):
    """The output folder's conversion as a reader sees it: None without a manifest."""
    if not (out / "manifest.json").exists():
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    shards = sorted(p.name for p in out.iterdir() if p.name.startswith("slices-"))
    assert shards == sorted(manifest["shards"]), "a manifest beside shards not its own"
    tags = {(out / name).read_text().split(":")[0] for name in shards}
    assert tags == {manifest["tag"]}, "shards of another conversion under the manifest"
    return manifest["tag"]


def _setup(tmp_path, old_shards, new_shards):
    out, partial = tmp_path / "out", tmp_path / "out" / ".partial-1"
    if old_shards:
        _, manifest = _conversion(out, "old", old_shards)
        (out / "manifest.json").write_text(json.dumps(manifest))
    names, manifest = _conversion(partial, "new", new_shards)
    return out, partial, names, manifest


@pytest.mark.parametrize("old_shards, new_shards", [(3, 3), (3, 1), (1, 2), (0, 2)])
def test_a_kill_at_any_step_leaves_the_old_conversion_or_the_new(
    tmp_path, monkeypatch, old_shards, new_shards
):
    """Each rename of the swap in turn is where a SIGKILL lands; the next run's cleanup
    (`discard_partial`) then leaves the earlier conversion whole or the new one (it left
    the earlier manifest over new shards, the earlier shards deleted)."""
    renames = 1 + old_shards + new_shards + (old_shards > 0)  # + the manifest's own
    seen = set()
    for kill_at in range(1, renames + 2):
        root = tmp_path / str(kill_at)
        out, partial, names, manifest = _setup(root, old_shards, new_shards)
        calls = {"n": 0}
        real = os.replace

        def replace(src, dst, kill_at=kill_at, calls=calls, real=real):
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise Killed
            return real(src, dst)

        with monkeypatch.context() as m:
            m.setattr(swap.os, "replace", replace)
            m.setattr(swap, "discard_partial", lambda *args: None)  # no cleanup: a SIGKILL
            try:
                swap.swap_in(out, partial, names, manifest)
            except Killed:
                pass
        # Whatever a reader finds now is one conversion, or none (unfinished).
        found = _state(out)
        assert found in (None, "new") or (found == "old" and old_shards)
        swap.discard_partial(out, partial)  # the next run, as it starts
        after = _state(out)
        assert after == ("new" if found == "new" else "old" if old_shards else None)
        if after is None:
            assert not any(p.name.startswith("slices-") for p in out.iterdir())
        assert not partial.exists()
        seen.add(after)
    assert seen == ({"old", "new"} if old_shards else {None, "new"})


def test_a_ctrl_c_puts_the_earlier_conversion_back_at_once(tmp_path, monkeypatch):
    out, partial, names, manifest = _setup(tmp_path, 2, 2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(swap, "atomic_write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        swap.swap_in(out, partial, names, manifest)
    assert _state(out) == "old" and not partial.exists()


def test_a_retried_swap_ends_a_finished_one_and_refuses_after_an_unfinished_one(
    tmp_path, monkeypatch
):
    """A Beam runner may run the last step again on the same partial folder: after a
    swap that finished, nothing changes; after one killed midway its shards are gone from
    the partial folder (they were moved in), and the retry must not swap in empty files."""
    out, partial, names, manifest = _setup(tmp_path / "a", 2, 2)
    with monkeypatch.context() as m:
        m.setattr(swap.shutil, "rmtree", lambda *args, **kwargs: None)  # killed at the end
        swap.swap_in(out, partial, names, manifest)
    swap.swap_in(out, partial, names, manifest)
    assert _state(out) == "new" and not partial.exists()

    out, partial, names, manifest = _setup(tmp_path / "b", 2, 2)
    calls = {"n": 0}
    real = os.replace

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 5:  # the second new shard
            raise Killed
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(swap.os, "replace", replace)
        m.setattr(swap, "discard_partial", lambda *args: None)
        with pytest.raises(Killed):
            swap.swap_in(out, partial, names, manifest)
    with pytest.raises(ConversionError, match="is not in the run's folder"):
        swap.swap_in(out, partial, names, manifest)
    assert _state(out) == "old" and not partial.exists()


def test_a_restore_that_fails_keeps_the_set_aside_conversion(tmp_path, monkeypatch, capsys):
    """A disk error while putting the earlier conversion back was swallowed, and the
    partial folder holding it deleted: the output folder was left empty."""
    out, partial, names, manifest = _setup(tmp_path, 2, 2)
    real = os.replace

    def failing(src, dst):
        if "previous" in str(src):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(swap, "atomic_write_json", interrupted)
    monkeypatch.setattr(swap.os, "replace", failing)
    with pytest.raises(KeyboardInterrupt):
        swap.swap_in(out, partial, names, manifest)
    assert "could not be put back" in capsys.readouterr().err
    assert (partial / swap.PREVIOUS / "manifest.json").exists()
    monkeypatch.undo()
    swap.discard_partial(out, partial)  # the next run
    assert _state(out) == "old" and not partial.exists()
