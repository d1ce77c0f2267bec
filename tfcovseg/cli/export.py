"""``tfcovseg-export`` / ``python -m tfcovseg.export``: a training run as a SavedModel for
TF Serving (the library: `tfcovseg.export`). Its ``--version`` is the model version."""

from __future__ import annotations

from pathlib import Path

from tfcovseg import cli
from tfcovseg.constants import DEFAULT_EXPORT_DIR


def build_parser():
    parser = cli.parser(
        "export", "Export a training run as a SavedModel for TF Serving", tool_version=False
    )
    parser.add_argument("--run", type=Path, required=True, help="training run folder")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_EXPORT_DIR,
        help=f"model folder (default: {DEFAULT_EXPORT_DIR})",
    )
    parser.add_argument("--version", type=int, help="version number (default: next free)")
    parser.add_argument(
        "--gate-threshold",
        default="auto",
        help="slice gate threshold, or 'auto': the highest <= 0.5 that keeps 98%% of the "
        "validation lesion slices (default)",
    )
    cli.add_set(parser, "data.* keys only, e.g. --set data.records_dir=DIR")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.gate_threshold != "auto":
        try:
            args.gate_threshold = float(args.gate_threshold)
        except ValueError:
            return cli.fail(
                f"--gate-threshold must be a number or 'auto', got {args.gate_threshold!r}"
            )
    problem = cli.run_overrides_problem(args.overrides)
    if problem:
        return cli.fail(problem)
    from tfcovseg.inference.export import SIGNATURES, ExportError, export_run

    try:
        target = export_run(
            args.run, args.out, args.version, args.gate_threshold, overrides=args.overrides
        )
    except ExportError as e:
        return cli.fail(str(e))
    print(f"signatures: {', '.join(SIGNATURES)}")
    print(f"inspect:    saved_model_cli show --dir {target} --all")
    print(
        f"serve:      docker run -p 8501:8501 -p 8500:8500 "
        f"-v {target.parent.resolve()}:/models/{target.parent.name} "
        f"-e MODEL_NAME={target.parent.name} tensorflow/serving"
    )
    return 0
