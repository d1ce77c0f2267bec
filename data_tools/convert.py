"""Convert CT studies into sharded TFRecords plus a manifest with patient-level folds.

    python -m data_tools.convert --input DIR --out DIR [--size 512] [--shards N]
        [--workers K] [--folds 5] [--seed S] [--classes ggo,consolidation,fibrosis]
        [--compression GZIP] [--strict] [--salt SECRET] [--default-diagnosis covid]

What it finds under ``--input``:

- DICOM CT series (grouped by SeriesInstanceUID, sorted along the slice normal), with
  lesion masks from a DICOM SEG object that references the series, or else from a NIfTI
  label volume named like ``*lesion*``, ``*mask*``, ``*seg*`` or ``*label*`` in the
  series folder or a folder above it, given to the one series whose voxel grid it fits
  (never shared, never borrowed: an ambiguous mask is skipped);
- NIfTI CT volumes, with a mask next to them named ``<stem>_mask`` (``_seg``,
  ``_lesions``, ``_label``) or with ``im`` replaced by ``mask`` (``tr_im`` -> ``tr_mask``);
- 2-D slice datasets in the COVID-SemiSeg layout: ``Imgs/N.jpg`` (already windowed 8-bit)
  with ``GT/N.png`` (0 background, 1 GGO, 2 consolidation), or without ``GT/`` (unlabelled
  slices: records with ``mask/annotated`` 0); each slice is its own patient, except that
  slices named ``<volume>_<k>`` (COVID-SemiSeg's ``Data-1_coronacases_org_001_10``) are
  one patient per volume;
- patient labels in ``manifest.csv`` or ``labels.csv`` at the input root (columns
  patient, diagnosis, severity; the phantom writes one).

What it writes to ``--out``: ``slices-XXXXX-of-YYYYY.tfrecord[.gz]`` shards (one
`tf.train.Example` per slice, spec in `data_tools.features`) and ``manifest.json`` (classes,
shards, per-patient and per-slice statistics, the fold assignment, skipped files). Shards are
written under a temporary folder and moved into place when complete, the earlier output set
aside first and the manifest last, so an interrupted run leaves the previous output intact (a
kill in that last step: the next run puts it back before it starts); re-running gives
byte-identical output and never duplicates. Identifiers are pseudonymised (`data_tools.privacy`).

Files that cannot be used (corrupt, not DICOM, not CT, not an image, an undecodable or
unsupported codec, a mask that does not fit) are skipped with their reason and listed at
the end; ``--strict`` makes any of them fatal. Nothing usable is an error (exit code 2).

This module is the command; the converter is `data_tools.conversion` (`convert` and
`ConversionError` are importable from here as well, for scripts that call it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_tools import __version__
from data_tools.conversion.discovery import ConversionError
from data_tools.conversion.pipeline import convert, print_summary
from data_tools.features import DIAGNOSES, LESION_CLASSES, SEVERITIES
from data_tools.privacy import salt_option
from data_tools.workers import oversubscribed, reuse_freed_memory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.convert",
        description="Convert DICOM / NIfTI / PNG CT studies into sharded TFRecords.",
    )
    parser.add_argument("--version", action="version", version=f"tfcovseg {__version__}")
    parser.add_argument("--input", type=Path, required=True, help="folder of studies")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--size", type=int, default=512, help="slice size of the records")
    parser.add_argument("--shards", type=int, help="number of shards (default: ~256 slices each)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    parser.add_argument(
        "--classes",
        default=",".join(LESION_CLASSES),
        help="lesion classes in label order (default: %(default)s)",
    )
    parser.add_argument("--compression", default="", choices=["", "GZIP"])
    parser.add_argument(
        "--strict",
        action="store_true",
        help="write nothing if any file is unusable or any study has a warning (all listed)",
    )
    parser.add_argument(
        "--salt",
        type=salt_option,
        help="pseudonymisation secret (default: $TFCOVSEG_SALT or "
        "~/.config/tfcovseg/pseudonym.key)",
    )
    parser.add_argument(
        "--default-diagnosis",
        default="unknown",
        choices=DIAGNOSES,
        help="diagnosis of patients missing from manifest.csv/labels.csv",
    )
    parser.add_argument("--default-severity", default="unknown", choices=SEVERITIES)
    parser.add_argument(
        "--runner",
        choices=("direct", "flink", "spark", "dataflow"),
        help='run as an Apache Beam pipeline on this runner (pip install "tfcovseg[beam]")',
    )
    parser.add_argument(
        "--pipeline-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Beam pipeline option, repeated (e.g. direct_num_workers=2, "
        "flink_master=host:8081, project=P, region=R, temp_location=gs://B/tmp)",
    )
    args = parser.parse_args(argv)
    if args.pipeline_option and not args.runner:
        parser.error("--pipeline-option needs --runner")
    if args.runner and args.workers != 1:
        parser.error(
            "--workers is the local process pool's: with --runner give the runner's "
            "parallelism as a pipeline option (--pipeline-option direct_num_workers=N)"
        )
    if args.shards is not None and args.shards < 1:
        parser.error("--shards must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    too_many = oversubscribed(args.workers)
    if too_many:
        print(f"warning: {too_many}", file=sys.stderr)
    # Mask label k is the k-th name: an empty one dropped would shift the labels after it.
    classes = tuple(c.strip() for c in args.classes.split(","))
    if not all(classes) or len(set(classes)) != len(classes):
        parser.error(f"--classes must name distinct, non-empty classes, got {args.classes!r}")
    # Names are free (a one-class "infection", a site's own), but a misspelt lesion type
    # would name the records' and every model's class for good.
    unknown = [c for c in classes if c not in (*LESION_CLASSES, "infection")]
    if unknown:
        print(
            f"warning: --classes {', '.join(unknown)}: not a lesion type of this package "
            f"({', '.join((*LESION_CLASSES, 'infection'))}); the records name the class as "
            "given (check the spelling)",
            file=sys.stderr,
        )
    try:
        summary = convert(
            args.input,
            args.out,
            args.size,
            args.shards,
            args.workers,
            args.folds,
            args.seed,
            classes,
            args.compression,
            args.strict,
            args.salt,
            args.default_diagnosis,
            args.default_severity,
            runner=args.runner,
            pipeline_options=args.pipeline_option,
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from a worker's wait
        print(
            "\ninterrupted: a conversion that did not finish leaves the output folder as "
            "it was: run the command again",
            file=sys.stderr,
        )
        return 130
    print_summary(summary)
    return 0


def run(argv=None) -> int:
    """The command line as its own process runs it (`python -m data_tools.convert`, the
    `tfcovseg-convert` script): `main`, with glibc reusing freed memory
    (`reuse_freed_memory`: the process ends with the conversion). Code that calls `main`
    in a longer-lived process keeps its allocator as it was."""
    reuse_freed_memory()
    return main(argv)


if __name__ == "__main__":
    # `python -m data_tools.convert`: run the imported module's command, not this copy's,
    # so that errors raised by code importing `data_tools.convert` (the Beam pipeline's)
    # are the classes main catches.
    from data_tools.convert import run as _run

    sys.exit(_run())
