"""The lesion-burden rule and the slice scores, each defined once.

Lesion burden: the predicted lesion volume (any lesion type) over the lung volume. Lesion
voxels count only in the lung (`data_tools.lung.lesions_in_lung`: the lung mask and a
margin for pleural lesions); the lung is the lung mask joined with the lesions that count.
Training's `PatientEvaluation`, the evaluation of a run, the export's burden threshold and
`tfcovseg.predict`'s measures all count through `burden_masks` and `burden`.

Slice scores: a slice classifier's probability per slice with the slice's label, patient
and diagnosis (`slice_scores`), grouped by patient for the patient rules (`by_patient`).
"""

from __future__ import annotations

import numpy as np

from data_tools.lung import lesions_in_lung


def burden_masks(lesions, lung, spacing_mm) -> tuple[np.ndarray, np.ndarray]:
    """(the lesion voxels that count, the lung region they are measured against).

    Args:
        lesions: bool [..., H, W], any lesion type.
        lung: bool lung mask of the same shape.
        spacing_mm: in-plane (row, column) spacing of all slices, or [N, >= 2] per slice
            of a batch [N, H, W].
    """
    lesions, lung = np.asarray(lesions, bool), np.asarray(lung, bool)
    spacing = np.asarray(spacing_mm, np.float64)
    if spacing.ndim == 2:  # a batch of slices, each with its own spacing
        counted = np.stack(
            [lesions_in_lung(f, g, tuple(s[:2]))[0] for f, g, s in zip(lesions, lung, spacing)]
        )
    else:
        counted = lesions_in_lung(lesions, lung, tuple(spacing[:2]))[0]
    return counted, counted | lung


def burden(lesion_voxels, lung_voxels) -> float:
    """Lesion / lung volume (0 for an empty lung)."""
    return float(lesion_voxels) / max(float(lung_voxels), 1.0)


def burden_percent(ratio: float) -> float:
    """A lesion / lung ratio as the percentage every output prints (report.json, the
    console, report.html, the archive's summary, the verdict's sentence).

    One value, at the ratio's stored precision (6 decimals, so 4 as a percentage): printing
    it at 2 decimals gives the same text everywhere. A percentage rounded to 3 decimals and
    then to 2 put "1.45 % of lung" beside the verdict's "1.44 %" (a ratio of 0.014449).
    """
    return round(100.0 * round(float(ratio), 6), 4)


def lesion_burdens(segmenter, dataset, threshold=0.5, positive_weights=None) -> tuple[dict, dict]:
    """{patient: lesion burden} and {patient: diagnosis} of a segmenter over a dataset.

    Args:
        segmenter: A segmenter returning {"final": [N, H, W, C] probabilities}; a lesion
            is any class at or above `threshold`.
        dataset: A `make_dataset(..., task="inspect")` dataset.
        positive_weights: The segmenter's loss weights (`tfcovseg.models.outputs`).
    """
    from tfcovseg.models.outputs import final_probabilities

    lesion, lung, diagnosis = {}, {}, {}
    for batch in dataset:
        out = segmenter.predict_on_batch(batch["hu"][..., None])
        found = np.asarray(final_probabilities(out, positive_weights)) >= threshold
        counted, region = burden_masks(
            found.any(-1), batch["lung"].numpy() > 0, batch["spacing_mm"].numpy()
        )
        for i, (pid, d) in enumerate(
            zip(batch["patient/id"].numpy(), batch["patient/diagnosis"].numpy())
        ):
            pid = pid.decode()
            lesion[pid] = lesion.get(pid, 0) + int(counted[i].sum())
            lung[pid] = lung.get(pid, 0) + int(region[i].sum())
            diagnosis[pid] = d.decode()
    return {p: burden(lesion[p], lung[p]) for p in lesion}, diagnosis


def slice_scores(classify, dataset, label=None) -> dict:
    """A slice classifier's probabilities over a dataset, one entry per slice.

    Returns {"probabilities": [...], "labels": [...] (``label(batch)`` > 0, when given),
    "patients": [...], "diagnosis": {patient: diagnosis}}.

    Args:
        classify: [batch, H, W] HU -> [batch] probabilities.
        dataset: A `make_dataset(..., task="inspect")` dataset.
        label: batch -> [batch] slice labels (e.g. `tfcovseg.data.dataset.classify_label`).
    """
    out = {"probabilities": [], "labels": [], "patients": [], "diagnosis": {}}
    for batch in dataset:
        out["probabilities"] += np.asarray(classify(batch["hu"])).reshape(-1).tolist()
        if label is not None:
            out["labels"] += (np.asarray(label(batch)) > 0).tolist()
        for pid, d in zip(batch["patient/id"].numpy(), batch["patient/diagnosis"].numpy()):
            out["patients"].append(pid.decode())
            out["diagnosis"][pid.decode()] = d.decode()
    return out


def by_patient(scores: dict) -> dict:
    """{patient: [slice probabilities]} of `slice_scores`, in slice order."""
    probs = {}
    for pid, p in zip(scores["patients"], scores["probabilities"]):
        probs.setdefault(pid, []).append(float(p))
    return probs
