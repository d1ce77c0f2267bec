"""python -m tfcovseg.export --format onnx: model.onnx for onnxruntime and Triton."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import tensorflow as tf

from tfcovseg.cli.export import main
from tfcovseg.data.dataset import make_dataset
from tfcovseg.inference.export import ASSET_NAME, ExportError, export_run
from tfcovseg.inference.onnx import read_metadata


@pytest.fixture(scope="module")
def onnx_export(phantom_run, tmp_path_factory):
    """The phantom run exported through the command, and what it printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("onnx") / "tfcovseg-onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["--run", str(phantom_run.run), "--out", str(out), "--format", "onnx"])
    assert code == 0, printed.getvalue()
    return out / "1", printed.getvalue()


def _phantom_slices(records, n=6):
    hu, _ = next(iter(make_dataset(records, "all", batch_size=n, training=False)))
    return hu.numpy()[..., 0]


def test_onnxruntime_matches_the_saved_models_segment_and_classify(
    onnx_export, phantom_export, phantom_run
):
    """The ONNX graph is the SavedModel's: masks (resized in and out) and the gate's
    probability within 1e-4, at the model's size and at another, non-square one."""
    target, _ = onnx_export
    session = onnxruntime.InferenceSession(str(target / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["hu"]
    assert {o.name for o in session.get_outputs()} == {"masks", "covid_probability"}
    saved = tf.saved_model.load(str(phantom_export))
    slices = _phantom_slices(phantom_run.records)
    # 64 x 64 -> 80 x 88 with air around: the graph resizes to 64 x 64 and back
    larger = np.pad(slices, ((0, 0), (10, 6), (4, 20)), constant_values=-1000.0)
    for hu in (slices, larger):
        masks, probability = session.run(["masks", "covid_probability"], {"hu": hu})
        assert masks.shape == (*hu.shape, 3) and probability.shape == (len(hu),)
        expected = saved.signatures["segment"](hu=tf.constant(hu))["masks"].numpy()
        np.testing.assert_allclose(masks, expected, atol=1e-4)
        gate = saved.signatures["classify"](hu=tf.constant(hu))["covid_probability"].numpy()
        np.testing.assert_allclose(probability, gate, atol=1e-4)
    assert masks.max() > 0.01  # not a graph of zeros


def test_triton_layout_and_metadata(onnx_export, phantom_export):
    target, printed = onnx_export
    assert sorted(p.name for p in target.iterdir()) == ["model.onnx", "tfcovseg.json"]
    config = (target.parent / "config.pbtxt").read_text()
    assert f'name: "{target.parent.name}"' in config
    assert 'platform: "onnxruntime_onnx"' in config
    assert "dims: [ -1, -1, -1, 3 ]" in config
    metadata = read_metadata(target / "model.onnx")
    assert metadata == json.loads((target / "tfcovseg.json").read_text())
    saved = json.loads((phantom_export / "assets" / ASSET_NAME).read_text())
    assert metadata["class_names"] == saved["class_names"]
    assert metadata["gate"]["threshold"] == pytest.approx(saved["gate"]["threshold"])
    assert metadata["disclaimer"] == "Research use, not a medical device."
    assert "model.onnx" in printed and "tritonserver --model-repository" in printed


def test_one_format_per_model_folder(onnx_export, phantom_export, phantom_run):
    """Triton and TF Serving load every version of a model folder: no mixing."""
    target, _ = onnx_export
    with pytest.raises(ExportError, match="holds saved_model versions"):
        export_run(phantom_run.run, phantom_export.parent, export_format="onnx", log=print)
    with pytest.raises(ExportError, match="holds onnx versions"):
        export_run(phantom_run.run, target.parent, log=print)
    assert sorted(p.name for p in target.parent.iterdir()) == ["1", "config.pbtxt"]


def test_predict_names_an_onnx_export_given_as_model(onnx_export):
    """It said the folder was "neither ... a folder of numbered versions" (it is one)."""
    from tfcovseg.inference.errors import PredictionError
    from tfcovseg.inference.predictors import open_model

    target, _ = onnx_export
    for given in (target.parent, target):
        with pytest.raises(PredictionError, match="is an ONNX export .* takes a SavedModel"):
            open_model(given)


def test_a_config_for_other_outputs_is_not_overwritten(phantom_run, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.pbtxt").write_text('name: "model"\nplatform: "tensorrt_plan"\n')
    with pytest.raises(ExportError, match="config.pbtxt describes other inputs"):
        export_run(phantom_run.run, out, export_format="onnx", log=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == ["config.pbtxt"]
