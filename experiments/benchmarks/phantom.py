"""Phantom generation speed on one core, per diagnosis, in memory and written to disk.

    python experiments/benchmarks/phantom.py [--size 512] [--patients 2] [--out FILE.json]

Target (issue 20): >= 50 slices/s at 512x512 on one core, deterministic for a seed. One
core: OpenCV's drawing and blurring threads are limited to one (numpy and scipy run on one
here anyway). The baseline in the same run is writing the same slices as DICOM (pydicom),
which the cohort command does after rendering: the ratio says how much of a cohort's time
the rendering takes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2

from data_tools.phantom import make_patient, write_patient

CASES = (("healthy", "none"), ("covid", "mild"), ("covid", "severe"), ("bacterial", "none"),
         ("viral", "none"))  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--patients", type=int, default=2, help="patients per diagnosis")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    make_patient(0, 64, "covid", "severe")  # imports and first-call costs out of the timing
    rows, total_slices, total_render, total_write = {}, 0, 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for diagnosis, severity in CASES:
            slices = render = write = 0.0
            for seed in range(args.patients):
                start = time.perf_counter()
                p = make_patient(seed, args.size, diagnosis, severity)
                mid = time.perf_counter()
                write_patient(p, Path(tmp) / f"{diagnosis}-{severity}-{seed}", patient_id="B",
                              patient_name="BENCH^MARK")  # fmt: skip
                write += time.perf_counter() - mid
                render += mid - start
                slices += p.hu.shape[0]
            rows[f"{diagnosis}/{severity}"] = slices / render
            total_slices += slices
            total_render += render
            total_write += write
    result = {
        "size": args.size,
        "render_slices_per_s": {k: round(v, 1) for k, v in rows.items()},
        "render_slices_per_s_all": round(total_slices / total_render, 1),
        "dicom_write_slices_per_s": round(total_slices / total_write, 1),
        "render_time_over_write_time": round(total_render / total_write, 2),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
