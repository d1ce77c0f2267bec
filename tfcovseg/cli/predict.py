"""``tfcovseg-predict`` / ``python -m tfcovseg.predict``: segment a CT study (the library:
`tfcovseg.predict`)."""

from __future__ import annotations

from pathlib import Path

from data_tools.privacy import salt_option
from tfcovseg import cli
from tfcovseg.constants import DISCLAIMER, INTENSITY_MODES


def build_parser():
    parser = cli.parser("predict", "Segment COVID-19 lesions in a CT study and estimate severity")
    parser.add_argument(
        "--model", type=Path, required=True, help="SavedModel (version or model folder) or run"
    )
    parser.add_argument(
        "--input",
        type=Path,
        required=True,
        help="DICOM folder, NIfTI file, or folder of windowed PNG/JPEG slices; with "
        "--runner: a .txt list of studies, a glob pattern or a folder of studies",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--no-gate", action="store_true", help="segment every slice")
    parser.add_argument(
        "--threshold", type=float, help="slice gate threshold (default: the model's)"
    )
    parser.add_argument(
        "--mask-threshold", type=float, default=0.5, help="lesion probability threshold"
    )
    parser.add_argument("--series", help="SeriesInstanceUID (or its pseudonym) to process")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per model call")
    parser.add_argument(
        "--salt", type=salt_option, help="pseudonym salt (default: $TFCOVSEG_SALT or key file)"
    )
    parser.add_argument(
        "--intensity",
        choices=INTENSITY_MODES,
        help="PNG/JPEG slices only: map each image's grey levels onto the training slices' "
        "(match, the default) or use them unchanged (as-is)",
    )
    parser.add_argument(
        "--research-seg",
        action="store_true",
        help="write the DICOM SEG with the patient's pseudonym instead of the source study's "
        "patient name, ID and birth date, without the study's free text (description, "
        "institution, physicians); UIDs still reference the source images",
    )
    parser.add_argument(
        "--runner",
        choices=("direct", "flink", "spark", "dataflow"),
        help="predict an archive of studies as an Apache Beam pipeline (RunInference) on "
        'this runner; writes summary.csv too (pip install "tfcovseg[beam]")',
    )
    parser.add_argument(
        "--pipeline-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Beam pipeline option, repeated (e.g. direct_num_workers=2)",
    )
    return parser


def _shared(args) -> dict:
    """The options a single study and an archive take alike."""
    return {
        "gate": not args.no_gate,
        "threshold": args.threshold,
        "mask_threshold": args.mask_threshold,
        "batch_size": args.batch_size,
        "salt": args.salt,
        "research_seg": args.research_seg,
    }


def _archive(args) -> int:
    if args.series or args.intensity:
        return cli.fail("--series and --intensity are single-study options: not with --runner")
    import importlib.util

    if importlib.util.find_spec("apache_beam") is None:
        return cli.fail('--runner needs Apache Beam: pip install "tfcovseg[beam]"')
    from tfcovseg.inference.archive import predict_archive
    from tfcovseg.inference.errors import PredictionError

    try:
        predict_archive(
            args.model, args.input, args.out, args.runner, args.pipeline_option, **_shared(args)
        )
    except PredictionError as e:
        return cli.fail(str(e))
    print(DISCLAIMER)
    return 0


@cli.interruptible("finished series are kept in --out: the same command goes on with the others")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        return cli.fail("--batch-size must be >= 1")
    if args.pipeline_option and not args.runner:
        return cli.fail("--pipeline-option needs --runner")
    from tfcovseg.inference.errors import PredictionError, check_thresholds

    try:  # before TensorFlow loads (seconds)
        check_thresholds(args.threshold, args.mask_threshold)
    except PredictionError as e:
        return cli.fail(str(e))
    if args.runner:
        return _archive(args)
    from tfcovseg.inference.predict import predict

    try:
        predict(
            args.model,
            args.input,
            args.out,
            series_uid=args.series,
            intensity=args.intensity,
            log=cli.say,
            **_shared(args),
        )
    except PredictionError as e:
        return cli.fail(str(e))
    print(DISCLAIMER)
    return 0
