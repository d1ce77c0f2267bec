"""Train the coarse-refine segmenter and its slice classifier (`train`, `cross_validate`):
the library of ``python -m tfcovseg.train`` (`tfcovseg.cli.train`, which also evaluates and
exports after training when asked).

A config with ``data.phantom_patients`` (the built-in ``quickstart``, the embedded default)
writes that synthetic phantom cohort beside its records folder once and converts it there
(`tfcovseg.training.inputs`).

Phase 1 (segmentation, Huang et al. 2021 Section 3.2): the segmenter with the hybrid loss on
"coarse" and "final", Adam, validation every epoch with per-class Dice / IoU / precision /
recall, early stopping on validation loss with the best weights restored.
Phase 2 (classification): the encoder (input layer and four stages) frozen, the pooling +
dense head trained on slice labels; the paper's gate. (`tfcovseg.training.phases`)

Keras callbacks do the bookkeeping: ModelCheckpoint (best ``.keras``), EarlyStopping,
TensorBoard, CSVLogger and BackupAndRestore, so a run killed mid-epoch continues with
``--resume`` and loses at most that epoch (`tfcovseg.training.fitting`; what a folder may
hold and what a resume keeps: `tfcovseg.training.run_folder`). Mixed precision, XLA and
`tf.distribute.MirroredStrategy` (when several GPUs are visible) are config switches.

The run folder holds ``config.yaml`` (resolved), ``segmenter_best.keras``,
``segmenter_last.keras``, ``classifier_best.keras``, ``logs/``, ``severity.json`` (the
severity grades' lesion / lung ratio thresholds fitted on the training patients) and
``run.json`` (data fingerprint, seed, versions, timings); evaluation and export add
``validation_scores.json`` (`tfcovseg.evaluation.calibration.validation_burdens` and
`validation_slice_scores`).

Research use, not a medical device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import platform
import shutil
import time
from pathlib import Path

import keras

from data_tools.files import atomic_write_json
from tfcovseg import __version__, cpu_kernels, require_tensorflow
from tfcovseg.configs.experiment import ExperimentConfig, save_config
from tfcovseg.data.dataset import corrupt_records_message, data_fingerprint, split_patients
from tfcovseg.evaluation.severity import severity_rule_from_manifest
from tfcovseg.training.callbacks import remove_backup
from tfcovseg.training.distributed import choose_strategy, is_chief, is_multi_worker, worker_path
from tfcovseg.training.errors import TrainingError
from tfcovseg.training.fitting import Run
from tfcovseg.training.inputs import (
    check_inputs,
    prepare_records,
)
from tfcovseg.training.phases import classification_phase, segmentation_phase, self_training_phase
from tfcovseg.training.run_folder import (
    PHASE_NUMBER,
    check_cv_folder,
    check_out,
    check_run_folder,
    check_same_records,
    drop_stale_evaluation,
    nothing_to_keep,
    verified_state,
)

tf = require_tensorflow("python -m tfcovseg.train")

__all__ = ["TrainingError", "cross_validate", "prepare_records", "train"]


def check_method(config: ExperimentConfig) -> None:
    """Refuses a semi-supervised method only the COVID-SemiSeg benchmark trains."""
    if config.semi.method == "fixmatch":
        raise TrainingError(
            "semi.method fixmatch is measured by the COVID-SemiSeg benchmark only (python -m "
            "tfcovseg.benchmarks.semiseg --semi-method fixmatch; docs/semiseg.md has how it "
            "compares): train with semi.method self_training"
        )


def train(
    config: ExperimentConfig,
    out: Path,
    resume: bool = False,
    verbose: int = 2,
    log=print,
    strategy=None,
) -> dict:
    """Runs the configured phases; returns the run summary (also in ``run.json``).

    With ``resume``, phases already completed in ``out`` are skipped (when their models
    load; `verified_state`) and an interrupted phase continues from its last completed
    epoch (BackupAndRestore). A fresh run that fails before its first epoch ends leaves
    no folder behind to block the next one.

    ``strategy``: a `tf.distribute.Strategy` made by `choose_strategy` (default: made here
    from ``train.strategy``). MultiWorkerMirroredStrategy must exist before any other
    TensorFlow op of the process, so several runs in one process share one.
    """
    start = time.perf_counter()
    check_method(config)
    if strategy is None:
        strategy = choose_strategy(config.train.strategy)
    # Only the chief writes the run folder (and checks it); other workers write to a
    # temporary one.
    if is_chief(strategy):
        check_run_folder(Path(out), config, resume, log)
    out = Path(worker_path(str(out), strategy))
    fresh = not out.exists()
    try:
        return _train(config, out, resume, verbose, log, strategy, start)
    except BaseException:
        if fresh and nothing_to_keep(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(config, out, resume, verbose, log, strategy, start) -> dict:
    folder = prepare_records(config, log)
    manifest = check_inputs(config, folder)
    fingerprint = data_fingerprint(folder)  # once: the resume check, state.json, run.json
    if resume:
        check_same_records(out, config, fingerprint, log)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.partial-*"):  # a save that a kill interrupted
        stale.unlink()
    save_config(config, out / "config.yaml")
    state = verified_state(out, config, log) if resume else {"completed": [], "timings": {}}
    state.setdefault("data_fingerprint", fingerprint)  # for a resume elsewhere
    # Written now, not only when a phase ends: a run killed in its first phase has a best
    # checkpoint that evaluate and export took for a finished run's (state.json absent
    # means a run older than it). A resume writes back the phases it will redo.
    atomic_write_json(out / "state.json", state)
    keras.utils.set_random_seed(config.train.seed)
    keras.config.set_dtype_policy(config.train.precision)
    t = config.train
    fold = config.data.fold
    timings = dict(state.get("timings", {}))
    # total_s adds up over the invocations that ended a phase (a resume replaced it with
    # its own seconds: 1.0 for a finished run resumed).
    before_s = float(timings.get("total_s", 0.0))

    def total_s() -> float:
        return round(before_s + time.perf_counter() - start, 1)

    common = dict(
        record_dir=folder,
        fold=fold,
        batch_size=t.batch_size,
        image_size=config.model.input_size,
        class_names=config.model.class_names,
        cache=config.data.cache,
        seed=t.seed,
    )
    run = Run(config, out, resume, verbose, log, strategy, common)

    def finish_phase(phase, phase_start):
        state["completed"] = [*state["completed"], phase]
        timings[f"{phase}_s"] = round(time.perf_counter() - phase_start, 1)
        timings["total_s"] = total_s()
        state["timings"] = timings
        atomic_write_json(out / "state.json", state)
        remove_backup(out, phase)  # kept until now: a kill before this resumes with no epoch

    segmenter, trained = None, []
    for phase in t.phases:
        if phase in state["completed"]:
            log(f"phase {PHASE_NUMBER[phase]}: {phase} already completed in this run folder")
            continue
        trained.append(phase)
        phase_start = time.perf_counter()
        if resume:
            drop_stale_evaluation(out, log)
        try:
            if phase == "segmentation":
                segmenter = segmentation_phase(run)
            elif phase == "self_training":
                segmenter = self_training_phase(run, segmenter, state)
            else:
                classification_phase(run, segmenter)
        except tf.errors.DataLossError as e:
            raise TrainingError(corrupt_records_message(folder, manifest, e)) from None
        finish_phase(phase, phase_start)
    if is_chief(strategy):
        _finish_run(config, out, manifest)
    timings["total_s"] = total_s()
    state["timings"] = timings
    atomic_write_json(out / "state.json", state)
    summary = _summary(config, folder, fingerprint, manifest, strategy, resume, timings)
    if state.get("self_training"):
        summary["self_training"] = state["self_training"]
    atomic_write_json(out / "run.json", summary)
    # Not in run.json: what this invocation trained (none: a finished run resumed).
    return summary | {"trained_now": trained}


def _finish_run(config, out: Path, manifest: dict) -> None:
    """What the chief writes when the phases are done: the severity grades' ratio
    thresholds, from the training patients' ground truth (exports and predictions read
    them from ``severity.json``)."""
    fold = config.data.fold
    fitted_on = split_patients(manifest, config.data.train_split, fold)
    fitted_on += split_patients(manifest, "validation", fold)
    atomic_write_json(out / "severity.json", severity_rule_from_manifest(manifest, fitted_on))
    # BackupAndRestore removes its phase folders when a phase ends; drop their parent too
    # unless something (an interrupted phase's backup) is still in it.
    with contextlib.suppress(OSError):
        (out / "backup").rmdir()


def _summary(config, folder, fingerprint, manifest, strategy, resume, timings) -> dict:
    """The content of ``run.json``."""
    return {
        "experiment": config.name,
        "fold": config.data.fold,
        "records": str(folder),
        "data_fingerprint": fingerprint,
        "num_slices": manifest["num_slices"],
        "seed": config.train.seed,
        "strategy": (
            "MultiWorkerMirroredStrategy"  # TF's class is CollectiveAllReduceStrategy
            if is_multi_worker(strategy)
            else type(strategy).__name__
        ),
        "replicas": strategy.num_replicas_in_sync,
        "chief": is_chief(strategy),
        "resumed": bool(resume),
        "versions": {
            "tfcovseg": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "cpu_kernels": cpu_kernels(),
        "timings": timings,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _fold_config(config: ExperimentConfig, fold: int) -> ExperimentConfig:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, fold=fold))


def _check_every_fold(config: ExperimentConfig, log) -> None:
    """Every fold's splits checked before the first fold trains (a fold without validation
    patients stopped the run after hours of fold 0)."""
    folder = prepare_records(config, log)
    for k in range(config.data.num_folds):
        check_inputs(_fold_config(config, k), folder)


def cross_validate(config: ExperimentConfig, out: Path, resume=False, verbose=2, log=print):
    """Trains and evaluates every fold into out/foldK; writes cv_metrics.json and cv_report.md."""
    from tfcovseg.evaluation.compare import write_cv_summary
    from tfcovseg.evaluation.run import evaluate_run

    out = Path(out)
    check_method(config)
    check_out(out, resume)
    check_cv_folder(out, resume)
    _check_every_fold(config, log)
    strategy = choose_strategy(config.train.strategy)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    for k in range(config.data.num_folds):
        fold_config = _fold_config(config, k)
        fold_out = out / f"fold{k}"
        if resume and (fold_out / "metrics.json").is_file():
            log(f"fold {k}: already trained and evaluated")
            continue
        log(f"fold {k} of {config.data.num_folds}: {fold_out}")
        train(
            fold_config,
            fold_out,
            resume=resume and fold_out.exists(),
            verbose=verbose,
            log=log,
            strategy=strategy,
        )
        evaluate_run(fold_out, split="test")
    return write_cv_summary(out)
