"""The error `predict` stops with: a model or input it cannot use, named (the CLI's
``error: ...``, exit code 2)."""

from __future__ import annotations


class PredictionError(Exception):
    """Prediction cannot go on; the message says why (exit code 2)."""


def check_thresholds(threshold, mask_threshold) -> None:
    """Raises `PredictionError` for a gate or mask threshold out of its range (here, where
    the command line checks them before it loads TensorFlow)."""
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise PredictionError(f"--threshold must be in [0, 1], got {threshold}")
    if not 0.0 < float(mask_threshold) <= 1.0:
        raise PredictionError(f"--mask-threshold must be in (0, 1], got {mask_threshold}")
