"""Which frozen-encoder features separate the slice gate's classes on new patients?

    python experiments/gate_probe.py RUN_DIR RECORDS_DIR [--fold 0]

RUN_DIR holds a trained ``segmenter_best.keras`` (a quickstart run, say), RECORDS_DIR its
records (``~/.cache/tfcovseg/quickstart-128-v4/records``). Each slice of the classify task
(`tfcovseg.data.dataset.classify_label`: lesion slices of COVID-19 patients against the
lesion-free slices of COVID-19 patients and every slice of the other diagnoses) is scored
by the segmenter's maximum lesion probability and by logistic regressions on the frozen
encoder's pooled features (per level, average and max pooling), fitted on the training
split. Prints the slice AUC per split: over all its slices, over its COVID-19 patients'
slices, and its lesion slices against the other diagnoses'. docs/results-phantom.md
("Where the frozen encoder's gate fails") reports a run.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

# tfcovseg first: its TensorFlow settings (oneDNN off) before Keras loads TensorFlow.
importlib.import_module("tfcovseg")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import minimize  # noqa: E402
from scipy.stats import rankdata  # noqa: E402

from tfcovseg.data.dataset import NON_COVID, make_dataset  # noqa: E402
from tfcovseg.models import load_model  # noqa: E402
from tfcovseg.models.classifier import build_classifier  # noqa: E402

LEVELS = ("stem", "stage1", "stage2", "stage3", "stage4")
HEADS = {
    "stage 4, average (the paper's)": ["stage4_avg"],
    "stage 4, average + max": ["stage4_avg", "stage4_max"],
    "stages 2 + 3, max": ["stage2_max", "stage3_max"],
    "every level, average + max": [f"{k}_{p}" for k in LEVELS for p in ("avg", "max")],
}
SPLITS = ("train", "validation", "test")


def auc(y, score) -> float:
    """Slice AUC (ties averaged); nan without both classes."""
    pos = y > 0.5
    n1, n0 = pos.sum(), (~pos).sum()
    if not n1 or not n0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fit_logistic(x, y, l2) -> np.ndarray:
    """Weights (bias last) of a class-balanced, L2-penalised logistic regression."""
    weight = np.where(y > 0.5, (1 - y.mean()) / max(y.mean(), 1e-6), 1.0)

    def loss(w):
        p = 1 / (1 + np.exp(-(x @ w[:-1] + w[-1])))
        nll = -(weight * (y * np.log(p + 1e-9) + (1 - y) * np.log(1 - p + 1e-9))).mean()
        grad = weight * (p - y)
        return nll + l2 * (w[:-1] ** 2).sum(), np.append(
            x.T @ grad / len(y) + 2 * l2 * w[:-1], grad.mean()
        )

    return minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B").x


def collect(segmenter, features, records, split, fold):
    """(pooled features by name, label, segmenter max, non-COVID flag) of a split."""
    ds = make_dataset(
        records, split=split, fold=fold, batch_size=32, training=False, task="inspect"
    )
    rows = {"features": [], "label": [], "max": [], "non_covid": []}
    for e in ds:
        diagnosis = np.asarray(e["patient/diagnosis"]).reshape(-1).astype(str)
        annotated = np.asarray(e["mask/annotated"]).reshape(-1) > 0
        lesion = np.asarray(e["slice/label"]).reshape(-1) > 0
        non_covid = np.isin(diagnosis, NON_COVID)
        keep = annotated | non_covid  # `slice_is_usable` for the classify task
        if not keep.any():
            continue
        x = np.asarray(e["hu"])[keep][..., None]
        rows["features"].append(np.concatenate([np.asarray(f) for f in features(x)], axis=1))
        out = segmenter(x, training=False)
        final = np.asarray(out["final"] if isinstance(out, dict) else out)
        rows["max"].append(final.reshape(len(x), -1).max(axis=1))
        rows["label"].append((lesion & ~non_covid)[keep].astype(np.float32))
        rows["non_covid"].append(non_covid[keep])
    return {k: np.concatenate(v) for k, v in rows.items()}


def three_aucs(y, score, non_covid) -> str:
    covid, versus = ~non_covid, (y > 0.5) | non_covid
    return " / ".join(f"{auc(y[m], score[m]):.3f}" for m in (np.ones_like(y, bool), covid, versus))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("records", type=Path)
    parser.add_argument("--fold", type=int, default=0)
    args = parser.parse_args()
    segmenter = load_model(args.run / "segmenter_best.keras")
    classifier = build_classifier(segmenter)  # the encoder and HU window, shared
    levels = classifier.encoder(classifier.window_layer(classifier.input))
    pooled, names = [], []
    for level in LEVELS:
        pooled += [
            keras.layers.GlobalAveragePooling2D()(levels[level]),
            keras.layers.GlobalMaxPooling2D()(levels[level]),
        ]
        names += [f"{level}_avg", f"{level}_max"]
    features = keras.Model(classifier.input, pooled)
    bounds = np.cumsum([0] + [int(p.shape[-1]) for p in pooled])
    data = {s: collect(segmenter, features, args.records, s, args.fold) for s in SPLITS}
    print("slice AUC: all slices / COVID-19 patients only / lesion slices vs other diagnoses")
    for split, d in data.items():
        print(f"{split:10s} segmenter max {three_aucs(d['label'], d['max'], d['non_covid'])}")
    train = data["train"]
    for head, wanted in HEADS.items():
        cols = np.concatenate(
            [np.arange(bounds[i], bounds[i + 1]) for i, n in enumerate(names) if n in wanted]
        )
        mean, sd = train["features"][:, cols].mean(0), train["features"][:, cols].std(0) + 1e-6
        for l2 in (1e-3, 1e-2, 1e-1):
            w = fit_logistic((train["features"][:, cols] - mean) / sd, train["label"], l2)
            for split, d in data.items():
                score = ((d["features"][:, cols] - mean) / sd) @ w[:-1]
                print(
                    f"{head} (L2 {l2:g}), {split}: {three_aucs(d['label'], score, d['non_covid'])}"
                )


if __name__ == "__main__":
    main()
