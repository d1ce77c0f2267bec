"""Model files that are whole or absent: atomic saves and plain reasons for broken files.

Keras writes ``.keras`` and ``.weights.h5`` files in place, so a process killed while
saving leaves a truncated (often 0-byte) file under the final name, which the next run
takes for a model and Keras then reports as "File not found". Every model file tfcovseg
writes goes through `save_model` / `save_weights` (a temporary file beside the target,
renamed over it when complete), and every one it reads is first checked by
`model_file_problem`. Pure Python and Keras: any backend.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path


class ModelFileError(ValueError):
    """A model file that is missing, empty or truncated; the message names it and why."""


def _partial_path(path: Path) -> Path:
    """A temporary name beside `path` with the same suffix (Keras checks the suffix)."""
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    stem = path.name[: -len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.partial-{os.getpid()}{suffix}")


def _replace_with(write, path) -> None:
    """``write(tmp)`` on a temporary file beside `path`, then renames it over `path`."""
    path = Path(path)
    tmp = _partial_path(path)
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_model(model, path, **kwargs) -> None:
    """``model.save(path)``, atomically: a kill leaves the old file or the new one."""
    _replace_with(lambda tmp: model.save(tmp, **kwargs), path)


def save_weights(model, path, **kwargs) -> None:
    """``model.save_weights(path)`` (a ``.weights.h5`` file), atomically."""
    _replace_with(lambda tmp: model.save_weights(tmp, **kwargs), path)


def model_file_problem(path) -> str | None:
    """Why a ``.keras`` file cannot be a model (missing, empty, truncated), or None.

    Cheap (no weights are read), so that an error names the cause.
    """
    path = Path(path)
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_file():
        return f"{path} is not a file"
    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty (0 bytes): a write was interrupted"
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        return f"{path} is not a complete .keras file ({size} bytes: truncated or corrupt)"
    return None
