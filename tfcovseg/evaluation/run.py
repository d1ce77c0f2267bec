"""Evaluate a training run with the paper's metrics, statistics and figures.

    python -m tfcovseg.evaluate --run runs/NAME [--split test] [--fold K] [--no-figures]

Writes ``metrics.json``, ``report.md``, ``report.html`` and ``figures/`` into the run
folder for the test split, into ``evaluation/validation/`` (``evaluation/train/``) in it
for the others:

- Table 4: per lesion type Dice, IoU, pixel precision and pixel recall from global pixel
  counts over the split's annotated slices, and the per-image mean Dice;
- Table 6: patient-level accuracy, recall, precision and F1 of the slice classifier under
  the paper's rule (a patient is COVID-19 positive when any slice is) and under a more
  robust rule, "at least k slices with probability >= t", with k and t chosen on the
  validation patients of the fold (`tfcovseg.evaluation.metrics.choose_patient_rule`); the truth is
  the patient's diagnosis; Figure 5, the confusion matrices;
- Table 5 and Figure 4: per patient, lesion area / lung area per lesion type, ground truth
  and predicted; box plots by severity, Kruskal-Wallis p-values and Spearman correlation
  with severity (`tfcovseg.evaluation.severity`);
- Figure 6: image, ground-truth contours and prediction for the slices with the most
  lesion (red GGO, green consolidation, blue fibrosis).

The lung area of a patient counts lesions as lung (lung mask | lesion mask), separately
for the true and the predicted lesions; predicted lesions count only in the lung
(`data_tools.lung.lesions_in_lung`: the record's lung mask and a 10 mm margin), as in
`tfcovseg.predict`.

Research use, not a medical device.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from data_tools.files import atomic_write_json
from tfcovseg import require_tensorflow
from tfcovseg.configs.experiment import load_config
from tfcovseg.constants import DISCLAIMER
from tfcovseg.data.dataset import (
    CorruptRecordsError,
    corrupt_records_message,
    data_fingerprint,
    read_manifest,
    records_folder,
    split_dataset,
)
from tfcovseg.evaluation.burden import burden, burden_masks
from tfcovseg.evaluation.calibration import (
    burden_rule_from,
    validation_burdens,
    validation_slice_scores,
)
from tfcovseg.evaluation.metrics import (
    choose_patient_rule,
    confusion_counts,
    lesion_slice_mean,
    patient_calls,
    patient_scores,
    roc_curve,
    scores_from_counts,
    slice_dice,
)
from tfcovseg.evaluation.runlog import (
    evaluation_dir,
    fingerprint_message,
    missing_message,
    missing_models,
    training_summary,
    unfinished_message,
    unfinished_phases,
)
from tfcovseg.evaluation.severity import covid_cohort, ratio_statistics
from tfcovseg.models import load_run_models, run_model_path
from tfcovseg.models.outputs import final_probabilities
from tfcovseg.reporting import figures as viz
from tfcovseg.reporting import report

tf = require_tensorflow("python -m tfcovseg.evaluate")

OVERLAY_SLICES = 4


class _Overlays:
    """Keeps the slices with the most true lesion, preferring distinct patients.

    Ties (a split without lesions, e.g. healthy and other-pneumonia patients only) go to the
    slices with the most predicted lesion, then to the highest lesion probability, so that
    Figure 6 shows what the network marks even where there is nothing to find.
    """

    def __init__(self, k, threshold=0.5):
        self.k = k
        self.threshold = threshold
        self.items = []  # (rank, patient, hu, true, pred)

    def offer(self, true_area, pid, hu, true, pred):
        area = (true_area, int((pred >= self.threshold).sum()), float(pred.max()))
        same = [i for i, item in enumerate(self.items) if item[1] == pid]
        if same:
            i = same[0]
            if area > self.items[i][0]:
                self.items[i] = (area, pid, hu.copy(), true.copy(), pred.copy())
            return
        self.items.append((area, pid, hu.copy(), true.copy(), pred.copy()))
        self.items.sort(key=lambda item: item[0], reverse=True)
        del self.items[self.k :]


class _Tally:
    """What one pass over a split gathers: pixel counts, per-slice Dice, lung and lesion
    areas per patient, the overlay slices, and the slice classifier's probabilities."""

    def __init__(self, classes, threshold):
        self.classes, self.threshold = classes, threshold
        self.image_dice, self.image_present = [], []
        self.patient_counts = {}  # per patient: [TP, FP, FN] x class over annotated slices
        self.slice_prob, self.slice_roc = {}, ([], [])  # ROC: lesion on the slice, its p
        self.areas, self.diagnosis, self.severity = {}, {}, {}
        self.overlays = _Overlays(OVERLAY_SLICES, threshold)

    def patients(self, batch) -> list[str]:
        pids = [p.decode() for p in batch["patient/id"].numpy()]
        for pid, d, sev in zip(
            pids, batch["patient/diagnosis"].numpy(), batch["patient/severity"].numpy()
        ):
            self.diagnosis[pid], self.severity[pid] = d.decode(), sev.decode()
        return pids

    def add_segmentation(self, batch, pids, pred) -> None:
        hu, masks = batch["hu"], batch["lesions"].numpy()
        lung, annotated = batch["lung"].numpy() > 0, batch["mask/annotated"].numpy() > 0
        _count_patients(self.patient_counts, pids, masks, pred, annotated, self.threshold)
        if annotated.any():
            dice, present = slice_dice(masks[annotated], pred[annotated], self.threshold)
            self.image_dice.append(dice)
            self.image_present.append(present)
        # Predicted lesions count in the lung only (`burden.burden_masks`), as in predict.
        found = pred >= self.threshold
        kept, region = burden_masks(found.any(-1), lung, batch["spacing_mm"].numpy())
        binary, truth = found & kept[..., None], masks >= 0.5
        n = len(self.classes)
        for i, pid in enumerate(pids):
            a = self.areas.setdefault(pid, _empty_areas(n))
            a["lung_true"] += int((lung[i] | truth[i].any(-1)).sum())
            a["lung_pred"] += int(region[i].sum())
            a["true"] += truth[i].reshape(-1, n).sum(0)
            a["pred"] += binary[i].reshape(-1, n).sum(0)
            a["any_pred"] += int(kept[i].sum())
            if annotated[i]:
                self.overlays.offer(int(truth[i].sum()), pid, hu[i].numpy(), masks[i], pred[i])

    def add_classification(self, batch, pids, probs) -> None:
        masks = batch["lesions"].numpy()
        annotated = batch["mask/annotated"].numpy() > 0
        for pid, p in zip(pids, probs):
            self.slice_prob.setdefault(pid, []).append(float(p))
        lesion = masks[annotated].reshape(int(annotated.sum()), -1).max(-1) >= 0.5
        self.slice_roc[0].extend(lesion)
        self.slice_roc[1].extend(float(p) for p in probs[annotated])


def _empty_areas(n: int) -> dict:
    return {
        "lung_true": 0,
        "lung_pred": 0,
        "any_pred": 0,
        "true": np.zeros(n),
        "pred": np.zeros(n),
    }


def _segmentation_results(tally: _Tally) -> dict:
    """Table 4 (the split's pixel counts, its patients' together), the lesion-slice Dice,
    per-patient Dice, Table 5's lesion / lung ratios and their severity statistics."""
    classes = tally.classes
    counts = sum(tally.patient_counts.values(), np.zeros((3, len(classes)), np.int64))
    scores = scores_from_counts(*counts)
    present = (
        np.concatenate(tally.image_present)
        if tally.image_present
        else np.zeros((0, len(classes)), bool)
    )
    per_slice = (
        lesion_slice_mean(np.concatenate(tally.image_dice), present)
        if tally.image_dice
        else np.full(len(classes), np.nan)  # no annotated slice: nothing to score
    )
    ratios = {
        pid: {
            "diagnosis": tally.diagnosis[pid],
            "severity": tally.severity[pid],
            "true": {
                n: float(a["true"][c] / max(a["lung_true"], 1)) for c, n in enumerate(classes)
            },
            "pred": {
                n: float(a["pred"][c] / max(a["lung_pred"], 1)) for c, n in enumerate(classes)
            },
        }
        for pid, a in sorted(tally.areas.items())
    }
    return {
        "segmentation": {
            name: {k: float(v[c]) for k, v in scores.items()}
            | {"lesion_slice_dice": float(per_slice[c]), "lesion_slices": int(present[:, c].sum())}
            for c, name in enumerate(classes)
        },
        "patient_dice": _patient_dice(tally.patient_counts, tally.diagnosis, classes),
        "lesion_lung_ratio": ratios,
        "severity_statistics": ratio_statistics(ratios, classes),
    }


def _score_split(tally, config, split, fold, batch_size, segmenter, classifier) -> None:
    """Every slice of the split through the run's models, into `tally`."""
    for batch in split_dataset(config, split, fold, batch_size):
        hu, pids = batch["hu"][..., None], tally.patients(batch)
        if segmenter is not None:
            out = segmenter.predict_on_batch(hu)
            pred = np.asarray(final_probabilities(out, config.train.positive_weights))
            tally.add_segmentation(batch, pids, pred)
        if classifier is not None:
            probs = np.asarray(classifier.predict_on_batch(hu)).reshape(-1)
            tally.add_classification(batch, pids, probs)


def evaluate_run(
    run, split="test", fold=None, threshold=0.5, batch_size=8, figures=True, overrides=()
) -> dict:
    """Computes the run's metrics on a split; writes metrics.json, the reports and figures.

    `overrides` change the run's config as ``--set`` does (``data.records_dir=DIR`` for
    records that moved since training).
    """
    run = Path(run)
    config = load_config(run / "config.yaml", overrides)
    if fold is not None and fold != config.data.fold:
        # The folds partition the patients: another fold's split holds patients this
        # run trained on or chose its epochs with, and its figures would flatter it.
        raise ValueError(
            f"{run} was trained on fold {config.data.fold}: the {split} patients of fold "
            f"{fold} were among its training or validation patients; evaluate a run "
            f"trained on fold {fold} (python -m tfcovseg.train --fold {fold}, or --fold all)"
        )
    fold = config.data.fold
    classes = list(config.model.class_names)
    segmenter, classifier = load_run_models(run)
    if segmenter is None and classifier is None:
        raise FileNotFoundError(f"{run} holds no trained model (*_best.keras / *_last.keras)")
    tally = _Tally(classes, threshold)
    records = records_folder(config)
    try:
        _score_split(tally, config, split, fold, batch_size, segmenter, classifier)
    except tf.errors.DataLossError as e:  # a shard of its size with bytes changed inside
        message = corrupt_records_message(records, read_manifest(records), e)
        raise CorruptRecordsError(message) from None
    results = {
        "experiment": config.name,
        "architecture": config.model.architecture,
        "loss": config.train.loss,
        "split": split,
        "fold": fold,
        "threshold": threshold,
        "classes": classes,
        # Which checkpoints were scored: a missing best one falls back to the last.
        "models": {
            stem: None if path is None else path.name
            for stem in ("segmenter", "classifier")
            for path in [run_model_path(run, stem)]
        },
        "disclaimer": DISCLAIMER,
        "patients": split_composition(tally.diagnosis, tally.severity),
        "training": training_summary(run, config),
    }
    unfinished = unfinished_phases(run, config)
    if unfinished:  # scored all the same (an interrupted run may be worth a look), but said
        results["warnings"] = [unfinished_message(run, unfinished)]
    trained = results["training"].get("data_fingerprint")
    fingerprint = fingerprint_message(run, records, data_fingerprint(records), trained)
    if fingerprint:  # other records: scored as asked, but said
        results.setdefault("warnings", []).append(fingerprint)
    missing = missing_models(run, config)
    if missing:  # scored with what is there (a last checkpoint, or no classifier), but said
        results.setdefault("warnings", []).append(missing_message(run, missing))
    if segmenter is not None:
        results |= _segmentation_results(tally)
    if classifier is not None:
        results["classification"] = classification_results(
            classifier, config, tally.slice_prob, tally.diagnosis, split, fold, threshold,
            batch_size, run,
        )  # fmt: skip
        # Slice level: does the classifier find the annotated slices with a lesion?
        results["classification"]["slices"] = roc_curve(*tally.slice_roc)
    if segmenter is not None and tally.areas:
        burdens = {p: burden(a["any_pred"], a["lung_pred"]) for p, a in tally.areas.items()}
        cls = results.setdefault("classification", {})
        cls["lesion_burden"] = burden_results(
            segmenter, config, burdens, tally.diagnosis, split, fold, threshold, batch_size, run
        )
        cls["lesion_burdens"] = {pid: float(b) for pid, b in sorted(burdens.items())}
    write_outputs(evaluation_dir(run, split), results, tally.overlays, config, figures)
    return results


def write_outputs(folder: Path, results: dict, overlays, config, figures=True) -> None:
    """The split's figures, reports and metrics.json into `folder`, metrics.json last.

    The earlier evaluation's metrics.json, reports and figures go first: a kill part-way
    leaves a folder without metrics.json (compare says "not evaluated") rather than one
    whose figures or report describe another evaluation than its metrics."""
    for name in ("metrics.json", "report.md", "report.html"):
        (folder / name).unlink(missing_ok=True)
    if (folder / "figures").is_dir():
        shutil.rmtree(folder / "figures")
    if figures:
        results["figures"] = write_figures(folder, results, overlays, config)
    report.write_reports(results, config.name, folder)
    atomic_write_json(folder / "metrics.json", results)


def _count_patients(patient_counts, pids, masks, pred, annotated, threshold) -> None:
    for i in np.nonzero(annotated)[0]:
        counts = np.stack(confusion_counts(masks[i], pred[i], threshold))
        patient_counts[pids[i]] = patient_counts.get(pids[i], 0) + counts


def _patient_dice(patient_counts, diagnosis, classes) -> dict:
    """Dice per patient and class from the patient's pixel counts (the empty-case rule of
    `tfcovseg.evaluation.metrics`: 1 when neither truth nor prediction has the class)."""
    out = {}
    for pid, counts in sorted(patient_counts.items()):
        dice = scores_from_counts(*counts)["dice"]
        out[pid] = {
            "diagnosis": diagnosis[pid],
            "dice": {name: float(dice[c]) for c, name in enumerate(classes)},
            "lesion_pixels": {
                name: int(counts[0, c] + counts[2, c]) for c, name in enumerate(classes)
            },
        }
    return out


def split_composition(diagnosis: dict, severity: dict) -> dict:
    """How many patients of each diagnosis (and COVID-19 severity) a split holds."""
    by_diagnosis, by_severity = {}, {}
    for pid, d in sorted(diagnosis.items()):
        by_diagnosis[d] = by_diagnosis.get(d, 0) + 1
        if d == "covid":
            by_severity[severity[pid]] = by_severity.get(severity[pid], 0) + 1
    return {"count": len(diagnosis), "diagnosis": by_diagnosis, "covid_severity": by_severity}


def classification_results(
    classifier, config, slice_prob, diagnosis, split, fold, threshold, batch_size, run=None
) -> dict:
    """Table 6 under the any-slice rule and the rule chosen on the validation patients."""
    truth = {pid: diagnosis[pid] == "covid" for pid in slice_prob}
    any_slice = patient_scores(truth, patient_calls(slice_prob, threshold, 1))
    any_slice["rule"] = f"any slice with probability >= {threshold:g} (the paper's rule)"
    out = {"any_slice": any_slice}
    if split == "validation":
        val_prob, val_diagnosis = slice_prob, diagnosis
    else:
        # Kept in the run: the export's gate (and predict on a run folder) reads them back.
        scores = validation_slice_scores(
            lambda hu: classifier.predict_on_batch(hu[..., None]), config, fold, batch_size, run
        )
        val_prob, val_diagnosis = {}, scores["diagnosis"]
        for pid, prob in zip(scores["patients"], scores["probabilities"]):
            val_prob.setdefault(pid, []).append(prob)
    rule = choose_patient_rule(val_prob, {p: d == "covid" for p, d in val_diagnosis.items()})
    robust = patient_scores(truth, patient_calls(slice_prob, rule["threshold"], rule["min_slices"]))
    robust |= {
        "rule": (
            f"at least {rule['min_slices']} slice(s) with probability >= "
            f"{rule['threshold']:.3f}, chosen on the {len(val_prob)} validation patients "
            f"(validation accuracy {rule['accuracy']:.3f})"
        ),
        "min_slices": rule["min_slices"],
        "threshold": rule["threshold"],
        "chosen_on": "validation",
    }
    out["robust"] = robust
    out["patients"] = {
        pid: {
            "diagnosis": diagnosis[pid],
            "slices": len(p),
            "max_probability": float(max(p)),
            "positive_slices": int(sum(v >= threshold for v in p)),
        }
        for pid, p in sorted(slice_prob.items())
    }
    return out


def burden_results(
    segmenter, config, burdens, diagnosis, split, fold, threshold, batch_size, run=None
) -> dict:
    """Patient calls from the segmenter alone: predicted lesion volume >= t of the lung.

    Not the paper's classifier: a patient-level rule on the segmentation (the burden the
    severity grade uses), with t chosen on the validation patients as the robust rule is.
    """
    truth = {pid: diagnosis[pid] == "covid" for pid in burdens}
    if split == "validation":
        val_burdens, val_diagnosis = burdens, diagnosis
    else:
        # Cached in the run: the export (and predict on a run folder) reads them back.
        val_burdens, val_diagnosis = validation_burdens(
            segmenter, config, fold, threshold, batch_size, run=run
        )
    rule = burden_rule_from(val_burdens, val_diagnosis)
    if rule["threshold"] is None:  # as the export: no call from a rule that means nothing
        return {"rule": f"lesion burden {rule['method']}", "threshold": None}
    calls = {pid: b >= rule["threshold"] for pid, b in burdens.items()}
    return patient_scores(truth, calls) | {
        "rule": (
            f"predicted lesion volume >= {100 * rule['threshold']:.2f} % of the lung "
            f"(segmentation, not the slice classifier), chosen on the {len(val_burdens)} "
            f"validation patients (validation accuracy {rule['validation_accuracy']:.3f})"
        ),
        "threshold": rule["threshold"],
        "chosen_on": "validation",
    }


def write_figures(out: Path, results: dict, overlays: _Overlays, config) -> dict:
    """Figures 4, 5 and 6 as PNGs under out/figures; returns their paths relative to out."""
    folder = out / "figures"
    written = {}
    classes = results["classes"]
    if results.get("lesion_lung_ratio"):
        patients, _ = covid_cohort(results["lesion_lung_ratio"], classes)
        stats = results.get("severity_statistics") or {}
        viz.plot_ratio_boxplots(patients, stats, classes, folder / "fig4_ratios.png")
        written["ratios"] = "figures/fig4_ratios.png"
    cls = results.get("classification")
    if cls and "any_slice" in cls:
        viz.plot_confusion(
            cls["any_slice"]["confusion"],
            folder / "fig5_confusion.png",
            title="Patients, any-slice rule",
        )
        written["confusion"] = "figures/fig5_confusion.png"
        if "robust" in cls:
            viz.plot_confusion(
                cls["robust"]["confusion"],
                folder / "fig5_confusion_robust.png",
                title=f"Patients, >= {cls['robust']['min_slices']} slice(s) rule",
            )
            written["confusion_robust"] = "figures/fig5_confusion_robust.png"
    phases = results.get("training", {}).get("phases")
    if phases:
        viz.plot_learning_curves(phases, folder / "learning_curves.png")
        written["learning_curves"] = "figures/learning_curves.png"
    slices = (cls or {}).get("slices")
    if slices and slices.get("fpr"):
        viz.plot_roc(slices, folder / "slice_roc.png")
        written["slice_roc"] = "figures/slice_roc.png"
    if overlays.items:
        items = overlays.items
        viz.plot_overlays(
            np.stack([i[2] for i in items]),
            np.stack([i[3] for i in items]),
            np.stack([i[4] for i in items]),
            classes,
            folder / "fig6_overlays.png",
            window=tuple(config.model.hu_window),
            threshold=results["threshold"],
            titles=[f"patient {i[1]}" for i in items],
        )
        written["overlays"] = "figures/fig6_overlays.png"
    return written


def print_headline(results: dict, run: Path) -> None:
    print(
        f"evaluation on the {results['split']} split (fold {results['fold']}); {DISCLAIMER.lower()}"
    )
    for warning in results.get("warnings", []):
        print(f"  warning: {warning}")
    models = results.get("models", {})
    missing = [stem for stem, name in models.items() if name is None]
    fallback = [name for name in models.values() if name and name.endswith("_last.keras")]
    if missing or fallback:
        scored = ", ".join(name for name in models.values() if name)
        print(
            f"  models: {scored}"
            + (f" (no {' or '.join(missing)} in the run)" if missing else "")
            + (" (no best checkpoint: the last epoch's)" if fallback else "")
        )
    for cls, s in results.get("segmentation", {}).items():
        print(
            f"  {cls:<14} Dice {s['dice']:.3f}  IoU {s['iou']:.3f}  precision "
            f"{s['precision']:.3f}  recall {s['recall']:.3f}"
        )
    if results.get("patients"):
        print(f"  {results['split']} patients: {report.composition_text(results['patients'])}")
    cls = results.get("classification", {})
    for key, label in (
        ("any_slice", "any slice"),
        ("robust", "robust rule"),
        ("lesion_burden", "burden rule"),
    ):
        if key in cls and "accuracy" in cls[key]:
            m = cls[key]
            print(
                f"  patients ({label:<11}) accuracy {m['accuracy']:.3f}  recall "
                f"{m['recall']:.3f}  precision {m['precision']:.3f}  ({m['patients']} patients)"
            )
    for key in ("robust", "lesion_burden"):
        if key in cls:
            print(f"  {key.replace('_', ' ')} rule: {cls[key]['rule']}")
    out = evaluation_dir(run, results["split"])
    print(
        f"metrics: {out / 'metrics.json'}, report: {out / 'report.md'} and {out / 'report.html'}"
        + (f", figures: {out / 'figures'}" if results.get("figures") else "")
    )
