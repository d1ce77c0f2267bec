"""Putting a finished conversion into its output folder so that no kill loses the one before.

The output folder holds one conversion: ``manifest.json`` and the shards it lists. A run
writes its shards into its partial folder (``.partial-<pid>``) and swaps them in at the end
(`swap_in`), in four steps, each a rename:

1. the earlier manifest goes aside into ``<partial>/previous`` (from here on no manifest
   in the output folder lists shards that may change);
2. the earlier shards follow it (the new ones may bear their names), then a marker file
   says they all have (`_ASIDE`): from here on a shard in the output folder is a new one;
3. the new shards go in;
4. the new manifest is written (atomically), and the partial folder removed.

A kill between 1 and 4 leaves an output folder without a manifest, which readers refuse
as unfinished; `restore_previous` puts the earlier conversion back (a Ctrl-C's cleanup at
once, otherwise the next run as it starts: `discard_partial` on every stale partial
folder). Before the marker, the shards in the output folder are earlier ones; after it,
new ones, removed before the earlier ones come back.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from data_tools.conversion.discovery import ConversionError
from data_tools.conversion.shards import SHARD_RE
from data_tools.files import atomic_write_json

MANIFEST = "manifest.json"
PREVIOUS = "previous"  # in a partial folder: the conversion a finishing run replaces
_ASIDE = ".aside"  # in PREVIOUS: every earlier shard is there


def swap_in(out_dir: Path, partial: Path, shard_names, manifest: dict) -> None:
    """Replaces the output folder's conversion with the shards `shard_names` in `partial`
    and `manifest` (the module's steps). Run again on the same partial folder (a Beam
    runner retrying its last step), it ends a swap that finished, or undoes one that did
    not before it starts again.

    Raises:
        ConversionError: a shard is missing from `partial` (a retried step whose first
            try had moved it in); the earlier conversion is back in place.
    """
    previous = partial / PREVIOUS
    if previous.is_dir():
        if (out_dir / MANIFEST).exists() and (previous / _ASIDE).exists():
            shutil.rmtree(partial, ignore_errors=True)  # the new manifest is in place
            return
        restore_previous(out_dir, previous)
        shutil.rmtree(previous, ignore_errors=True)  # empty, or set aside nothing yet
    missing = [name for name in shard_names if not (partial / name).is_file()]
    if missing:
        discard_partial(out_dir, partial)
        raise ConversionError(
            f"shard {missing[0]} is not in the run's folder {partial} (a retried step?): "
            "the output is as it was; run the conversion again"
        )
    previous.mkdir()
    try:
        if (out_dir / MANIFEST).exists():
            os.replace(out_dir / MANIFEST, previous / MANIFEST)
        for old in out_dir.iterdir():
            if SHARD_RE.match(old.name):
                os.replace(old, previous / old.name)
        (previous / _ASIDE).touch()
        for name in shard_names:
            os.replace(partial / name, out_dir / name)
        atomic_write_json(out_dir / MANIFEST, manifest, indent=1)
    except BaseException:  # Ctrl-C, a full disk: the earlier conversion back now
        discard_partial(out_dir, partial)
        raise
    shutil.rmtree(partial, ignore_errors=True)


def restore_previous(out_dir: Path, previous: Path) -> None:
    """Puts back the conversion a swap killed before its manifest had set aside in
    `previous` (none: the output folder is left without shards), and removes `previous`.
    Nothing to do where the output folder has a manifest: it and its shards are one
    conversion, the earlier one (not yet set aside) or the new one. Safe to run again
    after a kill inside it."""
    if not previous.is_dir() or (out_dir / MANIFEST).exists():
        return
    if (previous / _ASIDE).exists():  # the shards in the output folder are the new run's
        for new in out_dir.iterdir():
            if SHARD_RE.match(new.name):
                new.unlink()
        (previous / _ASIDE).unlink()
    for old in previous.iterdir():
        if SHARD_RE.match(old.name):
            os.replace(old, out_dir / old.name)
    if (previous / MANIFEST).exists():
        os.replace(previous / MANIFEST, out_dir / MANIFEST)
    shutil.rmtree(previous, ignore_errors=True)


def discard_partial(out_dir: Path, partial: Path) -> None:
    """Removes a run's partial folder, after putting back the conversion it had set aside;
    where that fails (a disk error), keeps the folder for the next run to try again."""
    try:
        restore_previous(out_dir, partial / PREVIOUS)
    except OSError as e:
        print(
            f"warning: the earlier records set aside in {partial / PREVIOUS} could not be put "
            f"back ({e.strerror or e}): the next conversion into {out_dir} tries again",
            file=sys.stderr,
        )
        return
    shutil.rmtree(partial, ignore_errors=True)
