"""Is this CT in Hounsfield units? One check for the converter and for `predict`.

A volume is refused, with the reason, when it

- holds NaN or infinite voxels (some resampling tools pad with NaN): no value can stand in
  for them without changing what the lung mask and the model see;
- has a handful of distinct values (a label or mask volume given as the image);
- has no air (no voxel below -500 HU: the lungs and the air around a patient are far
  below it) or no soft tissue (no voxel between -200 and +200 HU): stored pixel values
  without the rescale to HU, an image already windowed to 0-255, or not a CT at all.

Real CT passes with a wide margin: pydicom's CT test files have 15-70 % of their pixels
below -500 HU and 24-77 % between -200 and +200 HU, against the 0.5 % asked here.
"""

from __future__ import annotations

import numpy as np

from data_tools.dicom_io import SkipFile

AIR_BELOW_HU = -500.0
SOFT_TISSUE_HU = (-200.0, 200.0)
MIN_FRACTION = 0.005
MIN_DISTINCT_VALUES = 16


def ct_value_problem(hu: np.ndarray) -> str | None:
    """Why `hu` is not CT in Hounsfield units, or None when it looks like it."""
    hu = np.asarray(hu)
    finite = np.isfinite(hu)
    if not finite.all():
        bad = int(hu.size - finite.sum())
        return (
            f"{bad} of {hu.size} voxels are NaN or infinite: give a volume with finite "
            "Hounsfield units (fill padding with -1024)"
        )
    # Half a million voxels are plenty; contiguous, the counts below take a third of the time.
    sample = np.ascontiguousarray(hu.ravel()[:: max(1, hu.size // 500_000)])
    # Enough distinct values among the first voxels settles it without sorting them all.
    distinct = np.unique(sample[:20_000])
    if len(distinct) < MIN_DISTINCT_VALUES:
        distinct = np.unique(sample)
    if len(distinct) < MIN_DISTINCT_VALUES:
        shown = ", ".join(f"{v:g}" for v in distinct[:8])
        return (
            f"only {len(distinct)} distinct values ({shown}): a label or mask volume, "
            "not a CT image"
        )
    lo, hi = float(sample.min()), float(sample.max())
    air = float((sample < AIR_BELOW_HU).mean())
    soft = float(((sample >= SOFT_TISSUE_HU[0]) & (sample <= SOFT_TISSUE_HU[1])).mean())
    if air < MIN_FRACTION or soft < MIN_FRACTION:
        missing = (
            "no air (below -500 HU)" if air < MIN_FRACTION else "no soft tissue (-200 to +200 HU)"
        )
        return (
            f"values {lo:g} to {hi:g} with {missing}: not CT in Hounsfield units (stored "
            "values without the rescale slope / intercept, an image windowed to 0-255, or "
            "another modality)"
        )
    return None


def check_ct_values(hu: np.ndarray) -> None:
    """Raises `SkipFile` with `ct_value_problem`'s reason when `hu` is not CT in HU."""
    problem = ct_value_problem(hu)
    if problem:
        raise SkipFile(problem)
