"""Client side of TF Serving for a tfcovseg export: REST and gRPC requests from DICOM slices
(the library of ``python -m tfcovseg.serving_client``,
    `tfcovseg.cli.serving_client`):

    python -m tfcovseg.serving_client --dicom slice.dcm [--rest http://localhost:8501 |
        --grpc localhost:8500] [--model tfcovseg] [--version N] [--signature serving_default]
        [--export saved_models/tfcovseg]

Builders and parsers (no server needed, so they are tested offline):

- REST, ``POST /v1/models/NAME[/versions/N]:predict``: `rest_url`, `rest_request` in the
  row ("instances") or columnar ("inputs") format, `parse_rest_response` for either answer
  format ("predictions" / "outputs") and the ``{"error": ...}`` answer;
- gRPC ``tensorflow.serving.PredictionService/Predict``: `grpc_request` (a
  ``PredictRequest`` from `tensorflow-serving-api`) and `parse_grpc_response`;
- `predict_rest` and `predict_grpc` send them;
- `export_metadata` reads the served export's metadata from its folder and `score_name`
  names what its ``covid_probability`` is (a classifier's or the highest lesion
  probability).

Inputs are Hounsfield units [H, W] or [batch, H, W] (`hu_from_dicom` reads a DICOM CT
slice the way training does); the export resizes and windows inside the graph. Outputs
come back as numpy arrays: ``masks`` [batch, H, W, C] and ``covid_probability`` [batch].

`tensorflow-serving-api` is needed for gRPC only. It declares a dependency on the full
``tensorflow`` wheel; next to ``tensorflow-cpu`` install it without dependencies:
``pip install --no-deps tensorflow-serving-api`` (grpcio and protobuf come with TensorFlow).

Research use, not a medical device.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from tfcovseg.constants import EXPORT_METADATA, EXPORT_METADATA_FORMAT
from tfcovseg.evaluation.verdict import slice_score_name

SERVING_API_HINT = (
    "gRPC needs tensorflow-serving-api: pip install --no-deps tensorflow-serving-api "
    "(without --no-deps it pulls the full tensorflow wheel next to tensorflow-cpu)"
)
FORMS = ("instances", "inputs")
# The export's signatures that take slices in HU ("hu"): what this client sends
# (`tfcovseg.inference.export.SIGNATURES` has the others, for images and examples).
HU_SIGNATURES = ("serving_default", "classify", "segment")


class ServingError(Exception):
    """TF Serving answered with an error, or the answer cannot be read."""


def hu_from_dicom(path) -> np.ndarray:
    """One axial DICOM CT slice in Hounsfield units [H, W] float32 (`data_tools.dicom_io`).

    Raises:
        ValueError: naming the file, for what `predict` would not segment either: no CT
            image, a localizer, a slice far from axial, values that are not HU.
    """
    from data_tools import dicom_io
    from data_tools.ct_values import check_ct_values

    path = Path(path)
    try:
        kind, ds = dicom_io.read_header(path)
        if kind != "ct":
            raise dicom_io.SkipFile("a DICOM SEG object, not a CT image")
        try:
            header = dicom_io.slice_header(path, ds)
        except ValueError as e:
            raise dicom_io.SkipFile(f"malformed geometry ({e})") from None
        tilt = dicom_io.tilt_deg(np.cross(header.orientation[:3], header.orientation[3:]))
        if tilt > dicom_io.MAX_TILT_DEG:
            raise dicom_io.SkipFile(
                f"not an axial slice ({tilt:.0f} degrees from axial): the model segments "
                "axial slices"
            )
        hu = header.read_hu()
        check_ct_values(hu)
        return hu
    except dicom_io.SkipFile as e:
        raise ValueError(f"{path.name}: {e}") from None


def export_metadata(path, version: int | None = None) -> dict:
    """The metadata of the export TF Serving serves (``assets/tfcovseg.json``, what its
    ``metadata`` signature returns), from its version folder or its model folder (version
    `version`, else the newest: what TF Serving serves under its default version policy).
    Raises ValueError naming the path."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--export {path} is not a folder")
    folder = path
    if (path / "saved_model.pb").is_file():
        if version is not None:
            _check_version_folder(path, version)
    else:
        # TF Serving reads a folder "007" as version 7.
        numbered = {int(p.name): p for p in path.iterdir() if _is_version(p)}
        if numbered:
            wanted = version if version is not None else max(numbered)
            if wanted not in numbered:
                held = ", ".join(map(str, sorted(numbered)))
                raise ValueError(f"--export {path} has no version {wanted} (it holds {held})")
            folder = numbered[wanted]
    file = folder / "assets" / EXPORT_METADATA
    if not file.is_file():
        raise ValueError(
            f"--export {path}: {file} does not exist (the folder of a tfcovseg SavedModel "
            "export, or of its numbered versions)"
        )
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--export {path}: {file} cannot be read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_METADATA_FORMAT:
        raise ValueError(f"--export {path}: {file} is not a tfcovseg export's metadata")
    names = meta.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names)
    ):
        raise ValueError(f"--export {path}: {file}: class_names is not a list of names")
    return meta


def _check_version_folder(path: Path, version: int) -> None:
    """ValueError unless the version folder `path` is version `version` as TF Serving
    reads it (its own name through "." or a link such as current -> 3)."""
    named = path.resolve()
    if not _is_version(named):  # TF Serving serves numbered folders only
        raise ValueError(
            f"--export {path} is not a numbered version folder, so not the version "
            f"{version} TF Serving serves: give the model folder or its {version}/"
        )
    if int(named.name) != version:
        raise ValueError(
            f"--export {path} is version {int(named.name)}, --version asks for {version}"
        )


def _is_version(path: Path) -> bool:
    return path.is_dir() and path.name.isascii() and path.name.isdigit()


def score_name(metadata: dict | None) -> str:
    """What the answer's ``covid_probability`` is, for a reader: the slice classifier's
    "COVID-19 probability" or, for a model without one, its "highest lesion probability"
    (`tfcovseg.evaluation.verdict`); "slice score" when the export is not at hand."""
    if metadata is None:
        return "slice score"
    try:
        return slice_score_name(metadata)
    except ValueError as e:
        raise ValueError(f"the export's metadata: {e}") from None


def _batch(hu) -> np.ndarray:
    hu = np.asarray(hu, np.float32)
    if hu.ndim == 2:
        hu = hu[None]
    if hu.ndim != 3:
        raise ValueError(f"hu must be [H, W] or [batch, H, W], got shape {hu.shape}")
    if not np.isfinite(hu).all():
        raise ValueError("hu holds NaN or infinite values")
    return hu


# ----------------------------------------------------------------------------- REST


def rest_url(base: str, model: str = "tfcovseg", version: int | None = None) -> str:
    """``BASE/v1/models/MODEL[/versions/N]:predict``, e.g. base http://localhost:8501.

    Raises:
        ValueError: a base that is not an http(s)://HOST[:PORT] address.
    """
    try:
        parsed = urllib.parse.urlsplit(base)
        usable = parsed.scheme in ("http", "https") and parsed.hostname
        usable = usable and (parsed.port is None or parsed.port > 0)
    except ValueError:  # a port that is not a number or above 65535, a broken [IPv6]
        usable = False
    if not usable:
        raise ValueError(
            f"the REST address {base!r} is not http://HOST:PORT (TF Serving's REST port, "
            "e.g. http://localhost:8501)"
        )
    path = f"{base.rstrip('/')}/v1/models/{model}"
    if version is not None:
        path += f"/versions/{int(version)}"
    return path + ":predict"


def rest_request(hu, signature: str = "serving_default", form: str = "instances") -> dict:
    """The JSON body of a REST predict request for slices in HU.

    Args:
        hu: [H, W] or [batch, H, W] Hounsfield units.
        signature: The export's signature ("serving_default", "classify", "segment").
        form: "instances" (row format: one object per slice) or "inputs" (columnar).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    hu = _batch(hu)
    if form == "instances":
        return {"signature_name": signature, "instances": [{"hu": s.tolist()} for s in hu]}
    return {"signature_name": signature, "inputs": {"hu": hu.tolist()}}


def parse_rest_response(body) -> dict[str, np.ndarray]:
    """Arrays from a REST predict answer (a dict or its JSON text), either format.

    Row format: ``{"predictions": [{"masks": ..., "covid_probability": ...}, ...]}`` (or a
    list of values when the signature has one output); columnar: ``{"outputs": {...}}``
    (or the value of the single output).

    Raises:
        ServingError: an ``{"error": ...}`` answer or an unknown shape of answer.
    """
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except ValueError as e:
            raise ServingError(f"the answer is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ServingError(f"unexpected answer of type {type(body).__name__}")
    if "error" in body:
        raise ServingError(f"TF Serving: {body['error']}")
    try:
        if "predictions" in body:
            rows = body["predictions"]
            if rows and isinstance(rows[0], dict):
                return {k: np.asarray([r[k] for r in rows], np.float32) for k in rows[0]}
            return {"output": np.asarray(rows, np.float32)}
        if "outputs" in body:
            outputs = body["outputs"]
            if isinstance(outputs, dict):
                return {k: np.asarray(v, np.float32) for k, v in outputs.items()}
            return {"output": np.asarray(outputs, np.float32)}
    except (KeyError, TypeError, ValueError) as e:  # a row without a key, ragged, text
        raise ServingError(f"{MALFORMED}: {type(e).__name__}: {e}") from None
    raise ServingError(f"the answer has neither 'predictions' nor 'outputs': keys {list(body)}")


MALFORMED = "the server's answer is malformed"


def checked_answer(out: dict, n_slices: int, size=None) -> dict[str, np.ndarray]:
    """The answer's ``covid_probability`` [n] and ``masks`` [n, H, W, C] (a single-output
    signature's unnamed ``output`` named by its rank), checked against the `n_slices`
    sent and, with `size` (H, W), their size: a tfcovseg export answers masks at the
    size of the slices it was sent.

    Raises:
        ServingError: neither output, a count other than `n_slices`, a wrong rank, masks
            of another size, or values that are not probabilities.
    """
    if "output" in out:  # REST answers of a single-output signature are unnamed
        out = {"covid_probability" if out["output"].ndim <= 2 else "masks": out["output"]}
    found = {}
    for key, rank in (("covid_probability", 1), ("masks", 4)):
        if key not in out:
            continue
        value = np.asarray(out[key], np.float32)
        if key == "covid_probability" and value.ndim == 2 and value.shape[-1] == 1:
            value = value[:, 0]
        if value.ndim != rank or len(value) != n_slices:
            raise ServingError(
                f"{MALFORMED}: {key} has shape {list(value.shape)} for {n_slices} slice(s) "
                f"sent ({'[n]' if rank == 1 else '[n, H, W, C]'} expected)"
            )
        if key == "masks" and size is not None and tuple(value.shape[1:3]) != tuple(size):
            (h, w), (sh, sw) = value.shape[1:3], size
            raise ServingError(
                f"{MALFORMED}: masks of {h}x{w} pixels for slices of {sh}x{sw} sent (a "
                "tfcovseg export answers at the slices' size)"
            )
        if not (np.isfinite(value).all() and value.min() >= 0.0 and value.max() <= 1.0):
            raise ServingError(f"{MALFORMED}: {key} holds values outside [0, 1] (or NaN)")
        found[key] = value
    if not found:
        raise ServingError(f"{MALFORMED}: no covid_probability or masks in {sorted(out)}")
    return found


def predict_rest(url: str, hu, signature="serving_default", form="instances", timeout=60.0):
    """POSTs a predict request to a TF Serving REST `url` (`rest_url`); returns arrays."""
    data = json.dumps(rest_request(hu, signature, form)).encode("utf-8")
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return parse_rest_response(response.read())
    except urllib.error.HTTPError as e:  # TF Serving puts {"error": ...} in the body
        body = e.read()
        try:
            return parse_rest_response(body)
        except ServingError as problem:  # not TF Serving's answer (a proxy's page, say)
            text = body[:200].decode("utf-8", "replace").strip()
            raise ServingError(f"{url}: HTTP {e.code} {e.reason}: {text or problem}") from None
    except http.client.HTTPException as e:  # an answer that is not HTTP at all
        raise ServingError(
            f"{url} did not answer as an HTTP server ({type(e).__name__}): is it TF "
            "Serving's gRPC port? Its REST port is --rest_api_port (8501 in the docker "
            "image), gRPC --port (8500): give that one with --grpc"
        ) from None
    except urllib.error.URLError as e:
        raise ServingError(f"cannot reach {url}: {e.reason}") from None
    except OSError as e:  # timeouts and dropped connections after connecting
        raise ServingError(f"{url}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- gRPC


def _serving_apis():
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError:
        raise ImportError(SERVING_API_HINT) from None
    return predict_pb2, prediction_service_pb2_grpc


def grpc_request(hu, model="tfcovseg", signature="serving_default", version=None):
    """A ``tensorflow.serving.PredictRequest`` for slices in HU."""
    import tensorflow as tf

    predict_pb2, _ = _serving_apis()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    request.inputs["hu"].CopyFrom(tf.make_tensor_proto(_batch(hu), dtype=tf.float32))
    return request


def parse_grpc_response(response) -> dict[str, np.ndarray]:
    """Arrays from a ``PredictResponse`` (its ``outputs`` map of TensorProtos)."""
    import tensorflow as tf

    return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}


def predict_grpc(
    target: str, hu, model="tfcovseg", signature="serving_default", version=None, timeout=60.0
):
    """Sends a Predict call to TF Serving's gRPC `target` (host:port); returns arrays."""
    import grpc

    _, service = _serving_apis()
    request = grpc_request(hu, model, signature, version)
    # Masks of 512 x 512 x C float32 slices exceed gRPC's 4 MB default message size.
    options = [("grpc.max_receive_message_length", 512 << 20)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = service.PredictionServiceStub(channel)
        try:
            return parse_grpc_response(stub.Predict(request, timeout=timeout))
        except grpc.RpcError as e:
            raise ServingError(f"TF Serving at {target}: {e.code().name}: {e.details()}") from None
