"""`data_tools.convert --runner direct|flink|spark|dataflow`: the conversion as an Apache
Beam pipeline (``pip install "tfcovseg[beam]"``).

The steps are the local converter's:

1. ``ReadHeaders``: the launching process only lists the input's files
   (`discovery.input_files`); the workers read their DICOM headers, 32 files an element
   (`workers.scan_chunk`: compact answers, pydicom's warnings held back);
2. ``Plan``: one element, the local converter's plan (`pipeline.plan_conversion` over
   those answers: the studies, their patients' pseudonyms, the shards); the steps after
   it see only its ``Layout`` (each study's shard, the shards' names), the final one the
   whole plan;
3. ``Convert``: one study per element, `shards.safe_process` (read, lung mask, resize,
   encode the examples), on as many workers as the runner gives;
4. ``WriteShard``: the studies of one shard, in plan order, written into the output
   folder's temporary ``.partial-*`` folder (`data_tools.tfrecord`: the bytes the local
   path writes). Step 3 leaves each study's examples in a file there and sends on only
   their manifest entries: no 1.5 MB-a-slice element travels between steps;
5. ``Manifest``: a final combine over every study's manifest entries: folds, the
   manifest, the shards moved into place, the manifest last (`pipeline.finish`).

Exactly once, deterministic: a retried bundle writes the same shard file again from the
start (step 2 owns a shard whole), and nothing appears in the output folder before the
final step, which a failed pipeline never reaches. The output is byte for byte the local
converter's (a test compares the shards and the manifest).

Input and output are local paths: with the DirectRunner as they are, with Flink, Spark or
Dataflow on a file system every worker mounts at the same path (NFS, Filestore, ...). The
workers read the studies' files and write the shards there; object-store URLs (gs://,
s3://) are not supported.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import re
from pathlib import Path

from data_tools import tfrecord, workers
from data_tools.conversion.discovery import ConversionError, input_files
from data_tools.conversion.pipeline import (
    MANIFEST,
    collect_results,
    finish,
    partial_folder,
    plan_conversion,
    spilling_jobs,
    summarize,
)
from data_tools.conversion.shards import Records, safe_process
from data_tools.conversion.swap import discard_partial
from data_tools.privacy import warning_lines

RUNNERS = {
    "direct": "DirectRunner",
    "flink": "FlinkRunner",
    "spark": "SparkRunner",
    "dataflow": "DataflowRunner",
}
INSTALL = 'pip install "tfcovseg[beam]" (Apache Beam; for Dataflow "apache-beam[gcp]")'


class _QuietImport(logging.Filter):
    """Drops Beam's import-time note about Google Cloud client libraries (a warning on
    every run, about an extra the local runners do not use)."""

    def filter(self, record):
        return "apitools not found" not in record.getMessage()


def import_beam():
    quiet = _QuietImport()
    logging.getLogger().addFilter(quiet)
    try:
        import apache_beam as beam
    except ImportError:
        raise ConversionError(f"--runner needs Apache Beam: {INSTALL}") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    return beam


def pipeline_options(runner: str, options=()):
    """Beam's options for `runner` and ``--pipeline-option KEY=VALUE`` items."""
    from apache_beam.options.pipeline_options import PipelineOptions

    if runner not in RUNNERS:
        raise ConversionError(f"--runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    args, given = [], {}
    for item in options:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConversionError(f"--pipeline-option takes KEY=VALUE, got {item!r}")
        if key == "runner":
            raise ConversionError(
                f"--pipeline-option {item!r}: choose the runner with --runner "
                f"({', '.join(RUNNERS)})"
            )
        args.append(f"--{key}={value}")
        given[key] = item
    beam_options = PipelineOptions(args, runner=RUNNERS[runner], save_main_session=False)
    _check_options(beam_options, given)
    return beam_options


def _check_options(beam_options, given: dict) -> None:
    """Beam drops an option it does not know with a log line, and answers a bad value
    with its whole usage text and exit: both become one error naming the option."""
    said, beam_log = io.StringIO(), logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # its "Discarding unparseable args": said below
    try:
        with contextlib.redirect_stderr(said):
            known = beam_options.get_all_options(retain_unknown_options=False)
    except SystemExit:  # argparse's error, after printing the usage into `said`
        lines = said.getvalue().strip().splitlines() or ["an invalid value"]
        raise ConversionError(f"--pipeline-option: {lines[-1].split('error: ', 1)[-1]}") from None
    finally:
        beam_log.setLevel(level)
    unknown = [item for key, item in given.items() if key not in known]
    if unknown:
        raise ConversionError(
            f"--pipeline-option {unknown[0]!r}: Apache Beam knows no such option (the "
            "options of each runner: https://beam.apache.org/documentation/runners/)"
        )


SCAN_CHUNK = 32  # files whose headers one element reads


def _read_headers(indexed, root):
    """Reads one chunk of headers (`workers.scan_chunk`); the chunk's index says whose."""
    index, paths = indexed
    return index, *workers.scan_chunk(paths, root)


def _plan(chunks, job, redactor, files):
    """The local converter's plan from the workers' header reads (the chunks in index
    order are the answers for ``files.candidates``, which discovery scans); their pydicom
    warnings are logged redacted once the plan has met every identity."""
    answers, held = [], []
    for _, scanned, said in sorted(chunks, key=lambda chunk: chunk[0]):
        answers += scanned
        held += said

    def scan(paths):
        if len(paths) != len(answers):  # discovery scans the listed candidates, in order
            raise RuntimeError(f"{len(answers)} header answers for {len(paths)} files")
        return answers

    plan = plan_conversion(job, redactor, scan, files)
    for line in warning_lines(held, plan.found.redactor):
        logging.warning("convert: %s", line)
    return plan


def _study_jobs(plan, partial):
    """(index, job) of every study, each leaving its examples in its own file."""
    return enumerate(spilling_jobs(plan, partial))


def _convert_study(indexed):
    """Converts one study; its examples go to its own file (`pipeline.spilling_jobs`,
    written again, identical, by a retried bundle), so that no 1.5 MB-a-slice element
    travels between the pipeline's steps."""
    index, job = indexed
    return index, safe_process(job)


def _layout(plan) -> tuple[list, list]:
    """What the shard steps need of the plan: each study's shard and the shards' names.
    Small, so every worker can hold it; the plan itself, every study's headers, is read
    by the final step alone (a side input is materialised on each worker that reads it)."""
    return [plan.shard_of(i) for i in range(len(plan.jobs))], plan.shard_names


def _write_shard(keyed, partial, layout):
    """Writes one shard whole from its studies' files, in plan order (a retry writes it
    again from the start); returns the studies' results for the manifest."""
    shard, items = keyed
    items = sorted(items, key=lambda item: item[0])
    with open(partial / layout[1][shard], "wb", buffering=0) as target:
        for _, (encoded, _, _) in items:
            if encoded is not None:
                tfrecord.append_file(Path(encoded.path), target)
    return items


def _manifest(items, job, plan, partial):
    """The final combine: the manifest's entries in plan order, then `pipeline.finish`.

    On a copy of the plan: `collect_results` adds the skipped files and the studies'
    warnings to it, and a retried step (a runner may keep the side input) added them
    twice."""
    plan = copy.deepcopy(plan)
    records = Records(partial, plan.shard_names, job.classes, job.compression, open_shards=False)
    # A shard no study went to is written empty; the others are `_write_shard`'s (a retry
    # of this step after its first try had moved them in finds them gone: `swap_in`).
    written = {plan.shard_names[plan.shard_of(i)] for i in range(len(plan.jobs))}
    for name in set(plan.shard_names) - written:
        (partial / name).touch()
    held = []
    results = [result for _, result in sorted(items, key=lambda item: item[0])]
    collect_results(job, plan, records, results, held, write=False)
    for line in warning_lines(held, plan.found.redactor):
        logging.warning("convert: %s", line)
    finish(job, records, records.close(), plan.found)


def _our_error(error: BaseException):
    """The converter's own error (`ConversionError`: --strict, nothing usable; its text
    already redacted) inside a runner's error, or None. Runners with worker processes
    (the DirectRunner's multi_processing mode, Flink, Spark, Dataflow) hand a step's
    error back as their own exception around the worker's traceback text."""
    found = re.findall(r"ConversionError: (.+)", str(error))
    return ConversionError(found[-1].strip()) if found else None


def _interrupted(error: BaseException) -> bool:
    """A Ctrl-C, also as the runner hands it back: Beam wraps the KeyboardInterrupt a step
    was stopped by in a RuntimeError ("KeyboardInterrupt [while running 'Convert']"), and
    the command printed a 100-line traceback and exited 1."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt) or re.match(r"KeyboardInterrupt\b", str(error)):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def convert_with_beam(job, redactor, runner: str, options=()) -> dict:
    """Runs the conversion `job` (`pipeline.Job`) on Beam's `runner`; returns the summary."""
    beam = import_beam()
    beam_options = pipeline_options(runner, options)
    files = input_files(job.input_dir, job.out_dir)
    names = files.candidates
    chunks = [names[i : i + SCAN_CHUNK] for i in range(0, len(names), SCAN_CHUNK)]
    partial = partial_folder(job)
    # Beam logs a failing step's traceback before raising the error; ours (--strict, say)
    # reach the command as one line, and others propagate with their traceback anyway.
    step_log = logging.getLogger("apache_beam.runners.common")
    level = step_log.level
    step_log.setLevel(logging.CRITICAL)
    try:
        with beam.Pipeline(options=beam_options) as pipeline:
            plan = (
                pipeline
                | "Files" >> beam.Create(list(enumerate(chunks)))
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadHeaders" >> beam.Map(_read_headers, job.input_dir)
                | "AllHeaders" >> beam.combiners.ToList()
                | "Plan" >> beam.Map(_plan, job, redactor, files)
            )
            the_plan = beam.pvalue.AsSingleton(plan)
            layout = beam.pvalue.AsSingleton(plan | "Layout" >> beam.Map(_layout))
            _ = (
                plan
                | "Studies" >> beam.FlatMap(_study_jobs, partial)
                | "Spread" >> beam.Reshuffle()  # one study per bundle, over all workers
                | "Convert" >> beam.Map(_convert_study)
                | "ByShard" >> beam.Map(lambda item, lay: (lay[0][item[0]], item), layout)
                | "GroupShards" >> beam.GroupByKey()
                | "WriteShard" >> beam.FlatMap(_write_shard, partial, layout)
                | "All" >> beam.combiners.ToList()
                | "Manifest" >> beam.Map(_manifest, job, the_plan, partial)
            )
    except ConversionError:
        discard_partial(job.out_dir, partial)
        raise
    except BaseException as e:
        discard_partial(job.out_dir, partial)
        if _interrupted(e):  # Ctrl-C: the command's one line and exit 130, as without Beam
            raise KeyboardInterrupt from None
        ours = _our_error(e)
        if ours is None:
            raise
        raise ours from None
    finally:
        step_log.setLevel(level)
    manifest = json.loads((job.out_dir / MANIFEST).read_text())
    return summarize(job, manifest)
