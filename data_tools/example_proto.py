"""`tf.train.Example` without TensorFlow: the message classes built by protobuf at run time.

The converter's worker processes encode their slices (`data_tools.features.encode_example`)
so that the converting process only writes bytes; importing TensorFlow in each worker
would cost seconds and hundreds of MB. The schema is TensorFlow's public wire format
(``tensorflow/core/example/{example,feature}.proto``: field numbers and types) described
here as descriptors in a pool of our own, so protobuf serialises it exactly as
TensorFlow's generated classes do (a test compares the bytes).
"""

from __future__ import annotations

import functools

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _field(name, number, kind, label=_F.LABEL_OPTIONAL, type_name=None, oneof=None):
    field = descriptor_pb2.FieldDescriptorProto(name=name, number=number, type=kind, label=label)
    if type_name:
        field.type_name = type_name
    if oneof is not None:
        field.oneof_index = oneof
    return field


def _schema() -> descriptor_pb2.FileDescriptorProto:
    schema = descriptor_pb2.FileDescriptorProto(
        name="tfcovseg/example.proto", package="tensorflow", syntax="proto3"
    )
    repeated = _F.LABEL_REPEATED
    for name, kind in (
        ("BytesList", _F.TYPE_BYTES),
        ("FloatList", _F.TYPE_FLOAT),
        ("Int64List", _F.TYPE_INT64),
    ):
        schema.message_type.add(name=name).field.append(_field("value", 1, kind, repeated))
    feature = schema.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, name in enumerate(("bytes_list", "float_list", "int64_list"), start=1):
        type_name = ".tensorflow." + name.title().replace("_", "")
        feature.field.append(_field(name, number, _F.TYPE_MESSAGE, type_name=type_name, oneof=0))
    features = schema.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")  # map<string, Feature> feature = 1
    entry.options.map_entry = True
    entry.field.append(_field("key", 1, _F.TYPE_STRING))
    entry.field.append(_field("value", 2, _F.TYPE_MESSAGE, type_name=".tensorflow.Feature"))
    features.field.append(
        _field("feature", 1, _F.TYPE_MESSAGE, repeated, ".tensorflow.Features.FeatureEntry")
    )
    example = schema.message_type.add(name="Example")
    example.field.append(_field("features", 1, _F.TYPE_MESSAGE, type_name=".tensorflow.Features"))
    return schema


@functools.cache
def classes() -> dict:
    """{name: message class} for Example, Features, Feature, BytesList, FloatList,
    Int64List (in a pool of their own: no clash with TensorFlow's when it is loaded)."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_schema())
    names = ("Example", "Features", "Feature", "BytesList", "FloatList", "Int64List")
    return {
        n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.{n}"))
        for n in names
    }
