"""Finished folds of a benchmark run, kept on disk so that a killed run goes on from them.

``OUT/progress.json`` holds the run's settings; ``OUT/folds/<row>/fold<k>.json`` one
finished (row, fold): its scores and run facts, written atomically once the fold's
probability maps are on disk. A rerun into the same ``OUT`` with the same settings skips
what is there; with other settings it stops, naming what differs, rather than mixing
two runs in one table.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.files import atomic_write_json

PROGRESS = "progress.json"


class StoreError(Exception):
    """``OUT`` holds another run's folds, or a fold file that cannot be read."""


class FoldStore:
    """`settings`: the run's, as `progress.json` keeps them; `normalise`: applied to the
    recorded settings before they are compared (to drop keys that do not matter to this
    run, which an older run recorded)."""

    def __init__(self, out, settings: dict, normalise=None):
        self.out = Path(out)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from disk
        path = self.out / PROGRESS
        if path.is_file():
            try:
                before = json.loads(path.read_text())["settings"]
                before = normalise(before) if normalise else before
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise StoreError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
            differ = differing(before, self.settings)
            if differ:
                raise StoreError(
                    f"{self.out} holds a run with other settings ({', '.join(differ)} "
                    "differ); give another --out, or delete it to start afresh"
                )
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"settings": self.settings})

    def path(self, row: str, fold: int) -> Path:
        return self.out / "folds" / row / f"fold{fold}.json"

    def weights(self, row: str, fold: int) -> Path:
        return self.out / "folds" / row / f"fold{fold}.weights.h5"

    def get(self, row: str, fold: int) -> dict | None:
        path = self.path(row, fold)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{path} cannot be read ({type(e).__name__}: {e})") from None

    def put(self, row: str, fold: int, entry: dict) -> None:
        path = self.path(row, fold)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, entry)


def differing(before: dict, after: dict, free=()) -> list[str]:
    """The keys, other than `free`, whose values differ between two runs' settings."""
    keys = (set(before) | set(after)) - set(free)
    return sorted(k for k in keys if before.get(k) != after.get(k))
