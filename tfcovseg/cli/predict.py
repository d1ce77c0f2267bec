"""``tfcovseg-predict`` / ``python -m tfcovseg.predict``: segment a CT study (the library:
`tfcovseg.predict`)."""

from __future__ import annotations

from pathlib import Path

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
        help="DICOM folder, NIfTI file, or folder of windowed PNG/JPEG slices",
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
    parser.add_argument("--salt", help="pseudonym salt (default: $TFCOVSEG_SALT or key file)")
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
        "patient name, ID and birth date (UIDs still reference the source images)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        return cli.fail("--batch-size must be >= 1")
    from tfcovseg.inference.predict import PredictionError, predict

    try:
        predict(
            args.model,
            args.input,
            args.out,
            gate=not args.no_gate,
            threshold=args.threshold,
            mask_threshold=args.mask_threshold,
            series_uid=args.series,
            batch_size=args.batch_size,
            salt=args.salt,
            research_seg=args.research_seg,
            intensity=args.intensity,
        )
    except PredictionError as e:
        return cli.fail(str(e))
    print(DISCLAIMER)
    return 0
