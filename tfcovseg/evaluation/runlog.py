"""What a run folder records about its training, read back for the evaluation report.

``run.json`` (written by `tfcovseg.train`): the data fingerprint, seed, strategy, versions
and the time of each phase. ``logs/<phase>.csv`` (one row per epoch, Keras' CSVLogger):
the learning curves, from which the best epoch (lowest validation loss, the one the
``*_best.keras`` checkpoint holds) and whether early stopping ended the phase follow.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from data_tools.folds import SPLITS
from tfcovseg.constants import RUN_MODELS

# The config field bounding each phase's epochs (a self-training round's log is
# ``student_r<N>.csv``).
_MAX_EPOCHS = {"segmentation": "train.epochs", "classification": "train.classifier_epochs"}
# Other splits' evaluations live apart from the test split's, which stays at the top of the
# run (compare, cross-validation and the README read it there): scoring the validation
# patients must not overwrite the test figures.
EVALUATION_DIR = "evaluation"


def evaluation_dir(run: Path, split: str) -> Path:
    """Where `tfcovseg.evaluate` writes a split's metrics.json, reports and figures: the
    run folder for the test split, ``evaluation/<split>/`` in it for the others."""
    run = Path(run)
    return run if split == "test" else run / EVALUATION_DIR / split


def run_of(folder: Path) -> Path:
    """The run folder an evaluation folder belongs to (`evaluation_dir`'s inverse): a run
    itself (one kept under a folder named "evaluation" too) is its own."""
    folder = Path(folder)
    split = folder.name
    inside = folder.parent.name == EVALUATION_DIR and split in SPLITS and split != "test"
    return folder.parent.parent if inside else folder


def read_history(path: Path) -> dict[str, list[float]]:
    """A CSV log as columns of floats (NaN where a cell is empty or not a number)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            columns.setdefault(key, []).append(_number(value))
    return columns


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _phase_order(path: Path):
    """Segmentation, self-training's rounds, then the classifier: the order they run."""
    rank = {"segmentation": 0, "classification": 2}.get(path.stem, 1)
    return rank, path.stem


def _max_epochs(phase: str, config) -> int | None:
    field = "semi.epochs" if phase.startswith("student_") else _MAX_EPOCHS.get(phase)
    if field is None or config is None:
        return None
    section, name = field.split(".")
    return int(getattr(getattr(config, section), name))


def phase_summary(history: dict, max_epochs: int | None) -> dict:
    """Epochs run, the best epoch and its validation loss, and whether it stopped early."""
    loss = history.get("loss", [])
    val = [v for v in history.get("val_loss", []) if not math.isnan(v)]
    best = None
    if val and len(val) == len(loss):
        best = min(range(len(val)), key=val.__getitem__) + 1
    return {
        "epochs": len(loss),
        "max_epochs": max_epochs,
        "best_epoch": best,
        "best_val_loss": None if best is None else val[best - 1],
        "stopped_early": None if max_epochs is None else len(loss) < max_epochs,
        "loss": loss,
        "val_loss": history.get("val_loss", []),
    }


def _completed_phases(run) -> list[str] | None:
    """The phases ``state.json`` records as completed; None without a readable state (runs
    older than it; the trainer names a broken state when the run is resumed)."""
    path = Path(run) / "state.json"
    if not path.is_file():
        return None
    try:
        return list(json.loads(path.read_text()).get("completed", []))
    except (ValueError, OSError, AttributeError):
        return None


def unfinished_phases(run, config) -> list[str]:
    """The configured phases the run folder's ``state.json`` does not record as completed:
    a run killed part-way (empty for a finished run, and for runs older than the state)."""
    completed = _completed_phases(run) if config is not None else None
    if completed is None:
        return []
    return [p for p in config.train.phases if p not in completed]


def missing_models(run, config) -> list[str]:
    """The best-model files (``<model>_best.keras``, `RUN_MODELS`) of phases that
    ``state.json`` records as completed but that are not in the run folder (moved or
    deleted since): a resume trains those phases again."""
    completed = _completed_phases(run) if config is not None else None
    if completed is None:
        return []
    names = [f"{RUN_MODELS[p]}_best.keras" for p in config.train.phases if p in completed]
    return [n for n in names if not (Path(run) / n).is_file()]


def missing_message(run, names) -> str:
    return (
        f"{run} lacks {', '.join(names)}, which its completed training wrote (moved or "
        f"deleted?): put it back, or train that phase again with python -m tfcovseg.train "
        f"--out {run} --resume"
    )


def fingerprint_message(run, folder, fingerprint, trained) -> str | None:
    """A warning when the records read now are not those the run trained on, or None:
    another cohort's slices scored as the run's own split. `trained`: run.json's
    fingerprint as `training_summary` read it (None: absent or unreadable, no claim)."""
    if trained is None or trained == fingerprint:
        return None
    return (
        f"the records in {folder} (fingerprint {fingerprint}) are not those {run} trained "
        f"on ({trained}): its split of them may hold patients it trained on, or other data"
    )


def unfinished_message(run, phases) -> str:
    """What an unfinished run is and how to finish it (evaluate warns, export refuses)."""
    return (
        f"{run} did not finish training (phase {', '.join(phases)} not completed: the run "
        f"was interrupted); finish it with python -m tfcovseg.train --out {run} --resume"
    )


# run.json's fields the report reads, and their types.
_RUN_TYPES = {"data_fingerprint": str, "seed": int, "strategy": str, "replicas": int,
              "cpu_kernels": str, "versions": dict, "timings": dict}  # fmt: skip


def _run_info(run: Path) -> tuple[dict, list[str]]:
    """run.json's `_RUN_TYPES` fields of the types the report reads, and what could not be read
    (the report goes on without it, and says so)."""
    path = run / "run.json"
    if not path.is_file():
        return {}, []
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {}, [f"run.json: {type(e).__name__}"]
    if not isinstance(info, dict):
        return {}, [f"run.json: a {type(info).__name__}, not an object"]
    kept, wrong = {}, []
    for key, kind in _RUN_TYPES.items():
        if key in info:
            value = info[key]
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if ok and kind is dict and key == "timings":
                ok = all(isinstance(v, (int, float)) for v in value.values())
            if ok:
                kept[key] = value
            else:
                wrong.append(f"run.json: {key} malformed")
    return kept, wrong


def training_summary(run, config=None) -> dict:
    """The run's training record: its phases' curves and epochs, and what ``run.json``
    says (fields missing from older runs are left out)."""
    run = Path(run)
    info, unreadable = _run_info(run)
    phases = {}
    for path in sorted((run / "logs").glob("*.csv"), key=_phase_order):
        try:
            history = read_history(path)
        except (OSError, UnicodeDecodeError, csv.Error) as e:  # the report goes on without it
            unreadable.append(f"logs/{path.name}: {type(e).__name__}")
            continue
        if history.get("loss"):  # NaN losses too: a run that diverged is still its run
            phases[path.stem] = phase_summary(history, _max_epochs(path.stem, config))
        elif history:  # rows, but no loss column: not a Keras CSVLogger file
            unreadable.append(f"logs/{path.name}: no loss column (not a training log)")
    for name in unfinished_phases(run, config):
        if name in phases:  # fewer epochs than the maximum: killed, not stopped early
            phases[name] |= {"stopped_early": None, "interrupted": True}
    out = {"phases": phases} | info
    return out | ({"unreadable_logs": unreadable} if unreadable else {})
