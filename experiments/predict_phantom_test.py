"""Predict the test patients of a phantom fold from their DICOM series, against the truth.

    python experiments/predict_phantom_test.py [--model saved_models/tfcovseg]
        [--cache ~/.cache/tfcovseg/quickstart-128-v4] [--fold 0] [--out runs/phantom-predict]
        [--no-gate]

The phantom cohort and the records the quickstart wrote (``--cache``) say which patients
are in the fold's test split (the records hold pseudonyms made with the phantom's salt);
each test patient's DICOM series goes through `tfcovseg.predict` and the printed table
compares the predicted severity and lesion burden with the truth. Research use, not a
medical device.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from data_tools.conversion.discovery import dicom_patient_key
from data_tools.privacy import pseudonym
from tfcovseg.inference.predict import predict
from tfcovseg.inference.predictors import open_model

PHANTOM_SALT = "tfcovseg-phantom"  # tfcovseg.train converts the phantom with this salt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("saved_models/tfcovseg"))
    parser.add_argument(
        "--cache", type=Path, default=Path("~/.cache/tfcovseg/quickstart-128-v4").expanduser()
    )
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/phantom-predict"))
    parser.add_argument("--no-gate", action="store_true")
    args = parser.parse_args(argv)
    manifest = json.loads((args.cache / "records" / "manifest.json").read_text())
    test = set(manifest["folds"]["splits"][str(args.fold)]["test"])
    with (args.cache / "phantom" / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    model = open_model(args.model)
    print(f"{model.source}; severity thresholds {model.metadata['severity'].get('thresholds')}")
    t = model.metadata.get("burden_rule", {}).get("threshold")
    print(f"lesion-burden call at >= {'-' if t is None else f'{100 * t:.2f} %'} of the lungs")
    print(
        "| patient | truth | lesions, truth | verdict (rule) | severity | lesions, predicted "
        "| burden call | COVID-19 p |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i, row in enumerate(rows):
        pid = pseudonym("P", dicom_patient_key(row["patient"]), PHANTOM_SALT.encode())
        if pid not in test:
            continue
        case = f"case_{i:04d}"
        out = args.out / case
        index = predict(
            model,
            args.cache / "phantom" / case,
            out,
            gate=not args.no_gate,
            salt=PHANTOM_SALT,
            log=lambda *a: None,
        )
        report = json.loads((out / index["series"][0]["folder"] / "report.json").read_text())
        truth = 100 * sum(manifest["patients"][pid]["lesion_lung_ratio"].values())
        print(
            f"| {case} | {row['diagnosis']}, {row['severity']} | {truth:.2f} % | "
            f"{report['verdict']['call']} ({report['verdict']['rule'] or '-'}) | "
            f"{report['severity']['grade'] or '-'} | {report['total']['percent_of_lung']:.2f} % | "
            f"{_call(report['covid'].get('lesion_burden', {}).get('positive'))} | "
            f"{report['covid']['probability']:.3f} |"
        )
    return 0


def _call(positive) -> str:
    return "-" if positive is None else ("COVID-19" if positive else "no")


if __name__ == "__main__":
    sys.exit(main())
