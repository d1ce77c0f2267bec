"""What the benchmark scripts share (run as `python experiments/benchmarks/X.py`)."""

from __future__ import annotations

import json
from pathlib import Path


def write_figures(out: Path | None, figures: dict) -> None:
    """Writes the figures as JSON to `out` (its folder made) and says so; nothing if None."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"wrote {out}")
