"""One slice of the synthetic CT phantom per diagnosis and severity, as a PNG figure.

    python -m data_tools.phantom_figure --out docs/phantom.png [--size 512] [--seed 0]

Columns: healthy, COVID-19 mild / moderate / severe, bacterial and viral pneumonia (one
patient each, `data_tools.phantom.make_patient` with the seed). Top row: the slice in a
lung window; bottom row: the same slice with the COVID-19 lesion labels (red GGO, green
consolidation, blue fibrosis; the other pneumonias' lesions are not labelled). The slice
shown is the one with the most labelled lesion, or, without labels, the one with the most
dense lung (above -600 HU): where a reader looks first. Synthetic data: research and
testing only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_tools.files import OutputError, check_output_dir
from data_tools.phantom import make_patient

CASES = (
    ("healthy", "none"),
    ("covid", "mild"),
    ("covid", "moderate"),
    ("covid", "severe"),
    ("bacterial", "none"),
    ("viral", "none"),
)
LUNG_WINDOW = (-1350.0, 150.0)  # level -600, width 1500
LABEL_COLOURS = {1: (1.0, 0.0, 0.0), 2: (0.0, 0.8, 0.0), 3: (0.0, 0.3, 1.0)}


def pick_slice(hu: np.ndarray, labels: np.ndarray, lung: np.ndarray) -> int:
    """The slice with the most labelled lesion, else the most dense lung (> -600 HU)."""
    lesion = (labels > 0).sum(axis=(1, 2))
    if lesion.any():
        return int(np.argmax(lesion))
    return int(np.argmax((lung & (hu > -600)).sum(axis=(1, 2))))


def _grey(hu: np.ndarray) -> np.ndarray:
    low, high = LUNG_WINDOW
    return np.clip((hu - low) / (high - low), 0.0, 1.0)


def _with_labels(grey: np.ndarray, labels: np.ndarray, alpha=0.5) -> np.ndarray:
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value, colour in LABEL_COLOURS.items():
        on = labels == value
        rgb[on] = (1 - alpha) * rgb[on] + alpha * np.asarray(colour)
    return rgb


def render(out: Path, size: int = 512, seed: int = 0) -> Path:
    """Writes the figure; returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.2 * len(CASES), 4.9), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(CASES))
    for col, (diagnosis, severity) in enumerate(CASES):
        patient = make_patient(seed + col, size, diagnosis, severity)
        z = pick_slice(patient.hu, patient.lesions, patient.lung)
        grey = _grey(patient.hu[z])
        axes[0, col].imshow(grey, cmap="gray", vmin=0, vmax=1)
        axes[1, col].imshow(_with_labels(grey, patient.lesions[z]))
        title = diagnosis if severity == "none" else f"{diagnosis}, {severity}"
        axes[0, col].set_title(f"{title}\nslice {z + 1}/{len(patient.hu)}", fontsize=9)
        for ax in axes[:, col]:
            ax.set_axis_off()
    fig.suptitle(
        "Synthetic phantom (lung window; below: COVID-19 labels, red GGO, green "
        "consolidation, blue fibrosis). Research and testing only.",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(out)  # a killed run leaves the old figure, never half a new one
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.phantom_figure",
        description="One phantom slice per diagnosis and severity, as a PNG figure.",
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--size", type=int, default=512, help="slice size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 32 or args.size % 2:
        parser.error("--size must be an even number of at least 32")
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; give the PNG file's path")
    if args.out.suffix.lower() != ".png":  # PNG bytes went into a .jpg
        parser.error(f"--out {args.out}: the figure is a PNG; name it *.png")
    if not 0 <= args.seed < 2**32:
        parser.error("--seed must be in [0, 2**32 - 1]")
    try:
        check_output_dir(args.out.parent, "--out's folder")
    except OutputError as e:
        parser.error(str(e))
    print(f"wrote {render(args.out, args.size, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
