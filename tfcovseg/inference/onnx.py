"""The serving graph as ONNX, for onnxruntime, Triton and TensorRT.

    python -m tfcovseg.export --run runs/NAME --format onnx [--out saved_models/tfcovseg-onnx]

Writes Triton's model-repository layout: ``OUT/<N>/model.onnx`` (N: the next free
version), the export metadata beside it as ``OUT/<N>/tfcovseg.json`` and in the model's
``metadata_props`` (key ``tfcovseg``), and ``OUT/config.pbtxt`` (platform
``onnxruntime_onnx``, the inputs and outputs below).

One graph, the SavedModel's ``serving_default`` traced by tf2onnx from the same
`InferenceGraph` (so the two agree; a test holds them within 1e-4):

- input ``hu`` float32 [batch, H, W], Hounsfield units of any H, W;
- output ``masks`` float32 [batch, H, W, C], lesion probabilities at the input size;
- output ``covid_probability`` float32 [batch], the slice gate's probability (the
  SavedModel's ``classify``; the highest lesion probability for a run without a
  classifier, the metadata's ``slice_score: lesion``).

The resize to the model's size and back and the windowing are inside, as in the
SavedModel: the resize is `data_tools.resize`'s, two matrix products, which ONNX has
(TensorFlow's antialiased resize has no ONNX op). What ONNX cannot do: refuse a request.
The SavedModel's input checks (rank, empty slices, NaN) have no ONNX counterpart, so a
NaN in ``hu`` gives NaN probabilities; the gate threshold and the patient and severity rules
are applied by the caller, from the metadata, as with the SavedModel.

Research use, not a medical device.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.files import atomic_write_text, json_text
from tfcovseg import require_tensorflow

tf = require_tensorflow("python -m tfcovseg.export --format onnx")

MODEL_NAME = "model.onnx"
METADATA_NAME = "tfcovseg.json"
METADATA_KEY = "tfcovseg"
# Opset 17 (onnxruntime >= 1.13, TensorRT >= 8.6): every op the graph needs, widely served.
OPSET = 17
INSTALL = 'pip install "tfcovseg[onnx]" (tf2onnx, onnx, onnxruntime)'


def _tf2onnx():
    try:
        import tf2onnx
    except ImportError:
        raise ImportError(f"the ONNX export needs tf2onnx: {INSTALL}") from None
    return tf2onnx


def serving_function(graph):
    """``hu`` [batch, H, W] -> ``masks`` and ``covid_probability``: the SavedModel's
    ``serving_default`` without its input checks (ONNX has no op that fails a request)."""

    return tf.function(
        graph.serve_unchecked, input_signature=[tf.TensorSpec([None, None, None], tf.float32, "hu")]
    )


def triton_config(name: str, num_classes: int) -> str:
    """Triton's ``config.pbtxt`` for the model (batch in the dims: max_batch_size 0)."""
    return f"""# Triton model configuration by tfcovseg (research use, not a medical device).
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [
  {{ name: "hu" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] }}
]
output [
  {{ name: "masks" data_type: TYPE_FP32 dims: [ -1, -1, -1, {int(num_classes)} ] }},
  {{ name: "covid_probability" data_type: TYPE_FP32 dims: [ -1 ] }}
]
"""


def write_onnx(graph, path: Path) -> None:
    """Writes ``path/model.onnx`` and ``path/tfcovseg.json`` (the metadata)."""
    tf2onnx = _tf2onnx()
    import onnx

    function = serving_function(graph)
    # Freezing the graph warns about a table initializer it cannot serialise (a lookup
    # table the graph does not use): 3 lines of TensorFlow noise on every export.
    tf_log = tf.get_logger()
    level = tf_log.level
    tf_log.setLevel("ERROR")
    try:
        model, _ = tf2onnx.convert.from_function(
            function, input_signature=function.input_signature, opset=OPSET
        )
    finally:
        tf_log.setLevel(level)
    unsupported = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if unsupported:  # tf2onnx keeps ops it cannot map; onnxruntime would refuse them
        raise RuntimeError(f"ops without an ONNX counterpart in the graph: {unsupported}")
    metadata = json_text(graph.metadata, indent=None, sort_keys=True)
    onnx.helper.set_model_props(
        model, {METADATA_KEY: metadata, "disclaimer": graph.metadata["disclaimer"]}
    )
    model.producer_name = "tfcovseg"
    onnx.save_model(model, str(path / MODEL_NAME))
    atomic_write_text(path / METADATA_NAME, json_text(graph.metadata, sort_keys=True) + "\n")


def read_metadata(model_path) -> dict:
    """The export metadata stored in an ONNX model written by `write_onnx`."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{model_path} holds no tfcovseg metadata (not written by tfcovseg)")
    return json.loads(props[METADATA_KEY])
