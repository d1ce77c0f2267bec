"""``tfcovseg-serving-client`` / ``python -m tfcovseg.serving_client``: send DICOM CT slices
to a tfcovseg model behind TF Serving (the library: `tfcovseg.inference.serving_client`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tfcovseg import cli
from tfcovseg.constants import DISCLAIMER
from tfcovseg.inference.serving_client import (  # NumPy and the standard library only
    FORMS,
    HU_SIGNATURES,
    ServingError,
    checked_answer,
    export_metadata,
    hu_from_dicom,
    predict_grpc,
    predict_rest,
    rest_url,
    score_name,
)


def build_parser():
    parser = cli.parser(
        "serving_client",
        "Send a DICOM CT slice to a tfcovseg model behind TF Serving",
        tool_version=False,  # --version is the model's
    )
    parser.add_argument("--dicom", type=Path, required=True, nargs="+", help="CT slice(s)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--rest", help="REST base URL, e.g. http://localhost:8501")
    where.add_argument("--grpc", help="gRPC target, e.g. localhost:8500")
    parser.add_argument("--model", default="tfcovseg", help="model name (default tfcovseg)")
    parser.add_argument("--version", type=int, help="model version (default: the newest)")
    parser.add_argument(
        "--signature",
        choices=HU_SIGNATURES,
        default="serving_default",
        help="the export's signature that takes slices in HU (default serving_default)",
    )
    parser.add_argument("--form", choices=FORMS, default="instances", help="REST body format")
    parser.add_argument(
        "--export",
        type=Path,
        help="the served export's folder (model or version folder): its metadata names "
        "the slice score and the lesion classes",
    )
    return parser


UNNAMED = (
    "slice score: the model's covid_probability output, its slice classifier's COVID-19 "
    "probability or, for a model without a classifier, its highest lesion probability "
    "(--export DIR names which)"
)


def _line(file: str, out: dict, i: int, name: str, classes) -> str:
    """One slice's answer: its score under `name`, each class's share of pixels at 0.5."""
    parts = [file]
    if "covid_probability" in out:
        parts.append(f"{name} {float(out['covid_probability'][i]):.3f}")
    if "masks" in out:
        shares = (out["masks"][i] >= 0.5).mean(axis=(0, 1))
        labels = classes or [""] * len(shares)
        parts.append(
            "lesion pixels "
            + " ".join(f"{c} {100 * v:.2f}%".strip() for c, v in zip(labels, shares))
        )
    return ", ".join(parts)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.version is not None and args.version < 1:
        return cli.fail(f"--version must be a positive integer, got {args.version}")
    try:
        meta = export_metadata(args.export, args.version) if args.export else None
        name = score_name(meta)
        url = rest_url(args.rest, args.model, args.version) if args.rest else None
        slices = [hu_from_dicom(p) for p in args.dicom]
        sizes = {s.shape: p for s, p in zip(slices, args.dicom)}
        if len(sizes) > 1:
            named = ", ".join(f"{p} {s[0]}x{s[1]}" for s, p in list(sizes.items())[:2])
            raise ValueError(f"the slices of one request must have one size: {named}")
        hu = np.stack(slices)
        if url:
            out = predict_rest(url, hu, args.signature, args.form)
        else:
            out = predict_grpc(args.grpc, hu, args.model, args.signature, args.version)
        out = checked_answer(out, len(slices), hu.shape[1:])
    except (ValueError, ServingError, ImportError) as e:
        return cli.fail(str(e))
    classes = (meta or {}).get("class_names")
    if classes and "masks" in out and len(classes) != out["masks"].shape[-1]:
        return cli.fail(
            f"--export {args.export} names {len(classes)} lesion classes, the server "
            f"answered {out['masks'].shape[-1]}: it serves another model"
        )
    for i, path in enumerate(args.dicom):
        print(_line(path.name, out, i, name, classes))
    if meta is None and "covid_probability" in out:
        print(UNNAMED)
    print(DISCLAIMER)
    return 0
