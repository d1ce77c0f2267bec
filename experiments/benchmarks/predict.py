"""The slice gate's speed-up in `tfcovseg.predict`, and per-slice CPU latency at 512 x 512.

    python experiments/benchmarks/predict.py [--model saved_models/tfcovseg] [--size N]
        [--repeats 3] [--latency-repeats 5] [--out runs/benchmarks/predict.json]

Each part predicts a mild phantom COVID-19 patient (a DICOM series) of whom at least 60 %
of the slices are lesion-free, with the gate and with ``--no-gate`` alternately,
`--repeats` times each, the model already loaded; medians and their ratio (no gate / gate)
are reported, end to end (reading, lung masks, inference, NIfTI, DICOM SEG, overlay,
reports) and for the model calls alone.

1. Trained model, real gate: a tfcovseg export (default: the newest under
   saved_models/tfcovseg, which the quickstart writes) or a run folder, on a patient of
   the model's input size (`--size`), as trained; with the share of slices the gate passed
   and the lesion slices it dropped.
2. Latency: the paper's network (SE-ResNet-34 coarse-refine, full widths, 512 x 512, 3
   classes; untrained, which does not change its cost) through the serving graph:
   ``classify`` (the gate), ``segment`` and ``serving_default`` on one slice, median of
   `--latency-repeats` calls after warm-up.
3. The paper's network at 512 x 512 end to end, with an oracle gate: the classifier runs
   on every slice (its full cost) but the decision is the truth (a lesion on the slice),
   so exactly the lesion slices are segmented, as a perfect gate would do. This is the
   speed-up the gate can give the paper's network on such a patient.

Ratios are the figures to compare across machines. Research use, not a medical device.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# tfcovseg first: its TensorFlow settings (oneDNN off, a quiet start) before TensorFlow loads.
importlib.import_module("tfcovseg")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import write_figures  # noqa: E402  (experiments/benchmarks/common.py)

from data_tools.phantom import make_patient, write_patient  # noqa: E402
from tfcovseg.inference.predict import predict  # noqa: E402
from tfcovseg.inference.predictors import open_model  # noqa: E402

LESION_FREE = 0.6


def choose_patient(size: int, start_seed: int = 0):
    """The first phantom COVID-19 patient (mild: multifocal lesions on a few slices) with
    >= 60 % lesion-free slices."""
    for seed in range(start_seed, start_seed + 200):
        patient = make_patient(seed, size, "covid", "mild")
        lesion_slices = patient.lesions.reshape(len(patient.lesions), -1).max(axis=1) > 0
        if lesion_slices.any() and 1 - lesion_slices.mean() >= LESION_FREE:
            return seed, patient, lesion_slices
    raise RuntimeError("no phantom patient with enough lesion-free slices in 200 seeds")


def _paper_graph(size=512):
    import keras

    from tfcovseg.configs.experiment import ModelConfig
    from tfcovseg.inference.export import InferenceGraph
    from tfcovseg.models import build_classifier, build_model

    keras.utils.set_random_seed(0)
    config = ModelConfig(input_size=(size, size))
    segmenter = build_model(config)
    graph = InferenceGraph(
        segmenter,
        build_classifier(segmenter),
        {"class_names": list(config.class_names), "pre_windowed": False},
    )
    return graph, config, int(segmenter.count_params())


class OracleGatePredictor:
    """The paper's network with the truth as the gate's decision (the classifier still runs).

    `tfcovseg.predict` scores the slices in order, once per gated call, so the k-th slice
    scored gets the k-th truth value (modulo the number of slices).
    """

    def __init__(self, lesion_slices, size=512):
        graph, config, self.parameters = _paper_graph(size)
        spec = [tf.TensorSpec([None, None, None], tf.float32)]
        self._classify = tf.function(graph.classify, input_signature=spec)
        self._segment = tf.function(graph.segment, input_signature=spec)
        self._serve = tf.function(graph.serve, input_signature=spec)
        self.truth = np.asarray(lesion_slices, bool)
        self._next = 0
        self.source = "paper network (untrained) with an oracle gate"
        self.metadata = {
            "class_names": list(config.class_names),
            "hu_window": list(config.hu_window),
            "input_size": [size, size],
            "pre_windowed": False,
            "gate": {"threshold": 0.5, "method": "oracle"},
            "severity": {"fitted": False, "thresholds": None},
            "model_version": None,
        }

    def classify(self, hu):
        self._classify(tf.constant(hu))["covid_probability"].numpy()  # the real cost
        k = np.arange(self._next, self._next + len(hu)) % len(self.truth)
        self._next = (self._next + len(hu)) % len(self.truth)
        return self.truth[k].astype(np.float32)

    def segment(self, hu):
        return self._segment(tf.constant(hu))["masks"].numpy()

    def serve(self, hu):
        out = self._serve(tf.constant(hu))
        return out["covid_probability"].numpy(), out["masks"].numpy()


def end_to_end(model_path, size, repeats, work: Path, oracle=False, threshold=None) -> dict:
    """Gate against no gate on one phantom patient; `model_path` None: the oracle run."""
    t0 = time.perf_counter()
    predictor = None if oracle else open_model(model_path)
    if size is None:
        size = int(predictor.metadata["input_size"][0])
    seed, patient, lesion_slices = choose_patient(size)
    study = work / "study"
    write_patient(patient, study, patient_id="BENCH-0001", patient_name="BENCH^PATIENT")
    if oracle:
        predictor = OracleGatePredictor(lesion_slices, size)
    load_s = time.perf_counter() - t0
    quiet = dict(salt="benchmark", log=lambda *a: None, threshold=threshold)
    predict(predictor, study / "ct", work / "warmup", gate=True, **quiet)  # traces, caches
    predict(predictor, study / "ct", work / "warmup2", gate=False, **quiet)
    times = {"gate": [], "no_gate": []}
    model_times = {"gate": [], "no_gate": []}
    reports = {}
    for r in range(repeats):
        for mode in ("gate", "no_gate"):
            out = work / f"{mode}-{r}"
            start = time.perf_counter()
            index = predict(predictor, study / "ct", out, gate=mode == "gate", **quiet)
            times[mode].append(time.perf_counter() - start)
            report = json.loads((out / index["series"][0]["folder"] / "report.json").read_text())
            model_times[mode].append(report["timings_s"]["inference"])
            reports[mode] = report
    passed = reports["gate"]["gate"]["slices_segmented"]
    probs = np.array(reports["gate"]["covid"]["slice_probabilities"])
    gate_pass = probs >= reports["gate"]["gate"]["threshold"]
    median = {k: statistics.median(v) for k, v in times.items()}
    model = {k: statistics.median(v) for k, v in model_times.items()}
    return {
        "model": predictor.source,
        "model_input_size": predictor.metadata.get("input_size"),
        "model_load_s": load_s,
        "patient_seed": seed,
        "study_size": size,
        "slices": int(len(lesion_slices)),
        "lesion_free_fraction": float(1 - lesion_slices.mean()),
        "gate_threshold": reports["gate"]["gate"]["threshold"],
        "gate_method": (
            predictor.metadata["gate"].get("method") if threshold is None else "--threshold"
        ),
        "slices_passed": int(passed),
        "lesion_slices_dropped_by_gate": int((lesion_slices & ~gate_pass).sum()),
        "lesion_free_slices_passed": int((~lesion_slices & gate_pass).sum()),
        "repeats": repeats,
        "wall_s": median,
        "model_s": model,
        "speedup_end_to_end": median["no_gate"] / median["gate"],
        "speedup_model": model["no_gate"] / max(model["gate"], 1e-9),
        # Reading, lung masks, resampling and writing the outputs: the same work either way.
        "io_s": {
            mode: statistics.median([t - m for t, m in zip(times[mode], model_times[mode])])
            for mode in times
        },
        "lesion_ml": {mode: reports[mode]["total"]["volume_ml"] for mode in ("gate", "no_gate")},
    }


def latency(repeats: int, size: int = 512) -> dict:
    """Per-slice latency of the paper-size network's serving paths (ms)."""
    graph, _, parameters = _paper_graph(size)
    spec = [tf.TensorSpec([None, None, None], tf.float32)]
    paths = {
        "classify": tf.function(graph.classify, input_signature=spec),
        "segment": tf.function(graph.segment, input_signature=spec),
        "serve": tf.function(graph.serve, input_signature=spec),
    }
    hu = tf.constant(np.random.default_rng(0).uniform(-1100, 300, (1, size, size)), tf.float32)
    result = {"size": size, "parameters": parameters, "ms": {}}
    for fn in paths.values():
        for _ in range(2):
            fn(hu)  # trace and warm up
    samples = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():  # interleaved: drift hits all paths alike
            start = time.perf_counter()
            out = fn(hu)
            _ = [v.numpy() for v in out.values()]
            samples[name].append(time.perf_counter() - start)
    result["ms"] = {k: 1000 * statistics.median(v) for k, v in samples.items()}
    result["segment_over_classify"] = result["ms"]["segment"] / result["ms"]["classify"]
    return result


def _print_run(title, e2e, repeats):
    print(
        f"{title}: {e2e['model']} (input {e2e['model_input_size']}), phantom patient seed "
        f"{e2e['patient_seed']}: {e2e['slices']} slices of {e2e['study_size']}x"
        f"{e2e['study_size']}, {100 * e2e['lesion_free_fraction']:.0f} % lesion-free"
    )
    print(f"  gate: {e2e['gate_method']}")
    print(
        f"  gate (threshold {e2e['gate_threshold']:.3f}) passed {e2e['slices_passed']} slices; "
        f"lesion slices dropped {e2e['lesion_slices_dropped_by_gate']}, lesion-free passed "
        f"{e2e['lesion_free_slices_passed']}"
    )
    print(
        f"  median of {repeats}: gate {e2e['wall_s']['gate']:.2f} s, no gate "
        f"{e2e['wall_s']['no_gate']:.2f} s -> end to end x{e2e['speedup_end_to_end']:.2f}; "
        f"model calls {e2e['model_s']['gate']:.2f} s vs {e2e['model_s']['no_gate']:.2f} s "
        f"-> x{e2e['speedup_model']:.2f}; everything else {e2e['io_s']['gate']:.2f} s vs "
        f"{e2e['io_s']['no_gate']:.2f} s"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("saved_models/tfcovseg"))
    parser.add_argument("--size", type=int, help="part 1 study size (default: model input)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--skip-paper", action="store_true", help="part 1 only")
    parser.add_argument("--threshold", type=float, help="part 1 gate threshold (default: model's)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if not args.model.exists():
        parser.error(f"{args.model} does not exist: run the quickstart (python -m tfcovseg.train)")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "tensorflow": tf.__version__,
    }
    with tempfile.TemporaryDirectory() as work:
        result["trained_gate"] = end_to_end(
            args.model, args.size, args.repeats, Path(work), threshold=args.threshold
        )
    _print_run("1. trained model, real gate", result["trained_gate"], args.repeats)
    if not args.skip_paper:
        lat = latency(args.latency_repeats)
        result["latency_512"] = lat
        ms = lat["ms"]
        print(
            f"2. paper network ({lat['parameters'] / 1e6:.1f} M parameters) at 512x512, one "
            f"slice, median of {args.latency_repeats}: classify {ms['classify']:.0f} ms, segment "
            f"{ms['segment']:.0f} ms, both {ms['serve']:.0f} ms (segment / classify "
            f"x{lat['segment_over_classify']:.2f})"
        )
        with tempfile.TemporaryDirectory() as work:
            result["paper_oracle_gate"] = end_to_end(
                None, 512, args.repeats, Path(work), oracle=True
            )
        _print_run(
            "3. paper network at 512, oracle gate", result["paper_oracle_gate"], args.repeats
        )
    write_figures(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
