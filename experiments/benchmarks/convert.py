"""DICOM -> TFRecord conversion speed and memory, against bare pydicom reads.

    python experiments/benchmarks/convert.py [--patients 68] [--size 512] [--workers 2]
        [--records-size 128] [--records-dir /dev/shm/records] [--repeats 2] [--beam]
        [--out runs/benchmarks/convert.json]

In one run, on a phantom cohort of about 2000 slices at 512x512 (generated once into
``runs/benchmarks/cohort-<size>-<patients>`` and reused; a job of 2000 slices, not 1000, so
that the half-second a spawned worker takes to start does not decide the speed-up of a
second worker, which is for archives of millions of slices: docs/benchmarks.md):

1. phantom generation rate (slices/s on one core; target >= 50 at 512x512);
2. bare read: ``pydicom.dcmread(f).pixel_array`` of every file, in a fresh process,
   files in the page cache (a first pass warms it; the best of ``--repeats`` passes
   counts), with glibc's default allocator and with the converter's settings
   (`data_tools.workers.reuse_freed_memory`); and in ``--workers`` processes at once, each
   reading its share: the speed-up this machine gives the bare read (its memory and caches
   are shared: a NumPy loop over large arrays gains x1.74 from a second process here, a
   pure Python loop x1.92), the ceiling against which to read the converter's;
3. the lung mask alone (`data_tools.lung.lung_mask` on each series' HU volume, one core;
   issue 22's target: <= 5 ms per 512x512 slice);
4. ``python -m data_tools.convert`` (its ``run``, in a fresh process: no TensorFlow) with
   one worker and with ``--workers`` workers: slices/s, the ratio to the bare read rate per
   worker (issue 22's target: >= 0.2), the speed-up from 1 to ``--workers`` workers
   (target >= 1.7 with 2), and the peak resident memory of the converting process and of
   its largest worker (target: <= 2 GB in all for a 1000-slice cohort).

1 and N workers run in turn ``--repeats`` times; the best of each is reported, and the
median of the N-worker run's ratio to the 1-worker run before it (runs on this shared
host vary by +-15 %). The 1.6 GB of shards go to ``--records-dir`` (default
``runs/benchmarks/records-...``): on this machine's disk their writing made a run vary by
+-20 %, so give a RAM folder (``/dev/shm/...``) to measure the converter's computation
alone; each run starts with the previous run's records removed (untimed). ``--beam``
also runs the conversion on Apache Beam's DirectRunner, in-process and with ``--workers``
processes.
``--records-size`` converts to another size than the cohort's (the resize included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import write_figures  # experiments/benchmarks/common.py

ROOT = Path(__file__).resolve().parents[2]

_CONVERT = """
import contextlib, io, json, re, resource, sys, time
from data_tools.convert import run  # as `python -m data_tools.convert` runs, no TensorFlow
cohort, out, size, workers = sys.argv[1:5]
runner = sys.argv[5] if len(sys.argv) > 5 else None
argv = ["--input", cohort, "--out", out, "--size", size, "--salt", "benchmark"]
if runner:
    argv += ["--runner", runner]
    if workers != "1":
        argv += ["--pipeline-option", "direct_num_workers=" + workers,
                 "--pipeline-option", "direct_running_mode=multi_processing"]
else:
    argv += ["--workers", workers]
start = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()) as printed:
    code = run(argv)
seconds = time.perf_counter() - start
if code:
    sys.exit(code)
slices = int(re.search(r"series[)], ([0-9]+) slices", printed.getvalue()).group(1))
# This process's own peak (VmHWM): Linux's ru_maxrss of a process started by fork and exec
# begins at its parent's size at the fork (the benchmark's, holding the lung volumes: 2 GB).
# A pool worker's (RUSAGE_CHILDREN) begins at this process's size when it started it, early.
status = open("/proc/self/status").read() if sys.platform.startswith("linux") else ""
hwm = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
self_kb = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "slices": slices,
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


_BARE = """
import json, sys, time
from pathlib import Path
import pydicom
cohort, repeats, allocator, part, parts, start_at, slot = sys.argv[1:8]
files = sorted(Path(cohort).rglob("*.dcm"))[int(part) :: int(parts)]
if allocator == "reuse":
    from data_tools.workers import reuse_freed_memory
    reuse_freed_memory()
for f in files:  # once to warm the page cache: the converter runs warm too
    pydicom.dcmread(f).pixel_array
passes = []
for i in range(int(repeats)):  # each pass at its slot, when the other processes start theirs
    time.sleep(max(0.0, float(start_at) + i * float(slot) - time.time()))
    start = time.time()
    for f in files:
        pydicom.dcmread(f).pixel_array
    passes.append((start, time.time()))
print(json.dumps({"files": len(files), "passes": passes}))
"""


def _bare_read(cohort: Path, repeats: int, allocator: str, processes: int = 1) -> float:
    """Slices/s of ``pydicom.dcmread(f).pixel_array``, the best of `repeats` passes, in
    fresh processes: with glibc's default allocator ("default") or with the converter's
    settings ("reuse": `data_tools.workers.reuse_freed_memory`). The two differ by up to 2x
    here, as did the same loop run after other work in one process (2026-12-05: 689 to
    1,663 slices/s), which is why neither runs in this process. With several `processes`
    each reads its share of the files and they start each pass together: what the
    machine gives a second process on this work (its memory and caches are shared)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    count = len(list(cohort.rglob("*.dcm")))
    slot = 1.5 * count / 500  # seconds: a pass of all files at 500 slices/s or more
    start_at = time.time() + 2.0 + 0.5 * count / 300  # after each has warmed its files
    args = [str(cohort), str(repeats), allocator, "", str(processes), str(start_at), str(slot)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BARE, *args[:3], str(k), *args[4:]],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )  # fmt: skip
        for k in range(processes)
    ]
    answers = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a bare read process failed")
    files = sum(a["files"] for a in answers)
    spans = [
        max(a["passes"][i][1] for a in answers) - min(a["passes"][i][0] for a in answers)
        for i in range(repeats)
    ]
    return files / min(spans)


def _lung_alone(files, repeats: int) -> float:
    """`lung_mask` alone over each series' HU volume (read before timing), on one core,
    the best of `repeats` passes (one pass varied from 2.2 to 4.2 ms a slice here)."""
    import cv2

    from data_tools.dicom_io import read_hu
    from data_tools.lung import lung_mask
    from data_tools.workers import reuse_freed_memory

    cv2.setNumThreads(1)  # one core, as one converter worker
    reuse_freed_memory()  # as in the converter
    by_series: dict[Path, list] = {}
    for f in files:
        by_series.setdefault(f.parent, []).append(read_hu(f))
    volumes = [np.stack(slices) for slices in by_series.values()]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for volume in volumes:
            lung_mask(volume)
        best = min(best, time.perf_counter() - start)
    return len(files) / best


def _convert(cohort: Path, out: Path, size: int, workers: int, runner: str = "") -> dict:
    """One conversion into `out` emptied of the previous run's records first, untimed:
    replacing 1.6 GB of them added 0.3 s to a 2.6 s run here (freeing their pages). Only
    the converter's own files go (shards, manifest, temporary folders)."""
    for old in [*out.glob("slices-*.tfrecord*"), out / "manifest.json"]:
        old.unlink(missing_ok=True)
    for partial in out.glob(".partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
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
    parser.add_argument("--patients", type=int, default=68)
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
    bare = _bare_read(cohort, args.repeats, "default")
    bare_reuse = _bare_read(cohort, args.repeats, "reuse")
    bare_many = _bare_read(cohort, args.repeats, "default", args.workers)
    lung = _lung_alone(files, args.repeats)
    out_size = args.records_size or args.size
    records = (
        args.records_dir or ROOT / "runs" / "benchmarks" / f"records-{args.size}-{args.patients}"
    )
    runs = {1: [], args.workers: []}
    for _ in range(args.repeats):
        for workers in runs:
            runs[workers].append(_convert(cohort, records, out_size, workers))
    one, many = (max(runs[w], key=lambda r: r["slices_per_s"]) for w in runs)
    # Runs here vary by +-15 % (a shared host): each repeat's N-worker run against the
    # 1-worker run just before it, the median of those ratios beside the best against best.
    paired = statistics.median(
        n["slices_per_s"] / o["slices_per_s"] for o, n in zip(runs[1], runs[args.workers])
    )
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
        "bare_read_reusing_memory_slices_per_s": bare_reuse,
        f"bare_read_{args.workers}_processes_slices_per_s": bare_many,
        "bare_read_speed_up": bare_many / bare,
        "lung_mask_alone_slices_per_s": lung,
        "lung_mask_ms_per_slice": 1000 / lung,
        "convert_1_worker": one,
        f"convert_{args.workers}_workers": many,
        "ratio_1_worker": one["slices_per_s"] / bare,
        "ratio_per_worker": many["slices_per_s"] / args.workers / bare,
        "ratio_1_worker_to_bare_read_reusing_memory": one["slices_per_s"] / bare_reuse,
        "speed_up_1_to_n_workers": many["slices_per_s"] / one["slices_per_s"],
        "speed_up_median_of_pairs": paired,
        "runs": {str(w): [round(r["slices_per_s"], 1) for r in rs] for w, rs in runs.items()},
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
    print(f"bare pydicom read         {bare:8.1f} slices/s ({bare_reuse:.1f} reusing memory)")
    print(
        f"bare read, {args.workers} processes  {bare_many:8.1f} slices/s "
        f"(x{bare_many / bare:.2f} of one: what this machine gives a second process)"
    )
    print(f"lung mask alone           {lung:8.1f} slices/s ({1000 / lung:.1f} ms per slice)")
    for name, r in (("convert, 1 worker", one), (f"convert, {args.workers} workers", many)):
        print(
            f"{name:<26}{r['slices_per_s']:8.1f} slices/s, peak RSS {r['peak_rss_mb']:.0f} MB "
            f"+ worker {r['peak_worker_rss_mb']:.0f} MB"
        )
    print(
        f"convert / bare read: x{result['ratio_1_worker']:.2f} (1 worker; "
        f"x{result['ratio_1_worker_to_bare_read_reusing_memory']:.2f} of the read reusing "
        f"memory), x{result['ratio_per_worker']:.2f} per worker with {args.workers}; "
        f"{args.workers} workers x{result['speed_up_1_to_n_workers']:.2f} of 1 "
        f"(best against best; median of {args.repeats} pairs x{paired:.2f})"
    )
    for w, r in beam.items():
        print(f"Beam DirectRunner, {w} worker(s): {r['slices_per_s']:8.1f} slices/s")
    write_figures(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
