"""Real CT benchmark on the COVID-SemiSeg slices, scored as Inf-Net scores its models.

    python -m tfcovseg.benchmarks.semiseg --train-dir ../shared/data/covid-semiseg/train
        [--test-dir DIR] [--out runs/semiseg] [--size 256] [--models coarse_refine,unet]
        [--folds 5] [--epochs 60] [--seed 0]

The slices (``Imgs/N.jpg``: 8-bit windowed CT; ``GT/N.png``: 0 background, 1 GGO, 2
consolidation) are read through `data_tools.convert` (its discovery and per-study
processing: pre-windowed images, two classes, resized to ``--size``), in memory: no
TFRecords, so the benchmark runs under any Keras backend (``KERAS_BACKEND=jax`` on a
machine without TensorFlow).

Each model trains from scratch (no pretrained weights offline) with the paper's recipe:
Adam, the hybrid loss on "coarse" and "final" for the coarse-refine network (plain BCE for
the U-Net baseline, as in the paper's comparison), the paper's augmentation (random
multiple of 90 degrees and horizontal flip, image and mask together); a fifth of the
training slices is held out for validation, early stopping restores the best weights.

Without ``--test-dir``: slice-level ``--folds``-fold cross-validation over the training
slices (the collection has no patient ids), mean ± sd over folds. With it: train on all
training slices, evaluate on the test slices: ``Imgs/`` + ``GT/`` with 0/1/2 masks as the
training split, or binary 0/255 infection masks as in Inf-Net's ``LungInfection-Test``
folder (then only infection is scored). Evaluation follows
Inf-Net's protocol (`tfcovseg.benchmarks.protocol`) at the original image size, for
infection (GGO ∪ consolidation: the maximum of the two channels) and for GGO and
consolidation separately. Writes ``OUT/results.json``, ``OUT/results.md``
(beside Inf-Net's published values) and the probability maps as 8-bit PNGs named like
the images, ``OUT/predictions/{infection,ggo,consolidation}/N.png`` for the coarse-refine
network and ``OUT/unet/predictions/...`` for the U-Net baseline, which any evaluator
(Inf-Net's MATLAB toolbox included) can score.

Research use, not a medical device.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from tfcovseg.benchmarks import protocol  # noqa: E402

CLASSES = ("ggo", "consolidation")
TARGETS = ("infection", "ggo", "consolidation")
MODELS = {"coarse_refine": "hybrid", "unet": "bce"}  # architecture -> loss
LABELS = {"coarse_refine": "coarse-refine (ours, hybrid loss)", "unet": "U-Net (ours, BCE)"}
# A quarter of the paper's widths (the quickstart network): trains in minutes on a CPU.
WIDTHS = {
    "stem_filters": 16,
    "encoder_filters": (16, 32, 64, 128),
    "encoder_blocks": (3, 4, 6, 3),
    "se_reduction": 8,
    "aspp_filters": 16,
    "decoder_filters": (64, 32, 16, 16),
    "refine_filters": 16,
    "unet_filters": (16, 32, 64, 128, 256),
}
# Inf-Net (Fan et al., IEEE TMI 2020), 48 test slices of the same collection: meanDic.
PUBLISHED = {
    "U-Net": {"infection": 0.439},
    "U-Net++": {"infection": 0.581},
    "Inf-Net (ImageNet-pretrained Res2Net)": {"infection": 0.682},
    "Semi-Inf-Net (+1600 pseudo-labelled slices)": {"infection": 0.739},
    "Semi-Inf-Net + U-Net (multi-class)": {"ggo": 0.624, "consolidation": 0.362},
}
DISCLAIMER = "Research use, not a medical device."


class BenchmarkError(Exception):
    """Bad input; the message names the folder or file (exit code 2)."""


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
    from data_tools.convert import ConversionError, discover, process_study
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
            raise BenchmarkError(f"{study.rel}: {e}") from None
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


class _Augmented(keras.utils.PyDataset):
    """Batches of (image, {output: mask}) with the paper's augmentation, from memory."""

    def __init__(self, images, masks, outputs, batch_size, passes, seed, augment=True):
        super().__init__()
        self.images, self.masks, self.outputs = images, masks, tuple(outputs)
        self.batch_size, self.augment = batch_size, augment
        self.rng = np.random.default_rng(seed)
        self.passes = passes
        self._order()

    def _order(self):
        order = [self.rng.permutation(len(self.images)) for _ in range(self.passes)]
        self.order = np.concatenate(order) if self.augment else np.arange(len(self.images))

    def __len__(self):
        return int(np.ceil(len(self.order) / self.batch_size))

    def __getitem__(self, i):
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        x, y = self.images[idx][..., None], self.masks[idx]
        if self.augment:
            x, y = x.copy(), y.copy()
            for j in range(len(idx)):
                k = int(self.rng.integers(4))
                x[j], y[j] = np.rot90(x[j], k), np.rot90(y[j], k)
                if self.rng.random() < 0.5:
                    x[j], y[j] = x[j][:, ::-1], y[j][:, ::-1]
        return x, {name: y for name in self.outputs}

    def on_epoch_end(self):
        if self.augment:
            self._order()


def build(architecture: str, size: int, widths=WIDTHS):
    from tfcovseg.config import ModelConfig
    from tfcovseg.models import build_model

    config = ModelConfig(
        architecture=architecture,
        input_size=(size, size),
        class_names=CLASSES,
        pre_windowed=True,
        **widths,
    )
    return build_model(config)


def train_one(architecture, data: Slices, train_idx, val_idx, settings, seed, log=print):
    """Trains one model from scratch; returns it with the best validation weights."""
    from tfcovseg.losses import deep_supervision

    keras.utils.set_random_seed(seed)
    model = build(architecture, settings["size"], settings.get("widths", WIDTHS))
    outputs = list(model.output)
    losses, weights = deep_supervision(outputs, MODELS[architecture])
    model.compile(
        optimizer=keras.optimizers.Adam(settings["learning_rate"]),
        loss=losses,
        loss_weights=weights,
    )
    batch = settings["batch_size"]
    train = _Augmented(
        data.images[train_idx], data.masks[train_idx], outputs, batch, settings["passes"], seed
    )
    val = _Augmented(
        data.images[val_idx], data.masks[val_idx], outputs, batch, 1, seed, augment=False
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=settings["patience"], restore_best_weights=True
    )
    history = model.fit(
        train, validation_data=val, epochs=settings["epochs"], callbacks=[stop], verbose=0
    )
    epochs = len(history.history["loss"])
    best = int(np.argmin(history.history["val_loss"])) + 1
    log(f"    {architecture}: {epochs} epochs, best {best}")
    return model, {"epochs": epochs, "best_epoch": best}


def predict_maps(model, data: Slices, idx, batch_size=4) -> dict:
    """8-bit probability maps at each slice's original size: {target: [maps]}."""
    from PIL import Image

    maps = {t: [] for t in TARGETS}
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        out = model.predict_on_batch(data.images[chunk][..., None])
        probs = np.asarray(out["final"] if isinstance(out, dict) else out, np.float32)
        for j, i in enumerate(chunk):
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


def run(train_dir, out, test_dir=None, models=tuple(MODELS), folds=5, seed=0, log=print, **kw):
    """Runs the benchmark; returns the results (also written to ``out``)."""
    settings = {
        "size": 256,
        "epochs": 60,
        "patience": 15,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "passes": 2,
        "val_fraction": 0.2,
        "widths": WIDTHS,
    } | kw
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise BenchmarkError(f"unknown models {unknown}; choose from {list(MODELS)}")
    if settings["size"] % 32:
        raise BenchmarkError(f"--size must be a multiple of 32, got {settings['size']}")
    out = Path(out)
    start = time.perf_counter()
    train = load_slices(train_dir, settings["size"])
    test = load_slices(test_dir, settings["size"], allow_infection_only=True) if test_dir else None
    if test is None and not 2 <= folds <= len(train.names):
        raise BenchmarkError(f"--folds must be between 2 and {len(train.names)}, got {folds}")
    log(
        f"{len(train.names)} training slices"
        + (
            f", {len(test.names)} test slices"
            + (
                " (infection-only masks: GGO and consolidation not scored)"
                if test.infection_only
                else ""
            )
            if test
            else f", {folds}-fold cross-validation"
        )
        + f", {settings['size']}x{settings['size']}, backend {keras.backend.backend()}"
    )
    results = {
        "benchmark": "COVID-SemiSeg",
        "mode": "test" if test else "cross-validation",
        "train_slices": len(train.names),
        "test_slices": len(test.names) if test else None,
        "targets": list(test.targets if test else train.targets),
        "folds": None if test else folds,
        "seed": seed,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
        "backend": keras.backend.backend(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "published_meanDic": PUBLISHED,
        "models": {},
        "disclaimer": DISCLAIMER,
    }
    for architecture in models:
        model_start = time.perf_counter()
        log(f"{LABELS[architecture]}")
        per_fold, runs = [], []
        if test is not None:
            fit_idx, val_idx = _holdout(np.arange(len(train.names)), settings["val_fraction"], seed)
            model, info = train_one(architecture, train, fit_idx, val_idx, settings, seed, log)
            idx = np.arange(len(test.names))
            maps = predict_maps(model, test, idx)
            truth = truths(test, idx)
            per_fold.append({t: protocol.score(maps[t], truth[t]) for t in test.targets})
            runs.append(info)
            write_maps(prediction_folder(out, architecture), test.names, maps)
        else:
            all_maps = {t: [None] * len(train.names) for t in TARGETS}
            for k, test_idx in enumerate(_folds(len(train.names), folds, seed)):
                rest = np.setdiff1d(np.arange(len(train.names)), test_idx)
                fit_idx, val_idx = _holdout(rest, settings["val_fraction"], seed + k)
                log(
                    f"  fold {k}: {len(fit_idx)} train, {len(val_idx)} validation, "
                    f"{len(test_idx)} test"
                )
                model, info = train_one(
                    architecture, train, fit_idx, val_idx, settings, seed + k, log
                )
                maps = predict_maps(model, train, test_idx)
                scores = {t: protocol.score(maps[t], truths(train, test_idx)[t]) for t in TARGETS}
                per_fold.append(scores)
                runs.append(info | {"test_slices": [train.names[i] for i in test_idx]})
                log(f"    infection meanDic {scores['infection']['meanDic']:.3f}")
                for t in TARGETS:
                    for j, i in enumerate(test_idx):
                        all_maps[t][i] = maps[t][j]
            write_maps(prediction_folder(out, architecture), train.names, all_maps)
        results["models"][architecture] = {
            "label": LABELS[architecture],
            "folds": per_fold,
            "summary": summarise(per_fold),
            "runs": runs,
            "wall_s": round(time.perf_counter() - model_start, 1),
        }
        results["wall_s"] = round(time.perf_counter() - start, 1)
        _write(out, results)  # after every model: a crash later keeps what is done
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write(out, results)
    return results


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
        f"{results['wall_s'] / 60:.1f} min. {DISCLAIMER}",
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
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfcovseg.benchmarks.semiseg",
        description="COVID-SemiSeg benchmark in Inf-Net's protocol "
        "(research use, not a medical device).",
    )
    parser.add_argument("--train-dir", type=Path, required=True)
    parser.add_argument(
        "--test-dir",
        type=Path,
        help="test slices, Imgs/ + GT/ with 0/1/2 or infection-only 0/255 masks "
        "(default: cross-validation)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/semiseg"))
    parser.add_argument("--size", type=int, default=256, help="model input size (pixels)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=15)
    parser.add_argument("--passes", type=int, default=2, help="augmented passes per epoch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        results = run(
            args.train_dir,
            args.out,
            test_dir=args.test_dir,
            models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
            folds=args.folds,
            seed=args.seed,
            size=args.size,
            epochs=args.epochs,
            patience=args.patience,
            passes=args.passes,
        )
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render_table(results))
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'}, predictions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
