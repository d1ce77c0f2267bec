"""TFRecord shards and tf.train.Examples written without TensorFlow (the converter's workers)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf

from data_tools import tfrecord
from data_tools.features import SPEC, encode_example, slice_fields

RECORDS = [b"", b"x", bytes(range(256)) * 40, b"slice" * 1000]


def test_uncompressed_file_is_tensorflows_byte_for_byte(tmp_path):
    theirs = tmp_path / "tf.tfrecord"
    with tf.io.TFRecordWriter(str(theirs)) as writer:
        for record in RECORDS:
            writer.write(record)
    ours = io.BytesIO()
    tfrecord.write(RECORDS, ours)
    assert ours.getvalue() == theirs.read_bytes()


@pytest.mark.parametrize("compression", ["", "GZIP"])
def test_pieces_appended_read_as_one_file(tmp_path, compression):
    """Pieces written apart (one per study, in workers) and appended to a shard read back
    as one TFRecord file, compressed or not."""
    pieces = []
    for i, part in enumerate((RECORDS[:2], RECORDS[2:])):
        pieces.append(tmp_path / f"piece{i}")
        with open(pieces[-1], "wb") as f:
            tfrecord.write(part, f, compression)
    shard = tmp_path / "shard"
    with open(shard, "wb", buffering=0) as target:
        for piece in pieces:
            tfrecord.append_file(piece, target)
    assert shard.read_bytes() == b"".join(p.read_bytes() for p in pieces)
    read = tf.data.TFRecordDataset(str(shard), compression_type=compression or None)
    assert [r.numpy() for r in read] == RECORDS


def test_unknown_compression_is_refused():
    with pytest.raises(ValueError, match="compression must be one of"):
        tfrecord.write(RECORDS, io.BytesIO(), "ZLIB")


@pytest.mark.parametrize("kinds", ["float HU, 0/1 masks", "int16 HU, 0/2 and float masks"])
def test_examples_serialise_as_tensorflows(kinds):
    """`encode_example` builds tf.train.Example from descriptors of its own (no TF in the
    workers): the bytes are the ones TensorFlow's classes give, whatever the arrays' types
    (0/1 masks are written as they are, others compared with 0)."""
    rng = np.random.default_rng(0)
    hu = rng.normal(-500, 300, (16, 12))
    lesions = (rng.random((16, 12, 3)) < 0.2).astype(np.uint8)
    lung = rng.random((16, 12)) < 0.5
    if kinds.startswith("int16"):
        hu, lesions, lung = np.rint(hu).astype(np.int16), lesions * 2, lung * 0.5
    fields = slice_fields(
        hu,
        lesions,
        lung,
        slice_index=3,
        position_mm=-12.5,
        spacing_mm=(0.7, 0.7, 5.0),
        slice_id="I1",
        series_id="S1",
        patient_id="P1",
        diagnosis="covid",
        severity="mild",
    )
    feature = {}
    for key, (kind, _) in SPEC.items():
        value = fields[key]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if kind == "bytes":
            values = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
        elif kind == "int64":
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        else:
            feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
    theirs = tf.train.Example(features=tf.train.Features(feature=feature))
    assert encode_example(fields) == theirs.SerializeToString(deterministic=True)
    assert fields["mask/lesions"] == (lesions > 0).astype(np.uint8).tobytes()
    assert fields["mask/lung"] == (lung > 0).astype(np.uint8).tobytes()
    assert fields["image/hu"] == np.rint(hu).astype("<i2").tobytes()


def test_any_example_serialises_as_tensorflows():
    """The hand-written wire format on what slices never hold: negative and 64-bit
    integers, empty values and lists, several values, keys out of order, non-ASCII."""
    from data_tools.example_proto import serialize_example

    features = {
        "z/ints": ("int64", [0, 1, -1, 127, 128, 2**40, -(2**63), 2**63 - 1]),
        "a/empty_bytes": ("bytes", [b"", b"x" * 200]),
        "m/floats": ("float", [0.0, -1.5, 3.1415926, 1e-30, 1e30]),
        "é/key": ("bytes", ["ü".encode()]),
        "b/no_ints": ("int64", []),
        "c/no_floats": ("float", []),
        "d/no_bytes": ("bytes", []),
        "B/upper": ("int64", [5]),
    }
    lists = {"bytes": tf.train.BytesList, "float": tf.train.FloatList, "int64": tf.train.Int64List}
    theirs = tf.train.Example(
        features=tf.train.Features(
            feature={
                key: tf.train.Feature(**{f"{kind}_list": lists[kind](value=values)})
                for key, (kind, values) in features.items()
            }
        )
    )
    assert serialize_example(features) == theirs.SerializeToString(deterministic=True)
    assert tf.train.Example.FromString(serialize_example(features)) == theirs


def test_mask_bytes_are_0_and_1_whatever_the_array_holds():
    """A bool array whose bytes are not 0/1 (a view of 0/255 bytes) is compared with 0,
    not written as it is; empty arrays give empty bytes."""
    from data_tools.features import _binary_bytes, _bytes_of

    raw = np.array([[0, 2, 255, 1]], np.uint8)
    data, any_set = _binary_bytes(raw.view(bool))
    assert bytes(data) == bytes([0, 1, 1, 1]) and any_set
    data, any_set = _binary_bytes(np.array([[0, 1, 0]], np.uint8))
    assert bytes(data) == bytes([0, 1, 0]) and any_set
    assert bytes(_bytes_of(np.zeros((0, 3), np.int16))) == b""
    assert bytes(_binary_bytes(np.zeros((2, 0), bool))[0]) == b""
    fields = slice_fields(np.zeros((0, 4)), np.zeros((0, 4, 3), np.uint8), np.zeros((0, 4)),
                          slice_index=0, position_mm=0.0, spacing_mm=(1, 1, 1), slice_id="I",
                          series_id="S", patient_id="P")  # fmt: skip
    assert encode_example(fields)  # empty images encode (as TensorFlow would write them)
