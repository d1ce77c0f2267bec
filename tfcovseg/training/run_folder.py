"""A training run's folder: which folders a run may start in or continue (errors name the
fix), what ``--resume`` keeps (`verified_state`), and the names of the models each phase
writes there."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

from data_tools.files import OutputError, check_output_dir
from tfcovseg.configs.experiment import (
    ARITHMETIC_KEYS,
    TrainConfig,
    config_to_dict,
    dotted_values,
    load_config,
)
from tfcovseg.constants import RUN_MODELS
from tfcovseg.evaluation.runlog import EVALUATION_DIR
from tfcovseg.models import ModelFileError, load_model
from tfcovseg.training.errors import TrainingError

# The paper's two phases keep their numbers; self-training refines phase 1's segmenter.
PHASE_NUMBER = {"segmentation": "1", "self_training": "1b", "classification": "2"}


def phase_name(phase: str) -> str:
    """The model a phase trains, as its checkpoints are named (``<name>_best.keras``)."""
    return RUN_MODELS[phase]


def read_state(out: Path) -> dict:
    path = out / "state.json"
    if not path.is_file():
        return {"completed": [], "timings": {}}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise TrainingError(f"{path} is not valid JSON ({e}): choose another --out") from None


def verified_state(out: Path, config, log) -> dict:
    """The run's state for ``--resume``, with every phase whose best model does not load
    undone.

    A completed phase needs its best checkpoint to load (the next phase and the export
    build on it); when it does not (a file cut by a kill, before writes were atomic), that
    phase and the ones after it run again from their first epoch: their backup and CSV
    log go. The broken best checkpoint of a phase that runs again, completed or not, is
    removed, so that its next epoch writes it again.
    """
    state = read_state(out)
    completed, redo = [], False
    for phase in config.train.phases:
        best = out / f"{RUN_MODELS[phase]}_best.keras"
        problem = _load_problem(best) if best.exists() else None
        done = phase in state["completed"] and not redo
        if done and (problem or not best.exists()):
            why = problem or f"{best.name} is missing"
            log(f"warning: {phase} phase marked completed but {why}: it runs again")
            redo, done = True, False
        if redo:
            shutil.rmtree(out / "backup" / phase, ignore_errors=True)
            (out / "logs" / f"{phase}.csv").unlink(missing_ok=True)
        if problem and not done:
            log(f"warning: {problem}; removed, the phase writes it again")
            best.unlink()
        if done:
            completed.append(phase)
    state["completed"] = completed
    return state


def _load_problem(path: Path) -> str | None:
    """Why a model file of the run does not load, or None."""
    try:
        load_model(path)
    except Exception as e:  # a truncated zip, a missing layer: any failure counts
        return str(e) if isinstance(e, ModelFileError) else f"{path} does not load ({e})"
    return None


# What a run writes before its first epoch ends: a folder holding these alone can go.
_START_FILES = {"config.yaml", "state.json", "logs", "backup"}


def nothing_to_keep(out: Path) -> bool:
    """Whether `out` is a run folder (its ``config.yaml``) holding no trained epoch: a run
    that failed or was killed during start-up. Any other folder (records, a project, a
    parent of runs) is never taken for one."""
    if not out.is_dir():
        return True
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    if "config.yaml" not in names or not names <= _START_FILES:
        return False
    logs = [p for p in (out / "logs").rglob("*") if p.is_file() and p.suffix == ".csv"]
    return not logs and not any(p.is_file() for p in (out / "backup").rglob("*"))


def check_out(out: Path, resume: bool) -> None:
    """An --out that can be written, and exists when resumed (errors name the fix)."""
    try:
        check_output_dir(out)
    except OutputError as e:
        raise TrainingError(str(e)) from None
    if resume and not out.is_dir():
        raise TrainingError(f"--resume: {out} does not exist, so there is no run to continue")


def _training_settings(config):
    """The config without what a resumed run may change: what only happens after training
    (evaluate, export) and how TensorFlow computes the steps (`ARITHMETIC_KEYS`: CPU
    kernels, XLA; TF_ENABLE_ONEDNN_OPTS overrides the kernels anyway, and a run goes on
    on another machine)."""
    default = TrainConfig()
    free = {"evaluate": False, "export_dir": ""}
    free |= {f: getattr(default, f) for f in (k.removeprefix("train.") for k in ARITHMETIC_KEYS)}
    # Where the records are may change with the same records in it (`check_same_records`).
    data = dataclasses.replace(config.data, records_dir="(checked apart)")
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **free), data=data)


def check_same_records(out: Path, config, fingerprint: str, log) -> None:
    """A resumed run whose ``data.records_dir`` changed goes on where the folder holds the
    records it trained on (their fingerprint, in ``state.json`` or ``run.json``): records
    moved, or a relative path given from another folder. Otherwise it stops."""
    saved = load_config(out / "config.yaml").data.records_dir
    if saved == config.data.records_dir:
        return
    recorded = read_state(out).get("data_fingerprint")
    if recorded is None and (out / "run.json").is_file():
        with contextlib.suppress(ValueError, OSError, AttributeError):
            recorded = json.loads((out / "run.json").read_text()).get("data_fingerprint")
    if recorded != fingerprint:  # of the records in config.data.records_dir
        raise TrainingError(
            f"{out} was started on the records in {saved!r}; {config.data.records_dir!r} "
            + ("holds other records" if recorded else "cannot be told to hold the same ones")
            + f" (fingerprint {fingerprint}{f', the run has {recorded}' if recorded else ''}): "
            "--resume continues a run on its own records"
        )
    log(f"records: {config.data.records_dir} (moved from {saved}, the same records)")


def nothing_to_resume(out: Path) -> str:
    return f"{out} is empty: there is no run to continue (leave out --resume)"


def is_cv_folder(out: Path) -> bool:
    """Whether `out` holds a cross-validation (`cross_validate`'s ``foldK/`` runs)."""
    return (out / "config.yaml").is_file() and (out / "fold0").is_dir()


def _not_a_run(out: Path, resume: bool) -> str | None:
    """Why `out` (existing, not empty) cannot hold this single-fold run, or None."""
    if is_cv_folder(out):
        return (
            f"{out} holds a cross-validation (fold0/, ...): continue it with --fold all "
            "--resume, or train one fold into another --out"
        )
    if not (out / "config.yaml").is_file():
        # A predict output or a project folder was taken for a run to continue, and the
        # default experiment trained into it.
        what = "holds no run to continue (no config.yaml)" if resume else "is not empty"
        return f"{out} {what}: choose a new or empty --out"
    return None


def check_run_folder(out: Path, config, resume: bool, log) -> None:
    """Refuses a run folder that cannot be used (errors name the fix)."""
    check_out(out, resume)
    occupied = out.exists() and any(out.iterdir())
    if resume and not occupied:
        raise TrainingError(nothing_to_resume(out))
    problem = _not_a_run(out, resume) if occupied else None
    if problem:
        raise TrainingError(problem)
    if occupied and not resume:
        if not nothing_to_keep(out):
            raise TrainingError(
                f"{out} already holds a run: pass --resume to continue it or choose another --out"
            )
        log(f"{out} holds a run that never finished an epoch: starting it afresh")
        shutil.rmtree(out)
    if resume and (out / "config.yaml").is_file():
        saved = load_config(out / "config.yaml")
        differ = _differences(_training_settings(saved), _training_settings(config))
        if differ:
            raise TrainingError(
                f"{out} was started with another configuration ({'; '.join(differ)}): "
                "--resume continues it only with its own (leave out those --set and "
                "--config; evaluate, export, cpu_kernels and jit_compile may change), or "
                "train anew into another --out"
            )


def _differences(saved, now) -> list[str]:
    """ "key X there, Y now" for each dotted key whose value differs between two configs."""
    a, b = (dotted_values(config_to_dict(c)) for c in (saved, now))
    return [f"{k} {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]  # fmt: skip


EVALUATION_OUTPUTS = ("metrics.json", "report.md", "report.html", "figures", EVALUATION_DIR)


def drop_stale_evaluation(out: Path, log) -> None:
    """A resumed run that trains a phase (again) makes new weights: the evaluation of the
    earlier ones (which compare reads) goes, rather than describing a model no longer
    there."""
    stale = [out / n for n in EVALUATION_OUTPUTS if (out / n).exists()]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if stale:
        log(
            f"removed the evaluation of the earlier weights ({', '.join(p.name for p in stale)}): "
            "evaluate the run again when it ends"
        )


def check_cv_folder(out: Path, resume: bool) -> None:
    """Refuses an --out that holds something other than this cross-validation."""
    if not (out.exists() and any(out.iterdir())):
        if resume:
            raise TrainingError(nothing_to_resume(out))
        return
    if not resume:
        raise TrainingError(
            f"{out} already holds a run: pass --resume to continue it or choose another --out"
        )
    single = any((out / n).exists() for n in ("state.json", "logs", "backup", "run.json"))
    if single and not is_cv_folder(out):
        raise TrainingError(
            f"{out} holds a single-fold run: continue it without --fold all, or "
            "cross-validate into another --out"
        )
    if not (out / "config.yaml").is_file():
        raise TrainingError(f"{out} holds no run to continue (no config.yaml): choose a new --out")
