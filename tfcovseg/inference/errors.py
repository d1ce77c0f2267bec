"""The error `predict` stops with: a model or input it cannot use, named (the CLI's
``error: ...``, exit code 2)."""

from __future__ import annotations


class PredictionError(Exception):
    """Prediction cannot go on; the message says why (exit code 2)."""
