"""``tfcovseg-evaluate`` / ``python -m tfcovseg.evaluate``: evaluate a training run (the
library: `tfcovseg.evaluate`)."""

from __future__ import annotations

from pathlib import Path

from data_tools.folds import SPLITS
from tfcovseg import cli


def build_parser():
    parser = cli.parser("evaluate", "Evaluate a training run")
    parser.add_argument("--run", type=Path, required=True, help="run folder of tfcovseg.train")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument(
        "--fold", type=int, help="the run's fold (another fold's patients trained it: refused)"
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="probability cut-off")
    parser.add_argument(
        "--no-figures",
        action="store_true",
        help="skip the PNG figures (an earlier evaluation's of the split are removed)",
    )
    cli.add_set(parser, "data.* keys only, e.g. --set data.records_dir=DIR")
    return parser


@cli.interruptible(
    "an interrupted evaluation writes no metrics.json (the split's earlier one may be gone): "
    "run the command again"
)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    problem = cli.run_overrides_problem(args.overrides)
    if problem:
        return cli.fail(problem)
    if not (args.run / "config.yaml").is_file():
        return cli.fail(f"{args.run} is not a run folder (no config.yaml)")
    if not 0.0 < args.threshold < 1.0:
        return cli.fail(f"--threshold must be in (0, 1), got {args.threshold}")
    from tfcovseg.evaluation.run import evaluate_run, print_headline

    try:
        results = evaluate_run(
            args.run,
            args.split,
            args.fold,
            args.threshold,
            figures=not args.no_figures,
            overrides=args.overrides,
        )
    except (FileNotFoundError, ValueError) as e:
        return cli.fail(str(e))
    print_headline(results, args.run)
    return 0
