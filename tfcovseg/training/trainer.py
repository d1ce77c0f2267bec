"""Train the coarse-refine segmenter and its slice classifier (`train`, `cross_validate`):
the library of ``python -m tfcovseg.train`` (`tfcovseg.cli.train`, which also evaluates and
exports after training when asked).

A config with ``data.phantom_patients`` (the built-in ``quickstart``, the embedded default)
writes that synthetic phantom cohort beside its records folder once and converts it there.

Phase 1 (segmentation, Huang et al. 2021 Section 3.2): the segmenter with the hybrid loss on
"coarse" and "final", Adam, validation every epoch with per-class Dice / IoU / precision /
recall, early stopping on validation loss with the best weights restored.
Phase 2 (classification): the encoder (input layer and four stages) frozen, the pooling +
dense head trained on slice labels; the paper's gate.

Keras callbacks do the bookkeeping: ModelCheckpoint (best ``.keras``), EarlyStopping,
TensorBoard, CSVLogger and BackupAndRestore, so a run killed mid-epoch continues with
``--resume`` and loses at most that epoch. Mixed precision, XLA and
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
import functools
import hashlib
import json
import platform
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from data_tools.files import OutputError, atomic_write_json, check_output_dir
from tfcovseg import __version__, require_tensorflow
from tfcovseg.configs.experiment import (
    BUILTIN_EXPERIMENTS,
    ExperimentConfig,
    config_to_dict,
    dotted_values,
    load_config,
    save_config,
)
from tfcovseg.data.dataset import (
    OTHER_PNEUMONIA,
    classify_label,
    find_corrupt_shards,
    make_dataset,
    read_manifest,
    slice_is_usable,
    split_patients,
    split_slices,
)
from tfcovseg.evaluation.severity import severity_rule_from_manifest
from tfcovseg.models import (
    ModelFileError,
    build_classifier,
    build_model,
    load_model,
    model_file_problem,
    save_model,
)
from tfcovseg.models.classifier import head_on_features, head_options, with_classifier_head
from tfcovseg.training.callbacks import (
    AtomicBackupAndRestore,
    AtomicCSVLogger,
    AtomicModelCheckpoint,
    OverlayImages,
    PatientEvaluation,
)
from tfcovseg.training.distributed import (
    build_training_state,
    choose_strategy,
    fit_distributed,
    is_chief,
    is_multi_worker,
    worker_path,
)
from tfcovseg.training.recipe import (
    build_segmenter,
    compile_segmenter,
    early_stopping,
    keras_verbose,
    segmentation_objective,
)
from tfcovseg.training.selftrain import collect_images, mixed_dataset, pseudo_dataset
from tfcovseg.training.semisup import label_round

tf = require_tensorflow("python -m tfcovseg.train")

EXPERIMENTS = BUILTIN_EXPERIMENTS  # tfcovseg/configs/experiments, shipped in the wheel


# The fixed pseudonymisation salt of phantom records (synthetic patients, nothing to hide).
PHANTOM_SALT = "tfcovseg-phantom"


class TrainingError(Exception):
    """Training cannot start; the message names the problem (exit code 2)."""


def records_dir(config: ExperimentConfig) -> Path:
    return Path(config.data.records_dir).expanduser()


def prepare_records(config: ExperimentConfig, log=print) -> Path:
    """The record folder, after writing and converting the phantom cohort if configured."""
    folder = records_dir(config)
    if config.data.phantom_patients == 0:
        return folder
    return _phantom_records(config, folder, folder.parent / "phantom", "phantom_patients", log)


def classifier_records(config: ExperimentConfig, log=print) -> Path | None:
    """Records of the classifier's own phantom cohort (`data.classifier_phantom_patients`),
    written and converted beside the first cohort once; None when not configured."""
    if not config.data.classifier_phantom_patients:
        return None
    parent = records_dir(config).parent
    return _phantom_records(config, parent / "classifier-records", parent / "classifier-phantom",
                            "classifier_phantom_patients", log)  # fmt: skip


def _cohort_settings(config: ExperimentConfig, key: str) -> tuple[int, int]:
    """(patients, seed) of the cohort counted by `data.<key>`; the classifier's cohort
    takes the next seed, so that its patients are not the segmenter's."""
    d = config.data
    if key == "classifier_phantom_patients":
        return d.classifier_phantom_patients, d.phantom_seed + 1
    return d.phantom_patients, d.phantom_seed


def _phantom_records(config, folder: Path, cohort: Path, key: str, log) -> Path:
    """Writes (once) and converts (once) the phantom cohort counted by `data.<key>`."""
    check_phantom_cache(config, folder, cohort, key)
    patients, seed = _cohort_settings(config, key)
    if (folder / "manifest.json").is_file():
        return folder
    from data_tools.conversion.pipeline import convert
    from data_tools.phantom import make_cohort

    size = config.model.input_size[0]
    if not (cohort / "manifest.csv").is_file():
        log(
            f"writing a synthetic phantom cohort of {patients} patients "
            f"({config.data.phantom_mix} mix) to {cohort} (once)"
        )
        make_cohort(cohort, patients, seed, size, mix=config.data.phantom_mix,
                    slices=config.data.phantom_slices)  # fmt: skip
    log(f"converting {cohort} to TFRecords in {folder}")
    convert(
        cohort,
        folder,
        size=size,
        folds=config.data.num_folds,
        seed=seed,
        classes=config.model.class_names,
        progress=False,
        salt=PHANTOM_SALT,
    )
    return folder


def check_phantom_cache(
    config: ExperimentConfig, folder: Path, cohort: Path, key: str = "phantom_patients"
) -> None:
    """Stops when a cached phantom cohort or its records were made with other settings.

    The cache is reused across runs, so a changed `data.phantom_patients`, `phantom_seed`,
    `phantom_mix` or `phantom_slices` would otherwise train silently on the old cohort.
    Records are compared by their pseudonymised patients (`prepare_records` converts with a
    fixed salt) and slice counts.
    """
    import csv

    from data_tools.conversion.discovery import dicom_patient_key
    from data_tools.phantom import cohort_plan, phantom_patient_id
    from data_tools.privacy import pseudonym

    d = config.data
    patients, seed = _cohort_settings(config, key)
    plan = cohort_plan(patients, seed, d.phantom_mix)
    wanted = (
        f"data.{key}={patients}, phantom_seed={d.phantom_seed}, "
        f"phantom_mix={d.phantom_mix}, phantom_slices={list(d.phantom_slices)}"
    )
    low, high = d.phantom_slices

    def in_range(n) -> bool:
        try:
            return low <= int(n) <= high
        except (TypeError, ValueError):
            return False

    advice = (
        "delete that folder to write it again with these settings, or point "
        "data.records_dir somewhere else"
    )
    if key == "phantom_patients":  # the user's own records, not a cache
        advice += "; to train on these records as they are, --set data.phantom_patients=0"
    manifest_csv = cohort / "manifest.csv"
    if manifest_csv.is_file():
        with manifest_csv.open(newline="") as f:
            rows = list(csv.DictReader(f))
        made = [(r.get("diagnosis"), r.get("severity")) for r in rows]
        if made != [tuple(p) for p in plan] or not all(in_range(r.get("slices")) for r in rows):
            raise TrainingError(
                f"the cached phantom cohort in {cohort} ({len(rows)} patients) was not made "
                f"with {wanted}: {advice}"
            )
    records = folder / "manifest.json"
    # Records without a phantom folder beside them are the user's own: nothing to compare.
    if records.is_file() and manifest_csv.is_file():
        try:
            patients = json.loads(records.read_text())["patients"]
            found = {k: (v["diagnosis"], v["severity"]) for k, v in patients.items()}
            slices_ok = all(in_range(v["num_slices"]) for v in patients.values())
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"{records} is not a readable records manifest ({e})") from None
        salt = PHANTOM_SALT.encode("utf-8")
        expected = {
            pseudonym("P", dicom_patient_key(phantom_patient_id(seed, i)), salt): tuple(p)
            for i, p in enumerate(plan)
        }
        if found != expected or not slices_ok:
            raise TrainingError(
                f"the cached phantom records in {folder} ({len(found)} patients) were not "
                f"made with {wanted}: {advice}"
            )


def check_inputs(config: ExperimentConfig, folder: Path) -> dict:
    """Validates records against the config before any training; returns the manifest."""
    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError) as e:
        raise TrainingError(str(e)) from None
    classes = list(manifest["classes"])
    if classes != list(config.model.class_names):
        raise TrainingError(
            f"the records in {folder} have {len(classes)} classes {classes} but the model has "
            f"{len(config.model.class_names)}: {list(config.model.class_names)} "
            f"(set model.class_names)"
        )
    folds = manifest["folds"]["splits"]
    if len(folds) != config.data.num_folds:
        raise TrainingError(
            f"data.num_folds is {config.data.num_folds} but the records in {folder} have "
            f"{len(folds)} folds (convert them again with --folds {config.data.num_folds})"
        )
    if str(config.data.fold) not in folds:
        raise TrainingError(
            f"fold {config.data.fold} does not exist in {folder}: it has folds "
            f"{sorted(int(k) for k in folds)}"
        )
    for split in (config.data.train_split, "validation"):
        n = split_slices(manifest, split, config.data.fold)
        if n == 0:
            raise TrainingError(
                f"the {split} split of fold {config.data.fold} in {folder} is "
                f"empty: too few patients for {len(folds)} folds"
            )
    tasks = {"segmentation": "segment", "self_training": "segment", "classification": "classify"}
    if "self_training" in config.train.phases:
        _check_unlabelled(config, folder, manifest)
    for phase in config.train.phases:
        task = tasks[phase]
        for split in (config.data.train_split, "validation"):
            n = split_slices(manifest, split, config.data.fold, task)
            if n == 0:
                raise TrainingError(
                    f"the {split} split of fold {config.data.fold} in {folder} has no slice "
                    f"with ground-truth lesion masks for the {phase} phase (series converted "
                    "without a mask are left out unless their diagnosis is healthy)"
                )
            if split != "validation" and config.train.batch_size > n:
                raise TrainingError(
                    f"train.batch_size {config.train.batch_size} is larger than the {n} "
                    f"training slices of fold {config.data.fold} in {folder} that the "
                    f"{phase} phase can use"
                )
    return manifest


def _check_unlabelled(config, folder: Path, manifest: dict) -> None:
    """Self-training needs slices without masks: ``semi.records_dir``'s, or the training
    split's of ``data.records_dir``."""
    semi = config.semi
    if semi.records_dir:
        where = Path(semi.records_dir).expanduser()
        try:
            other = read_manifest(where)
        except (FileNotFoundError, ValueError) as e:
            raise TrainingError(f"semi.records_dir: {e}") from None
        if list(other["classes"]) != list(manifest["classes"]):
            raise TrainingError(
                f"semi.records_dir {where} has classes {other['classes']}, the training "
                f"records {manifest['classes']}: convert both with the same --classes"
            )
        n = split_slices(other, "all", 0, "unlabelled")
    else:
        where = f"the training split of fold {config.data.fold} in {folder}"
        n = split_slices(manifest, config.data.train_split, config.data.fold, "unlabelled")
    if n == 0:
        raise TrainingError(
            f"self-training has no slice without lesion masks to label in {where}: convert "
            "unlabelled slices (Imgs/ without GT/) and name them in semi.records_dir"
        )


def _best_so_far(csv_path: Path, monitor="val_loss"):
    """The best (lowest) monitored value in a CSV log of the run, or None."""
    if not csv_path.is_file():
        return None
    import csv

    with csv_path.open(newline="") as f:
        values = [float(row[monitor]) for row in csv.DictReader(f) if row.get(monitor)]
    return min(values) if values else None


def _build_classifier(segmenter, model):
    """The classifier head the model config asks for, on the segmenter's encoder."""
    return build_classifier(segmenter, **head_options(model))


def _callbacks(
    out: Path, phase: str, patience: int, resume: bool, extra=(), save=None, log=print, tag=None
):
    """Evaluation callbacks first (their logs reach the rest), then the bookkeeping.

    ``save``: the model the best checkpoint holds when it is not the model being fit.
    ``tag``: the name of the phase's files when it fits several models (self-training's
    rounds): ``logs/<tag>.csv``, ``backup/<tag>``, ``<tag>_best.keras``.
    """
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    best = out / f"{tag or phase_name(phase)}_best.keras"
    phase = tag or phase
    csv_path = logs / f"{phase}.csv"
    # After --resume, the best checkpoint must stay the best of the whole run (a broken
    # one was removed by `_verified_state`: the next epoch writes it again).
    best_so_far = _best_so_far(csv_path) if resume and best.is_file() else None
    # Every file of the run is replaced atomically: a kill leaves the old or the new one.
    return [
        *extra,
        AtomicBackupAndRestore(str(out / "backup" / phase), log=log),
        AtomicModelCheckpoint(
            filepath=str(best),
            monitor="val_loss",
            save_best_only=True,
            initial_value_threshold=best_so_far,
            target=save,
        ),
        early_stopping(patience),
        AtomicCSVLogger(csv_path, append=resume),
        keras.callbacks.TensorBoard(str(logs / "tensorboard" / phase), write_graph=False),
    ]


def phase_name(phase: str) -> str:
    """The model a phase trains, as its checkpoints are named (``<name>_best.keras``)."""
    return RUN_MODELS[phase]


def _data_fingerprint(folder: Path) -> str:
    return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()[:16]


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


def _read_state(out: Path) -> dict:
    path = out / "state.json"
    if not path.is_file():
        return {"completed": [], "timings": {}}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise TrainingError(f"{path} is not valid JSON ({e}): choose another --out") from None


def _overlay_slices(dataset, k: int):
    """Up to k slices with lesions (HU [k,H,W,1], masks [k,H,W,C]) from a dataset."""
    images, masks = [], []
    for batch in dataset:
        for i in range(int(batch["hu"].shape[0])):
            if batch["slice/label"][i] > 0 and len(images) < k:
                images.append(batch["hu"][i].numpy()[..., None])
                masks.append(batch["lesions"][i].numpy())
        if len(images) >= k:
            break
    return images, masks


def _fit(model, strategy, train_ds, val_ds, epochs, callbacks, verbose, log=print):
    verbose, callbacks = keras_verbose(verbose, callbacks, epochs, log)
    if is_multi_worker(strategy):
        # Shard by element: a record folder may hold fewer shards than workers.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        train_ds, val_ds = train_ds.with_options(options), val_ds.with_options(options)
        verbose = verbose if is_chief(strategy) else 0
        # model.fit fails under MultiWorkerMirroredStrategy in TF 2.21 / Keras 3.15
        # (keras-team/keras#20585): a distributed custom loop drives the same callbacks.
        return fit_distributed(
            model,
            strategy,
            train_ds,
            epochs,
            validation_data=val_ds,
            callbacks=callbacks,
            verbose=verbose,
        )
    build_training_state(model, strategy, train_ds)  # one trace of the step, not two
    return model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        verbose=verbose,
        shuffle=False,  # the datasets shuffle themselves
        callbacks=callbacks,
    )


RUN_MODELS = {
    "segmentation": "segmenter",
    "self_training": "student",
    "classification": "classifier",
}
# The paper's two phases keep their numbers; self-training refines phase 1's segmenter.
PHASE_NUMBER = {"segmentation": "1", "self_training": "1b", "classification": "2"}


def _verified_state(out: Path, config, log) -> dict:
    """The run's state for ``--resume``, with every phase whose best model does not load
    undone.

    A completed phase needs its best checkpoint to load (the next phase and the export
    build on it); when it does not (a file cut by a kill, before writes were atomic), that
    phase and the ones after it run again from their first epoch: their backup and CSV
    log go. The broken best checkpoint of a phase that runs again, completed or not, is
    removed, so that its next epoch writes it again.
    """
    state = _read_state(out)
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
_START_FILES = {"config.yaml", "logs", "backup"}


def _nothing_to_keep(out: Path) -> bool:
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


def _check_out(out: Path, resume: bool) -> None:
    """An --out that can be written, and exists when resumed (errors name the fix)."""
    try:
        check_output_dir(out)
    except OutputError as e:
        raise TrainingError(str(e)) from None
    if resume and not out.is_dir():
        raise TrainingError(f"--resume: {out} does not exist, so there is no run to continue")


def _training_settings(config):
    """The config without what only happens after training (evaluate, export), which a
    resumed run may change."""
    after = {"evaluate": False, "export_dir": ""}
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **after))


def _nothing_to_resume(out: Path) -> str:
    return f"{out} is empty: there is no run to continue (leave out --resume)"


def _is_cv_folder(out: Path) -> bool:
    """Whether `out` holds a cross-validation (`cross_validate`'s ``foldK/`` runs)."""
    return (out / "config.yaml").is_file() and (out / "fold0").is_dir()


def _not_a_run(out: Path, resume: bool) -> str | None:
    """Why `out` (existing, not empty) cannot hold this single-fold run, or None."""
    if _is_cv_folder(out):
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


def _check_run_folder(out: Path, config, resume: bool, log) -> None:
    """Refuses a run folder that cannot be used (errors name the fix)."""
    _check_out(out, resume)
    occupied = out.exists() and any(out.iterdir())
    if resume and not occupied:
        raise TrainingError(_nothing_to_resume(out))
    problem = _not_a_run(out, resume) if occupied else None
    if problem:
        raise TrainingError(problem)
    if occupied and not resume:
        if not _nothing_to_keep(out):
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
                "--config; evaluate and export may change), or train anew into another --out"
            )


def _differences(saved, now) -> list[str]:
    """ "key X there, Y now" for each dotted key whose value differs between two configs."""
    a, b = (dotted_values(config_to_dict(c)) for c in (saved, now))
    return [f"{k} {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]  # fmt: skip


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
    load; `_verified_state`) and an interrupted phase continues from its last completed
    epoch (BackupAndRestore). A fresh run that fails before its first epoch ends leaves
    no folder behind to block the next one.

    ``strategy``: a `tf.distribute.Strategy` made by `choose_strategy` (default: made here
    from ``train.strategy``). MultiWorkerMirroredStrategy must exist before any other
    TensorFlow op of the process, so several runs in one process share one.
    """
    start = time.perf_counter()
    if strategy is None:
        strategy = choose_strategy(config.train.strategy)
    # Only the chief writes the run folder (and checks it); other workers write to a
    # temporary one.
    if is_chief(strategy):
        _check_run_folder(Path(out), config, resume, log)
    out = Path(worker_path(str(out), strategy))
    fresh = not out.exists()
    try:
        return _train(config, out, resume, verbose, log, strategy, start)
    except BaseException:
        if fresh and _nothing_to_keep(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(config, out, resume, verbose, log, strategy, start) -> dict:
    folder = prepare_records(config, log)
    manifest = check_inputs(config, folder)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.partial-*"):  # a save that a kill interrupted
        stale.unlink()
    save_config(config, out / "config.yaml")
    state = _verified_state(out, config, log) if resume else {"completed": [], "timings": {}}
    keras.utils.set_random_seed(config.train.seed)
    keras.config.set_dtype_policy(config.train.precision)
    t = config.train
    fold = config.data.fold
    timings = dict(state.get("timings", {}))
    common = dict(
        record_dir=folder,
        fold=fold,
        batch_size=t.batch_size,
        image_size=config.model.input_size,
        class_names=config.model.class_names,
        cache=config.data.cache,
        seed=t.seed,
    )
    run = _Run(config, out, resume, verbose, log, strategy, common)

    def finish_phase(phase, phase_start):
        state["completed"] = [*state["completed"], phase]
        timings[f"{phase}_s"] = round(time.perf_counter() - phase_start, 1)
        state["timings"] = timings
        _write_json(out / "state.json", state)

    segmenter = None
    for phase in t.phases:
        if phase in state["completed"]:
            log(f"phase {PHASE_NUMBER[phase]}: {phase} already completed in this run folder")
            continue
        phase_start = time.perf_counter()
        if resume:
            _drop_stale_evaluation(out, log)
        try:
            if phase == "segmentation":
                segmenter = _segmentation_phase(run)
            elif phase == "self_training":
                segmenter = _self_training_phase(run, segmenter, state)
            else:
                _classification_phase(run, segmenter)
        except tf.errors.DataLossError as e:
            raise TrainingError(_corrupt_records_message(folder, manifest, e)) from None
        finish_phase(phase, phase_start)
    if is_chief(strategy):
        _finish_run(config, out, manifest)
    timings["total_s"] = round(time.perf_counter() - start, 1)
    summary = _summary(config, folder, manifest, strategy, resume, timings)
    if state.get("self_training"):
        summary["self_training"] = state["self_training"]
    _write_json(out / "run.json", summary)
    return summary


EVALUATION_OUTPUTS = ("metrics.json", "report.md", "report.html", "figures")


def _drop_stale_evaluation(out: Path, log) -> None:
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


def _finish_run(config, out: Path, manifest: dict) -> None:
    """What the chief writes when the phases are done: the severity grades' ratio
    thresholds, from the training patients' ground truth (exports and predictions read
    them from ``severity.json``)."""
    fold = config.data.fold
    fitted_on = split_patients(manifest, config.data.train_split, fold)
    fitted_on += split_patients(manifest, "validation", fold)
    _write_json(out / "severity.json", severity_rule_from_manifest(manifest, fitted_on))
    # BackupAndRestore removes its phase folders when a phase ends; drop their parent too
    # unless something (an interrupted phase's backup) is still in it.
    with contextlib.suppress(OSError):
        (out / "backup").rmdir()


@dataclasses.dataclass
class _Run:
    """What the phases of one training run share."""

    config: ExperimentConfig
    out: Path
    resume: bool
    verbose: object
    log: object
    strategy: object
    common: dict

    @property
    def eval_drop(self) -> bool:
        # Every replica needs at least one example of the last validation batch.
        return self.strategy.num_replicas_in_sync > 1

    @functools.cached_property
    def inspect_val(self):
        return make_dataset(split="validation", training=False, task="inspect", **self.common)


def _corrupt_records_message(folder: Path, manifest: dict, error) -> str:
    bad = find_corrupt_shards(folder, manifest)
    where = ", ".join(bad) if bad else "a shard"
    return (
        f"the records in {folder} are corrupt ({where}: {error.message.splitlines()[0]}); "
        "convert them again with python -m data_tools.convert"
    )


def _finish_best(model, out: Path, phase: str, log) -> None:
    """Makes sure the phase's best checkpoint loads; writes the model there when not.

    A resumed phase whose epochs were all done before the kill runs no epoch, so the
    checkpoint a kill interrupted is never written again: the weights the phase ends
    with (the best, restored by EarlyStopping, or the backup's) take its place.
    """
    best = out / f"{RUN_MODELS[phase]}_best.keras"
    if model_file_problem(best) is None:
        return
    log(f"{best.name} was not written by this phase's epochs: saving the phase's model")
    save_model(model, best)


def _intensity_window(config):
    """The window the intensity jitter works in (None: no jitter): the model's own."""
    if not config.data.intensity_augment:
        return None
    return (0.0, 255.0) if config.model.pre_windowed else tuple(config.model.hu_window)


def _segment_train_ds(run: _Run, outputs, label_output=None, batch_size=None):
    """The training split's segmentation batches, augmented as the config says."""
    data = run.config.data
    common = run.common if batch_size is None else {**run.common, "batch_size": batch_size}
    return make_dataset(
        split=data.train_split,
        training=True,
        compact=True,  # int16/uint8 batches: the model casts
        outputs=outputs,
        augment_data=data.augment,
        oversample_lesions=data.oversample_lesions,
        oversample_pneumonia=data.oversample_pneumonia,
        shuffle_buffer=data.shuffle_buffer,
        label_output=label_output,
        intensity_window=_intensity_window(run.config),
        **common,
    )


def _steps_per_epoch(dataset) -> int:
    """Batches per epoch of a training dataset (`make_dataset` asserts its cardinality)."""
    return int(dataset.cardinality())


def _segmentation_phase(run: _Run):
    """Phase 1: the segmenter with the hybrid loss (and the classifier head, with
    ``train.classifier_aux_weight``); returns the segmenter."""
    config, t, out = run.config, run.config.train, run.out
    with run.strategy.scope():
        segmenter = build_model(config.model)
        outputs = tuple(segmenter.output)
        losses, weights, metrics = segmentation_objective(config, outputs)
        fit_model, label_output = segmenter, None
        if t.classifier_aux_weight:
            # Segmentation and the slice classifier's head train the encoder together.
            head = _build_classifier(segmenter, config.model)
            fit_model = with_classifier_head(segmenter, head)
            label_output = "covid_probability"
            losses[label_output] = "binary_crossentropy"
            weights[label_output] = t.classifier_aux_weight
            metrics[label_output] = [keras.metrics.AUC(name="auc")]
    train_ds = _segment_train_ds(run, outputs, label_output)
    with run.strategy.scope():
        compile_segmenter(config, fit_model, (losses, weights, metrics), _steps_per_epoch(train_ds))
    val_ds = _validation_ds(run, outputs, label_output)
    extra = []
    if t.overlay_images and is_chief(run.strategy):
        images, masks = _overlay_slices(run.inspect_val, t.overlay_images)
        if images:
            extra.append(
                OverlayImages(
                    images,
                    masks,
                    out / "logs" / "tensorboard" / "segmentation",
                    window=config.model.hu_window,
                    class_names=config.model.class_names,
                )
            )
    run.log(
        f"phase 1: segmentation, {config.model.architecture} at "
        f"{config.model.input_size[0]}x{config.model.input_size[1]}, fold {config.data.fold}, "
        f"up to {t.epochs} epochs"
    )
    callbacks = _callbacks(
        out, "segmentation", t.early_stopping_patience, run.resume, extra, segmenter, run.log
    )
    _fit(fit_model, run.strategy, train_ds, val_ds, t.epochs, callbacks, run.verbose, run.log)
    save_model(segmenter, out / "segmenter_last.keras")
    _finish_best(segmenter, out, "segmentation", run.log)
    return segmenter


def _unlabelled_images(run: _Run) -> np.ndarray:
    """The unlabelled slices self-training labels: ``semi.records_dir``'s (all), else
    those of the training split of ``data.records_dir``."""
    semi = run.config.semi
    common = dict(run.common)
    split = run.config.data.train_split
    if semi.records_dir:
        common["record_dir"] = Path(semi.records_dir).expanduser()
        split = "all"
    ds = make_dataset(split=split, training=False, task="unlabelled", **common)
    return collect_images(ds)


def _first_teacher(run: _Run, segmenter):
    """Phase 1's best segmenter, kept as ``teacher_best.keras`` (``segmenter_best.keras``
    becomes the student's when the phase ends)."""
    out = run.out
    teacher = out / "teacher_best.keras"
    if segmenter is not None or model_file_problem(teacher):
        # Phase 1 ran in this process, or it never handed over: its best is the teacher.
        save_model(load_model(out / "segmenter_best.keras"), teacher)
    return load_model(teacher)


def _labelled_reference(run: _Run):
    """The labelled training slices the unlabelled ones are intensity-matched to, or None
    (HU records need no matching)."""
    config = run.config
    if not (config.model.pre_windowed and config.semi.match_intensity):
        return None
    split = config.data.train_split
    return collect_images(make_dataset(split=split, training=False, task="segment", **run.common))


def _rounds_done(run: _Run, fresh_teacher: bool, state: dict) -> dict:
    """The rounds a resumed run completed before ({round: record}); none when phase 1 ran
    in this process (its teacher is new, so are the rounds), whose old files go."""
    if fresh_teacher or not run.resume:  # an interrupted round's backup is kept otherwise
        for r in range(1, run.config.semi.rounds + 1):
            shutil.rmtree(run.out / "backup" / f"student_r{r}", ignore_errors=True)
            (run.out / "logs" / f"student_r{r}.csv").unlink(missing_ok=True)
        return {}
    return {r["round"]: r for r in state.get("self_training", [])}


def _validation_ds(run: _Run, outputs, label_output=None):
    return make_dataset(
        split="validation",
        training=False,
        compact=True,  # int16/uint8 batches: the model casts
        outputs=outputs,
        label_output=label_output,
        drop_remainder=run.eval_drop,
        **run.common,
    )


def _student_round(run: _Run, r: int, teacher, labels, n_pseudo: int):
    """One round's student: from the teacher's weights, on labelled batches with
    `n_pseudo` pseudo-labelled slices in each; returns its best model and the round's
    record."""
    config, t, out, tag = run.config, run.config.train, run.out, f"student_r{r}"
    outputs = tuple(teacher.output)
    labelled = _segment_train_ds(run, outputs, batch_size=t.batch_size - n_pseudo)
    with run.strategy.scope():
        student = build_segmenter(config, teacher, _steps_per_epoch(labelled), config.semi.epochs)
    window = _intensity_window(config)
    pseudo = pseudo_dataset(labels, n_pseudo, t.seed + r, config.data.augment, window)
    callbacks = _callbacks(
        out, "self_training", t.early_stopping_patience, run.resume, log=run.log, tag=tag
    )
    history = _fit(
        student, run.strategy, mixed_dataset(labelled, pseudo, outputs),
        _validation_ds(run, outputs), config.semi.epochs, callbacks, run.verbose, run.log,
    )  # fmt: skip
    best = out / f"{tag}_best.keras"
    if model_file_problem(best):
        save_model(student, best)
    record = {
        "round": r,
        "pool": labels.pool,
        "pseudo_labelled": len(labels.images),
        "confidence_min": round(labels.confidence_min, 4),
        "epochs": len(getattr(history, "history", {}).get("loss", [])),
    }
    return load_model(best), record


def _self_training_phase(run: _Run, segmenter, state: dict):
    """Phase 1b: self-training (`tfcovseg.configs.experiment.SemiConfig`); returns the
    student, which is also saved as ``segmenter_best.keras`` for the phases and tools after it."""
    t, semi, out = run.config.train, run.config.semi, run.out
    teacher = _first_teacher(run, segmenter)
    unlabelled = _unlabelled_images(run)
    reference = _labelled_reference(run)
    n_pseudo = max(1, int(round(semi.share * t.batch_size)))
    rng = np.random.default_rng(t.seed)
    # Phase 1 ran in this process: the teacher is new, earlier rounds are stale.
    done = _rounds_done(run, segmenter is not None, state)
    rounds = []
    run.log(
        f"phase 1b: self-training on {len(unlabelled)} unlabelled slices, {semi.rounds} "
        f"round(s) of up to {semi.epochs} epochs, {n_pseudo} of every {t.batch_size} "
        "slices pseudo-labelled"
    )
    for r in range(1, semi.rounds + 1):
        pool = np.sort(rng.permutation(len(unlabelled))[: semi.pool or len(unlabelled)])
        best = out / f"student_r{r}_best.keras"
        if r in done and model_file_problem(best) is None:
            run.log(f"  round {r}: completed before")
            teacher = load_model(best)
            rounds.append(done[r])
            continue
        labels = label_round(
            teacher, unlabelled[pool], semi.views, semi.keep, reference,
            t.positive_weights,
        )  # fmt: skip
        run.log(
            f"  round {r}: {len(labels.images)} of {labels.pool} slices pseudo-labelled "
            f"(confidence >= {labels.confidence_min:.3f})"
        )
        teacher, record = _student_round(run, r, teacher, labels, n_pseudo)
        rounds.append(record)
        state["self_training"] = rounds
        _write_json(out / "state.json", state)
    save_model(teacher, out / "student_best.keras")
    save_model(teacher, out / "segmenter_best.keras")  # what phase 2, evaluate and export use
    return teacher


def _classification_phase(run: _Run, segmenter) -> None:
    """Phase 2: the classifier head on the best segmenter's frozen encoder (the paper's
    gate), or the plain SE-ResNet classifier; on the classifier's own phantom cohort when
    one is configured (`data.classifier_phantom_patients`)."""
    config, out = run.config, run.out
    classifier = _phase_two_classifier(run, segmenter)
    cohort = classifier_records(config, run.log)
    # Patient-level metrics predict slice by slice on one worker: not under multi-worker.
    multi = is_multi_worker(run.strategy)
    patient_eval = [] if multi else [PatientEvaluation(run.inspect_val, classifier=classifier)]
    frozen = config.model.architecture != "seresnet_classifier"
    if cohort is not None and frozen and not multi and classifier.head == "dense":
        _fit_head_on_features(run, classifier, cohort, patient_eval)
    else:
        _fit_classifier(run, classifier, cohort, patient_eval)
    save_model(classifier, out / "classifier_last.keras")
    _finish_best(classifier, out, "classification", run.log)


def _phase_two_classifier(run: _Run, segmenter):
    config, t, out = run.config, run.config.train, run.out
    with run.strategy.scope():
        if config.model.architecture == "seresnet_classifier":
            classifier = build_model(config.model)
        else:
            # The encoder of the best segmenter (the checkpoint, which also holds after
            # a resumed run), frozen: the paper's phase 2.
            best = out / "segmenter_best.keras"
            if best.is_file():
                segmenter = load_model(best)
            elif segmenter is None:
                raise TrainingError(
                    f"classification without segmentation needs {best} from an "
                    f"earlier segmentation phase"
                )
            classifier = _build_classifier(segmenter, config.model)
            classifier.encoder.trainable = False
        classifier.compile(
            optimizer=keras.optimizers.Adam(t.classifier_learning_rate),
            loss="binary_crossentropy",
            metrics=[
                keras.metrics.BinaryAccuracy(name="accuracy"),
                keras.metrics.AUC(name="auc"),
            ],
            jit_compile=t.jit_compile,
        )
    return classifier


def _fit_classifier(run: _Run, classifier, cohort, patient_eval) -> None:
    """Phase 2 on batches of slices (augmented, through the frozen encoder each step)."""
    config, t = run.config, run.config.train
    train_common = {**run.common, "record_dir": cohort} if cohort else run.common
    train_ds = make_dataset(
        split="all" if cohort else config.data.train_split,
        training=True,
        compact=True,  # int16/uint8 batches: the model casts
        task="classify",
        augment_data=config.data.augment,
        oversample_pneumonia=config.data.oversample_pneumonia,
        shuffle_buffer=config.data.shuffle_buffer,
        intensity_window=_intensity_window(config),
        **train_common,
    )
    val_ds = make_dataset(
        split="validation",
        training=False,
        compact=True,  # int16/uint8 batches: the model casts
        task="classify",
        drop_remainder=run.eval_drop,
        **run.common,
    )
    run.log(
        f"phase 2: classification head on the frozen encoder, up to {t.classifier_epochs} epochs"
    )
    callbacks = _callbacks(
        run.out, "classification", t.early_stopping_patience, run.resume, patient_eval,
        log=run.log,
    )  # fmt: skip
    _fit(
        classifier,
        run.strategy,
        train_ds,
        val_ds,
        t.classifier_epochs,
        callbacks,
        run.verbose,
        run.log,
    )


def _fit_head_on_features(run: _Run, classifier, cohort: Path, patient_eval) -> None:
    """Phase 2 on the frozen encoder's pooled features, computed once per slice."""
    t = run.config.train
    features, head = head_on_features(classifier)
    head.compile(
        optimizer=keras.optimizers.Adam(t.classifier_learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )
    every = make_dataset(
        split="all", training=False, task="inspect", **{**run.common, "record_dir": cohort}
    )
    x, y, w = _pooled(features, every, run.config.data.oversample_pneumonia)
    val = make_dataset(split="validation", training=False, task="inspect", **run.common)
    xv, yv, _ = _pooled(features, val, 1)
    run.log(
        f"phase 2: classification head on the frozen encoder's pooled features of {len(y)} "
        f"slices of {cohort.parent.name}/{cohort.name}, up to {t.classifier_epochs} epochs"
    )
    callbacks = _callbacks(
        run.out, "classification", t.early_stopping_patience, run.resume, patient_eval,
        save=classifier, log=run.log,
    )  # fmt: skip
    verbose, callbacks = keras_verbose(run.verbose, callbacks, t.classifier_epochs, run.log)
    head.fit(x, y, sample_weight=w, batch_size=t.batch_size, epochs=t.classifier_epochs,
             validation_data=(xv, yv), callbacks=callbacks, verbose=verbose)  # fmt: skip


def _pooled(features, dataset, pneumonia_weight: int):
    """(pooled features, slice labels, sample weights) of every slice of a dataset."""
    xs, ys, ws = [], [], []
    for batch in dataset:
        diagnosis = batch["patient/diagnosis"].numpy().astype(str)
        # The "classify" task's slices: annotated ones, and every other pneumonia's slice.
        usable = [slice_is_usable("classify", a > 0, d)
                  for a, d in zip(batch["mask/annotated"].numpy(), diagnosis)]  # fmt: skip
        xs.append(np.asarray(features.predict_on_batch(batch["hu"][..., None]))[usable])
        ys.append(classify_label(batch).numpy()[usable])
        weight = np.where(np.isin(diagnosis, OTHER_PNEUMONIA), float(pneumonia_weight), 1.0)
        ws.append(weight[usable])
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def _summary(config, folder, manifest, strategy, resume, timings) -> dict:
    """The content of ``run.json``."""
    return {
        "experiment": config.name,
        "fold": config.data.fold,
        "records": str(folder),
        "data_fingerprint": _data_fingerprint(folder),
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
        "timings": timings,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_cv_folder(out: Path, resume: bool) -> None:
    """Refuses an --out that holds something other than this cross-validation."""
    if not (out.exists() and any(out.iterdir())):
        if resume:
            raise TrainingError(_nothing_to_resume(out))
        return
    if not resume:
        raise TrainingError(
            f"{out} already holds a run: pass --resume to continue it or choose another --out"
        )
    single = any((out / n).exists() for n in ("state.json", "logs", "backup", "run.json"))
    if single and not _is_cv_folder(out):
        raise TrainingError(
            f"{out} holds a single-fold run: continue it without --fold all, or "
            "cross-validate into another --out"
        )
    if not (out / "config.yaml").is_file():
        raise TrainingError(f"{out} holds no run to continue (no config.yaml): choose a new --out")


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
    _check_out(out, resume)
    _check_cv_folder(out, resume)
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
