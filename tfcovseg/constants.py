"""Constants shared by the library and its command-line doors (no heavy imports here, so
that `tfcovseg.cli` answers ``--help`` before TensorFlow loads)."""

from __future__ import annotations

from pathlib import Path

from data_tools.features import LESION_CLASSES, SEVERITIES  # noqa: F401 (LESION_CLASSES re-exported)

DISCLAIMER = "Research use, not a medical device."

# The model each training phase writes into the run folder (``<name>_best.keras``): what
# a resume, evaluate and export expect of a phase ``state.json`` records as completed.
RUN_MODELS = {
    "segmentation": "segmenter",
    "self_training": "student",
    "classification": "classifier",
}

# Where `tfcovseg.export` (and the quickstart) write TF Serving versions by default.
DEFAULT_EXPORT_DIR = Path("saved_models") / "tfcovseg"
# ... and ONNX versions (`--format onnx`), a model folder of their own: one format per
# model folder, as Triton's repository wants.
DEFAULT_ONNX_DIR = Path("saved_models") / "tfcovseg-onnx"
EXPORT_FORMATS = ("saved_model", "onnx")
# The export's metadata beside its graph (``<version>/assets/``), as its ``metadata``
# signature returns it: read by clients that have the export's folder but not TensorFlow.
EXPORT_METADATA = "tfcovseg.json"
EXPORT_METADATA_FORMAT = "tfcovseg-export"  # its "format"

# How `predict` treats the grey levels of PNG/JPEG slices (`tfcovseg.inference.images`).
INTENSITY_MODES = ("match", "as-is")

# Severity grades in order (the records' grades less "unknown"), and the name of the
# all-lesions total beside the lesion types.
SEVERITY_ORDER = tuple(s for s in SEVERITIES if s != "unknown")
TOTAL = "total"
