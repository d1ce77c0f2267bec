"""The converter's worker processes: started light, they end with the converting process.

A spawned worker imports what its first task needs and nothing more. Discovery, the
converter's first step, gives the workers header reads (`scan_chunk`), which need pydicom
and NumPy only, and this module imports nothing else: a worker reads headers 0.23 s after
the pool starts it on the 2-core machine, against 0.29 s when it loaded OpenCV, nibabel
and the converter first. Discovery of a 1,035-slice job takes 0.65 s in one process, so
the earlier a second one helps the better. The first study a worker converts imports
the rest.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from data_tools import dicom_io
from data_tools.privacy import held_warnings, locate


def scan_chunk(paths, root=None) -> tuple[list, list]:
    """Scans files (in a worker, or here); returns them and the warnings they raised (held
    back for the converter to show redacted), each marked with its file (relative to
    `root` when given)."""
    scanned = []
    with held_warnings() as held:
        for path in paths:
            before = len(held)
            scanned.append(dicom_io.scan_compact(path))
            if len(held) > before:
                where = path.relative_to(root).as_posix() if root is not None else str(path)
                locate(held, before, where)
    return scanned, list(held)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers and `taskset`
    narrow; `os.cpu_count` counts the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def oversubscribed(workers: int) -> str | None:
    """Why `workers` processes will not run faster than fewer, or None when they may."""
    cpus = usable_cpus()
    if workers <= cpus:
        return None
    return (
        f"--workers {workers} on {cpus} usable CPU(s): the workers beyond {cpus} share "
        "them, adding memory and start-up time, not speed"
    )


def _started() -> None:
    """A first task: submitting it makes the pool start a worker."""


def reuse_freed_memory() -> int:
    """Lets glibc keep the memory a study frees for the next study: arrays up to 64 MB
    (32 MB where glibc refuses more) from the heap, and up to 256 MB freed there kept.
    Returns the size up to which arrays now come from the heap (0: nothing changed; not
    Linux with glibc).

    A converter allocates and frees each study's volumes and masks (tens of MB). By
    default glibc maps most such arrays afresh and gives them back when freed, and the
    kernel zero-fills every page again: a pool worker spent 2.0 s of its 5 s in the
    kernel, 215,000 page faults for 500 slices of 512x512; with these settings 35,000
    and 1.1 s. Called in the pool's worker processes and by the command line (`run`), not
    by `convert` or `main`: it changes the calling process's allocator for good.
    """
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD (-3): glibc 2.36 takes 64 MB, older ones at most 32 MB. Setting
        # it turns off glibc's own adjustment of both thresholds, so the trim threshold
        # (M_TRIM_THRESHOLD, -1) is set only once it was taken.
        for threshold in (64 << 20, 32 << 20):
            if libc.mallopt(-3, threshold):
                libc.mallopt(-1, 256 << 20)
                return threshold
    except (OSError, AttributeError):  # not glibc (musl, say)
        pass
    return 0


def _start_worker(parent: int) -> None:
    """Worker initializer (`_die_with_parent`, `reuse_freed_memory`). A worker ignores
    Ctrl-C: a terminal sends it to the whole process group, and the converter, which
    handles it, stops the workers (`worker_pool`); each would print a traceback. It
    started with SIGINT blocked (`_interrupts_held`), so one that came while it imported
    is dropped here."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    reuse_freed_memory()
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """The worker ends when the converting process does.

    A parent killed with SIGKILL cannot shut its pool down, and the workers would go on
    converting for nobody. Linux delivers SIGKILL to the worker when its parent dies
    (prctl PR_SET_PDEATHSIG); elsewhere, and as a safety net, a thread checks every
    second whether the parent is still there.
    """
    import signal
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PDEATHSIG
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(1)

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


@contextlib.contextmanager
def worker_pool(workers: int):
    """The worker processes besides this one (None for one worker: all in this process),
    started at once; each imports what its tasks need as they come. They end with this
    process, even when it is killed (`_die_with_parent`)."""
    if workers <= 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")  # never fork a process that holds TF
    with ProcessPoolExecutor(
        workers - 1, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),)
    ) as pool:
        with _main_script_hidden(), _interrupts_held():
            for _ in range(workers - 1):  # each submit starts a worker while none is idle
                pool.submit(_started)
        try:
            yield pool
        except BaseException:
            _stop_now(pool)
            raise


def _stop_now(pool: ProcessPoolExecutor) -> None:
    """Ends the workers of a conversion that failed or was interrupted: leaving the
    `with`, the pool would first convert every study queued to it, for nothing."""
    # Before Python 3.14 (`kill_workers`) the executor names its processes only in a
    # private attribute; without it, shutdown alone still cancels the queued studies.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(OSError, ValueError):
            process.kill()
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            process.join(5)


@contextlib.contextmanager
def _interrupts_held():
    """SIGINT blocked in this thread while it starts workers: a spawned process inherits
    the mask, and one that Python would turn into a KeyboardInterrupt traceback while the
    worker still imports waits until its initializer ignores it (`_start_worker`). Here
    it is delivered once the workers are started."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextlib.contextmanager
def _main_script_hidden():
    """Workers started here do not run the calling script again. A spawned process
    imports the parent's main module to find functions defined there; ours are all in
    this package, and a script's own imports and top-level code (TensorFlow, say) cost
    each worker seconds and 600 MB: from such a script, 2 workers took 6.4-7.1 s to
    convert 1,035 slices and 1 worker 4.4 s. A bare stand-in is the main module while
    the workers start (multiprocessing reads it then, in this thread)."""
    import types

    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is None:
            del sys.modules["__main__"]
        else:
            sys.modules["__main__"] = main


def ordered_map(fn, items, pool, workers: int, pool_items=None, hold=None, redo=False):
    """map(fn, items) in order, in `pool` (None: all here) and here alike.

    This process is one of the `workers`: while the next result in order is not ready, it
    runs the next item nobody has started (`items[i]`; a study it converts is written
    straight to its shard when its turn comes) instead of waiting, so the work shares
    itself out whatever the items' sizes; the pool gets `pool_items[i]` (a study's version
    that leaves its examples in a file), at most two per pool worker ahead, and at most
    `hold` results (default two per worker) wait here. With `redo` (items without side
    effects, such as header reads), this process runs the next item in order itself when
    nothing else is left to start, rather than wait for a pool worker that has not
    finished it: a spawned worker is still importing for its first second or more (for
    seconds when the main module imports TensorFlow), and the work would stall on it.
    """
    items = list(items)
    if pool is None:
        yield from map(fn, items)
        return
    pool_items = items if pool_items is None else pool_items
    hold = 2 * workers if hold is None else hold
    started, pending, done = 0, {}, {}

    def top_up():  # before anything else here: an idle pool worker waits for this process
        nonlocal started
        while started < len(items) and len(pending) < 2 * (workers - 1):
            pending[started] = pool.submit(fn, pool_items[started])
            started += 1

    for head in range(len(items)):
        top_up()
        while head not in done and not (head in pending and pending[head].done()):
            if started == len(items) or len(done) >= hold:
                if redo and started == len(items):
                    pending.pop(head).cancel()  # when it has started, its answer is dropped
                    done[head] = fn(items[head])
                break  # else enough held here: wait for the pool
            done[started] = fn(items[started])
            started += 1
            top_up()
        yield done.pop(head) if head in done else pending.pop(head).result()
