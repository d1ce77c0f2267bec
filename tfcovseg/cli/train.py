"""``tfcovseg-train`` / ``python -m tfcovseg.train``: train the segmenter and its slice
classifier, then evaluate and export (the library: `tfcovseg.training`). The config is read
and checked here, so a bad ``--set`` answers before TensorFlow loads."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from tfcovseg import cli
from tfcovseg.configs.experiment import (
    ConfigError,
    builtin_experiment,
    builtin_experiments,
    load_config,
)
from tfcovseg.constants import DEFAULT_EXPORT_DIR

DEFAULT_EXPERIMENT = "quickstart"


def _fold(value: str):
    if value == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--fold must be an integer or 'all', got {value!r}"
        ) from None


def build_parser():
    parser = cli.parser("train", "Train the coarse-refine segmenter and its slice classifier")
    parser.add_argument(
        "--config",
        type=Path,
        help="experiment: a YAML file, or the name of a built-in one "
        f"({', '.join(builtin_experiments())}); default: {DEFAULT_EXPERIMENT}",
    )
    cli.add_set(parser)
    parser.add_argument(
        "--fold",
        type=_fold,
        help="cross-validation fold, or 'all' to train every fold and report mean +- sd "
        "(default: data.fold)",
    )
    parser.add_argument("--out", type=Path, help="run folder (default: runs/NAME-foldK-TIME)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="evaluate the test split after training (or the config's train.evaluate)",
    )
    parser.add_argument(
        "--export",
        nargs="?",
        const=str(DEFAULT_EXPORT_DIR),
        type=Path,
        metavar="DIR",
        help="export the trained run for TF Serving into DIR/<next version> "
        f"(default DIR {DEFAULT_EXPORT_DIR}; the config's train.export_dir, which the "
        "quickstart sets, does the same)",
    )
    parser.add_argument("--quiet", action="store_true", help="one line per epoch at most")
    return parser


def base_config(args):
    """The config to run: --config, the run folder's own when resuming, or the quickstart."""
    path = args.config
    if path is None and args.resume and args.out is not None:
        if (args.out / "config.yaml").is_file():
            path = args.out / "config.yaml"
    return path or builtin_experiment(DEFAULT_EXPERIMENT)


@cli.interruptible(
    "the run folder keeps what had finished (its last epoch, or all of its training once "
    "that had ended, while it was evaluated or exported): the same command with --resume "
    "goes on from there"
)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume and args.out is None:
        return cli.fail("--resume needs --out, the run folder to continue")
    overrides = list(args.overrides)
    if isinstance(args.fold, int):
        overrides.append(f"data.fold={args.fold}")
    try:
        config = load_config(base_config(args), overrides)
    except ConfigError as e:
        return cli.fail(str(e))
    if config.data.train_split == "development" and (args.evaluate or args.fold == "all"):
        return cli.fail(
            "data.train_split 'development' trains on the fold's test patients too: "
            "there is nothing left to evaluate (--evaluate, --fold all)"
        )
    return _run(args, config)


def _export_dir(args, config):
    """Where the run is exported: --export, else train.export_dir, else nowhere (None)."""
    if args.export:
        return args.export
    return Path(config.train.export_dir) if config.train.export_dir else None


def _run(args, config) -> int:
    """Trains (one fold or every fold), then evaluates and exports as asked."""
    from tfcovseg import select_cpu_kernels

    # Before anything loads TensorFlow, which reads its kernels' choice once.
    print(f"TensorFlow CPU kernels: {select_cpu_kernels(config.train.cpu_kernels)}")
    from data_tools.files import OutputError, check_output_dir
    from tfcovseg.training.trainer import TrainingError, cross_validate, train

    # A progress bar in a terminal; one short line per epoch in a log file or with --quiet.
    verbose = "auto" if sys.stdout.isatty() and not args.quiet else 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    export_dir = _export_dir(args, config)
    try:
        if args.fold == "all":
            out = args.out or Path("runs") / f"{config.name}-cv-{stamp}"
            cross_validate(config, out, resume=args.resume, verbose=verbose)
            print(f"cross-validation folder: {out}")
            print((out / "cv_report.md").read_text())
            return 0
        if export_dir is not None:  # before hours of training, not after
            check_output_dir(export_dir, "--export" if args.export else "train.export_dir")
        out = args.out or Path("runs") / f"{config.name}-fold{config.data.fold}-{stamp}"
        summary = train(config, out, resume=args.resume, verbose=verbose)
    except (OutputError, TrainingError) as e:
        return cli.fail(str(e))
    print(f"run folder: {out} ({summary['timings']['total_s']:.0f} s)")
    if not summary.get("chief", True):
        return 0  # other workers of a multi-worker run: the chief evaluates and exports
    # A finished run resumed trains nothing: it was evaluated and exported again (another
    # version of the same weights), unless those are gone.
    unchanged = args.resume and not summary.get("trained_now", True)
    if args.evaluate or config.train.evaluate:
        from tfcovseg.evaluation.run import evaluate_run, print_headline

        if unchanged and (out / "metrics.json").is_file():
            print(f"nothing trained: evaluation as before ({out / 'metrics.json'})")
        else:
            print_headline(evaluate_run(out, split="test"), out)
    if export_dir is None:
        return 0
    before = _exported_before(out) if unchanged else None
    if before is not None and before.parent.resolve() == Path(export_dir).resolve():
        print(f"nothing trained: exported before as {before}")
        return 0
    return _export(out, export_dir)


EXPORT_RECORD = "export.json"  # in a run folder: where `--export` put it last


def _exported_before(run: Path) -> Path | None:
    try:
        target = Path(json.loads((run / EXPORT_RECORD).read_text())["target"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return target if (target / "saved_model.pb").is_file() else None


def _export(run: Path, export_dir: Path) -> int:
    from data_tools.files import atomic_write_json
    from tfcovseg.inference.export import ExportError, export_run

    try:
        target = export_run(run, export_dir)
    except ExportError as e:
        return cli.fail(f"export: {e}")
    atomic_write_json(run / EXPORT_RECORD, {"target": str(target)})
    print(
        f"servable model: {target} (python -m tfcovseg.predict --model {target} "
        f"--input DICOM_DIR --out predictions)"
    )
    return 0
