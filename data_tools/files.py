"""Writing files so that nothing is ever half-written, and strict JSON.

Every file tfcovseg writes for others to read (records manifests, run state, reports,
exports) goes through here:

- `atomic_write_text` / `atomic_write_json`: a temporary file beside the target, renamed
  into place when complete, so a kill leaves the old file or the new one;
- `atomic_directory`: the same for a folder (an export version, a prediction series);
- `json_text`: standard JSON only (NaN and infinities become ``null``; Python's default
  writes bare ``NaN``, which other JSON readers refuse);
- `check_output_dir`: an ``--out`` that is a file, lies under a file or cannot be written
  is reported in one line before any work starts;
- `exclusive_folder`: one run at a time writes into a folder.

Pure Python (no TensorFlow); used by `data_tools` and `tfcovseg` alike.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be used; the message names it."""


def plain(value):
    """`value` with NaN and infinities as None and numpy scalars/arrays as Python values,
    recursively (what strict JSON can hold)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy scalars and arrays
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def files_sha256(paths, root=None) -> str:
    """SHA-256 of files' bytes, in the order given; with `root`, each file's name relative
    to it first (so that a renamed or moved file changes the digest)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        if root is not None:
            h.update(path.relative_to(root).as_posix().encode("utf-8", "surrogateescape"))
            h.update(b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def json_text(data, indent=2, sort_keys=False) -> str:
    """Strict JSON text of `data` (`plain` first: no bare NaN / Infinity)."""
    return json.dumps(plain(data), indent=indent, sort_keys=sort_keys, allow_nan=False)


def atomic_write_text(path, text: str) -> None:
    """Writes text to a temporary file beside `path`, then renames it into place.

    A reader sees the old file or the new one, never half of one; on failure the
    temporary file is removed and the old file stays. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # A file name that is not UTF-8 (kept by Python as surrogates) is written with
        # backslash escapes, as `data_tools.privacy.printable` shows it: no failed write.
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the usual mode (or keep the old file's).
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, data, indent=2, sort_keys=False) -> None:
    """`atomic_write_text` of `json_text(data)`."""
    atomic_write_text(path, json_text(data, indent, sort_keys) + "\n")


@contextlib.contextmanager
def atomic_directory(target):
    """Yields a temporary folder beside `target` that becomes `target` when the block ends.

    The folder is renamed into place only if the block completes; on any error it is
    removed and nothing appears at `target`. Its name starts with a dot, which TF Serving
    (numbered versions only) and readers of ``OUT/<name>/`` ignore. An existing `target`
    is never replaced: the caller checks, and a non-empty one makes the rename fail.
    The folder gets the usual mode (mkdtemp makes it owner-only), so a model server
    running as another user can read an export.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{partial_prefix(target)}", dir=target.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def partial_prefix(target) -> str:
    """The name prefix of `atomic_directory`'s temporary folders for `target`."""
    return f".{Path(target).name}-"


def remove_partial_directories(target) -> list[Path]:
    """Removes what interrupted `atomic_directory` blocks left beside `target`; returns it."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    left = [p for p in target.parent.glob(partial_prefix(target) + "*") if p.is_dir()]
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    return left


def check_output_dir(path, option="--out") -> Path:
    """Checks that `path` is, or can become, a writable folder; returns it.

    Nothing is created. The nearest existing folder above a missing `path` must accept a
    new entry (checked by creating and removing a temporary file, which also catches
    read-only file systems and root-squashed mounts that `os.access` does not).

    Raises:
        OutputError: `path` (or a part of it) is a file, or cannot be written.
    """
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"lies under the file {probe}"
        raise OutputError(f"{option} {path} {where}: give a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".tfcovseg-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno in (errno.EACCES, errno.EPERM):
            reason = "permission denied"
        elif e.errno == errno.ENOENT:  # /proc, /sys: folders that take no new file
            reason = "no file can be created there"
        raise OutputError(f"{option} {path} cannot be written ({probe}: {reason})") from None
    return path


@contextlib.contextmanager
def exclusive_folder(path, option="--out", error=OutputError):
    """Creates the folder `path` if needed and holds it while a run writes there: a second
    run given the same folder meanwhile is refused (`error`, naming it) instead of
    removing the first one's work in progress or mixing its files with the first's.

    An advisory lock on the folder itself (``flock``; no file is left behind), released
    when the run ends, also when it is killed. Where ``flock`` does not exist (Windows)
    nothing is locked. A folder made here and still empty at the end (the run failed
    before writing anything) is removed again.
    """
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        try:
            import fcntl
        except ImportError:
            yield path
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # a folder that can be written but not read: go on unlocked
            yield path
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise error(
                    f"{option} {path} is being written by another run: wait for it to end "
                    "or give another folder"
                ) from None
            except OSError:
                pass  # a file system without locks (some network mounts): go on unlocked
            yield path
        finally:
            os.close(fd)
    finally:
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                path.rmdir()
