"""Run a trained model on a CT study: gated segmentation, masks, DICOM SEG, overlays, report.

    python -m tfcovseg.predict --model (saved_models/tfcovseg[/N] | runs/NAME)
        --input (DICOM folder | NIfTI volume | PNG/JPEG folder) --out DIR [--no-gate]
        [--threshold T] [--mask-threshold 0.5] [--series UID] [--batch-size 8]

The study is read with `data_tools` exactly as training data are (DICOM grouping and
sorting along the slice normal, Hounsfield units, padding, the NIfTI orientation, the
classical lung mask). The slice classifier (the gate; for a model without one, whose export
records ``slice_score: lesion``, the highest lesion probability) scores every slice; only
slices at or above the gate threshold are segmented (``--no-gate`` segments all), in
batches. Per series, into ``OUT/<series pseudonym>/``:

- ``lesions.nii.gz``: one label volume (0 background, 1.. the classes in the model's order)
  on the DICOM series' grid and affine (a NIfTI input: its voxels in the closest canonical
  RAS+ orientation, the same physical space); ``probability_<class>.nii.gz``: per-class
  probabilities;
- ``segmentation.dcm``: a DICOM SEG object (highdicom) referencing the source series
  (DICOM input only; as DICOM requires, it carries the source's patient module);
- ``overlay.png``: a montage of the slices with the most lesion (red GGO, green
  consolidation, blue fibrosis);
- ``report.json`` and ``report.html``: per lesion type the volume in mL and the percentage
  of lung volume, the slices with lesions, one patient-level verdict with the rule that
  made it (`tfcovseg.evaluation.verdict`: the slice classifier's any-slice rule, or the
  highest lesion probability's for a model without one, when the export validated it,
  else the lesion burden) and the other rule's figure as evidence, the
  severity grade for a patient called COVID-19 from the thresholds fitted on the
  training and validation patients (`tfcovseg.evaluation.severity`), the
  model version, what was skipped and why, and "Research use, not a medical device."

A folder of windowed 2-D PNG/JPEG slices (COVID-SemiSeg's, Inf-Net's) goes to
`tfcovseg.inference.images`: label and probability PNGs named like the inputs, and a report,
in ``OUT/<folder pseudonym>/``.

``OUT/index.json`` lists the series processed and the files skipped. File and folder names
carry pseudonyms only. Files that cannot be used (not DICOM, not CT, corrupt, undecodable)
and slices beyond a gap in the slice positions are skipped with a warning and listed in the
report; nothing usable is an error (exit code 2).

This module runs the steps per series and keeps the output folder (the index, reruns);
the steps live beside it: `studies` reads the input, `predictors` loads the model,
`measures` measures, `outputs` writes the NIfTI volumes and the DICOM SEG, `report_html`
draws the overlay and the page.

Research use, not a medical device.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path

import numpy as np

from data_tools.files import (
    OutputError,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    exclusive_folder,
    remove_partial_directories,
)
from data_tools.lung import LESION_RULE
from data_tools.privacy import Redactor, pseudonym, redacted_warnings, resolve_salt
from tfcovseg import __version__
from tfcovseg.constants import DISCLAIMER
from tfcovseg.evaluation.metrics import patient_score
from tfcovseg.evaluation.verdict import patient_verdict, severity_for_verdict, slice_score
from tfcovseg.evaluation.verdict import summary as verdict_summary
from tfcovseg.inference.errors import PredictionError, check_thresholds
from tfcovseg.inference.images import (
    ImageInputError,
    image_files_digest,
    intensity_setting,
    is_image_folder,
    label_map,
    predict_images,
    read_image_folder,
)
from tfcovseg.inference.measures import burden_call, measure
from tfcovseg.inference.outputs import nifti_image, write_seg
from tfcovseg.inference.predictors import check_metadata, open_model
from tfcovseg.inference.report_html import montage, render_html, unreadable_text
from tfcovseg.inference.studies import Volume, read_input
from tfcovseg.reporting.figures import DEFAULT_WINDOW

# ----------------------------------------------------------------------------- inference


def run_model(predictor, hu: np.ndarray, gate: bool, threshold: float, batch_size: int):
    """Slice probabilities [K], masks [K, H, W, C] (zeros where the gate said no), and the
    indices segmented.

    With the gate, the classifier scores every slice and only the slices it passes are
    segmented. Without, one pass of the serving graph gives both outputs for every slice
    (the encoder runs once), the cheapest way to segment everything.
    """
    k = hu.shape[0]
    if not gate or threshold <= 0.0:  # a gate that passes everything: one pass is cheaper
        outs = [predictor.serve(hu[i : i + batch_size]) for i in range(0, k, batch_size)]
        probs = np.concatenate([p for p, _ in outs]).astype(np.float32, copy=False)
        masks = np.concatenate([m for _, m in outs]).astype(np.float32, copy=False)
        return probs, masks, np.arange(k)
    probs = np.concatenate(
        [predictor.classify(hu[i : i + batch_size]) for i in range(0, k, batch_size)]
    ).astype(np.float32)
    passed = np.nonzero(probs >= threshold)[0]
    masks = None
    for i in range(0, len(passed), batch_size):
        idx = passed[i : i + batch_size]
        out = predictor.segment(hu[idx])
        if masks is None:
            masks = np.zeros((k, *out.shape[1:]), np.float32)
        masks[idx] = out
    return probs, masks, passed


def _label_volume(masks: np.ndarray | None, shape, mask_threshold: float) -> np.ndarray:
    """[K, H, W] uint8: the most probable class among those at or above the threshold."""
    if masks is None:
        return np.zeros(shape, np.uint8)
    return label_map(masks, mask_threshold)


def predict_volume(
    predictor,
    volume: Volume,
    out_dir: Path,
    gate=True,
    threshold=None,
    mask_threshold=0.5,
    batch_size=8,
    study_skipped=(),
    research_seg=False,
) -> dict:
    """Predicts one volume and writes its files into `out_dir` (created); returns the report.

    ``study_skipped``: (file, reason) of the input's files that belong to no usable series
    (other modalities, corrupt headers), reported with the series' own skipped slices.
    ``research_seg``: the DICOM SEG carries pseudonyms instead of the source's patient
    module (`write_seg`).
    """
    threshold = float(predictor.metadata["gate"]["threshold"] if threshold is None else threshold)
    start = time.perf_counter()
    probs, masks, passed = run_model(predictor, volume.hu, gate, threshold, batch_size)
    inference = Inference(probs, masks, passed, time.perf_counter() - start)
    return finish_volume(
        predictor, volume, out_dir, inference, gate, threshold, mask_threshold,
        study_skipped, research_seg, start,
    )  # fmt: skip


@dataclasses.dataclass
class Inference:
    """The model's answer on a volume (`run_model`): slice probabilities [K], masks
    [K, H, W, C] (zeros where the gate said no; None when it passed no slice), the indices
    segmented and the seconds it took (None where not known per volume)."""

    probs: np.ndarray
    masks: np.ndarray | None
    passed: np.ndarray
    seconds: float


def finish_volume(
    predictor, volume, out_dir, inference, gate, threshold, mask_threshold,
    study_skipped=(), research_seg=False, start=None,
) -> dict:  # fmt: skip
    """`predict_volume` once the model has answered (also the batch pipeline's last step,
    `tfcovseg.inference.archive`): measures, writes the files, returns the report.
    `predictor`: anything with the model's ``metadata`` and ``source``."""
    start = time.perf_counter() if start is None else start
    meta = predictor.metadata
    classes = list(meta["class_names"])
    probs, masks, passed = inference.probs, inference.masks, inference.passed
    if volume.unreadable:
        # Slices that could not be read stand in as air to keep the grid: they are neither
        # segmented nor scored (an air slice's low probability would count as evidence).
        probs = np.array(probs, np.float32)
        probs[volume.unreadable] = 0.0
        passed = np.setdiff1d(passed, volume.unreadable)
        if masks is not None:
            masks[volume.unreadable] = 0.0
    measured, labels = measure(
        volume, _label_volume(masks, volume.hu.shape, mask_threshold), classes, meta.get("severity")
    )
    report = _report(predictor, volume, probs, passed, measured, gate, threshold, mask_threshold)
    report["skipped"] = [{"file": f, "reason": r, "scope": "series"} for f, r in volume.skipped] + [
        {"file": f, "reason": r, "scope": "study"} for f, r in study_skipped
    ]
    seconds = inference.seconds  # None: not known per series (the Beam pipeline's)
    report["timings_s"] = {"inference": None if seconds is None else round(seconds, 3)}
    report["options"] = {"research_seg": bool(research_seg)}
    report["lesion_rule"] = LESION_RULE
    if masks is None:
        masks = np.zeros((*volume.hu.shape, len(classes)), np.float32)
    png = _write_outputs(volume, labels, masks, classes, meta, out_dir, report, research_seg)
    report["timings_s"]["total"] = round(time.perf_counter() - start, 3)
    atomic_write_text(out_dir / "report.html", render_html(report, png))
    atomic_write_json(out_dir / "report.json", report)
    return report


def _report(predictor, volume, probs, passed, measured, gate, threshold, mask_threshold) -> dict:
    """The report of one volume (without its skipped files, timings and outputs)."""
    meta = predictor.metadata
    k, h, w = volume.hu.shape
    if not gate:
        gate_method = "--no-gate"
    elif threshold == float(meta["gate"]["threshold"]):
        gate_method = meta["gate"].get("method", "")
    else:
        gate_method = "--threshold"
    rule = meta.get("patient_rule", {})
    patient_threshold = float(rule.get("threshold", 0.5))
    patient_probability = patient_score(probs, int(rule.get("min_slices", 1)))
    not_graded = measured["severity"]["not_graded"]  # the study's limits
    covid = {
        "probability": patient_probability,
        "threshold": patient_threshold,
        "positive": bool(patient_probability >= patient_threshold),
        "rule": f"at least {int(rule.get('min_slices', 1))} slice(s) at or above the "
        "threshold (the paper: any slice, Huang et al. 2021)",
        "slice_probabilities": [round(float(p), 4) for p in probs],
        "lesion_burden": burden_call(
            measured["severity"]["total_lesion_lung_ratio"],
            meta.get("burden_rule"),
            mask_threshold,
            not_graded,
        ),
    }
    covid["slice_score"] = slice_score(meta)
    verdict = patient_verdict(
        covid, meta.get("gate", {}), covid["lesion_burden"], covid["slice_score"]
    )
    return {
        "disclaimer": DISCLAIMER,
        "study": {
            "patient": volume.patient,
            "series": volume.series,
            "input": volume.kind,
            "slices": int(k),
            "rows": int(h),
            "columns": int(w),
            "spacing_mm": [float(s) for s in volume.spacing_mm],
            "input_sha256": volume.fingerprint(),
        },
        "model": {
            "source": predictor.source,
            "sha256": getattr(predictor, "sha256", None),
            "model_version": meta.get("model_version"),
            "experiment": meta.get("experiment"),
            "architecture": meta.get("architecture"),
            "classes": list(meta["class_names"]),
            "tfcovseg": __version__,
        },
        "gate": {
            "enabled": bool(gate) and threshold > 0.0,
            "threshold": threshold,
            "method": gate_method,
            "slices_segmented": int(len(passed)),
            "slices_unreadable": len(volume.unreadable),
        },
        "verdict": verdict,
        "covid": covid,
        "mask_threshold": float(mask_threshold),
        **measured,
        "severity": severity_for_verdict(measured["severity"], verdict),
        "warnings": list(volume.warnings) + [f"no severity grade: {r}" for r in not_graded],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_outputs(volume, labels, masks, classes, meta, out_dir, report, research_seg) -> bytes:
    """Writes the label and probability volumes, the SEG and the overlay; returns the
    overlay PNG (for the HTML report) and records the files in ``report["outputs"]``."""
    import nibabel as nib

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"labels": "lesions.nii.gz"}
    nib.save(nifti_image(volume, labels), out_dir / "lesions.nii.gz")
    for c, name in enumerate(classes):
        file = f"probability_{name}.nii.gz"
        nib.save(nifti_image(volume, masks[..., c].astype(np.float32)), out_dir / file)
        outputs[f"probability_{name}"] = file
    if volume.kind == "dicom":
        version = meta.get("model_version") or "run"
        path = out_dir / "segmentation.dcm"
        try:
            if write_seg(volume, labels, classes, path, version, research=research_seg):
                outputs["dicom_seg"] = "segmentation.dcm"
                report["dicom_seg_identity"] = (
                    "pseudonymised (research SEG)" if research_seg else "the source study's"
                )
            else:
                report["warnings"].append("no lesion found: no DICOM SEG written")
        except Exception as e:  # highdicom refuses some source headers (missing modules)
            report["warnings"].append(f"no DICOM SEG: highdicom refused it ({type(e).__name__})")
    png = montage(volume, labels, classes, meta.get("hu_window", DEFAULT_WINDOW))
    (out_dir / "overlay.png").write_bytes(png)
    outputs["overlay"] = "overlay.png"
    outputs |= {"report_json": "report.json", "report_html": "report.html"}
    report["outputs"] = outputs
    return png


def _settings(report: dict) -> dict:
    """What makes two predictions of a series the same: the model, the options and the
    rule lesions were counted by (a report without it predates the rule)."""
    return {
        "model": report["model"]["source"],
        "model_sha256": report["model"].get("sha256"),
        "model_version": report["model"].get("model_version"),
        "gate": report["gate"]["enabled"],
        "gate_threshold": report["gate"]["threshold"],
        "mask_threshold": report.get("mask_threshold"),
        "research_seg": report.get("options", {}).get("research_seg"),
        "lesion_rule": report.get("lesion_rule"),
    }


def _finished_report(folder: Path) -> dict | None:
    """The report of a completed series folder, or None (missing or unreadable)."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "outputs" in report else None


def index_entry(report: dict) -> dict:
    return {
        "series": report["study"]["series"],
        "patient": report["study"]["patient"],
        "folder": report["study"]["series"],
        "slices": report["study"]["slices"],
        # Reports written before the verdict existed (kept by a rerun) have none.
        "verdict": report.get("verdict", {}).get("call"),
        "verdict_rule": report.get("verdict", {}).get("rule"),
        "covid_probability": report["covid"]["probability"],
        # What that probability is: "lesion" for a model without a slice classifier.
        "slice_score": report["covid"].get("slice_score", "classifier"),
        "severity": report["severity"]["grade"],
        "lesion_percent_of_lung": report["total"]["percent_of_lung"],
    }


def list_entry(index: dict, entry: dict) -> None:
    """Puts a series' entry into the index, replacing an older one of the same series."""
    index["series"] = [s for s in index["series"] if s.get("series") != entry["series"]]
    index["series"].append(entry)


def read_index(index_path: Path) -> dict:
    """OUT's index of earlier predictions (a new one when there is none), checked before
    anything is predicted into OUT: another file of that name raised a TypeError after
    the first series had been written."""
    index = {"disclaimer": DISCLAIMER, "series": [], "skipped": []}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except ValueError:
            raise PredictionError(f"{index_path} is not valid JSON: choose another --out") from None
        lists = [index.get(k, []) for k in ("series", "skipped")] if isinstance(index, dict) else []
        if not lists or not all(isinstance(v, list) and all(isinstance(e, dict) for e in v)
                                for v in lists):  # fmt: skip
            raise PredictionError(
                f"{index_path} is not an index predict wrote (series and skipped lists): "
                "choose another --out"
            )
    return index


def done_before(out: Path, volumes, expected: dict) -> dict:
    """{series: report} of the volumes a previous run into `out` completed with the same
    model and options; other results in `out` are an error (never overwritten)."""
    done = {}
    for v in volumes:
        folder = out / v.series
        if not folder.exists():
            continue
        report = _finished_report(folder)
        if report is None:
            raise PredictionError(
                f"{folder} exists but holds no finished prediction (no readable report.json): "
                "remove it or choose another --out"
            )
        found = _settings(report)
        # Reports written before a key existed hold None there: nothing to compare.
        differ = {
            k: (found[k], expected[k])
            for k in expected
            if found[k] != expected[k] and not (k.endswith("sha256") and found[k] is None)
        }
        kept_input = report["study"].get("input_sha256")
        if kept_input is not None and kept_input != v.fingerprint():
            raise PredictionError(
                f"{out} already holds results for series {v.series} predicted from other "
                f"input ({report['study']['slices']} slices there, {len(v.hu)} now, or "
                "changed voxels): choose another --out, or remove that series' folder"
            )
        if differ:
            detail = ", ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in differ.items())
            raise PredictionError(
                f"{out} already holds results for series {v.series} made with other settings "
                f"({detail}): choose another --out"
            )
        done[v.series] = report
    return done


def predict(
    model,
    input_path,
    out,
    gate=True,
    threshold=None,
    mask_threshold=0.5,
    series_uid=None,
    batch_size=8,
    salt=None,
    log=print,
    research_seg=False,
    intensity=None,
) -> dict:
    """Predicts every usable series of the input into ``out/<series pseudonym>/``.

    Each series folder is written under a temporary name and renamed when complete. A
    rerun into the same `out` (after a kill, say) keeps the series already finished with
    the same model and options, removes the partial folders and predicts the rest;
    results made with other settings are never overwritten. Returns the index (also
    ``index.json``). `intensity` ("match", the default, or "as-is") applies to folders of
    PNG/JPEG slices only (`tfcovseg.inference.images`).

    Raises:
        PredictionError: bad model, input or output folder, nothing usable, results in
            `out` made with other settings.
    """
    check_thresholds(threshold, mask_threshold)
    if series_uid is not None and is_image_folder(Path(input_path)):
        # It picks what is segmented: ignored, a whole folder was segmented instead.
        raise PredictionError(
            f"--series picks one DICOM series; {input_path} is a folder of image slices, "
            "which has none: leave --series out"
        )
    out = Path(out)
    try:
        check_output_dir(out)
    except OutputError as e:
        raise PredictionError(str(e)) from None
    predictor = model if hasattr(model, "segment") else open_model(model)
    check_metadata(predictor)
    with exclusive_folder(out, error=PredictionError):
        return _predict_input(
            predictor, input_path, out, gate, threshold, mask_threshold, series_uid,
            batch_size, salt, log, research_seg, intensity,
        )  # fmt: skip


def _predict_input(
    predictor, input_path, out, gate, threshold, mask_threshold, series_uid, batch_size,
    salt, log, research_seg, intensity,
) -> dict:  # fmt: skip
    """`predict` once the model is open and `out` is held."""
    if is_image_folder(Path(input_path)):
        options = {
            "--no-gate": not gate,
            "--threshold": threshold is not None,
            "--research-seg": research_seg,
        }
        ignored = [name for name, given in options.items() if given]
        if ignored:
            log(
                f"warning: {', '.join(ignored)} ignored: a folder of image slices is "
                "segmented slice by slice, without gate or DICOM SEG"
            )
        return _predict_image_folder(
            predictor, Path(input_path), out, mask_threshold, batch_size, salt, log,
            intensity or "match",
        )  # fmt: skip
    if intensity is not None:
        log("warning: --intensity ignored: studies in HU are windowed by the model's own window")
    options = dict(
        gate=gate,
        threshold=threshold,
        mask_threshold=mask_threshold,
        batch_size=batch_size,
        research_seg=research_seg,
    )
    redactor = Redactor()
    with redacted_warnings(redactor):
        volumes, skipped = read_input(input_path, series_uid, salt, redactor)
        return _predict_volumes(predictor, volumes, skipped, out, options, log)


def _check_kept_images(target: Path, report, expected: dict) -> None:
    """A folder's earlier results are kept only when made with the same model, threshold
    and intensity handling."""
    found = dict.fromkeys(expected)
    if report is not None:
        found = {
            "model": report["model"]["source"],
            "mask_threshold": report["mask_threshold"],
            "intensity": report.get("intensity", {}).get("mode", "as-is"),
            # None in reports from before these keys: nothing to compare.
            "model_sha256": report["model"].get("sha256") or expected["model_sha256"],
            "input_files": report.get("input_files_sha256") or expected["input_files"],
        }
    if found != expected:
        raise PredictionError(
            f"{target} already holds results made otherwise ({found}, now {expected}): "
            "choose another --out"
        )


def _predict_new_images(
    predictor, folder, target, mask_threshold, batch_size, intensity, log, digest
):  # fmt: skip
    """Reads the folder's slices and predicts them into `target`; returns the report."""
    name = target.name
    try:
        slices, skipped = read_image_folder(folder)
    except ImageInputError as e:
        raise PredictionError(str(e)) from None
    for f, r in skipped:
        log(f"warning: skipped {f}: {r}")
    for left in remove_partial_directories(target):
        log(f"removed {left}, left by an interrupted run")
    report = predict_images(
        predictor, slices, skipped, target, mask_threshold, batch_size, intensity, digest
    )
    with_lesion = sum(1 for s in report["slices"] if s["total"]["pixels"] > 0)
    log(
        f"images {name}: {len(report['slices'])} slices, {with_lesion} with lesions; "
        f"label PNGs in {target / 'labels'}, probabilities in "
        f"{target}/probability_<class>, report {target / 'report.html'}"
    )
    return report


def _predict_image_folder(
    predictor, folder, out, mask_threshold, batch_size, salt, log, intensity
):  # fmt: skip
    """`predict` on a folder of PNG/JPEG slices (`tfcovseg.inference.images`) into
    ``out/<folder pseudonym>/``; a rerun with the same model and settings keeps it."""
    try:
        setting = intensity_setting(predictor.metadata, intensity)
    except ImageInputError as e:
        raise PredictionError(str(e)) from None
    name = pseudonym("S", f"images:{folder.resolve().as_posix()}", resolve_salt(salt))
    target = out / name
    expected = {
        "model": predictor.source,
        "mask_threshold": float(mask_threshold),
        "intensity": setting["mode"],
        "model_sha256": getattr(predictor, "sha256", None),
        "input_files": image_files_digest(folder),  # images added, removed or changed
    }
    index_path = out / "index.json"
    index = read_index(index_path)
    report = _finished_report(target)
    if target.exists():
        _check_kept_images(target, report, expected)
        log(f"images {name}: already predicted in {target}, kept")
    else:  # the images are read only when they are to be predicted
        report = _predict_new_images(
            predictor, folder, target, mask_threshold, batch_size, intensity, log,
            expected["input_files"],
        )  # fmt: skip
    for warning in report["warnings"]:
        log(f"warning: images {name}: {warning}")
    matched = report.get("intensity", {})
    if matched.get("mode") == "match":
        log(
            f"images {name}: grey levels matched to the training slices' "
            f"(5th, 95th) percentiles {matched['reference']} (--intensity as-is to use them "
            "unchanged)"
        )
    index["model"] = predictor.source
    index.setdefault("series", [])
    entry = {"series": name, "folder": name, "input": "images", "slices": len(report["slices"])}
    list_entry(index, entry)
    atomic_write_json(index_path, index)
    return index


def expected_settings(predictor, options: dict) -> dict:
    """The `_settings` a series predicted now with `options` (`predict_volume`'s keywords)
    will have: a rerun keeps results that have them and refuses others."""
    threshold = options["threshold"]
    meta_threshold = float(predictor.metadata["gate"]["threshold"])
    gate_threshold = meta_threshold if threshold is None else float(threshold)
    return {
        "model": predictor.source,
        "model_sha256": getattr(predictor, "sha256", None),
        "model_version": predictor.metadata.get("model_version"),
        "gate": bool(options["gate"]) and gate_threshold > 0.0,
        "gate_threshold": gate_threshold,
        "mask_threshold": float(options["mask_threshold"]),
        "research_seg": bool(options["research_seg"]),
        "lesion_rule": LESION_RULE,
    }


def _predict_volumes(predictor, volumes, skipped, out, options: dict, log) -> dict:
    """`predict` once the input is read: `options` are `predict_volume`'s keywords."""
    done = done_before(out, volumes, expected_settings(predictor, options))
    for f, r in skipped:
        log(f"warning: skipped {f}: {r}")
    out.mkdir(parents=True, exist_ok=True)
    # Results already in OUT stay listed: the index grows with every study predicted into it.
    index_path = out / "index.json"
    index = read_index(index_path)
    index["model"] = predictor.source
    index.setdefault("series", [])
    known = {(s.get("file"), s.get("reason")) for s in index.setdefault("skipped", [])}
    index["skipped"] += [{"file": f, "reason": r} for f, r in skipped if (f, r) not in known]
    for volume in volumes:
        if volume.series in done:
            log(f"series {volume.series}: already predicted in {out / volume.series}, kept")
            list_entry(index, index_entry(done[volume.series]))
            continue
        report = write_series(
            out, volume, lambda tmp, v=volume: predict_volume(
                predictor, v, tmp, study_skipped=skipped, **options
            ), log,
        )  # fmt: skip
        list_entry(index, index_entry(report))
        atomic_write_json(index_path, index)  # after every series
    atomic_write_json(index_path, index)
    return index


def write_series(out: Path, volume: Volume, predict_into, log) -> dict:
    """Writes a series' results into ``out/<series>`` (complete or not at all) with
    ``predict_into(folder)``, saying what it found; returns the report."""
    for w in volume.warnings:
        log(f"warning: series {volume.series}: {w}")
    for left in remove_partial_directories(out / volume.series):
        log(f"removed {left}, left by an interrupted run")
    with atomic_directory(out / volume.series) as tmp:
        report = predict_into(tmp)
    for w in report["warnings"][len(volume.warnings) :]:
        log(f"warning: series {volume.series}: {w}")
    grade = report["severity"]["grade"] or "not graded"
    log(
        f"series {volume.series}: {report['study']['slices']} slices, "
        f"{report['gate']['slices_segmented']} segmented{unreadable_text(report['gate'])}, "
        f"lesions {report['total']['percent_of_lung']:.2f} % of lung; "
        f"{verdict_summary(report['verdict'])}; severity {grade} -> {out / volume.series}"
    )
    return report
