"""``tfcovseg-export`` / ``python -m tfcovseg.export``: a training run as a SavedModel for
TF Serving, or as ONNX for onnxruntime and Triton (``--format onnx``; the library:
`tfcovseg.export`, `tfcovseg.inference.onnx`). Its ``--version`` is the model version."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tfcovseg import cli
from tfcovseg.constants import DEFAULT_EXPORT_DIR, DEFAULT_ONNX_DIR, EXPORT_FORMATS


def build_parser():
    parser = cli.parser(
        "export",
        "Export a training run as a SavedModel for TF Serving, or as ONNX",
        tool_version=False,
    )
    parser.add_argument("--run", type=Path, required=True, help="training run folder")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"model folder (default: {DEFAULT_EXPORT_DIR}, or {DEFAULT_ONNX_DIR} with "
        "--format onnx)",
    )
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="saved_model",
        help="saved_model: TF Serving (default); onnx: model.onnx for onnxruntime / Triton "
        '(needs pip install "tfcovseg[onnx]")',
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


@cli.interruptible("the model folder holds only complete versions: run the command again")
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
    if args.format == "onnx" and importlib.util.find_spec("tf2onnx") is None:
        return cli.fail('--format onnx needs tf2onnx: pip install "tfcovseg[onnx]"')
    from tfcovseg.inference.export import SIGNATURES, ExportError, export_run

    try:
        target = export_run(
            args.run,
            args.out,
            args.version,
            args.gate_threshold,
            overrides=args.overrides,
            export_format=args.format,
        )
    except ExportError as e:
        return cli.fail(str(e))
    if args.format == "onnx":
        _print_onnx_usage(target)
        return 0
    print(f"signatures: {', '.join(SIGNATURES)}")
    print(f"inspect:    saved_model_cli show --dir {target} --all")
    print(
        f"serve:      docker run -p 8501:8501 -p 8500:8500 "
        f"-v {target.parent.resolve()}:/models/{target.parent.name} "
        f"-e MODEL_NAME={target.parent.name} tensorflow/serving"
    )
    return 0


def _print_onnx_usage(target: Path) -> None:
    repository = target.parent.parent.resolve()
    print("inputs:  hu float32 [batch, H, W] (Hounsfield units)")
    print("outputs: masks float32 [batch, H, W, classes], covid_probability float32 [batch]")
    print(f"run:     onnxruntime.InferenceSession('{target / 'model.onnx'}')")
    print(
        f"serve:   docker run -p 8000:8000 -p 8001:8001 -v {repository}:/models "
        "nvcr.io/nvidia/tritonserver:<release>-py3 tritonserver --model-repository=/models"
    )
