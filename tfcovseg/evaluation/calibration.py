"""Rules chosen on a run's validation patients: the slice gate's threshold, the lesion-
burden threshold and the severity rule, with the validation passes they need kept in the
run folder (``validation_scores.json``) so that evaluation and export share one pass.

The export stores what these choose in its metadata (`tfcovseg.inference.export`);
`tfcovseg.evaluation.run` reports the same rules on the test patients.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_tools.files import atomic_write_json, files_sha256
from data_tools.lung import LESION_RULE
from tfcovseg.data.dataset import (
    classify_label,
    read_manifest,
    records_folder,
    split_dataset,
    split_patients,
)
from tfcovseg.evaluation.burden import lesion_burdens, slice_scores
from tfcovseg.evaluation.metrics import choose_burden_threshold, roc_auc
from tfcovseg.evaluation.severity import GRADES, severity_rule_from_manifest
from tfcovseg.models import run_model_path

PAPER_GATE_THRESHOLD = 0.5
GATE_RECALL = 0.98  # the automatic gate keeps at least this share of lesion slices
# Below this validation slice AUC the gate is switched off. A gate that is off costs time;
# one that drops a patient's lesion slices loses the lesions: the bar is set high.
GATE_MIN_AUC = 0.95
VALIDATION_CACHE = "validation_scores.json"


def severity_rule_for_run(run: Path, config) -> dict:
    """The run's severity rule: ``severity.json`` of the run, else fitted from its records."""
    path = run / "severity.json"
    if path.is_file():
        return json.loads(path.read_text())
    try:
        manifest = read_manifest(records_folder(config))
    except FileNotFoundError as e:
        return {"fitted": False, "thresholds": None, "grades": list(GRADES), "reason": str(e)}
    patients = split_patients(manifest, "train", config.data.fold)
    patients += split_patients(manifest, "validation", config.data.fold)
    return severity_rule_from_manifest(manifest, patients)


CLASSIFIER_SCORER = "the classifier's"
SEGMENTER_SCORER = "the segmenter's maximum lesion probability's (the run has no classifier)"


def calibrate_gate(
    classifier_fn,
    config,
    recall=GATE_RECALL,
    min_auc=GATE_MIN_AUC,
    batch_size=16,
    run=None,
    scorer=CLASSIFIER_SCORER,
) -> dict:
    """The slice gate threshold: the paper's 0.5, lowered until the gate keeps `recall`.

    On the validation split of the run's fold, the highest threshold t <= 0.5 such that at
    least `recall` of the slices with lesions have probability >= t. A gate that drops
    lesion slices silently loses lesions; one that passes everything only costs time. So
    when the classifier separates lesion slices poorly (validation slice ROC AUC below
    `min_auc`), a threshold fitted on a few validation patients would not hold on others:
    the gate is switched off (threshold 0, every slice is segmented) and the reason kept
    (``predict --threshold T`` still forces one).

    Args:
        classifier_fn: [batch, H, W] HU -> {"covid_probability": [batch]}.
        config: The run's `ExperimentConfig`.
        run: The run folder the classifier came from: its validation scores are shared
            with `tfcovseg.evaluate` through `validation_slice_scores`.
        scorer: Whose probabilities they are, as the reason names them (a run without
            a classifier scores slices by the segmenter's maximum lesion probability).
    """
    try:
        scores = validation_slice_scores(
            lambda hu: classifier_fn(hu)["covid_probability"], config, None, batch_size, run
        )
    except (FileNotFoundError, ValueError) as e:
        return {"threshold": 0.0, "method": f"off: cannot be checked (validation records: {e})"}
    return gate_from_scores(scores["probabilities"], scores["labels"], recall, min_auc, scorer)


def _kept_in_run(run, stem: str, config, fold: int, extra: dict, compute):
    """`compute()` (JSON-able), kept in ``run/validation_scores.json`` when `run` is given.

    The key is the model file's SHA-256 (the file `load_run_models` loads for `stem`), the
    records' manifest, the fold, the input size and `extra`; a call with the same key reads
    the value back, any other computes it again and adds it. An unreadable cache is
    rewritten; a run folder that cannot be written only keeps nothing.
    """
    model_file = None if run is None else run_model_path(run, stem)
    if model_file is None:
        return compute()
    key = json.dumps(
        {
            "model": stem,
            "model_sha256": files_sha256([model_file]),
            "manifest_sha256": files_sha256([records_folder(config) / "manifest.json"]),
            "fold": int(fold),
            "input_size": list(config.model.input_size),
            **extra,
        },
        sort_keys=True,
    )
    path = Path(run) / VALIDATION_CACHE
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    if key in cache:
        return cache[key]
    value = compute()
    cache[key] = value
    try:
        atomic_write_json(path, cache, indent=1, sort_keys=True)
    except OSError:
        pass
    return value


def validation_burdens(
    segmenter, config, fold=None, mask_threshold=0.5, batch_size=16, run=None
) -> tuple[dict, dict]:
    """`lesion_burdens` of the segmenter on the validation split of `fold`, kept in the run.

    `tfcovseg.evaluate` (its lesion-burden rows) and the export (the `burden_rule` it
    stores, also what `predict --model runs/X` computes at start-up) need the same pass
    over the validation patients; at 512² it takes minutes on a CPU. With `run` (the
    folder the segmenter was loaded from) the result is kept in
    ``run/validation_scores.json``, keyed by the segmenter file's SHA-256, the records, the
    fold, the input size and `mask_threshold`, and read back by the next caller.

    Raises:
        FileNotFoundError, ValueError: no validation records (from `make_dataset`).
    """
    fold = config.data.fold if fold is None else fold
    ds = split_dataset(config, "validation", fold, batch_size)
    burdens, diagnosis = _kept_in_run(
        run,
        "segmenter",
        config,
        fold,
        {
            "scores": "lesion_burdens",
            "mask_threshold": float(mask_threshold),
            "lesion_rule": LESION_RULE,
            "positive_weights": list(config.train.positive_weights or ()),
        },
        lambda: list(lesion_burdens(segmenter, ds, mask_threshold, config.train.positive_weights)),
    )
    return burdens, diagnosis


def validation_slice_scores(classify, config, fold=None, batch_size=16, run=None) -> dict:
    """A slice classifier's probabilities on the validation split of `fold`, kept in the run.

    Returns {"probabilities": [...], "labels": [...] (the classifier's target,
    `data.classify_label`: a COVID-19 lesion slice), "patients": [...] (per slice),
    "diagnosis": {patient: diagnosis}}. Shared, as `validation_burdens`, by the export's
    gate (`calibrate_gate`) and `tfcovseg.evaluate`'s robust patient rule.

    Args:
        classify: [batch, H, W] HU -> [batch] probabilities.

    Raises:
        FileNotFoundError, ValueError: no validation records (from `make_dataset`).
    """
    fold = config.data.fold if fold is None else fold
    ds = split_dataset(config, "validation", fold, batch_size)

    def compute():
        return slice_scores(classify, ds, label=classify_label)

    return _kept_in_run(run, "classifier", config, fold, {"scores": "slice_probabilities"}, compute)


def calibrate_burden_rule(segmenter, config, mask_threshold=0.5, batch_size=16, run=None) -> dict:
    """The patient call on the segmentation: lesion burden >= t, t chosen on validation.

    The same rule as `tfcovseg.evaluate`'s lesion-burden rows: the segmenter's lesion
    volume (any type, probability >= `mask_threshold`) over the lung volume, per patient of
    the run's validation split, and t in the middle of the widest gap that separates their
    COVID-19 and other patients best (`tfcovseg.evaluation.metrics.choose_burden_threshold`).
    `tfcovseg.predict` reports this call beside the slice classifier's. Without
    validation records the rule is left out (threshold None) and the reason kept. With
    `run`, the validation burdens are shared with evaluate through `validation_burdens`.
    """
    try:
        burdens, diagnosis = validation_burdens(
            segmenter, config, None, mask_threshold, batch_size, run=run
        )
    except (FileNotFoundError, ValueError) as e:
        return {"threshold": None, "method": f"off: the validation records cannot be read: {e}"}
    rule = burden_rule_from(burdens, diagnosis)
    if rule["threshold"] is None:
        return rule
    return rule | {"mask_threshold": float(mask_threshold), "lesion_rule": LESION_RULE}


def burden_rule_from(burdens: dict, diagnosis: dict) -> dict:
    """The lesion-burden rule chosen on validation burdens {patient: ratio} and diagnoses.

    The one place where the rule is chosen: the export's `burden_rule` and evaluate's
    lesion-burden rows both come from here. Off (threshold None, the reason in
    ``method``) without patients of both kinds: any cut calls them all right, so the
    threshold would mean nothing (evaluate used one anyway, 45 % of the lungs once).
    """
    if not burdens:
        return {"threshold": None, "method": "off: the validation split has no patients"}
    covid = {diagnosis[p] == "covid" for p in burdens}
    if len(covid) == 1:
        which = "COVID-19" if covid == {True} else "without COVID-19"
        return {
            "threshold": None,
            "method": f"off: every validation patient is {which}",
            "validation_patients": len(burdens),
        }
    rule = choose_burden_threshold(burdens, {p: d == "covid" for p, d in diagnosis.items()})
    return {
        "threshold": float(rule["threshold"]),
        "method": "lesion burden, chosen on the validation patients",
        "validation_patients": len(burdens),
        "validation_accuracy": float(rule["accuracy"]),
    }


def gate_from_scores(
    probs, labels, recall=GATE_RECALL, min_auc=GATE_MIN_AUC, scorer=CLASSIFIER_SCORER
) -> dict:
    """`calibrate_gate`'s rule on slice probabilities and lesion labels (numpy)."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, bool)
    positives = np.sort(probs[labels])[::-1]
    if positives.size == 0:
        return {
            "threshold": 0.0,
            "method": "off: cannot be checked (no lesion slice in validation)",
        }
    auc = roc_auc(labels, probs)
    keep = int(np.ceil(recall * positives.size))
    threshold = float(min(PAPER_GATE_THRESHOLD, positives[keep - 1]))
    method = (
        f"highest threshold <= {PAPER_GATE_THRESHOLD} keeping {recall:.0%} of the validation "
        "lesion slices"
    )
    if auc is None:
        threshold = 0.0
        method = (
            "off: cannot be checked (every validation slice has a lesion, so the slice AUC "
            "is undefined): every slice is segmented"
        )
    elif auc < min_auc:
        threshold = 0.0
        method = (
            f"off: {scorer} validation slice AUC {round(auc, 3)} is below {min_auc}, "
            "so every slice is segmented"
        )
    return {
        "threshold": threshold,
        "method": method,
        "validation_slice_auc": auc,
        "validation_lesion_recall": float((probs[labels] >= threshold).mean()),
        "validation_pass_rate": float((probs >= threshold).mean()),
        "validation_slices": int(probs.size),
    }
