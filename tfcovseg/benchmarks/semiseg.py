"""Real CT benchmark on the COVID-SemiSeg slices, scored as Inf-Net scores its models.

    python -m tfcovseg.benchmarks.semiseg --train-dir ../shared/data/covid-semiseg/train
        [--test-dir DIR] [--out runs/semiseg] [--config semiseg_benchmark] [--set KEY=VALUE]
        [--models coarse_refine,unet] [--folds 5] [--only-folds 3,4] [--tta 8] [--passes 2]
        [--size 256] [--epochs 60] [--seed 0] [--intensity] [--spatial] [--width full]
        [--unlabelled-dir ../shared/data/covid-semiseg/unlabelled [--semi-rounds 2]
         [--semi-pool 0] [--semi-keep 0.5] [--semi-epochs 20] [--semi-learning-rate 1e-4]]

(the command: `tfcovseg.cli.semiseg`). What trains is an experiment config, as
``python -m tfcovseg.train`` reads one (`benchmark_config`: ``--config``, default
``semiseg_benchmark``, and ``--set``; ``--size``, ``--epochs``, ``--intensity``,
``--semi-*`` and the like are shortcuts for its keys), built, compiled and stopped early
through the trainer's recipe (`tfcovseg.training.recipe`); each row of the table is that
experiment with its network (`ROWS`).

The slices (``Imgs/N.jpg``: 8-bit windowed CT; ``GT/N.png``: 0 background, 1 GGO, 2
consolidation) are read through `data_tools.convert` (its discovery and per-study
processing: pre-windowed images, two classes, resized to ``--size``), in memory: no
TFRecords, so the benchmark runs under any Keras backend (``KERAS_BACKEND=jax`` on a
machine without TensorFlow).

Each model trains from scratch (no pretrained weights offline) with the paper's recipe:
Adam, the experiment's loss on "coarse" and "final" for the coarse-refine network (plain
BCE for the U-Net baseline, as in the paper's comparison), the paper's augmentation (random
multiple of 90 degrees and horizontal flip, image and mask together); a fifth of the
training slices is held out for validation, early stopping restores the best weights.

Without ``--test-dir``: slice-level ``--folds``-fold cross-validation over the training
slices (the collection has no patient ids), mean ± sd over folds. With it: train on all
training slices, evaluate on the test slices: ``Imgs/`` + ``GT/`` with 0/1/2 masks as the
training split, or binary 0/255 infection masks as in Inf-Net's ``LungInfection-Test``
folder (then only infection is scored). Evaluation follows
Inf-Net's protocol (`tfcovseg.evaluation.protocol`) at the original image size, for
infection (GGO ∪ consolidation: the maximum of the two channels) and for GGO and
consolidation separately. Writes ``OUT/results.json``, ``OUT/results.md``
(beside Inf-Net's published values) and the probability maps as 8-bit PNGs named like
the images, ``OUT/predictions/{infection,ggo,consolidation}/N.png`` for the coarse-refine
network and ``OUT/unet/predictions/...`` for the U-Net baseline, which any evaluator
(Inf-Net's MATLAB toolbox included) can score.

With ``--unlabelled-dir`` (slices without masks), a semi-supervised row follows the
supervised coarse-refine row in every fold: self-training (`train_student`) with the
fold's supervised model as the teacher. ``--tta``, ``--intensity`` and ``--spatial`` apply
to every row alike. A line per epoch shows progress; each finished (row, fold) is kept in
``OUT/folds/`` (`tfcovseg.benchmarks.store`), so a killed run goes on from there. The
command trains each fold in a process of its own (`tfcovseg.benchmarks.processes`), so
a run needs one fold's memory.

Research use, not a medical device.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

from data_tools.files import OutputError, check_output_dir
from tfcovseg import cpu_kernels, select_cpu_kernels
from tfcovseg.benchmarks import processes
from tfcovseg.benchmarks.semiseg_config import (
    BENCH_DEFAULTS,
    CLASSES,
    MODELS,
    BenchmarkError,
    benchmark_config,
    comparable,
    row_config,
    settings_record,
)
from tfcovseg.constants import DISCLAIMER
from tfcovseg.evaluation import protocol

TARGETS = ("infection", "ggo", "consolidation")
LABELS = {
    "coarse_refine": "coarse-refine (ours, hybrid loss)",
    "coarse_refine_semi": "coarse-refine + self-training on unlabelled slices (ours)",
    "coarse_refine_fixmatch": "coarse-refine + FixMatch consistency on unlabelled slices (ours)",
    "unet": "U-Net (ours, BCE)",
}
# Inf-Net (Fan et al., IEEE TMI 2020), 48 test slices of the same collection: meanDic.
PUBLISHED = {
    "U-Net": {"infection": 0.439},
    "U-Net++": {"infection": 0.581},
    "Inf-Net (ImageNet-pretrained Res2Net)": {"infection": 0.682},
    "Semi-Inf-Net (+1600 pseudo-labelled slices)": {"infection": 0.739},
    "Semi-Inf-Net + U-Net (multi-class)": {"ggo": 0.624, "consolidation": 0.362},
}


@dataclasses.dataclass
class Slices:
    """Slices in memory: model-size inputs and original-size truth."""

    names: list[str]  # N of Imgs/N.jpg
    images: np.ndarray  # [K, S, S] float32, 0-255
    masks: np.ndarray  # [K, S, S, 2] float32, binary
    truth: list[np.ndarray]  # [H, W] uint8 labels at the original size
    # Infection-only truth (0/255 masks, Inf-Net's LungInfection-Test layout): label 1 is
    # "infection", not GGO, and only the infection target can be scored.
    infection_only: bool = False

    @property
    def targets(self) -> tuple[str, ...]:
        return ("infection",) if self.infection_only else TARGETS


def load_slices(folder, size: int, allow_infection_only=False) -> Slices:
    """The annotated slices of a COVID-SemiSeg-layout folder (``Imgs/``, ``GT/``).

    Masks are multi-class (0 background, 1 GGO, 2 consolidation), or, with
    `allow_infection_only`, all binary 0/255 infection masks as in Inf-Net's
    ``LungInfection-Test`` split (then ``infection_only`` is set and only infection can
    be scored).

    Raises:
        BenchmarkError: no folder, no image, an image without its mask, a 0/255 mask where
            GGO and consolidation labels are needed, or a folder mixing both kinds.
    """
    from data_tools.conversion.discovery import ConversionError, discover
    from data_tools.conversion.reading import process_study
    from data_tools.dicom_io import SkipFile
    from data_tools.masks import read_png_labels

    folder = Path(folder)
    try:
        found = discover(folder, classes=CLASSES)
        studies = found.studies
    except ConversionError as e:
        raise BenchmarkError(str(e)) from None
    studies = [s for s in studies if s.kind == "png"]
    if not studies:
        raise BenchmarkError(f"{folder} holds no Imgs/*.jpg|png slices (COVID-SemiSeg layout)")
    missing = [s.rel for s in studies if s.mask_path is None]
    if missing:
        raise BenchmarkError(f"{folder}: no GT mask for {', '.join(missing[:5])}")
    names, images, masks, truth = [], [], [], []
    kinds = {}
    for study in sorted(studies, key=lambda s: _slice_key(s.image_path.stem)):
        mask_rel = _relative(study.mask_path, folder)
        try:
            binary = _is_infection_mask(study.mask_path)
            if binary and not allow_infection_only:
                raise BenchmarkError(
                    f"{mask_rel} is an infection-only 0/255 mask (Inf-Net's LungInfection "
                    "layout); the training slices need GGO and consolidation labels (0 "
                    "background, 1 GGO, 2 consolidation)"
                )
            # An infection-only mask's lesions go to the first channel; only their union
            # (infection) is scored for such a folder.
            as_class = 1 if binary else None
            result = process_study(study, size, CLASSES, binary_class=as_class)
            labels = read_png_labels(study.mask_path, len(CLASSES), binary_class=as_class)
        except SkipFile as e:
            raise BenchmarkError(f"{folder / study.rel}: {e}") from None
        if binary is not None:
            kinds.setdefault(binary, mask_rel)
        names.append(study.image_path.stem)
        images.append(result.hu[0].astype(np.float32))
        masks.append(result.lesions[0].astype(np.float32))
        truth.append(labels)
    if len(kinds) == 2:
        raise BenchmarkError(
            f"{folder} mixes infection-only 0/255 masks ({kinds[True]}) with multi-class "
            f"ones ({kinds[False]}); score them as two test folders"
        )
    return Slices(names, np.stack(images), np.stack(masks), truth, kinds.get(True, False))


@dataclasses.dataclass
class Unlabelled:
    """Unlabelled slices in memory, with the CT volume each comes from."""

    names: list[str]
    volumes: list[str]  # Data-1_<volume>_<k>.jpg -> <volume>; the name when there is no _k
    images: np.ndarray | None  # [K, S, S] float32, 0-255; None: not loaded here (`source`)
    skipped: list = dataclasses.field(default_factory=list)  # (file, reason): not slices
    source: tuple = ()  # (folder, size): `load_unlabelled`'s arguments


def _named(option: str, load, *args):
    """`load(*args)`, its refusal prefixed with the option that gave the folder (three
    options' folders said "input X is not a directory" alike)."""
    try:
        return load(*args)
    except BenchmarkError as e:
        raise BenchmarkError(f"{option}: {e}") from None


def load_unlabelled(folder, size: int, keep_images: bool = True) -> Unlabelled:
    """The slices of a slice-dataset folder without masks (``Imgs/*.jpg``), resized.

    Images that are no CT slice (unreadable, colour, a mask or blank: `read_image_slice`)
    are left out, in ``skipped``: one among 1,600 need not stop the run. Without
    `keep_images` each slice is read and checked, but none is kept (``images`` None): the
    parent of per-fold processes, which load them themselves (`source`).

    Raises:
        BenchmarkError: no folder, no readable slice, or a folder whose slices have masks
            (``GT/``): labelled slices belong in --train-dir.
    """
    from PIL import Image

    from data_tools.conversion.discovery import ConversionError, discover
    from data_tools.dicom_io import SkipFile
    from data_tools.masks import read_image_slice

    folder = Path(folder)
    try:
        studies = [s for s in discover(folder, classes=CLASSES).studies if s.kind == "png"]
    except ConversionError as e:
        raise BenchmarkError(str(e)) from None
    if not studies:
        raise BenchmarkError(f"{folder} holds no Imgs/*.jpg|png slices (unlabelled slices)")
    labelled = [s.rel for s in studies if s.mask_path is not None]
    if not labelled and (Path(folder) / "GT").is_dir():  # masks named unlike the images
        labelled = ["GT/"]
    if labelled:
        raise BenchmarkError(
            f"{folder} holds masks ({labelled[0]} has one): --unlabelled-dir takes slices "
            "without GT/, labelled slices belong in --train-dir"
        )
    names, volumes, images, skipped = [], [], [], []
    for study in sorted(studies, key=lambda s: s.image_path.name):
        try:
            image = read_image_slice(study.image_path)
        except SkipFile as e:
            skipped.append((study.rel, str(e)))
            continue
        stem = study.image_path.stem
        names.append(stem)
        volumes.append(re.sub(r"_\d+$", "", stem))
        if keep_images:
            image = Image.fromarray(image, mode="F").resize((size, size), Image.BILINEAR)
            images.append(np.asarray(image, np.float32))
    if not names:
        raise BenchmarkError(f"{folder}: no slice can be used ({skipped[0][0]}: {skipped[0][1]})")
    stacked = np.stack(images) if keep_images else None
    return Unlabelled(names, volumes, stacked, skipped, (str(folder), size))


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _is_infection_mask(path) -> bool | None:
    """True for a 0/255 mask, False for 0/1/2 labels, None for an empty mask (either)."""
    from PIL import Image

    from data_tools.dicom_io import SkipFile

    try:
        with Image.open(path) as im:
            values = set(np.unique(np.asarray(im.convert("L") if im.mode == "RGB" else im)))
    except Exception as e:
        raise SkipFile(f"cannot read mask image ({type(e).__name__}: {e})") from None
    if values <= {0}:
        return None
    return 255 in values and values <= {0, 255}


def _slice_key(stem: str):
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _jitter(config):
    from tfcovseg.data.intensity import IntensityJitter

    return IntensityJitter() if config.data.intensity_augment else None


def _spatial(config):
    from tfcovseg.data.spatial import SpatialJitter

    return SpatialJitter() if config.data.spatial_augment else None


def train_one(
    config, data: Slices, train_idx, val_idx, bench, seed, log=print, *, init=None,
    extra=None, epochs=None, prefix="",
):  # fmt: skip
    """Trains one row's model (`row_config`) through the trainer's recipe
    (`tfcovseg.training.recipe`: loss, optimiser, metrics, early stopping, epoch lines),
    from scratch or from `init`'s weights; returns it with the best validation weights.
    `extra`: pseudo-labelled (images, masks) mixed into every batch."""
    import keras

    from tfcovseg.benchmarks.batches import SliceBatches
    from tfcovseg.training.recipe import build_segmenter

    t = config.train
    keras.utils.set_random_seed(seed)
    model = build_segmenter(config, init, compile=False)
    outputs = list(model.output)
    train = SliceBatches(
        data.images[train_idx], data.masks[train_idx], outputs, t.batch_size, bench["passes"],
        seed, augment=config.data.augment, jitter=_jitter(config), extra=extra,
        extra_share=config.semi.share, spatial=_spatial(config),
    )  # fmt: skip
    val = SliceBatches(
        data.images[val_idx], data.masks[val_idx], outputs, t.batch_size, 1, seed, training=False
    )
    info = _fit(
        config, model, train, val, epochs or t.epochs, prefix or config.model.architecture, log
    )
    return model, info


def _fit(config, model, train, val, epochs, name, log, objective=None) -> dict:
    """Compiles `model` with the recipe (`objective`: default, its outputs'), fits it with
    early stopping and an epoch line each; returns its epochs, best epoch and that epoch's
    validation loss (a student's beside its teacher's: did it improve on the labelled
    validation slices?)."""
    from tfcovseg.benchmarks.batches import fit_input
    from tfcovseg.evaluation.runlog import phase_summary
    from tfcovseg.training.recipe import (
        EMAWeights,
        compile_segmenter,
        early_stopping,
        keras_verbose,
    )

    compile_segmenter(config, model, objective, steps_per_epoch=len(train), epochs=epochs)
    patience = config.train.early_stopping_patience
    verbose, callbacks = keras_verbose(
        2, [EMAWeights(), early_stopping(patience)], epochs, log, prefix=f"    {name} "
    )
    # The batches permute their slices each epoch themselves: read in turn, not shuffled.
    history = model.fit(
        fit_input(train), validation_data=fit_input(val), epochs=epochs, shuffle=False,
        steps_per_epoch=len(train), validation_steps=len(val), callbacks=callbacks,
        verbose=verbose,
    )  # fmt: skip
    run = phase_summary(history.history, epochs)  # NaN epochs are never the best
    best, loss = run["best_epoch"], run["best_val_loss"]
    seen = "no finite validation loss" if best is None else f"validation loss {loss:.4f}"
    log(f"    {name}: {run['epochs']} epochs, best {best} ({seen})")
    loss = None if loss is None else round(float(loss), 5)
    return {"epochs": run["epochs"], "best_epoch": best, "best_val_loss": loss}


def train_student(teacher, config, data: Slices, split, unlabelled, bench, seed, log, score=None):
    """Self-training (``config.semi``, as `tfcovseg.train`'s phase 1b): the teacher
    pseudo-labels ``semi.pool`` unlabelled slices (intensity-matched to the labelled ones),
    the surest ``semi.keep`` of them join every batch, and a student starting from the
    teacher's weights trains on both at ``semi.learning_rate`` (`for_student`); repeated
    ``semi.rounds`` times with the student as the next teacher. `score(model)`, when
    given, scores every round's student on the fold's test slices: a record of what each
    round adds, never a choice (the row's model is always the last round's)."""
    from tfcovseg.data import intensity
    from tfcovseg.training import semisup

    semi = config.semi
    rng = np.random.default_rng(seed)
    images = unlabelled.images
    if semi.match_intensity:
        images = intensity.match_intensity(images, data.images[split.fit])
    model, rounds = teacher, []
    for r in range(semi.rounds):
        pool = np.sort(rng.permutation(len(images))[: semi.pool or len(images)])
        start = time.perf_counter()
        pseudo = semisup.label_round(
            model, images[pool], semi.views, semi.keep,
            positive_weights=config.train.positive_weights,
        )  # fmt: skip
        log(
            f"    round {r + 1}: {len(pseudo.images)} of {pseudo.pool} unlabelled slices "
            f"pseudo-labelled (confidence >= {pseudo.confidence_min:.3f}, "
            f"{time.perf_counter() - start:.0f} s)"
        )
        model, info = train_one(
            config.for_student(), data, split.fit, split.val, bench, seed + 1000 * (r + 1), log,
            init=model, extra=(pseudo.images, pseudo.masks.astype(np.float32)),
            epochs=semi.epochs, prefix=f"student {r + 1}",
        )  # fmt: skip
        info |= {"pseudo_labelled": len(pseudo.images), "pool": pseudo.pool}
        if score is not None and r + 1 < semi.rounds:  # the last round's is the row's
            start, scores = time.perf_counter(), score(model)
            log(f"    student {r + 1} on the test slices: {_headline(scores)}")
            info["test_scores"] = {
                t: {k: s[k] for k in ("meanDic", "Dice@0.5")} for t, s in scores.items()
            }
            info["test_scored_s"] = round(time.perf_counter() - start, 1)  # in the row's wall_s
        rounds.append(info)
    last = rounds[-1]["best_val_loss"] if rounds else None  # the row's model's
    return model, {
        "epochs": sum(r["epochs"] for r in rounds),
        "best_val_loss": last,
        "rounds": rounds,
    }


def train_fixmatch(teacher, config, data: Slices, split, unlabelled, bench, seed, log):
    """FixMatch-style consistency (``semi.method: fixmatch``,
    `tfcovseg.training.consistency`): a student starting from the teacher's weights trains
    on the labelled batches plus as many unlabelled slices (intensity-matched to the
    labelled ones), its confident predictions on a weak view of each the targets of its
    prediction on a strong view; up to ``semi.epochs`` epochs under the same early stopping
    on the labelled validation slices. Returns the segmenter and its run's facts."""
    import keras

    from tfcovseg.benchmarks.batches import ConsistencyBatches, SliceBatches
    from tfcovseg.data import intensity
    from tfcovseg.training.consistency import ConsistencyTrainer
    from tfcovseg.training.recipe import build_segmenter, segmentation_objective

    semi, t = config.semi, config.train
    images = unlabelled.images
    if semi.match_intensity:
        images = intensity.match_intensity(images, data.images[split.fit])
    keras.utils.set_random_seed(seed + 1000)
    segmenter = build_segmenter(config, teacher, compile=False)
    outputs = list(segmenter.output)
    model = ConsistencyTrainer(
        segmenter, semi.confidence, semi.consistency_weight, t.positive_weights
    )
    train = ConsistencyBatches(
        data.images[split.fit], data.masks[split.fit], outputs, t.batch_size, bench["passes"],
        seed + 1000, images, intensity.IntensityJitter(), augment=config.data.augment,
        jitter=_jitter(config), spatial=_spatial(config),
    )  # fmt: skip
    val = SliceBatches(
        data.images[split.val], data.masks[split.val], outputs, t.batch_size, 1, seed,
        training=False,
    )  # fmt: skip
    # The wrapper has no symbolic outputs: the objective is the segmenter's.
    objective = segmentation_objective(config, outputs)
    # A student, as self-training's: at semi.learning_rate (`for_student`).
    info = _fit(config.for_student(), model, train, val, semi.epochs, "fixmatch", log, objective)
    return segmenter, info | {"unlabelled": len(images)}


def predict_maps(model, data: Slices, idx, views=1, positive_weights=None) -> dict:
    """8-bit probability maps at each slice's original size: {target: [maps]}; `views`
    (1 or up to 8) averages the model over that many quarter turns and flips; the maps are
    corrected for the row's `positive_weights` (`tfcovseg.models.outputs`)."""
    from PIL import Image

    from tfcovseg.training.semisup import DIHEDRAL, predict_probabilities

    maps = {t: [] for t in TARGETS}
    probs = predict_probabilities(
        model, data.images[idx], batch_size=4, tta=DIHEDRAL[:views],
        positive_weights=positive_weights,
    )  # fmt: skip
    for j, i in enumerate(idx):
        h, w = data.truth[i].shape
        full = np.stack(
            [
                np.asarray(
                    Image.fromarray(probs[j, ..., c], mode="F").resize((w, h), Image.BILINEAR)
                )
                for c in range(len(CLASSES))
            ],
            -1,
        )
        maps["ggo"].append(protocol.to_uint8(full[..., 0]))
        maps["consolidation"].append(protocol.to_uint8(full[..., 1]))
        maps["infection"].append(protocol.to_uint8(full.max(-1)))
    return maps


def truths(data: Slices, idx) -> dict:
    labels = [data.truth[i] for i in idx]
    return {
        "infection": [t > 0 for t in labels],
        "ggo": [t == 1 for t in labels],
        "consolidation": [t == 2 for t in labels],
    }


def prediction_folder(out, architecture: str) -> Path:
    """Where a model's probability maps go: ``OUT/predictions/`` for the coarse-refine
    network (the model this benchmark is about), ``OUT/<model>/predictions/`` for the
    baselines."""
    out = Path(out)
    return (
        out / "predictions"
        if architecture == "coarse_refine"
        else out / architecture / "predictions"
    )


def write_maps(folder: Path, names, maps) -> None:
    """8-bit PNGs ``folder/<target>/<name>.png``."""
    from PIL import Image

    for target, images in maps.items():
        out = folder / target
        out.mkdir(parents=True, exist_ok=True)
        for name, image in zip(names, images):
            Image.fromarray(image).save(out / f"{name}.png")


def _folds(n, k, seed):
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)]


def _holdout(idx, fraction, seed):
    idx = np.random.default_rng(seed).permutation(idx)
    n_val = max(1, int(round(fraction * len(idx))))
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])


def summarise(per_fold: list[dict]) -> dict:
    """Mean and sd (over folds) of every metric of every target."""
    out = {}
    for target in per_fold[0]:
        keys = [k for k in per_fold[0][target] if k != "images"]
        out[target] = {
            k: {
                "mean": float(np.mean([f[target][k] for f in per_fold])),
                "sd": float(np.std([f[target][k] for f in per_fold], ddof=1))
                if len(per_fold) > 1
                else 0.0,
            }
            for k in keys
        }
    return out


SEMI = "coarse_refine_semi"
FIXMATCH = "coarse_refine_fixmatch"
# The semi-supervised row of each ``semi.method`` (its teacher: the supervised row).
SEMI_ROWS = {"self_training": SEMI, "fixmatch": FIXMATCH}


@dataclasses.dataclass
class Split:
    fold: int
    fit: np.ndarray  # training slices
    val: np.ndarray  # early-stopping slices
    test: np.ndarray  # scored slices (of the test folder in test mode)


def _splits(train: Slices, test, folds, bench, seed) -> list[Split]:
    n = len(train.names)
    if test is not None:
        fit, val = _holdout(np.arange(n), bench["val_fraction"], seed)
        return [Split(0, fit, val, np.arange(len(test.names)))]
    out = []
    for k, test_idx in enumerate(_folds(n, folds, seed)):
        fit, val = _holdout(np.setdiff1d(np.arange(n), test_idx), bench["val_fraction"], seed + k)
        out.append(Split(k, fit, val, test_idx))
    return out


def _check_splits(splits, train_dir, cross_validation: bool) -> None:
    """Every fold has a slice to fit and one for early stopping (a fold without one ended
    in a Keras traceback)."""
    for split in splits:
        if len(split.fit) == 0:
            n = len(split.fit) + len(split.val) + (len(split.test) if cross_validation else 0)
            where = f" for {len(splits)} folds" if cross_validation else ""
            raise BenchmarkError(
                f"{train_dir} holds {n} slice(s), too few{where}: each fold trains on at "
                "least 2 (one to fit, one for early stopping)"
                + ("; give fewer --folds" if cross_validation else "")
            )


def _check_dirs(out, train_dir, test_dir) -> None:
    """An --out that can be written and holds no other files than a benchmark run's, and a
    test folder that is not the training one, checked before the slices load."""
    from tfcovseg.benchmarks.store import PROGRESS

    out = Path(out)
    try:
        check_output_dir(out)
    except OutputError as e:
        raise BenchmarkError(str(e)) from None
    if out.is_dir() and any(out.iterdir()) and not (out / PROGRESS).is_file():
        raise BenchmarkError(
            f"--out {out} holds other files and no benchmark run ({PROGRESS}): choose a new "
            "or empty folder (a run's own folder resumes)"
        )
    if test_dir is not None and Path(test_dir).resolve() == Path(train_dir).resolve():
        raise BenchmarkError(
            f"--test-dir {test_dir} is the --train-dir: the scores would be on the training "
            "slices (leave out --test-dir to cross-validate)"
        )


def _rows(models, unlabelled_dir, method="self_training") -> list[str]:
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise BenchmarkError(f"unknown models {unknown}; choose from {list(MODELS)}")
    if not models:
        raise BenchmarkError(f"--models names no model; choose from {list(MODELS)}")
    rows = list(dict.fromkeys(models))
    if unlabelled_dir is not None:
        if "coarse_refine" not in rows:
            raise BenchmarkError(
                "--unlabelled-dir trains the semi-supervised coarse-refine row from the "
                "supervised one (its teacher): include coarse_refine in --models"
            )
        # An experiment without a semi method (semi.method none) gets self-training, the
        # row --unlabelled-dir has always added.
        rows.insert(rows.index("coarse_refine") + 1, SEMI_ROWS.get(method, SEMI))
    return rows


def run(
    train_dir, out, test_dir=None, models=MODELS, folds=5, log=print, unlabelled_dir=None,
    only_folds=None, config=None, overrides=(), isolate=False, from_run=None, **kw,
):  # fmt: skip
    """Runs the benchmark; returns the results (also written to ``out``).

    The experiment is `config` with `overrides` (`benchmark_config`; the keywords `size`,
    `widths` and the `SHORTCUTS` set its keys); `passes`, `val_fraction` and `tta` are the
    benchmark's own (`BENCH_DEFAULTS`). Each finished (row, fold) is kept in ``out``
    (`store.FoldStore`): a rerun with the same arguments goes on from there. `only_folds`
    (cross-validation only) trains just those folds, so that runs in turn or on several
    machines fill one ``out`` (the table counts every fold found there). `isolate` (the
    command's way): in cross-validation each fold trains in a fresh process
    (`_fold_in_own_process`) that prints its lines itself instead of calling `log`, so
    memory stays that of one fold (in one process it grows by about 1.5 GB a fold).
    `from_run`: a run's folder whose settings are this run's but for the
    test-time views (``tta``) and rows: the models it kept (`_save_weights`) are loaded and
    scored again rather than trained (`_Fold._kept`); rows it kept none of train here."""
    from tfcovseg.benchmarks.store import FoldStore, StoreError

    bench = BENCH_DEFAULTS | {k: kw.pop(k) for k in BENCH_DEFAULTS if k in kw}
    if not 1 <= bench["tta"] <= 8:
        raise BenchmarkError(f"--tta takes 1 to 8 views, got {bench['tta']}")
    if bench["passes"] < 1:
        raise BenchmarkError(f"--passes must be at least 1, got {bench['passes']}")
    _check_dirs(out, train_dir, test_dir)
    if from_run is not None and Path(from_run).resolve() == Path(out).resolve():
        raise BenchmarkError("--from-run is the --out folder: give the new run its own --out")
    config = benchmark_config(config, overrides, **kw)
    # Before TensorFlow loads, here or in the folds' processes (which inherit the choice).
    kernels = select_cpu_kernels(config.train.cpu_kernels)
    out, start, size = Path(out), time.perf_counter(), config.model.input_size[0]
    # What needs no slice is checked before the slices are read (seconds; 1,600 unlabelled).
    rows = _rows(models, unlabelled_dir, config.semi.method)
    if test_dir is None and folds < 2:
        raise BenchmarkError(f"--folds must be at least 2, got {folds}")
    train = _named("--train-dir", load_slices, train_dir, size)
    test = _named("--test-dir", load_slices, test_dir, size, True) if test_dir else None
    # A process per fold: cross-validation only (a test split trains one model). Each
    # fold's process reads the unlabelled slices itself (420 MB at 256x256): none kept here.
    isolated = isolate and test is None
    unlabelled = (
        _named("--unlabelled-dir", load_unlabelled, unlabelled_dir, size, not isolated)
        if unlabelled_dir
        else None
    )
    if test is None and not 2 <= folds <= max(2, len(train.names)):
        raise BenchmarkError(f"--folds must be between 2 and {len(train.names)}, got {folds}")
    semi_row, seed = unlabelled is not None, config.train.seed
    settings = settings_record(config, bench, semi_row=semi_row)
    code = processes.source_digest() if isolated else None
    results = _header(train, test, unlabelled, folds, seed, settings, _backend(code))
    # What this invocation trains with; results.json lists, per row, what its folds did.
    kernels = kernels if results["backend"] == "tensorflow" else None
    log(_describe(train, test, unlabelled, folds, settings, results["backend"], kernels))
    splits = _splits(train, test, folds, bench, seed)
    _check_splits(splits, train_dir, test is None)
    todo = _pick_folds(only_folds, splits, test)
    # Free keys, and without a semi row semi keys, an older run recorded do not stop it.
    normalise = functools.partial(comparable, semi_row=semi_row)
    fingerprint = _fingerprint(results, rows)
    try:
        # --from-run is checked first: a refusal leaves no progress.json in --out.
        kept = _kept_run(from_run, fingerprint, normalise) if from_run else None
        if kept is not None:
            _check_lineage(kept, rows, todo)
            # Recorded, so that this --out goes on only from the same run's models.
            fingerprint |= {"from_run": str(Path(from_run).resolve())}
        store = FoldStore(out, fingerprint, normalise)
    except StoreError as e:
        raise BenchmarkError(str(e)) from None
    for split in (s for s in splits if s.fold in todo):
        if test is None:
            log(
                f"fold {split.fold}: {len(split.fit)} train, {len(split.val)} validation, "
                f"{len(split.test)} test"
            )
        fold = _Fold(
            config, bench, store, split, train, test, unlabelled, seed + split.fold, kept=kept
        )
        keep_teacher = bool(set(SEMI_ROWS.values()) & set(rows))
        if code:
            _fold_in_own_process(fold, rows, out, keep_teacher, code)
        else:
            fold.rows(rows, out, log, keep_teacher)
        results = _assemble(results, store, rows, splits, start)
        _write(out, results)  # after every fold: a crash later keeps what is done
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write(out, results)
    return results


@dataclasses.dataclass
class _Fold:
    """One fold's rows: trained, scored, their maps written and kept in the store."""

    config: object  # the experiment (`benchmark_config`)
    bench: dict
    store: object  # store.FoldStore
    split: Split
    train: Slices
    test: Slices | None
    unlabelled: Unlabelled | None
    seed: int
    teacher: object = None  # the supervised coarse-refine model, for the semi row
    kept: object = None  # store.FoldStore of --from-run: models scored again, not trained

    def rows(self, rows, out: Path, log, keep_teacher: bool) -> None:
        for row in rows:
            self.row(row, out, log, keep_teacher)

    def row(self, row: str, out: Path, log, keep_teacher: bool) -> None:
        from tfcovseg.training.recipe import jit_compile

        split, store = self.split, self.store
        done = store.get(row, split.fold)
        if done is not None:
            log(f"  {LABELS[row]}: done before ({_headline(done['scores'])})")
            return
        log(f"  {LABELS[row]}")
        start = time.perf_counter()
        model, info = self._fit(row, log, keep_teacher)
        semi = row in SEMI_ROWS.values()
        trained = row_config(self.config, "coarse_refine" if semi else row)
        maps, scores = self._score(model, trained)
        names = [self._scored.names[i] for i in split.test]
        write_maps(prediction_folder(out, row), names, maps)
        run_info = info | ({"test_slices": names} if self.test is None else {})
        # A run may go on under other kernels or XLA (`ARITHMETIC_KEYS`): each fold says its
        # own (a model of --from-run keeps what it trained with).
        if "from_run" not in info:
            run_info["jit_compile"] = jit_compile(trained)
            if _backend(isolated=False) == "tensorflow":
                run_info["cpu_kernels"] = cpu_kernels()
        entry = {"scores": scores, "run": run_info, "peak_rss_mb": _peak_rss_mb()}
        if semi:  # kept, as the teacher is: test-time changes can be scored without training
            _save_weights(model, store, row, split.fold)
        store.put(row, split.fold, entry | {"wall_s": round(time.perf_counter() - start, 1)})
        log(f"    {_headline(scores)}")

    @property
    def _scored(self) -> Slices:
        """The slices the fold's test indices point into: --test-dir's, or the CV's own."""
        return self.test if self.test is not None else self.train

    def _score(self, model, trained):
        """The fold's test slices: `model`'s maps and their scores (Inf-Net's protocol)."""
        scored, idx = self._scored, self.split.test
        maps = predict_maps(model, scored, idx, self.bench["tta"], trained.train.positive_weights)
        truth = truths(scored, idx)
        return maps, {t: protocol.score(maps[t], truth[t]) for t in scored.targets}

    def _fit(self, row: str, log, keep_teacher: bool):
        model, info = self._kept(row, log) or self._train(row, log)
        if row == "coarse_refine" and keep_teacher:
            self.teacher = model
            _save_weights(model, self.store, row, self.split.fold)
        return model, info

    def _train(self, row: str, log):
        split, supervised = self.split, row_config(self.config, "coarse_refine")
        if row in SEMI_ROWS.values():
            if self.teacher is None:  # the supervised fold was done before this process
                self.teacher = _load_model(self.store, "coarse_refine", split.fold, supervised)
            args = (self.teacher, supervised, self.train, split, self.unlabelled, self.bench)
            if row == FIXMATCH:
                return train_fixmatch(*args, self.seed, log)

            def score(model):
                return self._score(model, supervised)[1]

            return train_student(*args, self.seed, log, score=score)
        config = row_config(self.config, row)
        return train_one(config, self.train, split.fit, split.val, self.bench, self.seed, log)

    def _kept(self, row: str, log):
        """`row`'s model of this fold from --from-run with its run facts, or None (that
        run kept none: it trains here)."""
        if self.kept is None:
            return None
        fold = self.split.fold
        entry = _kept_entry(self.kept, row, fold)
        if entry is None:
            log(f"    {self.kept.out} kept no model of this row and fold: trained here")
            return None
        config = row_config(self.config, "coarse_refine" if row in SEMI_ROWS.values() else row)
        model = _load_model(self.kept, row, fold, config)
        log(f"    the model {self.kept.out} trained, scored again")
        info = entry["run"] | {"from_run": str(self.kept.out)}
        if "rounds" in info:  # their test scores are of that run's views, not of this one's
            info["rounds"] = [
                {k: v for k, v in r.items() if not k.startswith("test_")} for r in info["rounds"]
            ]
        return model, info


def _fold_in_own_process(fold: _Fold, rows, out: Path, keep_teacher: bool, code: str) -> None:
    """Trains `fold`'s rows in a fresh process (`processes.run_in_process`): memory that
    one fold's models leave behind goes with it. The store carries the finished rows to
    the parent; `code` is the run's `processes.source_digest`."""
    k = fold.split.fold
    args = (fold, rows, out, keep_teacher, code)
    exit_code = processes.run_in_process(_fold_process, args, f"fold {k}")
    if exit_code != 0:
        raise BenchmarkError(
            f"fold {k} stopped in its own process ({processes.describe_exit(exit_code)}); "
            f"the folds and rows finished before it are kept in {out / 'folds'}"
        )


def _fold_process(fold: _Fold, rows, out: Path, keep_teacher: bool, code: str) -> None:
    """A fold's process (`_fold_in_own_process`): its lines go to stdout as they come."""
    from tfcovseg.benchmarks.store import StoreError

    processes.exit_with_parent()
    try:
        if processes.source_digest() != code:
            raise BenchmarkError(
                f"fold {fold.split.fold}: the code of {', '.join(processes.PACKAGES)} changed "
                "on disk since this run started, and a fold's process would train under the "
                "new code; run the same command again to go on under it"
            )
        if fold.unlabelled is not None and fold.unlabelled.images is None:
            fold.unlabelled = load_unlabelled(*fold.unlabelled.source)
        fold.rows(rows, out, lambda line: print(line, flush=True), keep_teacher)
    except (BenchmarkError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _pick_folds(only_folds, splits, test) -> set[int]:
    """The folds to train: `only_folds` (checked), or all."""
    if only_folds is None:
        return {s.fold for s in splits}
    if test is not None:
        raise BenchmarkError("--only-folds is for cross-validation, not with --test-dir")
    wrong = sorted(set(only_folds) - {s.fold for s in splits})
    if wrong or not only_folds:
        raise BenchmarkError(
            f"--only-folds takes folds 0 to {len(splits) - 1}, got {sorted(set(only_folds))}"
        )
    return set(only_folds)


def _headline(scores) -> str:
    return f"infection meanDic {scores['infection']['meanDic']:.3f}"


def _save_weights(model, store, row: str, fold: int) -> None:
    from tfcovseg.models.saving import save_weights

    path = store.weights(row, fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)


def _load_model(store, row: str, fold: int, config):
    """The model `store` kept of (`row`, `fold`) (`_save_weights`), built from `config`."""
    from tfcovseg.models import build_model
    from tfcovseg.models.saving import model_file_problem

    path = store.weights(row, fold)
    problem = model_file_problem(path)
    if problem:
        raise BenchmarkError(
            f"the {LABELS[row]} model of fold {fold} cannot be read: {problem}; delete "
            f"{store.path(row, fold)} to train it again"
        )
    model = build_model(config.model)
    try:
        model.load_weights(path)
    except (OSError, ValueError) as e:  # truncated or another model's (h5py, Keras)
        raise BenchmarkError(
            f"the {LABELS[row]} model of fold {fold}, {path}, cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); delete "
            f"{store.path(row, fold)} to train it again"
        ) from None
    return model


def _kept_run(from_run, settings: dict, normalise):
    """--from-run's fold store, read only, once its settings are found to be this run's
    but for the test-time views and the rows (`run`)."""
    from tfcovseg.benchmarks.store import PROGRESS, FoldStore, differing

    from_run = Path(from_run)
    path = from_run / PROGRESS
    if not path.is_file():
        raise BenchmarkError(f"--from-run {from_run} is not a benchmark run (no {PROGRESS})")
    try:
        recorded = normalise(json.loads(path.read_text())["settings"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BenchmarkError(
            f"--from-run {from_run}: {path} cannot be read ({type(e).__name__}: {e})"
        ) from None
    settings = json.loads(json.dumps(settings))  # as it reads back from disk
    # (RUN may itself have scored another run's models again: "from_run".)
    differ = differing(recorded, settings, free=("settings.tta", "rows", "from_run"))
    if differ:
        raise BenchmarkError(
            f"--from-run {from_run} trained with other settings ({', '.join(differ)} "
            "differ): its models are scored again only under the settings they trained with"
        )
    if not any((from_run / "folds").glob("*/fold*.weights.h5")):
        # Scoring again was asked for: training everything instead would be a surprise.
        raise BenchmarkError(
            f"--from-run {from_run} kept no model (folds/<row>/fold<k>.weights.h5)"
        )
    return FoldStore(from_run, recorded, normalise)


def _check_lineage(kept, rows, folds) -> None:
    """A student --from-run kept is scored again only beside its own teacher: where that
    run kept the student but not the teacher, the teacher would train here afresh and the
    row would pair two lineages."""
    students = [r for r in rows if r in SEMI_ROWS.values()]
    for fold in folds:
        if _kept_entry(kept, "coarse_refine", fold) is not None:
            continue
        orphans = [r for r in students if _kept_entry(kept, r, fold) is not None]
        if orphans:
            raise BenchmarkError(
                f"--from-run {kept.out} kept fold {fold}'s {LABELS[orphans[0]]} model but not its "
                f"teacher ({kept.path('coarse_refine', fold)} and "
                f"{kept.weights('coarse_refine', fold).name}): score that run's folds that "
                "kept both (--only-folds), or give another --from-run"
            )


def _kept_entry(kept, row: str, fold: int) -> dict | None:
    """`row`'s record of `fold` in --from-run's store `kept` when that run finished the
    model (its record and its weights: a run killed between writing the two has not),
    else None."""
    entry = kept.get(row, fold)
    return entry if entry is not None and kept.weights(row, fold).is_file() else None


def _describe(train, test, unlabelled, folds, settings, backend, kernels) -> str:
    if test is None:
        where = f", {folds}-fold cross-validation"
    else:
        where = f", {len(test.names)} test slices" + (
            " (infection-only masks: GGO and consolidation not scored)"
            if test.infection_only
            else ""
        )
    more = (
        f", {len(unlabelled.names)} unlabelled slices of {len(set(unlabelled.volumes))} volumes"
        if unlabelled is not None
        else ""
    )
    if unlabelled is not None and unlabelled.skipped:
        (first, reason), n = unlabelled.skipped[0], len(unlabelled.skipped)
        more += f" ({n} more left out: {first}: {reason}{', ...' if n > 1 else ''})"
    kernels = f" ({kernels} CPU kernels)" if kernels else ""
    return (
        f"{len(train.names)} training slices{where}{more}, "
        f"{settings['size']}x{settings['size']}, backend {backend}{kernels}"
    )


def _backend(isolated) -> str:
    """The Keras backend the run trains with: asked of a fresh process when folds train in
    processes of their own (this one then never loads Keras), else of Keras here."""
    if not isolated:
        import keras

        return keras.backend.backend()
    try:
        return processes.keras_backend()
    except RuntimeError as e:
        raise BenchmarkError(str(e)) from None


def _header(train, test, unlabelled, folds, seed, settings, backend) -> dict:
    return {
        "benchmark": "COVID-SemiSeg",
        "mode": "test" if test else "cross-validation",
        "train_slices": len(train.names),
        "test_slices": len(test.names) if test else None,
        "unlabelled_slices": len(unlabelled.names) if unlabelled is not None else None,
        "targets": list(test.targets if test else train.targets),
        "folds": None if test else folds,
        "seed": seed,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
        "backend": backend,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "published_meanDic": PUBLISHED,
        "models": {},
        "disclaimer": DISCLAIMER,
    }


def _fingerprint(results, rows) -> dict:
    keep = ("mode", "train_slices", "test_slices", "unlabelled_slices", "folds", "seed")
    settings = {f"settings.{k}": v for k, v in results["settings"].items()}
    return {k: results[k] for k in keep} | settings | {"rows": rows, "backend": results["backend"]}


def _assemble(results, store, rows, splits, start) -> dict:
    """The results so far: every row's finished folds, summarised."""
    results = dict(results, models={})
    for row in rows:
        found = {s.fold: store.get(row, s.fold) for s in splits}
        done = [d for d in found.values() if d is not None]
        if not done:
            continue
        per_fold = [d["scores"] for d in done]
        results["models"][row] = {
            "label": LABELS[row],
            "folds": per_fold,
            "fold_ids": [k for k, d in found.items() if d is not None],
            "summary": summarise(per_fold),
            "runs": [d["run"] for d in done],
            # The kernels its folds trained with (TensorFlow; not recorded before 2026-12-07).
            "cpu_kernels": sorted({d["run"].get("cpu_kernels") for d in done} - {None}),
            "jit_compile": sorted({d["run"].get("jit_compile") for d in done} - {None}),
            "wall_s": round(sum(d["wall_s"] for d in done), 1),
            "peak_rss_mb": max((d.get("peak_rss_mb", 0) for d in done), default=0) or None,
        }
    models = results["models"]  # a row with no fold finished yet is not there
    results["complete"] = all(
        row in models and len(models[row]["folds"]) == len(splits) for row in rows
    )
    results["wall_s"] = round(time.perf_counter() - start, 1)  # this process
    # What the finished folds took to train and score, whichever invocations ran them: a
    # resumed run's own time says nothing of the folds it found done.
    results["folds_wall_s"] = round(sum(m["wall_s"] for m in models.values()), 1)
    results["peak_rss_mb"] = _peak_rss_mb()
    # The largest process a finished row was trained in, as each recorded it (a fold's own
    # process, or this one): not this process's children, among which the backend's
    # short-lived probe counts. None when no fold recorded it (folds made before).
    peaks = [m["peak_rss_mb"] for m in models.values() if m["peak_rss_mb"]]
    results["peak_fold_rss_mb"] = max(peaks, default=None)
    return results


def _peak_rss_mb() -> int:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _write(out: Path, results: dict) -> None:
    from data_tools.files import atomic_write_json, atomic_write_text

    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", render_table(results))


def _cell(summary, target, metric, sd=True):
    if target not in summary:
        return "—"
    entry = summary[target][metric]
    return f"{entry['mean']:.3f} ± {entry['sd']:.3f}" if sd else f"{entry['mean']:.3f}"


def render_table(results: dict) -> str:
    """Markdown: our models (mean ± sd over folds) beside Inf-Net's published meanDic."""
    cv = results["mode"] == "cross-validation"
    where = (
        f"{results['folds']}-fold cross-validation over the {results['train_slices']} "
        "training slices (mean ± sd over folds)"
        if cv
        else f"the {results['test_slices']} test slices"
    )
    infection_only = results.get("targets", list(TARGETS)) == ["infection"]
    lines = [
        f"# COVID-SemiSeg benchmark ({where})",
        "",
        f"Inf-Net's protocol, {results['settings']['size']}×{results['settings']['size']} "
        f"input, backend {results['backend']}, {results['machine']}, "
        f"{results['folds_wall_s'] / 60:.1f} min in its folds "
        f"({results['wall_s'] / 60:.1f} min this invocation). {DISCLAIMER}",
        "",
        *(
            [
                "The test masks are infection-only (0/255, Inf-Net's LungInfection-Test "
                "layout): GGO and consolidation are not scored (—).",
                "",
            ]
            if infection_only
            else []
        ),
        "| model | infection meanDic | maxDic | Dice@0.5 | meanSen | meanSpe | MAE "
        "| GGO meanDic | consolidation meanDic |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["models"].values():
        s = entry["summary"]
        lines.append(
            f"| {entry['label']} | {_cell(s, 'infection', 'meanDic', cv)} | "
            f"{_cell(s, 'infection', 'maxDic', cv)} | {_cell(s, 'infection', 'Dice@0.5', cv)} | "
            f"{_cell(s, 'infection', 'meanSen', cv)} | {_cell(s, 'infection', 'meanSpe', cv)} | "
            f"{_cell(s, 'infection', 'MAE', cv)} | {_cell(s, 'ggo', 'meanDic', cv)} | "
            f"{_cell(s, 'consolidation', 'meanDic', cv)} |"
        )
    for name, values in results["published_meanDic"].items():
        cells = [f"{values[t]:.3f}" if t in values else "" for t in TARGETS]
        lines.append(
            f"| {name} (published, 48 test slices) | {cells[0]} "
            f"| | | | | | {cells[1]} | {cells[2]} |"
        )
    if cv:
        lines += _fold_table(results)
    if not results.get("complete", True):
        lines += ["", "Not finished: the rows above hold the folds done so far."]
    return "\n".join(lines) + "\n"


def _fold_table(results) -> list[str]:
    """Infection meanDic per fold and row (which row wins in which fold)."""
    entries = list(results["models"].values())
    if not entries:
        return []
    ids = sorted({k for e in entries for k in e["fold_ids"]})
    lines = [
        "",
        "Infection meanDic per fold:",
        "",
        "| model | " + " | ".join(f"fold {k}" for k in ids) + " |",
        "|---|" + "---|" * len(ids),
    ]
    for e in entries:
        scores = dict(zip(e["fold_ids"], e["folds"]))
        cells = [f"{scores[k]['infection']['meanDic']:.3f}" if k in scores else "" for k in ids]
        lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
        lines += _round_rows(e, ids)
    return lines


def _round_rows(entry, ids) -> list[str]:
    """The self-training row's earlier rounds, scored on the same test slices
    (`train_student`): what each round added, recorded, never chosen from."""
    rounds = {k: run.get("rounds", []) for k, run in zip(entry["fold_ids"], entry["runs"])}
    lines = []
    for r in range(max((len(v) for v in rounds.values()), default=0)):
        cells = [
            f"{v[r]['test_scores']['infection']['meanDic']:.3f}"
            if k in rounds and r < len(v := rounds[k]) and "test_scores" in v[r]
            else ""
            for k in ids
        ]
        if any(cells):
            lines.append(f"| ↳ its round {r + 1} (a record) | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":  # python -m tfcovseg.benchmarks.semiseg: the command's door
    from tfcovseg.cli.semiseg import main

    sys.exit(main())
