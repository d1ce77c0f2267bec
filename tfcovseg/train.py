"""Train the coarse-refine segmenter and its slice classifier.

    python -m tfcovseg.train [--config experiments/X.yaml] [--set key=value ...]
        [--fold K] [--out runs/NAME] [--resume]

Without ``--config`` this runs ``experiments/quickstart.yaml``, the embedded default: it
writes a synthetic phantom cohort into a cache folder (once), converts it, trains a narrow
network at reduced size for both phases, evaluates the test patients of the fold and prints
where everything went and the headline figures.

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
``segmenter_last.keras``, ``classifier_best.keras``, ``logs/`` and ``run.json``
(data fingerprint, seed, versions, timings). Research use, not a medical device.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

from tfcovseg import __version__, require_tensorflow  # noqa: E402
from tfcovseg.config import ConfigError, ExperimentConfig, load_config, save_config  # noqa: E402

tf = require_tensorflow("python -m tfcovseg.train")

import keras  # noqa: E402

from tfcovseg.data import make_dataset, read_manifest, split_slices  # noqa: E402
from tfcovseg.losses import deep_supervision  # noqa: E402
from tfcovseg.metrics import segmentation_metrics  # noqa: E402
from tfcovseg.models import build_classifier, build_model, load_model  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DEFAULT_CONFIG = EXPERIMENTS / "quickstart.yaml"


class TrainingError(Exception):
    """Training cannot start; the message names the problem (exit code 2)."""


def records_dir(config: ExperimentConfig) -> Path:
    return Path(config.data.records_dir).expanduser()


def prepare_records(config: ExperimentConfig, log=print) -> Path:
    """The record folder, after writing and converting the phantom cohort if configured."""
    folder = records_dir(config)
    if (folder / "manifest.json").is_file() or config.data.phantom_patients == 0:
        return folder
    from data_tools.convert import convert
    from data_tools.phantom import make_cohort

    size = config.model.input_size[0]
    cohort = folder.parent / "phantom"
    if not (cohort / "manifest.csv").is_file():
        log(
            f"writing a synthetic phantom cohort of {config.data.phantom_patients} patients "
            f"to {cohort} (once)"
        )
        make_cohort(cohort, config.data.phantom_patients, config.data.phantom_seed, size)
    log(f"converting {cohort} to TFRecords in {folder}")
    convert(
        cohort,
        folder,
        size=size,
        folds=config.data.num_folds,
        seed=config.data.phantom_seed,
        classes=config.model.class_names,
        progress=False,
        salt="tfcovseg-phantom",
    )
    return folder


def check_inputs(config: ExperimentConfig, folder: Path) -> dict:
    """Validates records against the config before any training; returns the manifest."""
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError as e:
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
    for split in ("train", "validation"):
        n = split_slices(manifest, split, config.data.fold)
        if n == 0:
            raise TrainingError(
                f"the {split} split of fold {config.data.fold} in {folder} is "
                f"empty: too few patients for {len(folds)} folds"
            )
    n_train = split_slices(manifest, "train", config.data.fold)
    if config.train.batch_size > n_train:
        raise TrainingError(
            f"train.batch_size {config.train.batch_size} is larger than the "
            f"{n_train} training slices of fold {config.data.fold} in {folder}"
        )
    return manifest


def choose_strategy():
    """MirroredStrategy over several local GPUs, else the default strategy."""
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _callbacks(out: Path, phase: str, patience: int, resume: bool):
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    best = out / f"{phase_name(phase)}_best.keras"
    return [
        keras.callbacks.BackupAndRestore(str(out / "backup" / phase)),
        keras.callbacks.ModelCheckpoint(str(best), monitor="val_loss", save_best_only=True),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=patience, restore_best_weights=True
        ),
        keras.callbacks.CSVLogger(str(logs / f"{phase}.csv"), append=resume),
        keras.callbacks.TensorBoard(str(logs / "tensorboard" / phase), write_graph=False),
    ]


def phase_name(phase: str) -> str:
    return {"segmentation": "segmenter", "classification": "classifier"}[phase]


def _data_fingerprint(folder: Path) -> str:
    return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()[:16]


def train(
    config: ExperimentConfig, out: Path, resume: bool = False, verbose: int = 2, log=print
) -> dict:
    """Runs the configured phases; returns the run summary (also in ``run.json``)."""
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise TrainingError(
            f"{out} already holds a run: pass --resume to continue it or choose another --out"
        )
    folder = prepare_records(config, log)
    manifest = check_inputs(config, folder)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    keras.utils.set_random_seed(config.train.seed)
    keras.config.set_dtype_policy(config.train.precision)
    t = config.train
    fold = config.data.fold
    timings = {}
    common = dict(
        record_dir=folder,
        fold=fold,
        batch_size=t.batch_size,
        image_size=config.model.input_size,
        class_names=config.model.class_names,
        cache=config.data.cache,
        seed=t.seed,
    )
    strategy = choose_strategy()
    segmenter = None
    if "segmentation" in t.phases:
        phase_start = time.perf_counter()
        with strategy.scope():
            segmenter = build_model(config.model)
            losses, weights = deep_supervision(
                list(segmenter.output), t.loss, t.coarse_loss_weight, t.final_loss_weight
            )
            segmenter.compile(
                optimizer=keras.optimizers.Adam(t.learning_rate),
                loss=losses,
                loss_weights=weights,
                metrics={"final": segmentation_metrics(config.model.class_names)},
                jit_compile=t.jit_compile,
            )
        outputs = tuple(segmenter.output)
        train_ds = make_dataset(
            split="train",
            training=True,
            outputs=outputs,
            augment_data=config.data.augment,
            oversample_lesions=config.data.oversample_lesions,
            shuffle_buffer=config.data.shuffle_buffer,
            **common,
        )
        val_ds = make_dataset(split="validation", training=False, outputs=outputs, **common)
        log(
            f"phase 1: segmentation, {config.model.architecture} at "
            f"{config.model.input_size[0]}x{config.model.input_size[1]}, fold {fold}, up to "
            f"{t.epochs} epochs"
        )
        segmenter.fit(
            train_ds,
            validation_data=val_ds,
            epochs=t.epochs,
            verbose=verbose,
            shuffle=False,  # the datasets shuffle themselves
            callbacks=_callbacks(out, "segmentation", t.early_stopping_patience, resume),
        )
        segmenter.save(out / "segmenter_last.keras")
        timings["segmentation_s"] = round(time.perf_counter() - phase_start, 1)
    if "classification" in t.phases:
        phase_start = time.perf_counter()
        with strategy.scope():
            if config.model.architecture == "seresnet_classifier":
                classifier = build_model(config.model)
            else:
                if segmenter is None:
                    best = out / "segmenter_best.keras"
                    if not best.is_file():
                        raise TrainingError(
                            f"classification without segmentation needs "
                            f"{best} from an earlier segmentation phase"
                        )
                    segmenter = load_model(best)
                classifier = build_classifier(segmenter, config.model.classifier_dropout)
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
        train_ds = make_dataset(
            split="train",
            training=True,
            task="classify",
            augment_data=config.data.augment,
            shuffle_buffer=config.data.shuffle_buffer,
            **common,
        )
        val_ds = make_dataset(split="validation", training=False, task="classify", **common)
        log(
            f"phase 2: classification head on the frozen encoder, up to {t.classifier_epochs} "
            f"epochs"
        )
        classifier.fit(
            train_ds,
            validation_data=val_ds,
            epochs=t.classifier_epochs,
            verbose=verbose,
            shuffle=False,  # the datasets shuffle themselves
            callbacks=_callbacks(out, "classification", t.early_stopping_patience, resume),
        )
        classifier.save(out / "classifier_last.keras")
        timings["classification_s"] = round(time.perf_counter() - phase_start, 1)
    timings["total_s"] = round(time.perf_counter() - start, 1)
    summary = {
        "experiment": config.name,
        "fold": fold,
        "records": str(folder),
        "data_fingerprint": _data_fingerprint(folder),
        "num_slices": manifest["num_slices"],
        "seed": t.seed,
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
    (out / "run.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfcovseg.train",
        description="Train the coarse-refine segmenter and its slice classifier "
        "(research use, not a medical device).",
    )
    parser.add_argument("--config", type=Path, help="experiment YAML (default: quickstart)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value",
    )
    parser.add_argument("--fold", type=int, help="cross-validation fold (default: data.fold)")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/NAME-foldK-TIME)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--quiet", action="store_true", help="one line per epoch at most")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.fold is not None:
        overrides.append(f"data.fold={args.fold}")
    try:
        config = load_config(args.config or DEFAULT_CONFIG, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.resume and args.out is None:
        print("error: --resume needs --out, the run folder to continue", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / f"{config.name}-fold{config.data.fold}-{stamp}"
    try:
        summary = train(config, out, resume=args.resume, verbose=2 if args.quiet else "auto")
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run folder: {out} ({summary['timings']['total_s']:.0f} s)")
    if args.config is None or config.name == "quickstart":
        from tfcovseg.evaluate import evaluate_run, print_headline

        results = evaluate_run(out, split="test")
        print_headline(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
