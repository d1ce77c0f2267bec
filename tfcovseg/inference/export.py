"""Export a trained run as a SavedModel for TF Serving, preprocessing inside the graph.

    python -m tfcovseg.export --run runs/NAME [--out saved_models/tfcovseg] [--version N]
        [--gate-threshold auto|T]

Writes the TF Serving layout ``OUT/<N>/`` (N: the next free version unless ``--version``)
through Keras 3's `keras.export.ExportArchive`. Signatures:

- ``serving_default``: ``hu`` float32 [batch, H, W] Hounsfield units of any H, W ->
  ``masks`` float32 [batch, H, W, C] probabilities at the input size and
  ``covid_probability`` float32 [batch];
- ``classify``: ``hu`` -> ``covid_probability`` (the slice gate alone: encoder + head);
- ``segment``: ``hu`` -> ``masks``;
- ``serve_image`` and ``segment_image``: the same on ``image`` float32 [batch, H, W], grey
  levels 0-255 of windowed slices (PNG/JPEG);
- ``predict_examples``: ``examples`` string [batch] of serialized `tf.train.Example` in
  the records' spec (`data_tools.features`) -> ``masks``, ``covid_probability``,
  ``slice_id``, ``patient_id``;
- ``metadata``: no input -> ``class_names``, ``hu_window``, ``input_size``,
  ``gate_threshold``, ``severity_thresholds``, ``severity_grades`` and ``json`` (all of
  the metadata below).

Inside the graph a slice is resized to the model's input size with
`tfcovseg.data.dataset.resize_image` (the resize the training records went through),
windowed by the model's own `HUWindow` layer (the function training uses) and the masks are
resized back to the input size. A model trained on windowed 8-bit images
(``model.pre_windowed``) takes HU too: the graph maps them to grey levels through
``model.hu_window``, the HU window those images correspond to (`data_tools.windows`
estimates it from the images and a real CT); the ``image`` signatures take such grey levels
for either kind of model.

``assets/tfcovseg.json`` holds the same metadata as the ``metadata`` signature: class names,
HU window, input size, the slice gate threshold, the patient rule, the lesion-burden rule
(`calibrate_burden_rule`: the segmentation's patient call) and the severity rule
(`tfcovseg.evaluation.severity`, fitted on the training patients' lesion / lung ratios), the run it
came from and the versions. The version folder is written under a temporary name and
renamed when complete, so TF Serving never sees a half-written version.

Research use, not a medical device.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import keras
import numpy as np

from data_tools.features import feature_spec
from data_tools.files import (
    OutputError,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    exclusive_folder,
    json_text,
    remove_partial_directories,
)
from tfcovseg import __version__, require_tensorflow
from tfcovseg.configs.experiment import ConfigError, load_config
from tfcovseg.constants import (
    DEFAULT_EXPORT_DIR,
    DEFAULT_ONNX_DIR,
    DISCLAIMER,
    EXPORT_FORMATS,
    EXPORT_METADATA,
    EXPORT_METADATA_FORMAT,
)
from tfcovseg.data.dataset import (
    CorruptRecordsError,
    resize_image,
    split_dataset,
)
from tfcovseg.data.intensity import MATCH_PERCENTILES, reference_scale
from tfcovseg.evaluation.calibration import (
    CLASSIFIER_SCORER,
    PAPER_GATE_THRESHOLD,
    SEGMENTER_SCORER,
    calibrate_burden_rule,
    calibrate_gate,
    severity_rule_for_run,
)
from tfcovseg.evaluation.runlog import (
    missing_message,
    missing_models,
    unfinished_message,
    unfinished_phases,
)
from tfcovseg.evaluation.severity import GRADES
from tfcovseg.models import load_run_models
from tfcovseg.models.classifier import (
    build_classifier,
    copy_head,
    head_options,
    with_classifier_head,
)
from tfcovseg.models.outputs import final_probabilities
from tfcovseg.models.preprocessing import (
    DEFAULT_WINDOW,
    grey_from_hu,
    hu_from_grey,
)
from tfcovseg.models.saving import ModelFileError

tf = require_tensorflow("python -m tfcovseg.export")

ASSET_NAME = EXPORT_METADATA
FORMAT = EXPORT_METADATA_FORMAT
FORMAT_VERSION = 1
SIGNATURES = (
    "serving_default",
    "classify",
    "segment",
    "serve_image",
    "segment_image",
    "predict_examples",
    "metadata",
)


class ExportError(Exception):
    """The run cannot be exported; the message says why (exit code 2)."""


# ----------------------------------------------------------------------------- the graph


HU_INPUT = "hu: float32 [batch, height, width] Hounsfield units (height, width >= 1)"
IMAGE_INPUT = (
    "image: float32 [batch, height, width] grey levels 0-255 of windowed slices, as in "
    "PNG/JPEG datasets (height, width >= 1)"
)
INPUT_CHECKS = {
    "hu": HU_INPUT,
    "image": IMAGE_INPUT,
    "non_finite": "refused: a request with NaN or infinite values fails with INVALID_ARGUMENT",
    "wrong_shape": "refused: another rank or an empty height / width fails with "
    "INVALID_ARGUMENT naming the expected shape",
    "empty_batch": "a batch of 0 slices returns empty outputs",
}


def check_hu(hu, described=HU_INPUT):
    """The serving input, checked inside the graph: rank 3, a non-empty slice, finite.

    The signatures take ``hu`` of unknown rank, so that a wrong one reaches this check
    (a fixed-rank input lets TensorFlow fold the check away and fail later, inside the
    resize, with a message that names neither the input nor its shape). Returns `hu`
    with its static rank set. `described`: the input's description (`IMAGE_INPUT` for
    the ``image`` signatures).
    """
    name = described.split(":")[0]
    hu = tf.convert_to_tensor(hu, tf.float32)
    shape = tf.shape(hu)
    rank_ok = tf.debugging.Assert(
        tf.equal(tf.rank(hu), 3),
        [f"{described} expected; got a tensor of shape", shape],
        summarize=8,
    )
    with tf.control_dependencies([rank_ok]):
        size_ok = tf.debugging.Assert(
            tf.reduce_all(tf.shape(hu)[1:] > 0),
            [f"{described} expected; got shape", shape],
            summarize=8,
        )
    with tf.control_dependencies([size_ok]):
        hu = tf.debugging.assert_all_finite(
            hu, f"{name} holds NaN or infinite values: send finite values"
        )
    hu.set_shape([None, None, None])
    return hu


def _same_weights(a, b) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(wa, wb)
    )


class InferenceGraph:
    """The serving computation, shared by the SavedModel and by in-process prediction.

    All methods take Hounsfield units [batch, H, W] (any H, W) and return dicts of
    float32 tensors; they are plain functions of TensorFlow tensors, traced by
    `ExportArchive` for the SavedModel and by `tf.function` for `tfcovseg.predict` on a
    run folder, so both paths compute the same thing.

    When the classifier's encoder holds the segmenter's weights (the paper's phase 2
    freezes it), ``serve`` runs the encoder once for both outputs.

    Args:
        segmenter: A tfcovseg segmenter (outputs "final" [N, h, w, C]).
        classifier: A `CovidClassifier`, or None: the covid probability is then the
            highest lesion probability of the slice's mask.
        metadata: The export metadata (`export_metadata`).
    """

    def __init__(self, segmenter, classifier, metadata: dict):
        if segmenter is None:
            raise ExportError("the run has no segmenter: nothing to serve masks with")
        self.segmenter = segmenter
        self.classifier = classifier
        self.metadata = metadata
        self.input_size = tuple(int(s) for s in segmenter.input_shape[1:3])
        self.pre_windowed = bool(metadata["pre_windowed"])
        self.hu_window = tuple(float(w) for w in metadata["hu_window"])
        self.num_classes = len(metadata["class_names"])
        # Exports before the correction was recorded serve the raw map, as they did.
        self.positive_weights = metadata.get("positive_weights")
        self.joint = None
        encoder = getattr(segmenter, "encoder", None)
        if (
            classifier is not None
            and encoder is not None
            and _same_weights(encoder, classifier.encoder)
        ):
            head = build_classifier(segmenter, **head_options(classifier))
            copy_head(head, classifier)
            self.joint = with_classifier_head(segmenter, head)
        self.models = [m for m in (segmenter, classifier, self.joint) if m is not None]

    def _prepare(self, hu):
        """`hu` checked (`check_hu`), then `_resized`."""
        return self._resized(check_hu(hu))

    def _resized(self, hu):
        """`hu` [N, H, W] resized to the model's input size; for a model trained on
        windowed images, mapped to their grey levels through ``hu_window`` (the HU window
        those images correspond to: `data_tools.windows` estimates it). Returns the model
        input and (H, W)."""
        size = tf.shape(hu)[1:3]
        x = resize_image(hu[..., None], self.input_size)
        if self.pre_windowed:
            x = grey_from_hu(x, self.hu_window)
        return x, size

    def _prepare_image(self, image):
        """Grey levels 0-255 checked and resized; for a model that takes HU, mapped back
        to HU through its window (so that its own window layer gives the same grey)."""
        image = check_hu(image, IMAGE_INPUT)
        size = tf.shape(image)[1:3]
        x = resize_image(image[..., None], self.input_size)
        if not self.pre_windowed:
            x = hu_from_grey(x, self.hu_window)
        return x, size

    def _final(self, outputs):
        """The lesion probabilities of the segmenter's outputs (`final_probabilities`)."""
        return final_probabilities(outputs, self.positive_weights)

    def _masks(self, final, size):
        return resize_image(final, size)

    def _probability_from(self, masks):
        return tf.reduce_max(masks, axis=[1, 2, 3])

    @staticmethod
    def _run(model, x):
        """`model` on `x`, and on one blank slice more when `x` is an empty batch, cut
        back after: on an empty batch TensorFlow's oneDNN kernels (on by default on CPUs
        with AVX-512 VNNI, in TF Serving's build as in TensorFlow's) give a strided
        convolution its input's shape, and the request failed."""
        n = tf.shape(x)[0]
        blank = tf.zeros(tf.concat([[tf.maximum(1 - n, 0)], tf.shape(x)[1:]], 0), x.dtype)
        padded = tf.concat([x, blank], 0)
        padded.set_shape(x.shape)
        out = model(padded, training=False)
        return tf.nest.map_structure(lambda t: t[:n], out)

    def _serve(self, x, size):
        if self.joint is not None:
            out = self._run(self.joint, x)
            final, prob = self._final(out), out["covid_probability"]
        else:
            final = self._final(self._run(self.segmenter, x))
            prob = (
                self._run(self.classifier, x)
                if self.classifier is not None
                else self._probability_from(final)
            )
        return {
            "masks": self._masks(tf.cast(final, tf.float32), size),
            "covid_probability": tf.reshape(tf.cast(prob, tf.float32), [-1]),
        }

    def _classify(self, x):
        if self.classifier is not None:
            prob = self._run(self.classifier, x)
        else:
            prob = self._probability_from(self._final(self._run(self.segmenter, x)))
        return {"covid_probability": tf.reshape(tf.cast(prob, tf.float32), [-1])}

    def _segment(self, x, size):
        final = self._final(self._run(self.segmenter, x))
        return {"masks": self._masks(tf.cast(final, tf.float32), size)}

    def serve(self, hu):
        """Masks at the input size and the slice's covid probability."""
        return self._serve(*self._prepare(hu))

    def serve_unchecked(self, hu):
        """`serve` without the input checks, for graphs that cannot refuse a request (the
        ONNX export, `tfcovseg.inference.onnx`); `hu` must be float32 [batch, H, W]."""
        return self._serve(*self._resized(hu))

    def classify(self, hu):
        """The slice gate alone: much cheaper than segmentation."""
        return self._classify(self._prepare(hu)[0])

    def segment(self, hu):
        """Masks only, at the input size."""
        return self._segment(*self._prepare(hu))

    def serve_image(self, image):
        """`serve` on windowed 8-bit slices (PNG/JPEG grey levels 0-255)."""
        return self._serve(*self._prepare_image(image))

    def segment_image(self, image):
        """`segment` on windowed 8-bit slices (PNG/JPEG grey levels 0-255)."""
        return self._segment(*self._prepare_image(image))

    def serve_examples(self, examples):
        """`serve` on serialized `tf.train.Example` slices (the records' feature spec).

        Every example of one request must have the same height and width, and be windowed
        as the model expects (HU, or 8-bit windowed for a pre-windowed model).
        """
        parsed = tf.io.parse_example(examples, feature_spec())
        height, width = parsed["image/height"], parsed["image/width"]
        checks = [
            tf.debugging.assert_equal(
                height, height[:1], message="all examples of a request must have one height"
            ),
            tf.debugging.assert_equal(
                width, width[:1], message="all examples of a request must have one width"
            ),
            tf.debugging.assert_equal(
                parsed["image/pre_windowed"],
                tf.constant(int(self.metadata["pre_windowed"]), tf.int64),
                message=(
                    "image/pre_windowed of the examples differs from the model's "
                    f"(pre_windowed={self.metadata['pre_windowed']})"
                ),
            ),
        ]
        with tf.control_dependencies(checks):
            shape = tf.stack(
                [tf.shape(examples)[0], tf.cast(height[0], tf.int32), tf.cast(width[0], tf.int32)]
            )
            raw = tf.io.decode_raw(parsed["image/hu"], tf.int16, little_endian=True)
            hu = tf.reshape(tf.cast(raw, tf.float32), shape)
        # The examples hold what the model trained on: HU, or grey levels if pre-windowed.
        out = self.serve_image(hu) if self.pre_windowed else self.serve(hu)
        out["slice_id"] = parsed["slice/id"]
        out["patient_id"] = parsed["patient/id"]
        return out

    def metadata_tensors(self):
        """The export metadata as constants (the ``metadata`` signature)."""
        m = self.metadata
        thresholds = m["severity"].get("thresholds") or [float("nan")] * 2
        return {
            "class_names": tf.constant(m["class_names"]),
            "hu_window": tf.constant(m["hu_window"], tf.float32),
            "input_size": tf.constant(m["input_size"], tf.int32),
            "gate_threshold": tf.constant(m["gate"]["threshold"], tf.float32),
            "severity_thresholds": tf.constant(thresholds, tf.float32),
            "severity_grades": tf.constant(list(GRADES)),
            "json": tf.constant(json_text(m, indent=None, sort_keys=True)),
        }


# ----------------------------------------------------------------------------- metadata


GREY_REFERENCE_SLICES = 512


def grey_levels(config, batch_size=32) -> dict:
    """The grey-level scale of the slices the network trained on, as 8-bit images.

    `intensity.reference_scale` of up to `GREY_REFERENCE_SLICES` slices of the training
    split (HU models' slices windowed at their window first). `predict` maps PNG/JPEG
    slices onto it (``--intensity match``): slices windowed another way are read
    off-scale otherwise (the shipped model's Dice on its training slices fell from 0.70
    to 0.46 when they were re-windowed like COVID-SemiSeg's unlabelled slices, and came
    back to 0.71 matched; MODEL_CARD.md).

    Raises:
        FileNotFoundError, ValueError: no training records (from `make_dataset`).
    """
    images, n = [], 0
    for batch in split_dataset(config, config.data.train_split, batch_size=batch_size):
        x = batch["hu"]
        if not config.model.pre_windowed:
            x = grey_from_hu(x, config.model.hu_window)
        images.append(keras.ops.convert_to_numpy(x))
        n += len(images[-1])
        if n >= GREY_REFERENCE_SLICES:
            break
    if not n:
        raise ValueError(f"no {config.data.train_split} slices to take the grey levels from")
    low, high = (float(v) for v in reference_scale(np.concatenate(images)[:GREY_REFERENCE_SLICES]))
    return {
        "percentiles": [float(q) for q in MATCH_PERCENTILES],
        "reference": [round(low, 2), round(high, 2)],
        "slices": min(n, GREY_REFERENCE_SLICES),
        "split": config.data.train_split,
        "rule": "per slice, the grey levels at these percentiles, median over the slices",
    }


def _windowing(model_config) -> str:
    low, high = (float(w) for w in model_config.hu_window)
    if model_config.pre_windowed:
        return (
            f"trained on windowed 8-bit images whose grey levels 0-255 correspond to HU "
            f"[{low:g}, {high:g}]: hu inputs are mapped to grey levels through that window, "
            "image inputs are used as they are"
        )
    return (
        f"trained on HU: hu inputs are windowed at [{low:g}, {high:g}], image inputs "
        "(grey levels 0-255) are taken as windowed at the same window"
    )


def export_metadata(
    run: Path,
    config,
    severity: dict,
    gate: dict,
    version: int,
    burden: dict | None = None,
    grey: dict | None = None,
    slice_score: str = "classifier",
) -> dict:
    info = {}
    if (run / "run.json").is_file():
        info = json.loads((run / "run.json").read_text())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_version": None if version is None else int(version),
        "experiment": config.name,
        "architecture": config.model.architecture,
        "run": run.name,
        "fold": config.data.fold,
        "data_fingerprint": info.get("data_fingerprint"),
        "class_names": list(config.model.class_names),
        # The served probabilities are corrected for the loss's positive-pixel weights
        # (`tfcovseg.models.outputs`); kept here so that every graph of the export does it.
        "positive_weights": [float(w) for w in config.train.positive_weights or ()],
        "hu_window": [float(w) for w in config.model.hu_window],
        "pre_windowed": bool(config.model.pre_windowed),
        "windowing": _windowing(config.model),
        "grey_levels": grey,
        "input_size": [int(s) for s in config.model.input_size],
        "input": INPUT_CHECKS,
        "gate": gate,
        # What covid_probability is: the classifier's, or without one the highest lesion
        # probability of the slice (`tfcovseg.evaluation.verdict.slice_score`).
        "slice_score": slice_score,
        # The patient call is the paper's any-slice rule at 0.5, apart from the gate: the gate
        # is tuned to keep lesion slices (recall), a diagnosis also needs precision.
        "patient_rule": {"min_slices": 1, "threshold": PAPER_GATE_THRESHOLD, "name": "any_slice"},
        # The same call from the segmentation (lesion volume / lung volume >= t).
        "burden_rule": burden or {"threshold": None, "method": "off: not chosen"},
        "severity": severity,
        "versions": {
            "tfcovseg": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
    }


# ----------------------------------------------------------------------------- writing


def existing_versions(base: Path) -> list[int]:
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(base: Path) -> int:
    """The next free TF Serving version number under `base` (1 for a new model)."""
    versions = existing_versions(base)
    return versions[-1] + 1 if versions else 1


def _hu_spec():
    # Unknown rank on purpose: `check_hu` refuses a wrong one with a message naming it.
    return [tf.TensorSpec(None, tf.float32, name="hu")]


def _given_threshold(value) -> float:
    """A gate threshold given instead of "auto": a probability."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not 0.0 <= t <= 1.0:  # NaN included
        raise ExportError(f"--gate-threshold must be in [0, 1] or 'auto', got {value}")
    return t


def _run_folder(run) -> Path:
    """`run` as a Path, when it is a training run folder (errors name what it is)."""
    run = Path(run)
    if not run.exists():
        raise ExportError(f"--run {run} does not exist")
    if not (run / "config.yaml").is_file():
        raise ExportError(f"{run} is not a training run folder (no config.yaml)")
    return run


def write_saved_model(graph: InferenceGraph, path: Path) -> None:
    """Writes the graph's signatures (`SIGNATURES`) and the metadata asset to `path`."""
    archive = keras.export.ExportArchive()
    for model in graph.models:
        archive.track(model)
    archive.add_endpoint("serving_default", graph.serve, input_signature=_hu_spec())
    archive.add_endpoint("classify", graph.classify, input_signature=_hu_spec())
    archive.add_endpoint("segment", graph.segment, input_signature=_hu_spec())
    image = [tf.TensorSpec(None, tf.float32, name="image")]
    archive.add_endpoint("serve_image", graph.serve_image, input_signature=image)
    archive.add_endpoint("segment_image", graph.segment_image, input_signature=image)
    archive.add_endpoint(
        "predict_examples",
        graph.serve_examples,
        input_signature=[tf.TensorSpec([None], tf.string, name="examples")],
    )
    archive.add_endpoint("metadata", graph.metadata_tensors, input_signature=[])
    archive.write_out(str(path), verbose=False)
    assets = path / "assets"
    assets.mkdir(exist_ok=True)
    atomic_write_json(assets / ASSET_NAME, graph.metadata, sort_keys=True)


def prepare_run(run, gate_threshold="auto", version=None, overrides=()) -> InferenceGraph:
    """A run folder's models, gate and severity rule as the serving graph (with metadata).

    Shared by the export and by `tfcovseg.predict` on a run folder. `overrides` change
    the run's config as ``--set`` does (``data.records_dir=DIR`` for moved records).

    Raises:
        ExportError: no run folder, no segmenter, a model that does not load, a bad
            threshold.
    """
    run = _run_folder(run)
    try:
        config = load_config(run / "config.yaml", overrides)
        segmenter, classifier = load_run_models(run)
    except (ConfigError, ModelFileError) as e:  # ours say what is wrong, by file
        raise ExportError(f"cannot load the run {run}: {e}") from None
    except Exception as e:  # anything else: its class says more than its text may
        raise ExportError(f"cannot load the run {run}: {type(e).__name__}: {e}") from None
    unfinished = unfinished_phases(run, config)
    if unfinished:  # a model of 1 epoch of 4 was served without a word
        raise ExportError(unfinished_message(run, unfinished))
    missing = missing_models(run, config)
    if missing:  # the segmenter served as the gate for a classifier moved away
        raise ExportError(missing_message(run, missing))
    if segmenter is None:
        raise ExportError(
            f"{run} holds no segmenter (segmenter_best.keras / segmenter_last.keras)"
            + (": a classifier-only run cannot produce masks" if classifier is not None else "")
        )
    provisional = {
        "class_names": list(config.model.class_names),
        "pre_windowed": bool(config.model.pre_windowed),
        "hu_window": list(config.model.hu_window),
    }
    if gate_threshold == "auto":
        probe = InferenceGraph(segmenter, classifier, provisional)
        scorer = CLASSIFIER_SCORER if classifier is not None else SEGMENTER_SCORER
        classify = tf.function(probe.classify, reduce_retracing=True)
        gate = calibrate_gate(classify, config, run=run, scorer=scorer)
    else:
        gate = {"threshold": _given_threshold(gate_threshold), "method": "given"}
    severity = severity_rule_for_run(run, config)
    burden = calibrate_burden_rule(segmenter, config, run=run)
    try:
        levels = grey_levels(config)
    except (FileNotFoundError, CorruptRecordsError) as e:
        raise ExportError(
            f"the training slices' grey levels (the PNG/JPEG input's scale) come from the "
            f"run's records: {e}"
        ) from None
    score = "classifier" if classifier is not None else "lesion"
    metadata = export_metadata(run, config, severity, gate, version, burden, levels, score)
    return InferenceGraph(segmenter, classifier, metadata)


def _version_format(folder: Path) -> str | None:
    if (folder / "saved_model.pb").is_file():
        return "saved_model"
    return "onnx" if (folder / "model.onnx").is_file() else None


def _check_model_folder(out: Path, export_format: str) -> None:
    """One format per model folder: TF Serving and Triton load every version beneath it."""
    for version in existing_versions(out):
        found = _version_format(out / str(version))
        if found not in (None, export_format):
            raise ExportError(
                f"{out} holds {found} versions ({out / str(version)}); write the "
                f"{export_format} export to another --out"
            )


def _triton_config(out: Path, num_classes: int) -> tuple[Path, str | None]:
    """``out/config.pbtxt`` and its text to write (None: already there, the same)."""
    from tfcovseg.inference.onnx import triton_config

    path, text = out / "config.pbtxt", triton_config(out.name, num_classes)
    if not path.is_file():
        return path, text
    if path.read_text() != text:
        raise ExportError(
            f"{path} describes other inputs or outputs than this model's: write the export "
            "to another --out, or remove that file"
        )
    return path, None


def export_run(
    run,
    out=None,
    version=None,
    gate_threshold="auto",
    log=print,
    overrides=(),
    export_format="saved_model",
) -> Path:
    """Exports a run folder as ``out/<version>``; returns that folder.

    Args:
        run: A training run folder (``config.yaml`` and ``segmenter_*.keras``).
        out: The model's folder in the TF Serving / Triton layout (versions beneath it);
            default `DEFAULT_EXPORT_DIR`, or `DEFAULT_ONNX_DIR` for ONNX.
        version: The version number (default: the next free one); an existing version is
            never overwritten.
        gate_threshold: "auto" (`calibrate_gate`) or a probability in [0, 1].
        overrides: ``--set`` changes of the run's config (`prepare_run`).
        export_format: "saved_model" (TF Serving) or "onnx" (`tfcovseg.inference.onnx`:
            onnxruntime, Triton; also writes ``out/config.pbtxt``).

    Raises:
        ExportError: no run, no segmenter, a taken version, a bad threshold, a model
            folder holding the other format.
    """
    if export_format not in EXPORT_FORMATS:
        raise ExportError(f"--format must be one of {', '.join(EXPORT_FORMATS)}")
    if out is None:
        out = DEFAULT_ONNX_DIR if export_format == "onnx" else DEFAULT_EXPORT_DIR
    run, out = _run_folder(run), Path(out)
    if version is not None and int(version) < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    if gate_threshold != "auto":  # before the models load
        _given_threshold(gate_threshold)
    try:
        check_output_dir(out)
    except OutputError as e:
        raise ExportError(str(e)) from None
    # Held while the version is chosen and written: a second export to the same folder
    # is refused, and what a killed one left can go.
    with exclusive_folder(out, error=ExportError):
        _check_model_folder(out, export_format)
        target = out / str(int(next_version(out) if version is None else version))
        for left in remove_partial_directories(target):  # held here: no export is writing
            log(f"removed {left}, left by an interrupted export")
        if target.exists():
            raise ExportError(
                f"{target} already exists: served versions are immutable; omit --version "
                f"to write version {next_version(out)}"
            )
        graph = prepare_run(run, gate_threshold, int(target.name), overrides)
        _warn_default_window(graph, log)
        if export_format == "onnx":
            config_path, config_text = _triton_config(out, graph.num_classes)
        # Model servers only load folders named by a number: the temporary one is invisible.
        with atomic_directory(target) as tmp:
            if export_format == "onnx":
                from tfcovseg.inference.onnx import write_onnx

                write_onnx(graph, tmp)
            else:
                write_saved_model(graph, tmp)
        if export_format == "onnx" and config_text is not None:
            atomic_write_text(config_path, config_text)
    gate = graph.metadata["gate"]
    log(f"exported {run} as {target} (gate threshold {gate['threshold']:.3f}, {gate['method']})")
    burden = graph.metadata["burden_rule"]
    if burden["threshold"] is None:
        log(f"patient call by lesion burden: {burden['method']}")
    else:
        log(
            f"patient call by lesion burden: COVID-19 at >= {100 * burden['threshold']:.2f} % "
            f"of the lungs (chosen on {burden['validation_patients']} validation patients)"
        )
    return target


def _warn_default_window(graph, log) -> None:
    if graph.pre_windowed and tuple(graph.hu_window) == DEFAULT_WINDOW:
        log(
            "warning: the model trained on windowed images and model.hu_window is the "
            f"default {list(DEFAULT_WINDOW)}: HU studies will be windowed with it. Estimate "
            "the window of your images (python -m data_tools.windows --images DIR) and set "
            "model.hu_window in the run's config.yaml"
        )
