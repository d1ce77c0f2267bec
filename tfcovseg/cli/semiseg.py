"""``tfcovseg-semiseg-benchmark`` / ``python -m tfcovseg.benchmarks.semiseg``: the
COVID-SemiSeg benchmark in Inf-Net's protocol (the library: `tfcovseg.benchmarks.semiseg`).

The benchmark trains an experiment config as ``python -m tfcovseg.train`` reads one
(``--config``, ``--set``); ``--epochs``, ``--size``, ``--intensity``, ``--semi-*`` and the
like are shortcuts for its keys. Options left out keep the experiment's value or the
benchmark's default, so none of them is restated here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tfcovseg import cli

# Options that set a key of the experiment (`tfcovseg.benchmarks.semiseg_config.SHORTCUTS`).
_SHORTCUT_OPTIONS = (
    ("--epochs", int, "train.epochs"),
    ("--patience", int, "train.early_stopping_patience"),
    ("--batch-size", int, "train.batch_size"),
    ("--learning-rate", float, "train.learning_rate"),
    ("--seed", int, "train.seed"),
)
_SEMI_OPTIONS = (
    ("--semi-method", str, "semi.method: self_training or fixmatch (semiseg's: self_training)"),
    ("--semi-rounds", int, "semi.rounds: teacher -> student rounds"),
    ("--semi-pool", int, "semi.pool: unlabelled slices drawn per round (0: all)"),
    ("--semi-keep", float, "semi.keep: the surest fraction of them kept as pseudo-labels"),
    ("--semi-epochs", int, "semi.epochs: maximum epochs per round"),
    (
        "--semi-learning-rate",
        float,
        "semi.learning_rate: the students' Adam rate (0: the teacher's)",
    ),
)


def build_parser():
    parser = cli.parser(
        "benchmarks.semiseg", "COVID-SemiSeg benchmark in Inf-Net's protocol (real CT slices)"
    )
    parser.add_argument("--train-dir", type=Path, required=True, help="Imgs/ + GT/ slices")
    parser.add_argument(
        "--test-dir",
        type=Path,
        help="test slices, Imgs/ + GT/ with 0/1/2 or infection-only 0/255 masks "
        "(default: cross-validation)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/semiseg"))
    parser.add_argument(
        "--config",
        help="the experiment trained: a built-in name or a YAML file, as tfcovseg.train "
        "reads (default: semiseg_benchmark)",
    )
    cli.add_set(parser, "e.g. --set train.epochs=40 (applied after the shortcuts below)")
    parser.add_argument("--models", help="comma-separated rows: coarse_refine, unet (default both)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--only-folds",
        help="comma-separated folds to train now (e.g. 3,4); the others stay as stored in --out",
    )
    parser.add_argument("--tta", type=int, help="test-time views: 1 (default, none) to 8")
    parser.add_argument(
        "--from-run",
        type=Path,
        help="a run's --out with the same settings but --tta: the models it kept are "
        "scored again (under this --tta) instead of trained",
    )
    parser.add_argument("--passes", type=int, help="augmented passes per epoch (default 2)")
    keys = parser.add_argument_group("shortcuts for keys of the experiment")
    keys.add_argument("--size", type=int, help="model.input_size (square, pixels)")
    for flag, kind, key in _SHORTCUT_OPTIONS:
        keys.add_argument(flag, type=kind, help=key)
    keys.add_argument(
        "--width",
        choices=("quarter", "full"),
        help="network widths: a quarter of the paper's (the quickstart's) or the paper's "
        "(for a GPU); default: the experiment's",
    )
    keys.add_argument(
        "--intensity",
        action="store_const",
        const=True,
        help="data.intensity_augment: random window / contrast / gamma / noise (every row)",
    )
    keys.add_argument(
        "--spatial",
        action="store_const",
        const=True,
        help="data.spatial_augment: random small rotation / zoom / shift (every row)",
    )
    semi = parser.add_argument_group("semi-supervised row (self-training, config key semi.*)")
    semi.add_argument("--unlabelled-dir", type=Path, help="unlabelled slices (Imgs/ without GT/)")
    for flag, kind, key in _SEMI_OPTIONS:
        semi.add_argument(flag, type=kind, help=key)
    return parser


def _experiment(args):
    """The experiment the options name (`semiseg_config.benchmark_config`), checked before
    Keras loads."""
    from tfcovseg.benchmarks import semiseg_config

    flags = [f[2:].replace("-", "_") for f, *_ in _SHORTCUT_OPTIONS + _SEMI_OPTIONS]
    shortcuts = {n: getattr(args, n) for n in ["intensity", "spatial", *flags]}
    widths = semiseg_config.WIDTH_PRESETS[args.width]() if args.width else None
    return semiseg_config.benchmark_config(
        args.config, args.overrides, size=args.size, widths=widths, **shortcuts
    )


def _parse_folds(text):
    from tfcovseg.benchmarks import semiseg_config

    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise semiseg_config.BenchmarkError(
            f"--only-folds takes fold numbers such as 3,4, got {text!r}"
        ) from None


@cli.interruptible(
    "finished folds are kept in the --out folder's folds/: the same command goes on from "
    "the last one"
)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tfcovseg.benchmarks.semiseg_config import BenchmarkError

    own = {k: getattr(args, k) for k in ("tta", "passes") if getattr(args, k) is not None}
    if args.models:
        own["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    try:
        only_folds = _parse_folds(args.only_folds)
        config = _experiment(args)
        from tfcovseg.benchmarks import semiseg

        results = semiseg.run(
            args.train_dir,
            args.out,
            test_dir=args.test_dir,
            folds=args.folds,
            unlabelled_dir=args.unlabelled_dir,
            only_folds=only_folds,
            config=config,
            log=lambda line: print(line, flush=True),  # one line per epoch, as it comes
            isolate=True,  # a process per fold: memory stays that of one fold
            from_run=args.from_run,
            **own,
        )
    except BenchmarkError as e:
        return cli.fail(str(e))
    print(semiseg.render_table(results))
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'}, predictions")
    return 0
