"""Lung masks per 512x512 slice on one core: OpenCV pieces against scipy's, in one run.

    python experiments/benchmarks/lung.py [--patients 2] [--size 512] [--jpegs DIR]
        [--out runs/benchmarks/lung.json]

`data_tools.lung.lung_mask` labels, fills holes and closes with OpenCV. The baseline is the
same function with those three pieces swapped for scipy's (``ndimage.label``,
``binary_fill_holes``, the closing by iterated 3x3 steps: what it ran before), timed
alternately on the same phantom volumes (one per diagnosis and seed) and, with
``--jpegs``, 8-bit windowed slices such as COVID-SemiSeg's ``train/Imgs``. Both must give
the same masks (the script stops otherwise); it reports ms per slice and the ratio.
Issue target: <= 5 ms per 512x512 slice on one core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from common import write_figures  # experiments/benchmarks/common.py
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data_tools import lung  # noqa: E402
from data_tools.phantom.render import make_patient  # noqa: E402

CASES = (("covid", "moderate"), ("covid", "severe"), ("healthy", "none"), ("bacterial", "none"))


def _scipy_label(mask):
    labels, n = ndimage.label(mask)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)


def _scipy_close(mask, radius):
    pad = radius + 1
    padded = np.pad(mask, pad)
    grown = lung._grow(lung._grow(padded, radius, erode=False), radius, erode=True)
    return mask | grown[pad:-pad, pad:-pad]


@contextlib.contextmanager
def scipy_pieces():
    """`lung_mask` with scipy's labelling, hole filling and closing (the baseline)."""
    saved = lung._label, lung._fill_holes, lung._close
    lung._label, lung._fill_holes, lung._close = (
        _scipy_label, ndimage.binary_fill_holes, _scipy_close,
    )  # fmt: skip
    try:
        yield
    finally:
        lung._label, lung._fill_holes, lung._close = saved


def _time(volume, spacing, pre_windowed, repeats):
    """Median seconds of (OpenCV, scipy), run in turn; checks the masks are equal."""
    opencv, scipy = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ours = lung.lung_mask(volume, spacing, pre_windowed=pre_windowed)
        opencv.append(time.perf_counter() - start)
        with scipy_pieces():
            start = time.perf_counter()
            reference = lung.lung_mask(volume, spacing, pre_windowed=pre_windowed)
            scipy.append(time.perf_counter() - start)
        if not np.array_equal(ours, reference):
            raise SystemExit("the OpenCV and scipy masks differ")
    return statistics.median(opencv), statistics.median(scipy)


def _volumes(args):
    for diagnosis, severity in CASES:
        for seed in range(args.patients):
            p = make_patient(seed, args.size, diagnosis, severity)
            yield f"phantom {diagnosis}/{severity}", p.hu, p.spacing_mm[:2], False
    if args.jpegs:
        from PIL import Image

        images = [np.asarray(Image.open(f).convert("L"), np.float32)
                  for f in sorted(Path(args.jpegs).glob("*.jpg"))]  # fmt: skip
        for image in images:  # sizes differ: one slice at a time
            yield "jpeg", image[None], (1.0, 1.0), True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--patients", type=int, default=2, help="patients per diagnosis")
    parser.add_argument("--jpegs", type=Path, help="folder of 8-bit windowed slices")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # one core, as a converter worker has
    lung.lung_mask(np.full((2, 64, 64), -1000.0))  # first-call costs out of the timing
    totals = {}
    for kind, volume, spacing, pre_windowed in _volumes(args):
        ours, reference = _time(volume, spacing, pre_windowed, args.repeats)
        entry = totals.setdefault(kind.split()[0], [0, 0.0, 0.0])
        entry[0] += len(volume)
        entry[1] += ours
        entry[2] += reference
    result = {"size": args.size, "threads": 1}
    for kind, (slices, ours, reference) in totals.items():
        result[kind] = {
            "slices": slices,
            "opencv_ms_per_slice": round(1000 * ours / slices, 2),
            "scipy_ms_per_slice": round(1000 * reference / slices, 2),
            "speed_up": round(reference / ours, 2),
            "masks_identical": True,
        }
    print(json.dumps(result, indent=2))
    write_figures(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
