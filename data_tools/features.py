"""THE TFRecord feature spec: one `tf.train.Example` per CT slice.

Everything that writes or reads records imports this module: the converter
(`data_tools.convert`), the input pipeline (`tfcovseg.data.dataset`), the tests and the serving
signature that takes serialized examples. The spec itself is plain Python, so importing this
module does not import TensorFlow; the functions that build or parse examples do.

Per slice (H, W: the stored size; C: the number of lesion classes of the record set):

| key | type | content |
|---|---|---|
| image/hu | bytes | int16 little-endian, H*W, Hounsfield units (or 0-255 when pre-windowed) |
| image/height, image/width | int64 | H, W |
| image/pre_windowed | int64 | 1 for already windowed 8-bit sources (PNG/JPEG) |
| mask/lesions | bytes | uint8, H*W*C, one binary channel per lesion class |
| mask/num_classes | int64 | C |
| mask/annotated | int64 | 1 when the lesion masks are ground truth, 0 when unknown |
| mask/lung | bytes | uint8, H*W, lung mask (lesions inside the lung count as lung) |
| slice/label | int64 | 1 when the slice has any lesion pixel |
| slice/index | int64 | position of the slice in its sorted series (0 = lowest) |
| slice/position_mm | float | position along the slice normal |
| slice/id, series/id, patient/id | bytes | pseudonyms (salted hashes), never original ids |
| patient/diagnosis | bytes | covid / healthy / bacterial / viral / unknown |
| patient/severity | bytes | none / mild / moderate / severe / unknown |
| spacing_mm | float x3 | row spacing, column spacing, slice spacing of the stored image |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

DIAGNOSES = ("covid", "healthy", "bacterial", "viral", "unknown")
SEVERITIES = ("none", "mild", "moderate", "severe", "unknown")
# The lesion types of Huang et al. (2021), in mask channel order: the default everywhere.
LESION_CLASSES = ("ggo", "consolidation", "fibrosis")

# name -> (kind, length); kind is "bytes", "int64" or "float"; length 1 unless a list.
SPEC: dict[str, tuple[str, int]] = {
    "image/hu": ("bytes", 1),
    "image/height": ("int64", 1),
    "image/width": ("int64", 1),
    "image/pre_windowed": ("int64", 1),
    "mask/lesions": ("bytes", 1),
    "mask/num_classes": ("int64", 1),
    "mask/annotated": ("int64", 1),
    "mask/lung": ("bytes", 1),
    "slice/label": ("int64", 1),
    "slice/index": ("int64", 1),
    "slice/position_mm": ("float", 1),
    "slice/id": ("bytes", 1),
    "series/id": ("bytes", 1),
    "patient/id": ("bytes", 1),
    "patient/diagnosis": ("bytes", 1),
    "patient/severity": ("bytes", 1),
    "spacing_mm": ("float", 3),
}


def slice_fields(
    hu: np.ndarray,
    lesions: np.ndarray,
    lung: np.ndarray,
    *,
    slice_index: int,
    position_mm: float,
    spacing_mm: tuple[float, float, float],
    slice_id: str,
    series_id: str,
    patient_id: str,
    diagnosis: str = "unknown",
    severity: str = "unknown",
    annotated: bool = True,
    pre_windowed: bool = False,
) -> dict[str, Any]:
    """Validated field values of one slice, ready for `encode_example`: the arrays' bytes
    as memoryviews of them (bytes-like, compared equal to bytes; not copied until encoded:
    encode before changing the arrays, `bytes(v)` to keep a field apart from them).

    Args:
        hu: [H, W] intensities (HU, or 0-255 when `pre_windowed`); stored as int16.
        lesions: [H, W, C] binary lesion masks.
        lung: [H, W] binary lung mask.
        Other arguments: see the table in the module docstring.

    Raises:
        ValueError: naming the field that has the wrong shape or value.
    """
    hu = np.asarray(hu)
    lesions = np.asarray(lesions)
    lung = np.asarray(lung)
    if hu.ndim != 2:
        raise ValueError(f"image/hu must be 2-D [H, W], got shape {hu.shape}")
    if lesions.ndim != 3 or lesions.shape[:2] != hu.shape:
        raise ValueError(
            f"mask/lesions must be [H, W, C] with H, W {hu.shape}, got {lesions.shape}"
        )
    if lung.shape != hu.shape:
        raise ValueError(f"mask/lung must have the image's shape {hu.shape}, got {lung.shape}")
    if diagnosis not in DIAGNOSES:
        raise ValueError(f"patient/diagnosis must be one of {DIAGNOSES}, got {diagnosis!r}")
    if severity not in SEVERITIES:
        raise ValueError(f"patient/severity must be one of {SEVERITIES}, got {severity!r}")
    if len(spacing_mm) != 3:
        raise ValueError(f"spacing_mm must have 3 values, got {spacing_mm}")
    if hu.dtype == np.int16:  # integers already (the converter reads most CT so)
        hu16 = hu.astype("<i2", copy=False)
    else:
        hu16 = np.clip(np.rint(hu), -32768, 32767).astype("<i2")
    lesions8, any_lesion = _binary_bytes(lesions)
    return {
        "image/hu": _bytes_of(hu16),
        "image/height": hu.shape[0],
        "image/width": hu.shape[1],
        "image/pre_windowed": int(bool(pre_windowed)),
        "mask/lesions": lesions8,
        "mask/num_classes": lesions.shape[2],
        "mask/annotated": int(bool(annotated)),
        "mask/lung": _binary_bytes(lung)[0],
        "slice/label": int(any_lesion),
        "slice/index": int(slice_index),
        "slice/position_mm": float(position_mm),
        "slice/id": slice_id,
        "series/id": series_id,
        "patient/id": patient_id,
        "patient/diagnosis": diagnosis,
        "patient/severity": severity,
        "spacing_mm": [float(s) for s in spacing_mm],
    }


def _bytes_of(array: np.ndarray) -> memoryview:
    """The bytes of an array, without copying them (`encode_example` copies them once,
    into the example): 1.5 MB a 512x512 slice."""
    if not array.size:
        return memoryview(b"")
    return memoryview(np.ascontiguousarray(array)).cast("B")


def _binary_bytes(mask: np.ndarray) -> tuple[memoryview, bool]:
    """A mask's 0/1 bytes and whether any is 1; a uint8 or bool mask whose bytes are 0s
    and 1s as it is (its maximum costs a tenth of the comparison and copy otherwise)."""
    if mask.dtype in (np.uint8, np.bool_):
        as_bytes = mask.view(np.uint8)  # a bool array may hold other bytes than 0 and 1
        top = int(as_bytes.max(initial=0))
        if top <= 1:
            return _bytes_of(as_bytes), bool(top)
    binary = (mask > 0).astype(np.uint8)
    return _bytes_of(binary), bool(binary.any())


def encode_example(fields: Mapping[str, Any]) -> bytes:
    """Serializes one slice's fields (from `slice_fields`) as a `tf.train.Example`.

    Without TensorFlow (`data_tools.example_proto`): the converter's workers encode. The
    features are written in key order, so a rerun writes byte-identical shards.
    """
    from data_tools.example_proto import serialize_example

    missing = [k for k in SPEC if k not in fields]
    unknown = [k for k in fields if k not in SPEC]
    if missing or unknown:
        raise ValueError(f"example fields: missing {missing}, unknown {unknown}")
    features = {}
    for key, (kind, length) in SPEC.items():
        value = fields[key]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(values) != length:
            raise ValueError(f"{key} must have {length} values, got {len(values)}")
        if kind == "bytes":
            values = [_as_bytes(v) for v in values]
        features[key] = (kind, values)
    return serialize_example(features)


def _as_bytes(value) -> bytes | memoryview:
    """A bytes value as bytes, or as a flat memoryview of bytes (not copied here)."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, memoryview) and value.c_contiguous and value.nbytes:
        return value.cast("B") if value.format != "B" or value.ndim != 1 else value
    return bytes(value)


def feature_spec():
    """The `tf.io.parse_example` spec of every key."""
    import tensorflow as tf

    dtypes = {"bytes": tf.string, "int64": tf.int64, "float": tf.float32}
    return {
        key: tf.io.FixedLenFeature([] if length == 1 else [length], dtypes[kind])
        for key, (kind, length) in SPEC.items()
    }


def parse_example(serialized):
    """Parses one serialized example into its raw features (tensors, bytes undecoded)."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec())


def decode_example(parsed, compact=False):
    """Decodes parsed features into arrays: the decoding half of the input pipeline.

    Args:
        parsed: The output of parsing one example with `feature_spec` (or a part of it
            that holds the image and lesion features: a missing lung mask is not decoded).
        compact: Keep the stored dtypes (int16 image, uint8 masks), 4x smaller in shuffle
            buffers and caches; the input pipeline casts to float32 at the end.

    Returns:
        dict with "hu" float32 [H, W], "lesions" float32 [H, W, C], "lung" float32 [H, W]
        (int16 / uint8 when `compact`), "label" int64 scalar, and the other scalar
        features under their spec keys.
    """
    import tensorflow as tf

    h = tf.cast(parsed["image/height"], tf.int32)
    w = tf.cast(parsed["image/width"], tf.int32)
    c = tf.cast(parsed["mask/num_classes"], tf.int32)
    hu = tf.reshape(tf.io.decode_raw(parsed["image/hu"], tf.int16, little_endian=True), [h, w])
    lesions = tf.reshape(tf.io.decode_raw(parsed["mask/lesions"], tf.uint8), [h, w, c])
    out = {k: v for k, v in parsed.items() if k not in ("image/hu", "mask/lesions", "mask/lung")}
    dtype = None if compact else tf.float32
    out["hu"] = hu if compact else tf.cast(hu, dtype)
    out["lesions"] = lesions if compact else tf.cast(lesions, dtype)
    if "mask/lung" in parsed:
        lung = tf.reshape(tf.io.decode_raw(parsed["mask/lung"], tf.uint8), [h, w])
        out["lung"] = lung if compact else tf.cast(lung, dtype)
    out["label"] = parsed["slice/label"]
    return out


def decode_numpy(serialized: bytes) -> dict[str, Any]:
    """Decodes one serialized example to numpy arrays and Python values (for tests/tools)."""
    import tensorflow as tf

    example = tf.train.Example.FromString(serialized)
    f = example.features.feature
    out: dict[str, Any] = {}
    for key, (kind, length) in SPEC.items():
        if kind == "bytes":
            values = list(f[key].bytes_list.value)
        elif kind == "int64":
            values = list(f[key].int64_list.value)
        else:
            values = list(f[key].float_list.value)
        out[key] = values[0] if length == 1 else values
    h, w, c = out["image/height"], out["image/width"], out["mask/num_classes"]
    out["hu"] = np.frombuffer(out.pop("image/hu"), "<i2").reshape(h, w)
    out["lesions"] = np.frombuffer(out.pop("mask/lesions"), np.uint8).reshape(h, w, c)
    out["lung"] = np.frombuffer(out.pop("mask/lung"), np.uint8).reshape(h, w)
    for key in ("slice/id", "series/id", "patient/id", "patient/diagnosis", "patient/severity"):
        out[key] = out[key].decode("utf-8")
    return out
