"""``python -m tfcovseg.predict --runner direct|flink|spark|dataflow``: `predict` over an
archive of studies as an Apache Beam pipeline, the model run by Beam's RunInference.

Input (`archive_inputs`): a text file listing studies (one DICOM folder or NIfTI file per
line, relative to the list's folder; ``#`` comments), a glob pattern, or a folder whose
sub-folders and NIfTI files are the studies. Output: what `predict` writes for each series
(``OUT/<series pseudonym>/``: label and probability NIfTI, DICOM SEG, report.html /
report.json), ``OUT/index.json`` as `predict` keeps it, and ``OUT/summary.csv``, one row
per series (the index's entries).

Steps: ``Read`` (each study's series, `studies.read_input`; series a previous run into
OUT finished with the same model and options are kept, as `predict` keeps them) ->
``Slices`` -> ``RunInference`` (`SliceModelHandler`: the SavedModel's gate and
segmentation on batches of slices, `predict.run_model`) -> ``Join`` (the series' slices
back together) -> ``Write`` (`predict.finish_volume`, the single-study code, into a
folder renamed into place when complete) -> ``Index`` (a final combine).

Beam's own TensorFlow model handler loads models with ``tf.keras.models.load_model``
(Keras 3 loads no SavedModel that way) and imports tensorflow_hub, so the handler here is
ours: `tf.saved_model.load` and the export's signatures, through Beam's `ModelHandler`.

Paths are local, as for the converter (`data_tools.beam_convert`): with Flink, Spark or
Dataflow, on a file system every worker mounts. Research use, not a medical device.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
from pathlib import Path

import numpy as np

from data_tools.beam_convert import import_beam, pipeline_options
from data_tools.conversion.discovery import ConversionError, looks_like_mask
from data_tools.files import (
    OutputError,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    exclusive_folder,
)
from data_tools.privacy import Redactor, redacted_warnings, resolve_salt
from tfcovseg.constants import DISCLAIMER
from tfcovseg.inference import predict as single
from tfcovseg.inference.errors import PredictionError, check_thresholds
from tfcovseg.inference.predictors import check_metadata, open_model
from tfcovseg.inference.studies import read_input

# This module is imported for --runner only (`tfcovseg.cli.predict`): Beam is there.
beam = import_beam()
from apache_beam.ml.inference.base import (  # noqa: E402
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)

SUMMARY_NAME = "summary.csv"
# Files beside the studies of a folder that do not make it a study (manifests, notes).
_NOT_DICOM = (".csv", ".txt", ".md", ".json", ".html", ".png", ".jpg", ".jpeg")


def archive_inputs(spec) -> list[Path]:
    """The studies named by `spec`: a ``.txt`` list, a glob pattern or a folder of studies.

    Raises:
        PredictionError: nothing there, or a listed study that does not exist.
    """
    text = str(spec)
    path = Path(text)
    if path.is_file() and path.suffix == ".txt":
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        inputs = [(path.parent / line) for line in lines if line]
        nested = [str(p) for p in inputs if p.is_file() and p.suffix == ".txt"]
        if nested:  # each was skipped with "add --runner direct", which was given
            raise PredictionError(
                f"--input {spec} lists another list of studies ({nested[0]}): lists do not "
                "nest; list the studies themselves"
            )
        inputs = list(dict.fromkeys(inputs))  # a study listed twice is predicted once
    elif any(c in text for c in "*?["):
        inputs = [Path(p) for p in sorted(glob.glob(text))]
    elif path.is_dir():
        children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        if any(
            p.is_file() and not _is_nifti(p) and p.suffix.lower() not in _NOT_DICOM
            for p in children
        ):
            inputs = [path]  # DICOM files right there: the folder is one study
        else:
            inputs = [p for p in children if p.is_dir() or _is_nifti(p)]
    else:
        raise PredictionError(f"--input {spec} is no study list, pattern or folder")
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise PredictionError(f"--input {spec} names studies that do not exist: {missing[:3]}")
    if not inputs:
        raise PredictionError(f"--input {spec} names no study")
    return inputs


def _is_nifti(path: Path) -> bool:
    """A NIfTI volume that is no lesion mask (``lesions.nii.gz`` beside a series is not a
    study: the converter's naming rule)."""
    return path.name.endswith((".nii", ".nii.gz")) and not looks_like_mask(path)


class SliceModelHandler(ModelHandler):
    """Beam `ModelHandler` of an exported tfcovseg SavedModel on single slices [H, W].

    Each batch is run as `predict.run_model` runs a volume: the gate's probability for
    every slice, then the segmentation of the slices it passes. Slices of other sizes in a
    batch are run apart. Inference: (probability, masks [H, W, C] or None).
    """

    def __init__(self, model: str, gate: bool, threshold: float, batch_size: int):
        super().__init__()
        self.model, self.gate, self.threshold, self.batch_size = model, gate, threshold, batch_size

    def load_model(self):
        return open_model(self.model)

    def run_inference(self, batch, model, inference_args=None):
        answers = [None] * len(batch)
        by_shape: dict[tuple, list[int]] = {}
        for i, hu in enumerate(batch):
            by_shape.setdefault(np.shape(hu), []).append(i)
        for members in by_shape.values():
            hu = np.stack([batch[i] for i in members])
            probs, masks, passed = single.run_model(
                model, hu, self.gate, self.threshold, self.batch_size
            )
            segmented = set(int(j) for j in passed)
            for j, i in enumerate(members):
                mask = masks[j] if masks is not None and j in segmented else None
                answers[i] = (float(probs[j]), mask)
        return [PredictionResult(x, a) for x, a in zip(batch, answers)]

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return "tfcovseg"


class _ModelInfo:
    """What the report needs of the model, without loading it (`finish_volume`)."""

    def __init__(self, predictor):
        self.metadata, self.source = predictor.metadata, predictor.source
        self.sha256 = getattr(predictor, "sha256", None)


# ----------------------------------------------------------------------------- the steps


def _read(numbered, count, salt, out, expected):
    """A study's series: ("kept", report) for those a previous run into `out` finished
    with the same settings, ("new", (volume, study_skipped)) for the others, and
    ("failed", (study, reason)) for a study with no usable series: one bad study does not
    stop an archive. It is named by its place in the input ("input 3 of 40"): folder
    names in archives are often patient ids or accession numbers."""
    number, path = numbered
    redactor = Redactor()
    try:
        with redacted_warnings(redactor):
            volumes, skipped = read_input(path, salt=salt, redactor=redactor)
    except PredictionError as e:
        name = f"input {number} of {count}"
        reason = redactor(str(e).replace(str(path), name).replace(Path(path).name, name))
        logging.warning("skipped %s: %s", name, reason)
        yield beam.pvalue.TaggedOutput("failed", {"file": name, "reason": reason})
        return
    done = single.done_before(out, volumes, expected)
    for volume in volumes:
        if volume.series in done:
            yield beam.pvalue.TaggedOutput("kept", done[volume.series])
        else:
            yield volume.series, (volume, skipped)


def _slices(keyed):
    series, (volume, _) = keyed
    for i, hu in enumerate(volume.hu):
        yield (series, i), hu


def _by_series(keyed):
    (series, i), result = keyed
    return series, (i, result.inference)


def _write(joined, out, model, options):
    """One series' files from its volume and the model's answer on each slice."""
    series, grouped = joined
    volume, study_skipped = grouped["volume"][0]  # a series read twice is written once
    answers = dict(grouped["slices"])
    probs = np.array([answers[i][0] for i in range(len(volume.hu))], np.float32)
    passed = np.array([i for i in range(len(probs)) if answers[i][1] is not None], np.int64)
    masks = None
    if len(passed):
        first = answers[int(passed[0])][1]
        masks = np.zeros((len(probs), *first.shape), np.float32)
        for i in passed:
            masks[i] = answers[int(i)][1]
    threshold = options["threshold"]
    threshold = float(model.metadata["gate"]["threshold"] if threshold is None else threshold)
    # The pipeline's inference time is in the runner's metrics: none per series.
    inference = single.Inference(probs, masks, passed, None)
    report = single.write_series(
        out, volume, lambda tmp: single.finish_volume(
            model, volume, tmp, inference, options["gate"], threshold,
            options["mask_threshold"], study_skipped, options["research_seg"],
        ), logging.info,
    )  # fmt: skip
    return report


def _index(reports, out, model, failed):
    """The final combine: ``index.json`` (kept and new series, failed studies among the
    skipped) and ``summary.csv``."""
    index_path = out / "index.json"
    index = single.read_index(index_path)
    index["model"] = model.source
    index.setdefault("series", [])
    index.setdefault("skipped", [])
    index["skipped"] += [f for f in failed if f not in index["skipped"]]
    for report in sorted(reports, key=lambda r: r["study"]["series"]):
        single.list_entry(index, single.index_entry(report))
        known = {(s.get("file"), s.get("reason")) for s in index["skipped"]}
        for item in report["skipped"]:
            if item["scope"] == "study" and (item["file"], item["reason"]) not in known:
                index["skipped"].append({"file": item["file"], "reason": item["reason"]})
    atomic_write_json(index_path, index)
    atomic_write_text(out / SUMMARY_NAME, summary_csv(index))


def summary_csv(index: dict) -> str:
    """One row per series of the index (its entries' fields), and the disclaimer."""
    rows = index["series"]
    # Every row's fields: an index kept by a rerun mixes entries of older versions.
    fields = list(dict.fromkeys(k for row in rows for k in row)) if rows else ["series"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return f"# {DISCLAIMER}\n" + text.getvalue()


# ----------------------------------------------------------------------------- the pipeline


def predict_archive(
    model, input_spec, out, runner, options=(), gate=True, threshold=None,
    mask_threshold=0.5, batch_size=8, salt=None, research_seg=False, log=print,
) -> dict:  # fmt: skip
    """`predict` on every study of `input_spec` (`archive_inputs`) on Beam's `runner`
    (`RUNNERS`) with `options` (``KEY=VALUE``); returns the index (``OUT/index.json``).

    Raises:
        PredictionError: bad model, input, options or output folder; a study without a
            usable series; results in `out` made with other settings.
    """
    check_thresholds(threshold, mask_threshold)
    out = Path(out)
    try:
        check_output_dir(out)
        beam_options = pipeline_options(runner, options)
    except (OutputError, ConversionError) as e:
        raise PredictionError(str(e)) from None
    inputs = archive_inputs(input_spec)
    predictor = open_model(model)
    check_metadata(predictor)
    info = _ModelInfo(predictor)
    settings = dict(
        gate=gate, threshold=threshold, mask_threshold=mask_threshold,
        batch_size=batch_size, research_seg=research_seg,
    )  # fmt: skip
    expected = single.expected_settings(predictor, settings)
    gate_threshold = expected["gate_threshold"]
    handler = KeyedModelHandler(SliceModelHandler(str(model), gate, gate_threshold, batch_size))
    salt = resolve_salt(salt)
    with exclusive_folder(out, error=PredictionError):
        log(f"{len(inputs)} studies on the {runner} runner")
        _run_pipeline(beam_options, inputs, handler, salt, out, expected, info, settings)
    index = single.read_index(out / "index.json")
    for item in index["skipped"]:
        if item["file"].startswith("input "):
            log(f"warning: skipped {item['file']}: {item['reason']}")
    if not index["series"]:  # an empty summary.csv and exit code 0 said "done"
        raise PredictionError(
            f"none of the {len(inputs)} studies has a usable CT series (the reasons above "
            f"and in {out / 'index.json'})"
        )
    for entry in index["series"]:
        log(
            f"series {entry['series']}: {entry['slices']} slices, lesions "
            f"{entry['lesion_percent_of_lung']:.2f} % of lung; verdict {entry['verdict']}"
        )
    log(f"summary: {out / SUMMARY_NAME}")
    return index


def _run_pipeline(beam_options, inputs, handler, salt, out, expected, info, settings) -> None:
    """Reads each study, runs the model on its slices (RunInference), writes its files, then
    the index."""
    with beam.Pipeline(options=beam_options) as pipeline:
        read = (
            pipeline
            | "Studies" >> beam.Create([(i + 1, str(p)) for i, p in enumerate(inputs)])
            | "Spread" >> beam.Reshuffle()  # one study per bundle, over all workers
            | "Read"
            >> beam.FlatMap(_read, len(inputs), salt, out, expected).with_outputs(
                "kept", "failed", main="new"
            )
        )
        answers = (
            read.new
            | "Slices" >> beam.FlatMap(_slices)
            | "RunInference" >> RunInference(handler)
            | "BySeries" >> beam.Map(_by_series)
        )
        written = (
            {"volume": read.new, "slices": answers}
            | "Join" >> beam.CoGroupByKey()
            | "Write" >> beam.Map(_write, out, info, settings)
        )
        failed = read.failed | "Failed" >> beam.combiners.ToList()
        _ = (
            (written, read.kept)
            | "Reports" >> beam.Flatten()
            | "All" >> beam.combiners.ToList()
            | "Index" >> beam.Map(_index, out, info, beam.pvalue.AsSingleton(failed))
        )
