"""What a training run reads, checked before it starts: the records folder (the phantom
cohort written and converted there once when the config asks for one, `prepare_records`),
the classifier's own cohort, and the records' classes, folds and splits against the config
(`check_inputs`)."""

from __future__ import annotations

import json
from pathlib import Path

from tfcovseg.configs.experiment import ExperimentConfig
from tfcovseg.data.dataset import read_manifest, records_folder, split_slices
from tfcovseg.training.errors import TrainingError

# The fixed pseudonymisation salt of phantom records (synthetic patients, nothing to hide).
PHANTOM_SALT = "tfcovseg-phantom"


def prepare_records(config: ExperimentConfig, log=print) -> Path:
    """The record folder, after writing and converting the phantom cohort if configured."""
    folder = records_folder(config)
    if config.data.phantom_patients == 0:
        return folder
    return _phantom_records(config, folder, folder.parent / "phantom", "phantom_patients", log)


def classifier_records(config: ExperimentConfig, log=print) -> Path | None:
    """Records of the classifier's own phantom cohort (`data.classifier_phantom_patients`),
    written and converted beside the first cohort once; None when not configured."""
    if not config.data.classifier_phantom_patients:
        return None
    parent = records_folder(config).parent
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
