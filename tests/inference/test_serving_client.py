"""tfcovseg.serving_client against the TF Serving request/response formats, offline.

The TF Serving binary cannot be installed here, so two stand-ins serve the exported
SavedModel in-process: an HTTP server that follows the REST predict API (row and columnar
formats, ``{"error": ...}`` with HTTP 400) and a gRPC server implementing
``tensorflow.serving.PredictionService`` from tensorflow-serving-api's generated code.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
import tensorflow as tf
from pydicom.data import get_testdata_file
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tfcovseg.cli.serving_client import main as client_main
from tfcovseg.inference import serving_client as client

MODEL = "tfcovseg"


@pytest.fixture(scope="module")
def loaded(phantom_export):
    return tf.saved_model.load(str(phantom_export))


def _run_signature(loaded, name, inputs):
    if name not in loaded.signatures:
        raise ValueError(f'Serving signature name: "{name}" not found in signature def')
    fn = loaded.signatures[name]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


class _RestHandler(BaseHTTPRequestHandler):
    """POST /v1/models/<name>[/versions/<n>]:predict as TF Serving's REST API answers it."""

    loaded = None

    def log_message(self, *args):
        pass

    def _reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        path = self.path
        if not (path.startswith(f"/v1/models/{MODEL}") and path.endswith(":predict")):
            return self._reply(404, {"error": f"Servable not found for request: {path}"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        signature = body.get("signature_name", "serving_default")
        try:
            if "instances" in body:
                rows = body["instances"]
                names = rows[0].keys()
                inputs = {k: np.asarray([r[k] for r in rows], np.float32) for k in names}
                out = _run_signature(self.loaded, signature, inputs)
                n = len(rows)
                predictions = [{k: v[i].tolist() for k, v in out.items()} for i in range(n)]
                if len(out) == 1:
                    predictions = [next(iter(p.values())) for p in predictions]
                return self._reply(200, {"predictions": predictions})
            if "inputs" in body:
                inputs = {k: np.asarray(v, np.float32) for k, v in body["inputs"].items()}
                out = _run_signature(self.loaded, signature, inputs)
                outputs = {k: v.tolist() for k, v in out.items()}
                if len(outputs) == 1:
                    outputs = next(iter(outputs.values()))
                return self._reply(200, {"outputs": outputs})
            return self._reply(400, {"error": "Missing 'inputs' or 'instances' key"})
        except Exception as e:  # what TF Serving does with a failed run
            return self._reply(400, {"error": str(e).splitlines()[0]})


@pytest.fixture(scope="module")
def rest_server(loaded):
    handler = type("Handler", (_RestHandler,), {"loaded": loaded})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, loaded):
        self.loaded = loaded
        self.requests = []

    def Predict(self, request, context):
        self.requests.append(request)
        if request.model_spec.name != MODEL:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"Servable not found: {request.model_spec.name}"
            )
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        try:
            out = _run_signature(
                self.loaded, request.model_spec.signature_name or "serving_default", inputs
            )
        except Exception as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e).splitlines()[0])
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        for key, value in out.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


@pytest.fixture(scope="module")
def grpc_server(loaded):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service = _PredictionService(loaded)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", service
    server.stop(0)


def _slices(rng, n=2, size=48):
    return rng.uniform(-1100.0, 200.0, (n, size, size)).astype(np.float32)


def test_rest_urls_and_bodies_follow_the_api(rng):
    assert client.rest_url("http://h:8501/") == "http://h:8501/v1/models/tfcovseg:predict"
    assert (
        client.rest_url("http://h:8501", "m", 3) == "http://h:8501/v1/models/m/versions/3:predict"
    )
    hu = _slices(rng)
    rows = json.loads(json.dumps(client.rest_request(hu)))
    assert rows["signature_name"] == "serving_default" and len(rows["instances"]) == 2
    np.testing.assert_array_equal(np.asarray(rows["instances"][1]["hu"], np.float32), hu[1])
    cols = client.rest_request(hu[0], "classify", form="inputs")
    assert cols["signature_name"] == "classify"
    assert np.asarray(cols["inputs"]["hu"]).shape == (1, 48, 48)
    with pytest.raises(ValueError, match="form"):
        client.rest_request(hu, form="rows")
    with pytest.raises(ValueError, match="shape"):
        client.rest_request(hu[..., None])
    with pytest.raises(ValueError, match="NaN"):
        client.rest_request(np.full((4, 4), np.nan))


def test_rest_answers_parse_in_both_formats():
    two = {"predictions": [{"masks": [[[0.1]]], "covid_probability": 0.2}] * 2}
    out = client.parse_rest_response(json.dumps(two))
    assert out["masks"].shape == (2, 1, 1, 1) and out[
        "covid_probability"
    ].tolist() == pytest.approx([0.2, 0.2])
    assert client.parse_rest_response({"predictions": [0.3, 0.4]})["output"].shape == (2,)
    cols = client.parse_rest_response({"outputs": {"covid_probability": [0.5]}})
    assert cols["covid_probability"].tolist() == [0.5]
    with pytest.raises(client.ServingError, match="bad input"):
        client.parse_rest_response('{"error": "bad input"}')
    with pytest.raises(client.ServingError, match="neither"):
        client.parse_rest_response({"result": 1})


@pytest.mark.parametrize("form", client.FORMS)
def test_rest_round_trip_matches_the_savedmodel(rest_server, loaded, rng, form):
    hu = _slices(rng)
    url = client.rest_url(rest_server)
    out = client.predict_rest(url, hu, form=form)
    direct = _run_signature(loaded, "serving_default", {"hu": hu})
    np.testing.assert_allclose(out["masks"], direct["masks"], atol=1e-6)
    np.testing.assert_allclose(out["covid_probability"], direct["covid_probability"], atol=1e-6)
    gate = client.predict_rest(url, hu, signature="classify", form=form)
    np.testing.assert_allclose(gate["output"], direct["covid_probability"], atol=1e-6)


def test_rest_errors_surface(rest_server, rng):
    with pytest.raises(client.ServingError, match="not found"):
        client.predict_rest(client.rest_url(rest_server), _slices(rng), signature="nope")
    with pytest.raises(client.ServingError, match="Servable not found"):
        client.predict_rest(client.rest_url(rest_server, "other"), _slices(rng))
    with pytest.raises(client.ServingError, match="cannot reach"):
        client.predict_rest("http://127.0.0.1:9/v1/models/x:predict", _slices(rng), timeout=2)


class _NotFoundPage(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802  (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b"<html>no such page</html>")

    def log_message(self, *args):
        pass


def _serve_once(answer: bytes) -> str:
    """A port that answers the first connection with `answer`, whatever it was asked."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))

    def reply():
        with server, server.accept()[0] as conn:
            data = b""  # the whole request first: closing on a half-read one resets it
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(answer)

    threading.Thread(target=reply, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}"


def test_answers_that_are_not_tf_serving_are_named(rng, capsys):
    """A gRPC port given as --rest raised http.client.BadStatusLine with a traceback; a
    non-JSON error page said only "the answer is not JSON"; --version -1 was sent."""
    url = client.rest_url(_serve_once(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00"))
    with pytest.raises(client.ServingError, match="gRPC port"):
        client.predict_rest(url, _slices(rng), timeout=10)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(client.ServingError, match="HTTP 404 Not Found: <html>no such"):
            client.predict_rest(client.rest_url(base), _slices(rng), timeout=10)
    finally:
        server.shutdown()
    path = get_testdata_file("CT_small.dcm")
    assert client_main(["--dicom", path, "--rest", "http://x", "--version", "-1"]) == 2
    assert "--version must be a positive integer" in capsys.readouterr().err


def _json_reply(body: str) -> bytes:
    data = body.encode()
    head = f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
    return head.encode() + b"\r\n\r\n" + data


@pytest.mark.parametrize(
    "answer, message",
    [
        ('{"predictions": []}', r"covid_probability has shape \[0\] for 2"),  # IndexError
        ('{"predictions": null}', r"covid_probability has shape \[\] for 2"),
        ('{"predictions": [{"other": 1}, {"other": 2}]}', "no covid_probability or masks"),
        ('{"predictions": [0.5]}', r"covid_probability has shape \[1\] for 2 slice"),
        ('{"predictions": [{"covid_probability": 0.5}, {}]}', "KeyError"),
        ('{"predictions": [[0.1, 0.2], [0.3]]}', "ValueError"),  # ragged
        ('{"predictions": [NaN, 0.5]}', r"outside \[0, 1\] \(or NaN\)"),  # printed as nan
        ('{"outputs": {"masks": [0.5, 0.5]}}', r"masks has shape \[2\]"),  # an AxisError
        # CT_small.dcm is 128x128: masks of another size are another model's answer.
        (
            '{"outputs": {"masks": ' + json.dumps(np.zeros((2, 4, 4, 1)).tolist()) + "}}",
            "masks of 4x4 pixels for slices of 128x128 sent",
        ),  # fmt: skip
    ],
)
def test_malformed_answers_are_named_not_tracebacks(answer, message, capsys):
    path = get_testdata_file("CT_small.dcm")
    argv = ["--dicom", path, path, "--rest", _serve_once(_json_reply(answer))]
    assert client_main(argv) == 2
    err = capsys.readouterr().err
    assert "the server's answer is malformed" in err and re.search(message, err), err


def test_checked_answer_keeps_good_answers():
    out = client.checked_answer({"output": np.array([[0.25], [1.0]], np.float32)}, 2)
    assert list(out) == ["covid_probability"] and out["covid_probability"].tolist() == [0.25, 1]
    masks = np.zeros((2, 4, 4, 3), np.float32)
    out = client.checked_answer({"masks": masks, "covid_probability": [0.1, 0.9]}, 2)
    assert out["masks"].shape == (2, 4, 4, 3) and out["covid_probability"].shape == (2,)


@pytest.mark.parametrize(
    "base",
    ["localhost:8501", "ftp://localhost:1", "http://localhost:99999", "not a url", "http://[::1"],
)
def test_rest_addresses_that_are_not_http_are_refused(base, capsys):
    with pytest.raises(ValueError, match="is not http://HOST:PORT"):
        client.rest_url(base)
    path = get_testdata_file("CT_small.dcm")
    assert client_main(["--dicom", path, "--rest", base]) == 2
    assert "e.g. http://localhost:8501" in capsys.readouterr().err


def test_only_the_signatures_that_take_hu_are_sent(capsys):
    path = get_testdata_file("CT_small.dcm")
    for name in ("metadata", "serve_image", "foo", ""):
        with pytest.raises(SystemExit) as stop:
            client_main(["--dicom", path, "--rest", "http://x:1", "--signature", name])
        assert stop.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_grpc_request_is_a_predict_request(rng):
    hu = _slices(rng, n=1)
    request = client.grpc_request(hu[0], signature="segment", version=4)
    again = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert again.model_spec.name == MODEL and again.model_spec.signature_name == "segment"
    assert again.model_spec.version.value == 4
    tensor = again.inputs["hu"]
    assert tensor.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in tensor.tensor_shape.dim] == [1, 48, 48]
    np.testing.assert_array_equal(tf.make_ndarray(tensor), hu)


def test_grpc_round_trip_matches_the_savedmodel(grpc_server, loaded, rng):
    target, service = grpc_server
    hu = _slices(rng)
    out = client.predict_grpc(target, hu)
    direct = _run_signature(loaded, "serving_default", {"hu": hu})
    np.testing.assert_allclose(out["masks"], direct["masks"], atol=1e-6)
    np.testing.assert_allclose(out["covid_probability"], direct["covid_probability"], atol=1e-6)
    assert service.requests[-1].model_spec.signature_name == "serving_default"
    with pytest.raises(client.ServingError, match="NOT_FOUND"):
        client.predict_grpc(target, hu, model="other")
    with pytest.raises(client.ServingError, match="INVALID_ARGUMENT"):
        client.predict_grpc(target, hu, signature="nope")


def test_cli_sends_a_real_dicom_slice(rest_server, grpc_server, phantom_export, capsys):
    path = get_testdata_file("CT_small.dcm")
    assert client_main(["--dicom", path, "--rest", rest_server]) == 0
    printed = capsys.readouterr().out
    # Without the export at hand the score is not called a COVID-19 probability.
    assert "CT_small.dcm, slice score " in printed and "not a medical device" in printed
    assert "COVID-19 probability" not in printed.splitlines()[0]
    assert "--export DIR names which" in printed
    # With it (the model folder, or its version folder), the metadata names the score
    # and the classes.
    argv = ["--dicom", path, "--grpc", grpc_server[0], "--signature", "classify"]
    assert client_main([*argv, "--export", str(phantom_export.parent)]) == 0
    printed = capsys.readouterr().out
    assert "CT_small.dcm, COVID-19 probability " in printed and "--export" not in printed
    assert (
        client_main(["--dicom", path, "--rest", rest_server, "--export", str(phantom_export)]) == 0
    )
    assert "lesion pixels ggo " in capsys.readouterr().out
    assert client_main([*argv, "--export", str(phantom_export.parent / "9")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert client_main([*argv, "--export", str(phantom_export), "--version", "2"]) == 2
    assert "is version 1, --version asks for 2" in capsys.readouterr().err
    not_ct = get_testdata_file("MR_small.dcm")
    assert client_main(["--dicom", not_ct, "--rest", rest_server]) == 2
    assert "not CT" in capsys.readouterr().err
    hu = client.hu_from_dicom(path)
    assert hu.shape == (128, 128) and hu.dtype == np.float32


def test_a_slice_predict_would_not_segment_is_refused_by_name(tmp_path):
    # A scout, a sagittal slice and stored values without their rescale to HU were sent
    # to the model as axial HU slices.
    scout, sagittal, stored = (pydicom.dcmread(get_testdata_file("CT_small.dcm")) for _ in "abc")
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    sagittal.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    stored.RescaleIntercept = 1024  # stored values 0-4095 read as if they were HU
    for name, item, reason in (
        ("scout.dcm", scout, "localizer"),
        ("sagittal.dcm", sagittal, "not an axial slice"),
        ("stored.dcm", stored, "not CT in Hounsfield units"),
    ):
        item.save_as(tmp_path / name)
        with pytest.raises(ValueError, match=rf"{name}: .*{reason}"):
            client.hu_from_dicom(tmp_path / name)


def test_the_shipped_model_s_score_is_named_from_its_folder(tmp_path, monkeypatch):
    """The shipped real-CT model has no slice classifier: its covid_probability is its
    highest lesion probability, and the client says so from the folder TF Serving serves."""
    shipped = Path(__file__).resolve().parents[2] / "saved_models" / "covid-semiseg"
    meta = client.export_metadata(shipped)
    assert client.score_name(meta) == "highest lesion probability"
    assert client.score_name(None) == "slice score"
    assert client.export_metadata(shipped, version=1) == meta
    for wrong in ("other", [1]):  # a list raised TypeError (unhashable)
        with pytest.raises(ValueError, match="slice_score must be one of"):
            client.score_name({"slice_score": wrong})
    assert client.score_name({"gate": "x"}) == "COVID-19 probability"  # not an AttributeError
    broken = tmp_path / "007" / "assets"  # TF Serving's version 7
    broken.mkdir(parents=True)
    (broken / "tfcovseg.json").write_text("{")
    with pytest.raises(ValueError, match="007/assets/tfcovseg.json cannot be read"):
        client.export_metadata(tmp_path, version=7)
    (broken / "tfcovseg.json").write_text("[]")
    with pytest.raises(ValueError, match="not a tfcovseg export's metadata"):
        client.export_metadata(tmp_path)
    (broken / "tfcovseg.json").write_text(json.dumps(meta | {"class_names": 5}))
    with pytest.raises(ValueError, match="class_names is not a list of names"):
        client.export_metadata(tmp_path)
    with pytest.raises(ValueError, match="has no version 8 \\(it holds 7\\)"):
        client.export_metadata(tmp_path, version=8)
    # A copy of an export under another name cannot be the version asked for.
    copy = tmp_path / "latest"
    shutil.copytree(shipped / "1", copy)
    assert client.export_metadata(copy) == meta
    with pytest.raises(ValueError, match="latest is not a numbered version folder"):
        client.export_metadata(copy, version=1)
    # Its own folder given as "." (or through a link) is still version 1.
    monkeypatch.chdir(shipped / "1")
    assert client.export_metadata(Path("."), version=1) == meta


def test_an_export_that_is_not_the_served_model_is_named(phantom_export, capsys, monkeypatch):
    """--export of a model whose classes are not the answer's (another model is served)."""
    from tfcovseg.cli import serving_client as command

    two = {"covid_probability": np.array([0.7]), "masks": np.zeros((1, 128, 128, 2), np.float32)}
    monkeypatch.setattr(command, "predict_rest", lambda *a, **k: two)
    path = get_testdata_file("CT_small.dcm")
    argv = ["--dicom", path, "--rest", "http://x:1", "--export", str(phantom_export)]
    assert client_main(argv) == 2
    assert "names 3 lesion classes, the server answered 2" in capsys.readouterr().err
