"""What `predict` measures on a labelled volume: lung and lesion volumes per class and
side, the lesion burden, the severity grade and why a study cannot be graded."""

from __future__ import annotations

import numpy as np

from data_tools import dicom_io
from data_tools.lung import LESION_MARGIN_MM, LESION_RULE, lung_mask
from tfcovseg.evaluation.burden import burden, burden_masks, burden_percent
from tfcovseg.evaluation.severity import grade_severity
from tfcovseg.inference.studies import Volume, display_geometry

MIN_LUNG_ML = 300.0  # less is partial coverage, not a chest CT, or a failed lung mask
# More than any adult's total lung capacity (about 6-8 L, 10 L in the tallest): a slice
# or pixel spacing that is wrong in the header (a NIfTI's pixdim, positions in cm).
MAX_LUNG_ML = 12000.0


def grading_limits(volume: Volume, lung_ml: float) -> list[str]:
    """Why the study cannot support a severity grade (empty when it can)."""
    limits = []
    if volume.hu.shape[0] < 2:
        limits.append("a single slice: lesion and lung volumes need a series of slices")
    if volume.tilt_deg > dicom_io.MAX_TILT_DEG:
        limits.append(
            f"not an axial series (slices {volume.tilt_deg:.0f} degrees from axial): the "
            "model and the lung mask work on axial slices"
        )
    if lung_ml <= 0:
        limits.append("no lung found in the study")
    elif lung_ml < MIN_LUNG_ML:
        limits.append(
            f"lungs of {lung_ml:.0f} mL, below the {MIN_LUNG_ML:.0f} mL a chest CT covers "
            "(partial coverage, not a chest CT, or the lung mask failed)"
        )
    elif lung_ml > MAX_LUNG_ML:
        limits.append(
            f"lungs of {lung_ml:.0f} mL, above the {MAX_LUNG_ML:.0f} mL of any adult's "
            f"lungs: the voxel spacing read from the input ({_spacing_text(volume)} mm) is "
            "likely wrong (slice positions, thickness or a NIfTI's pixdim)"
        )
    return limits


def _spacing_text(volume: Volume) -> str:
    return " x ".join(f"{float(v):g}" for v in volume.spacing_mm)


def lung_sides(lung: np.ndarray, volume: Volume) -> dict:
    """{"right": mask, "left": mask}: the lung voxels on each side of the midline between
    the lungs (the middle of the lung mask's extent across the columns), the patient's
    side read from the series orientation; {} when the columns do not run right-left."""
    markers, _ = display_geometry(volume)
    columns = np.nonzero(lung.any(axis=(0, 1)))[0]
    if markers["right"] not in ("L", "R") or columns.size == 0:
        return {}
    beyond = np.arange(lung.shape[2]) > (columns.min() + columns.max()) / 2
    far = "left" if markers["right"] == "L" else "right"
    near = "right" if far == "left" else "left"
    return {near: lung & ~beyond, far: lung & beyond}


def measure(volume: Volume, labels: np.ndarray, classes, severity_rule) -> tuple[dict, np.ndarray]:
    """Lung and lesion volumes (mL), percentages of lung, lesion slices and severity.

    Only lesion voxels in the lung (within `LESION_MARGIN_MM` of the lung mask, for
    pleural consolidation) count; the others are dropped and their volume reported.

    Returns:
        (the measures, the label volume with the lesions outside the lung removed).
    """
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    lung = lung_mask(volume.hu, volume.spacing_mm[:2])
    counted, region = burden_masks(labels > 0, lung, volume.spacing_mm[:2])
    dropped = int((labels > 0).sum() - counted.sum())
    labels = np.where(counted, labels, 0).astype(np.uint8)
    lung_voxels = int(region.sum())
    sides = lung_sides(region, volume)
    lesions = {}
    total = 0.0
    for c, name in enumerate(classes):
        on = labels == c + 1
        voxels = int(on.sum())
        ratio = burden(voxels, lung_voxels)
        total += ratio
        lesions[name] = {
            "volume_ml": round(voxels * voxel_ml, 3),
            "percent_of_lung": round(100.0 * ratio, 3),
            "percent_of_each_lung": {
                side: round(100.0 * int((on & mask).sum()) / max(int(mask.sum()), 1), 3)
                for side, mask in sides.items()
            },
            "mean_hu": round(float(volume.hu[on].mean()), 1) if voxels else None,
            "slices": [int(z) for z in np.nonzero(on.any(axis=(1, 2)))[0]],
        }
    limits = grading_limits(volume, lung_voxels * voxel_ml)
    measured = {
        "lung_volume_ml": round(lung_voxels * voxel_ml, 3),
        "lesions": lesions,
        "total": {
            "volume_ml": round(sum(v["volume_ml"] for v in lesions.values()), 3),
            "percent_of_lung": burden_percent(total),
            "percent_of_each_lung": {
                side: round(100.0 * int(((labels > 0) & mask).sum()) / max(int(mask.sum()), 1), 3)
                for side, mask in sides.items()
            },
            "mean_hu": round(float(volume.hu[labels > 0].mean()), 1) if labels.any() else None,
            "slices": [int(z) for z in np.nonzero((labels > 0).any(axis=(1, 2)))[0]],
        },
        "outside_lung": {
            "volume_ml": round(dropped * voxel_ml, 3),
            "rule": f"predicted lesion voxels farther than {LESION_MARGIN_MM:g} mm from the "
            "lung mask (chest wall, table, abdomen) are not counted, nor written as lesions",
        },
        "severity": {
            "grade": None if limits else grade_severity(total, severity_rule),
            "not_graded": limits,
            "total_lesion_lung_ratio": round(total, 6),
            "thresholds": (severity_rule or {}).get("thresholds"),
            "rule": "mild < t1 <= moderate < t2 <= severe, on the total lesion/lung ratio",
            "fitted": bool((severity_rule or {}).get("fitted")),
        },
    }
    return measured, labels


def burden_call(
    ratio: float, rule: dict | None, mask_threshold: float | None = None, not_graded=()
) -> dict:
    """The patient call from the segmentation: lesion / lung ratio >= the export's t.

    The export chooses t on its run's validation patients (`calibration.calibrate_burden_rule`);
    models exported without one (older versions) give ``positive: None``. t holds for the
    mask threshold and the lesion-counting rule it was chosen with: a prediction made at
    another `mask_threshold` (``--mask-threshold``), or by a model whose t was chosen
    under another rule, counts other voxels as lesion, so it makes no call either; nor
    does a study that cannot support a ratio (`not_graded`: `grading_limits`).
    """
    rule = rule or {}
    t = rule.get("threshold")
    chosen_at = rule.get("mask_threshold")
    call = {
        "ratio": float(ratio),
        "percent_of_lung": burden_percent(ratio),
        "threshold": None if t is None else float(t),
        "positive": None if t is None else bool(ratio >= t),
        "rule": "total lesion / lung ratio at or above the threshold (chosen on validation)",
    }
    if t is None:
        # The export's reason ("off: every validation patient is COVID-19"), flat: it ends
        # up inside the verdict's own sentence.
        why = (rule.get("method") or "").removeprefix("off").lstrip(":, ")
        why = why or "the model was exported before the rule existed"
        call["rule"] = f"no call: the export chose no threshold, as {why}"
    elif rule.get("lesion_rule") != LESION_RULE:
        call["positive"] = None
        call["rule"] = (
            "no call: the threshold was chosen counting lesions by another rule "
            f"({rule.get('lesion_rule') or 'all predicted voxels'}); export the model again"
        )
    elif not_graded:
        call["positive"] = None
        call["rule"] = f"no call: {'; '.join(not_graded)}"
    elif (
        chosen_at is not None
        and mask_threshold is not None
        and abs(float(chosen_at) - float(mask_threshold)) > 1e-9
    ):
        call["positive"] = None
        call["rule"] = (
            f"no call: the threshold was chosen at mask threshold {float(chosen_at):g}, this "
            f"prediction used {float(mask_threshold):g}"
        )
    return call
