"""DICOM -> TFRecord conversion speed and memory, against bare pydicom reads.

    python experiments/benchmarks/convert.py [--patients 34] [--size 512] [--workers 2]
        [--records-size 128] [--records-dir /dev/shm/records] [--repeats 2] [--beam]
        [--out runs/benchmarks/convert.json]

In one run, on a phantom cohort of about 1000 slices at 512x512 (generated once into
``runs/benchmarks/cohort-<size>-<patients>`` and reused):

1. phantom generation rate (slices/s on one core; target >= 50 at 512x512);
2. bare read: ``pydicom.dcmread(f).pixel_array`` of every file, one process, files in the
   page cache (a first pass warms it; the best of ``--repeats`` passes counts);
3. the lung mask alone (`data_tools.lung.lung_mask` on each series' HU volume, one core;
   issue 22's target: <= 5 ms per 512x512 slice);
4. ``data_tools.convert`` with one worker and with ``--workers`` workers: slices/s, the
   ratio to the bare read rate per worker (issue 22's target: >= 0.2), the speed-up from 1
   to ``--workers`` workers (target >= 1.7 with 2), and the peak resident memory of the
   converting process and of its largest worker (target: <= 2 GB in all for a 1000-slice
   cohort).

Conversion runs in a fresh subprocess each time, so peak memory is the conversion's own;
1 and N workers run in turn ``--repeats`` times, the best of each is reported. The 1.6 GB
of shards go to ``--records-dir`` (default ``runs/benchmarks/records-...``): on this
machine's disk their writing made a run vary by +-20 %, so give a RAM folder
(``/dev/shm/...``) to measure the converter's computation alone. ``--beam`` also runs the
conversion on Apache Beam's DirectRunner, in-process and with ``--workers`` processes.
``--records-size`` converts to another size than the cohort's (the resize included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import write_figures  # experiments/benchmarks/common.py

ROOT = Path(__file__).resolve().parents[2]

_CONVERT = """
import json, resource, sys, time
import tensorflow  # imported before timing, as a long-running converter would have it
from data_tools.convert import convert
start = time.perf_counter()
runner = sys.argv[5] if len(sys.argv) > 5 else None
options = ["direct_num_workers=" + sys.argv[4], "direct_running_mode=multi_processing"]
summary = convert(sys.argv[1], sys.argv[2], size=int(sys.argv[3]),
                  workers=1 if runner else int(sys.argv[4]), salt="benchmark", progress=False,
                  runner=runner, pipeline_options=options if runner and sys.argv[4] != "1" else ())
seconds = time.perf_counter() - start
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "slices": summary["slices"],
                  "peak_rss_mb": self_kb / 1024, "peak_worker_rss_mb": child_kb / 1024}))
"""


def _cohort(patients: int, size: int) -> tuple[Path, float | None]:
    from data_tools.phantom import make_cohort

    folder = ROOT / "runs" / "benchmarks" / f"cohort-{size}-{patients}"
    if (folder / "manifest.csv").is_file():
        return folder, None
    start = time.perf_counter()
    make_cohort(folder, patients, seed=0, size=size)
    elapsed = time.perf_counter() - start
    slices = len(list(folder.rglob("*.dcm")))
    return folder, slices / elapsed


def _bare_read(files) -> float:
    import pydicom

    start = time.perf_counter()
    for f in files:
        pydicom.dcmread(f).pixel_array  # noqa: B018
    return len(files) / (time.perf_counter() - start)


def _lung_alone(files) -> float:
    """`lung_mask` alone over each series' HU volume (read before timing), on one core."""
    import cv2

    from data_tools.dicom_io import read_hu
    from data_tools.lung import lung_mask

    cv2.setNumThreads(1)  # one core, as one converter worker
    by_series: dict[Path, list] = {}
    for f in files:
        by_series.setdefault(f.parent, []).append(read_hu(f))
    seconds = 0.0
    for slices in by_series.values():
        start = time.perf_counter()
        lung_mask(np.stack(slices))
        seconds += time.perf_counter() - start
    return len(files) / seconds


def _convert(cohort: Path, out: Path, size: int, workers: int, runner: str = "") -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _CONVERT, str(cohort), str(out), str(size), str(workers)]
        + ([runner] if runner else []),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["slices_per_s"] = result["slices"] / result["seconds"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=34)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--records-size", type=int, help="convert to this size (default --size)")
    parser.add_argument("--records-dir", type=Path, help="where the shards go (see above)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--beam", action="store_true", help="also Beam's DirectRunner")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    cohort, phantom_rate = _cohort(args.patients, args.size)
    files = sorted(cohort.rglob("*.dcm"))
    _bare_read(files)  # once to warm the page cache: the converter runs warm too
    bare = max(_bare_read(files) for _ in range(args.repeats))
    lung = _lung_alone(files)
    out_size = args.records_size or args.size
    records = (
        args.records_dir or ROOT / "runs" / "benchmarks" / f"records-{args.size}-{args.patients}"
    )
    runs = {1: [], args.workers: []}
    for _ in range(args.repeats):
        for workers in runs:
            runs[workers].append(_convert(cohort, records, out_size, workers))
    one, many = (max(runs[w], key=lambda r: r["slices_per_s"]) for w in runs)
    beam = {}
    if args.beam:  # the DirectRunner: in-process, then `--workers` processes
        for workers in (1, args.workers):
            beam[workers] = _convert(cohort, records, out_size, workers, "direct")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "size": args.size,
        "records_size": out_size,
        "slices": len(files),
        "records_dir": str(records),
        "repeats": args.repeats,
        "phantom_slices_per_s": phantom_rate,
        "bare_read_slices_per_s": bare,
        "lung_mask_alone_slices_per_s": lung,
        "lung_mask_ms_per_slice": 1000 / lung,
        "convert_1_worker": one,
        f"convert_{args.workers}_workers": many,
        "ratio_1_worker": one["slices_per_s"] / bare,
        "ratio_per_worker": many["slices_per_s"] / args.workers / bare,
        "speed_up_1_to_n_workers": many["slices_per_s"] / one["slices_per_s"],
        **{f"beam_direct_{w}_workers": r for w, r in beam.items()},
    }
    print(
        f"{len(files)} DICOM slices at {args.size}x{args.size} on {result['machine']}, "
        f"converted to {out_size}x{out_size}"
    )
    if phantom_rate:
        print(f"phantom generation        {phantom_rate:8.1f} slices/s (one core)")
    else:
        print("phantom generation        (cohort reused from an earlier run)")
    print(f"bare pydicom read         {bare:8.1f} slices/s")
    print(f"lung mask alone           {lung:8.1f} slices/s ({1000 / lung:.1f} ms per slice)")
    for name, r in (("convert, 1 worker", one), (f"convert, {args.workers} workers", many)):
        print(
            f"{name:<26}{r['slices_per_s']:8.1f} slices/s, peak RSS {r['peak_rss_mb']:.0f} MB "
            f"+ worker {r['peak_worker_rss_mb']:.0f} MB"
        )
    print(
        f"convert / bare read: x{result['ratio_1_worker']:.2f} (1 worker), "
        f"x{result['ratio_per_worker']:.2f} per worker with {args.workers}; "
        f"{args.workers} workers x{result['speed_up_1_to_n_workers']:.2f} of 1"
    )
    for w, r in beam.items():
        print(f"Beam DirectRunner, {w} worker(s): {r['slices_per_s']:8.1f} slices/s")
    write_figures(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
