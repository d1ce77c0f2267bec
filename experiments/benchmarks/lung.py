"""Lung masks per 512x512 slice on one core: the fast mask against the one it replaced.

    python experiments/benchmarks/lung.py [--patients 2] [--size 512] [--jpegs DIR]
        [--dicom] [--out runs/benchmarks/lung.json]

`data_tools.lung.lung_mask` labels, fills holes and closes with OpenCV, in the box
around the lungs, with per-region sums where regions are few. The baseline is
``tests/data_tools/lung_reference.py``: the same method as it was computed before (scipy
and NumPy, whole images), timed alternately on the same inputs: phantom volumes (one per
diagnosis and seed), with ``--dicom`` pydicom's real CT files, and with ``--jpegs``
8-bit windowed slices such as COVID-SemiSeg's ``train/Imgs``. Both must give the same
masks (the script stops otherwise); it reports ms per slice and the ratio.
Issue 22's target: <= 5 ms per 512x512 slice on one core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
from common import write_figures  # experiments/benchmarks/common.py

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data_tools import lung  # noqa: E402
from data_tools.phantom.render import make_patient  # noqa: E402
from tests.data_tools.lung_reference import reference_lung_mask  # noqa: E402

CASES = (("covid", "moderate"), ("covid", "severe"), ("healthy", "none"), ("bacterial", "none"))
DICOM_CT = ("CT_small.dcm", "693_UNCR.dcm", "explicit_VR-UN.dcm")


def _time(volume, spacing, pre_windowed, repeats):
    """Median seconds of (fast, reference), run in turn; checks the masks are equal."""
    fast, slow = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ours = lung.lung_mask(volume, spacing, pre_windowed=pre_windowed)
        fast.append(time.perf_counter() - start)
        start = time.perf_counter()
        reference = reference_lung_mask(volume, spacing, pre_windowed)
        slow.append(time.perf_counter() - start)
        if not np.array_equal(ours, reference):
            raise SystemExit("the fast and the reference masks differ")
    return statistics.median(fast), statistics.median(slow)


def _dicom():
    import pydicom
    from pydicom.data import get_testdata_file

    from data_tools.dicom_io import read_hu

    for name in DICOM_CT:
        path = Path(get_testdata_file(name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spacing = tuple(float(v) for v in pydicom.dcmread(path).PixelSpacing)
            yield f"dicom {name}", read_hu(path)[None], spacing, False


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
    if args.dicom:
        yield from _dicom()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--patients", type=int, default=2, help="patients per diagnosis")
    parser.add_argument("--jpegs", type=Path, help="folder of 8-bit windowed slices")
    parser.add_argument("--dicom", action="store_true", help="also pydicom's real CT files")
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
            "ms_per_slice": round(1000 * ours / slices, 2),
            "reference_ms_per_slice": round(1000 * reference / slices, 2),
            "speed_up": round(reference / ours, 2),
            "masks_identical": True,
        }
    print(json.dumps(result, indent=2))
    write_figures(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
