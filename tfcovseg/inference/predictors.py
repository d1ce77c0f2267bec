"""The models `predict` runs: an exported SavedModel (TF Serving's format) or a training
run folder, behind one interface (classify, segment, serve, serve_image and the metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_tools.files import files_sha256
from tfcovseg import require_tensorflow
from tfcovseg.evaluation.verdict import slice_score
from tfcovseg.inference.errors import PredictionError

tf = require_tensorflow("python -m tfcovseg.predict")


class SavedModelPredictor:
    """A tfcovseg SavedModel (``tfcovseg.export``) loaded with `tf.saved_model.load`."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._model = tf.saved_model.load(str(path))
        except Exception as e:  # not a SavedModel, corrupt, missing variables
            raise PredictionError(f"cannot load the SavedModel {path}: {e}") from None
        missing = [
            s for s in ("classify", "segment", "metadata") if s not in self._model.signatures
        ]
        if missing:
            raise PredictionError(
                f"{path} is not a tfcovseg export: it lacks the signatures {missing}"
            )
        self.metadata = json.loads(self._model.signatures["metadata"]()["json"].numpy().decode())
        self.source = f"SavedModel {path.parent.name}/{path.name}"
        # Results kept in an output folder are this model's only if the files are the same
        # (another model copied to the same folder name is another model).
        self.sha256 = files_sha256(sorted(p for p in path.rglob("*") if p.is_file()), path)

    def classify(self, hu: np.ndarray) -> np.ndarray:
        out = self._model.signatures["classify"](hu=tf.constant(hu, tf.float32))
        return out["covid_probability"].numpy()

    def segment(self, hu: np.ndarray) -> np.ndarray:
        return self._model.signatures["segment"](hu=tf.constant(hu, tf.float32))["masks"].numpy()

    def serve(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._model.signatures["serving_default"](hu=tf.constant(hu, tf.float32))
        return out["covid_probability"].numpy(), out["masks"].numpy()

    def serve_image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if "serve_image" not in self._model.signatures:
            raise PredictionError(
                f"{self.path} has no serve_image signature (exported by an older tfcovseg): "
                "export its run again to predict on PNG/JPEG slices"
            )
        out = self._model.signatures["serve_image"](image=tf.constant(image, tf.float32))
        return out["covid_probability"].numpy(), out["masks"].numpy()


class RunPredictor:
    """A training run folder, through the same graph functions the export saves."""

    def __init__(self, run: Path):
        from tfcovseg.inference.export import ExportError, prepare_run

        try:
            graph = prepare_run(run)
        except ExportError as e:
            raise PredictionError(str(e)) from None
        spec = [tf.TensorSpec([None, None, None], tf.float32)]
        self._classify = tf.function(graph.classify, input_signature=spec)
        self._segment = tf.function(graph.segment, input_signature=spec)
        self._serve = tf.function(graph.serve, input_signature=spec)
        self._serve_image = tf.function(graph.serve_image, input_signature=spec)
        self.metadata = graph.metadata
        self.source = f"run folder {run.name}"
        files = [run / "config.yaml", *sorted(run.glob("*.keras"))]
        self.sha256 = files_sha256([p for p in files if p.is_file()], run)

    def classify(self, hu: np.ndarray) -> np.ndarray:
        return self._classify(tf.constant(hu, tf.float32))["covid_probability"].numpy()

    def segment(self, hu: np.ndarray) -> np.ndarray:
        return self._segment(tf.constant(hu, tf.float32))["masks"].numpy()

    def serve(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._serve(tf.constant(hu, tf.float32))
        return out["covid_probability"].numpy(), out["masks"].numpy()

    def serve_image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._serve_image(tf.constant(image, tf.float32))
        return out["covid_probability"].numpy(), out["masks"].numpy()


def open_model(path) -> SavedModelPredictor | RunPredictor:
    """A predictor from a SavedModel version folder, a model folder (its newest version)
    or a training run folder."""
    path = Path(path)
    if not path.exists():
        raise PredictionError(f"--model {path} does not exist")
    if (path / "saved_model.pb").is_file():
        return SavedModelPredictor(path)
    if (path / "config.yaml").is_file():
        return RunPredictor(path)
    from tfcovseg.inference.export import existing_versions

    versions = [path / str(v) for v in reversed(existing_versions(path))]
    for folder in versions:
        if (folder / "saved_model.pb").is_file():
            return SavedModelPredictor(folder)
    onnx = [f for f in [path, *versions] if (f / "model.onnx").is_file()]  # onnx.MODEL_NAME
    if onnx:  # "neither ... a folder of numbered versions" misled: it is one
        raise PredictionError(
            f"--model {path}: {onnx[0]} is an ONNX export (for onnxruntime or Triton); "
            "predict takes a SavedModel (python -m tfcovseg.export --format saved_model) "
            "or a training run folder"
        )
    raise PredictionError(
        f"--model {path} is neither a SavedModel (saved_model.pb), a folder of numbered "
        f"versions nor a training run (config.yaml)"
    )


def check_metadata(predictor) -> None:
    """Refuses, before any study is read, a model whose metadata predict cannot honour."""
    meta = predictor.metadata
    if meta.get("pre_windowed") and "windowing" not in meta:
        raise PredictionError(
            f"{predictor.source} was trained on 8-bit windowed images and exported before "
            "exports windowed HU for such models: export its run again"
        )
    try:
        slice_score(meta)
    except ValueError as e:
        raise PredictionError(f"{predictor.source}: its metadata's {e}") from None
