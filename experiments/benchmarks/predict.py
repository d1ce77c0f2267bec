"""The slice gate's speed-up in `tfcovseg.predict`, and per-slice CPU latency at 512 x 512.

    python experiments/benchmarks/predict.py [--model saved_models/tfcovseg] [--size 512]
        [--repeats 3] [--latency-repeats 5] [--out runs/benchmarks/predict.json]

1. End to end: a phantom COVID-19 patient (DICOM series of `--size` pixels) of whom at least
   60 % of the slices are lesion-free is predicted with the gate and with ``--no-gate``,
   alternately, `--repeats` times each, with the model already loaded; the medians and
   their ratio (no gate / gate) are reported, next to the model time alone (from the
   reports), the share of slices the gate passed and the lesion slices it dropped. The
   model is a tfcovseg export (default: the newest under saved_models/tfcovseg, which the
   quickstart writes) or a run folder.
2. Latency: the paper's network (SE-ResNet-34 coarse-refine, full widths, 512 x 512, 3
   classes; untrained, which does not change its cost) through the serving graph:
   ``classify`` (the gate), ``segment`` and ``serving_default`` on one slice, median of
   `--latency-repeats` calls after warm-up.
3. From 1 and 2, the end-to-end speed-up the gate would give the paper-size network on the
   same patient: non-model time of 1 plus each path's model time at paper size (K slices,
   P passed): (overhead + K serve) / (overhead + K classify + P segment). A projection from
   measured parts, labelled as such.

Ratios are the figures to compare across machines. Research use, not a medical device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from data_tools.phantom import make_patient, write_patient  # noqa: E402
from tfcovseg.predict import open_model, predict  # noqa: E402

LESION_FREE = 0.6


def choose_patient(size: int, start_seed: int = 0):
    """The first phantom COVID-19 patient (moderate) with >= 60 % lesion-free slices."""
    for seed in range(start_seed, start_seed + 200):
        patient = make_patient(seed, size, "covid", "moderate")
        lesion_slices = patient.lesions.reshape(len(patient.lesions), -1).max(axis=1) > 0
        if lesion_slices.any() and 1 - lesion_slices.mean() >= LESION_FREE:
            return seed, patient, lesion_slices
    raise RuntimeError("no phantom patient with enough lesion-free slices in 200 seeds")


def end_to_end(model_path, size, repeats, work: Path) -> dict:
    seed, patient, lesion_slices = choose_patient(size)
    study = work / "study"
    write_patient(patient, study, patient_id="BENCH-0001", patient_name="BENCH^PATIENT")
    t0 = time.perf_counter()
    predictor = open_model(model_path)
    load_s = time.perf_counter() - t0
    quiet = dict(salt="benchmark", log=lambda *a: None)
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
        "slices_passed": int(passed),
        "lesion_slices_dropped_by_gate": int((lesion_slices & ~gate_pass).sum()),
        "lesion_free_slices_passed": int((~lesion_slices & gate_pass).sum()),
        "repeats": repeats,
        "wall_s": median,
        "model_s": model,
        "speedup_end_to_end": median["no_gate"] / median["gate"],
        "speedup_model": model["no_gate"] / max(model["gate"], 1e-9),
        "overhead_s": statistics.median(
            [
                t - m
                for t, m in zip(
                    times["gate"] + times["no_gate"], model_times["gate"] + model_times["no_gate"]
                )
            ]
        ),
        "lesion_ml": {mode: reports[mode]["total"]["volume_ml"] for mode in ("gate", "no_gate")},
    }


def latency(repeats: int, size: int = 512) -> dict:
    """Per-slice latency of the paper-size network's serving paths (ms)."""
    import keras

    from tfcovseg.config import ModelConfig
    from tfcovseg.export import InferenceGraph
    from tfcovseg.models import build_classifier, build_model

    keras.utils.set_random_seed(0)
    config = ModelConfig(input_size=(size, size))
    segmenter = build_model(config)
    classifier = build_classifier(segmenter)
    graph = InferenceGraph(
        segmenter, classifier, {"class_names": list(config.class_names), "pre_windowed": False}
    )
    spec = [tf.TensorSpec([None, None, None], tf.float32)]
    paths = {
        "classify": tf.function(graph.classify, input_signature=spec),
        "segment": tf.function(graph.segment, input_signature=spec),
        "serve": tf.function(graph.serve, input_signature=spec),
    }
    hu = tf.constant(np.random.default_rng(0).uniform(-1100, 300, (1, size, size)), tf.float32)
    result = {"size": size, "parameters": int(segmenter.count_params()), "ms": {}}
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("saved_models/tfcovseg"))
    parser.add_argument("--size", type=int, default=512, help="phantom study size (pixels)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if not args.model.exists():
        parser.error(f"{args.model} does not exist: run the quickstart (python -m tfcovseg.train)")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "tensorflow": tf.__version__,
    }
    with tempfile.TemporaryDirectory() as work:
        e2e = end_to_end(args.model, args.size, args.repeats, Path(work))
    result["end_to_end"] = e2e
    print(
        f"{e2e['model']} (input {e2e['model_input_size']}), phantom patient seed "
        f"{e2e['patient_seed']}: {e2e['slices']} slices of {args.size}x{args.size}, "
        f"{100 * e2e['lesion_free_fraction']:.0f} % lesion-free"
    )
    print(
        f"gate (threshold {e2e['gate_threshold']:.3f}) passed {e2e['slices_passed']} slices; "
        f"lesion slices dropped {e2e['lesion_slices_dropped_by_gate']}, lesion-free passed "
        f"{e2e['lesion_free_slices_passed']}"
    )
    print(
        f"median of {args.repeats}: gate {e2e['wall_s']['gate']:.2f} s, no gate "
        f"{e2e['wall_s']['no_gate']:.2f} s -> end-to-end x{e2e['speedup_end_to_end']:.2f}; "
        f"model time {e2e['model_s']['gate']:.2f} s vs {e2e['model_s']['no_gate']:.2f} s "
        f"-> x{e2e['speedup_model']:.2f}; non-model time {e2e['overhead_s']:.2f} s"
    )
    if not args.skip_latency:
        lat = latency(args.latency_repeats)
        result["latency_512"] = lat
        k, p, o = e2e["slices"], e2e["slices_passed"], e2e["overhead_s"]
        ms = lat["ms"]
        no_gate = o + k * ms["serve"] / 1000
        gate = o + k * ms["classify"] / 1000 + p * ms["segment"] / 1000
        result["projection_paper_size"] = {
            "no_gate_s": no_gate,
            "gate_s": gate,
            "speedup": no_gate / gate,
            "model_only_speedup": (k * ms["serve"]) / (k * ms["classify"] + p * ms["segment"]),
        }
        print(
            f"paper network ({lat['parameters'] / 1e6:.1f} M parameters) at 512x512, one slice, "
            f"median of {args.latency_repeats}: classify {ms['classify']:.0f} ms, segment "
            f"{ms['segment']:.0f} ms, both {ms['serve']:.0f} ms "
            f"(segment / classify x{lat['segment_over_classify']:.2f})"
        )
        proj = result["projection_paper_size"]
        print(
            f"projected for the paper network on this patient: no gate {no_gate:.1f} s, gate "
            f"{gate:.1f} s -> x{proj['speedup']:.2f} end to end (model only "
            f"x{proj['model_only_speedup']:.2f})"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
