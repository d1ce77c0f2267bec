"""Evaluate a training run with the paper's metrics.

    python -m tfcovseg.evaluate --run runs/NAME [--split test] [--fold K]

Writes ``metrics.json`` and ``report.md`` into the run folder:

- Table 4: per lesion type Dice, IoU, pixel precision and pixel recall from global pixel
  counts over the split's annotated slices, and the per-image mean Dice;
- Table 6: patient-level accuracy, recall, precision and F1 of the slice classifier under
  the paper's rule (a patient is COVID-19 positive when any slice is) and the confusion
  matrix; the truth is the patient's diagnosis;
- Table 5: per patient, lesion area / lung area per lesion type, ground truth and
  predicted.

Research use, not a medical device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfcovseg import require_tensorflow  # noqa: E402
from tfcovseg.config import load_config  # noqa: E402
from tfcovseg.metrics import confusion_counts, per_image_dice, scores_from_counts  # noqa: E402

tf = require_tensorflow("python -m tfcovseg.evaluate")


from tfcovseg.data import make_dataset  # noqa: E402
from tfcovseg.models import load_model  # noqa: E402

DISCLAIMER = "Research use, not a medical device."


def _load(run: Path, stem: str):
    for name in (f"{stem}_best.keras", f"{stem}_last.keras"):
        if (run / name).is_file():
            return load_model(run / name)
    return None


def patient_metrics(truth: dict, predicted: dict) -> dict:
    """Accuracy, recall, precision, F1 and confusion counts of patient-level calls."""
    tp = sum(truth[p] and predicted[p] for p in truth)
    tn = sum(not truth[p] and not predicted[p] for p in truth)
    fp = sum(not truth[p] and predicted[p] for p in truth)
    fn = sum(truth[p] and not predicted[p] for p in truth)
    n = max(len(truth), 1)
    precision = tp / (tp + fp) if tp + fp else (1.0 if not fn else 0.0)
    recall = tp / (tp + fn) if tp + fn else (1.0 if not fp else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "patients": len(truth),
    }


def evaluate_run(run, split="test", fold=None, threshold=0.5, batch_size=8) -> dict:
    """Computes the run's metrics on a split and writes metrics.json and report.md."""
    run = Path(run)
    config = load_config(run / "config.yaml")
    fold = config.data.fold if fold is None else fold
    classes = list(config.model.class_names)
    segmenter, classifier = _load(run, "segmenter"), _load(run, "classifier")
    ds = make_dataset(
        Path(config.data.records_dir).expanduser(),
        split=split,
        fold=fold,
        batch_size=batch_size,
        training=False,
        task="inspect",
        image_size=config.model.input_size,
        class_names=classes,
    )
    counts = np.zeros((3, len(classes)), np.int64)
    image_dice = []
    slice_prob = {}
    areas = {}
    diagnosis = {}
    for batch in ds:
        hu = batch["hu"][..., None]
        masks = batch["lesions"].numpy()
        lung = batch["lung"].numpy() > 0
        pids = [p.decode() for p in batch["patient/id"].numpy()]
        for pid, d in zip(pids, batch["patient/diagnosis"].numpy()):
            diagnosis[pid] = d.decode()
        if segmenter is not None:
            pred = segmenter.predict_on_batch(hu)["final"]
            pred = np.asarray(pred)
            annotated = batch["mask/annotated"].numpy() > 0
            if annotated.any():
                counts += np.stack(confusion_counts(masks[annotated], pred[annotated], threshold))
                image_dice.append(per_image_dice(masks[annotated], pred[annotated], threshold))
            binary = pred >= threshold
            for i, pid in enumerate(pids):
                a = areas.setdefault(
                    pid, {"lung": 0, "true": np.zeros(len(classes)), "pred": np.zeros(len(classes))}
                )
                a["lung"] += int((lung[i] | binary[i].any(-1)).sum())
                a["true"] += masks[i].reshape(-1, len(classes)).sum(0)
                a["pred"] += binary[i].reshape(-1, len(classes)).sum(0)
        if classifier is not None:
            probs = np.asarray(classifier.predict_on_batch(hu)).reshape(-1)
            for pid, p in zip(pids, probs):
                slice_prob.setdefault(pid, []).append(float(p))
    results = {
        "split": split,
        "fold": fold,
        "threshold": threshold,
        "classes": classes,
        "disclaimer": DISCLAIMER,
    }
    if segmenter is not None:
        scores = scores_from_counts(*counts)
        dice_per_image = np.concatenate(image_dice) if image_dice else np.zeros((0, len(classes)))
        results["segmentation"] = {
            name: {k: float(v[c]) for k, v in scores.items()}
            | {
                "mean_image_dice": float(dice_per_image[:, c].mean())
                if len(dice_per_image)
                else float("nan")
            }
            for c, name in enumerate(classes)
        }
        results["lesion_lung_ratio"] = {
            pid: {
                "diagnosis": diagnosis[pid],
                "true": {n: float(a["true"][c] / max(a["lung"], 1)) for c, n in enumerate(classes)},
                "pred": {n: float(a["pred"][c] / max(a["lung"], 1)) for c, n in enumerate(classes)},
            }
            for pid, a in sorted(areas.items())
        }
    if classifier is not None:
        truth = {pid: diagnosis[pid] == "covid" for pid in slice_prob}
        any_slice = {pid: max(p) >= threshold for pid, p in slice_prob.items()}
        results["classification"] = {"any_slice": patient_metrics(truth, any_slice)}
    (run / "metrics.json").write_text(json.dumps(results, indent=2))
    (run / "report.md").write_text(render_report(results, config.name))
    return results


def render_report(results: dict, name: str) -> str:
    lines = [
        f"# {name}: evaluation on the {results['split']} split of fold {results['fold']}",
        "",
        f"**{DISCLAIMER}**",
        "",
    ]
    seg = results.get("segmentation")
    if seg:
        lines += [
            "## Segmentation (Table 4)",
            "",
            "| lesion | Dice | IoU | precision | recall | mean image Dice |",
            "|---|---|---|---|---|---|",
        ]
        for cls, s in seg.items():
            lines.append(
                f"| {cls} | {s['dice']:.3f} | {s['iou']:.3f} | {s['precision']:.3f} | "
                f"{s['recall']:.3f} | {s['mean_image_dice']:.3f} |"
            )
        lines.append("")
    cls = results.get("classification")
    if cls:
        m = cls["any_slice"]
        c = m["confusion"]
        lines += [
            "## Patient-level classification (Table 6, any-slice rule)",
            "",
            "| accuracy | recall | precision | F1 | TP | FP | FN | TN |",
            "|---|---|---|---|---|---|---|---|",
            f"| {m['accuracy']:.3f} | {m['recall']:.3f} | {m['precision']:.3f} | "
            f"{m['f1']:.3f} | {c['tp']} | {c['fp']} | {c['fn']} | {c['tn']} |",
            "",
        ]
    ratios = results.get("lesion_lung_ratio")
    if ratios:
        classes = results["classes"]
        lines += [
            "## Lesion / lung area ratio per patient (Table 5)",
            "",
            "| patient | diagnosis | " + " | ".join(f"{c} true | {c} pred" for c in classes) + " |",
            "|---|---|" + "---|---|" * len(classes),
        ]
        for pid, r in ratios.items():
            cells = " | ".join(f"{r['true'][c]:.4f} | {r['pred'][c]:.4f}" for c in classes)
            lines.append(f"| {pid} | {r['diagnosis']} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def print_headline(results: dict, run: Path) -> None:
    print(
        f"evaluation on the {results['split']} split (fold {results['fold']}); {DISCLAIMER.lower()}"
    )
    for cls, s in results.get("segmentation", {}).items():
        print(
            f"  {cls:<14} Dice {s['dice']:.3f}  IoU {s['iou']:.3f}  precision "
            f"{s['precision']:.3f}  recall {s['recall']:.3f}"
        )
    if "classification" in results:
        m = results["classification"]["any_slice"]
        print(
            f"  patients       accuracy {m['accuracy']:.3f}  recall {m['recall']:.3f}  "
            f"precision {m['precision']:.3f}  ({m['patients']} patients)"
        )
    print(f"metrics: {run / 'metrics.json'}, report: {run / 'report.md'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfcovseg.evaluate", description="Evaluate a training run (research use)."
    )
    parser.add_argument("--run", type=Path, required=True, help="run folder of tfcovseg.train")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--fold", type=int, help="fold (default: the run's)")
    args = parser.parse_args(argv)
    if not (args.run / "config.yaml").is_file():
        print(f"error: {args.run} is not a run folder (no config.yaml)", file=sys.stderr)
        return 2
    results = evaluate_run(args.run, args.split, args.fold)
    print_headline(results, args.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
