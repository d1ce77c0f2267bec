"""``tfcovseg-train`` / ``python -m tfcovseg.train``: train the segmenter and its slice
classifier, then evaluate and export (the library: `tfcovseg.train`). The config is read
and checked here, so a bad ``--set`` answers before TensorFlow loads."""

from __future__ import annotations

import argparse
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
    cli.quiet_libraries()
    from tfcovseg.training.trainer import command

    return command(args, config)
