"""The shared layer test: config round-trip, symbolic and eager shapes, one fit step."""

from __future__ import annotations

import keras
import numpy as np


def run_layer_test(
    layer_cls, init_kwargs, input_shapes, expected_output_shape, input_low=0.0, input_high=1.0
):
    """Checks a custom layer the way every registered layer of tfcovseg must behave.

    Args:
        layer_cls: The layer class.
        init_kwargs: Constructor arguments.
        input_shapes: One shape (tuple) or a list of shapes, batch dimension included.
        expected_output_shape: Output shape, batch dimension included.
        input_low, input_high: Range of the random inputs.

    Returns:
        The eager output for further assertions.
    """
    single = isinstance(input_shapes, tuple)
    shapes = [input_shapes] if single else list(input_shapes)
    rng = np.random.default_rng(7)
    data = [rng.uniform(input_low, input_high, s).astype("float32") for s in shapes]

    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is layer_cls and revived.get_config() == config

    sym_inputs = [keras.Input(s[1:], batch_size=s[0]) for s in shapes]
    sym_out = layer(sym_inputs[0] if single else sym_inputs)
    assert tuple(sym_out.shape) == tuple(expected_output_shape)

    eager = keras.ops.convert_to_numpy(layer(data[0] if single else data))
    assert eager.shape == tuple(expected_output_shape)

    # One fit step through the layer: a trainable Dense in front of it must receive
    # gradients that flow through the layer and change its kernel.
    fit_inputs = [keras.Input(s[1:]) for s in shapes]
    front = keras.layers.Dense(
        shapes[0][-1], kernel_initializer="identity" if shapes[0][-1] > 1 else "ones", name="front"
    )
    moved = [front(fit_inputs[0]), *fit_inputs[1:]]
    out = layer_cls(**init_kwargs)(moved[0] if single else moved)
    model = keras.Model(fit_inputs, out)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = keras.ops.convert_to_numpy(model.get_layer("front").kernel).copy()
    target = eager + 0.1
    loss = model.train_on_batch(data[0] if single else data, target)
    after = keras.ops.convert_to_numpy(model.get_layer("front").kernel)
    assert np.isfinite(loss)
    assert not np.allclose(before, after), "no gradient flowed through the layer"
    return eager


MATRIX_PRODUCTS = ("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")


def broadcast_products(graph, seen=None) -> list[str]:
    """Batched matrix products in a TensorFlow graph (and the functions it calls) whose
    operands differ in rank: a matrix broadcast over a batch of matrices, the products that
    TensorFlow's oneDNN kernels read past (tensorflow/tensorflow#117700).

    Returns one "op type: shapes" line per such product.
    """
    seen = set() if seen is None else seen
    found = []
    for op in graph.get_operations():
        if op.type in MATRIX_PRODUCTS:
            ranks = {t.shape.rank for t in op.inputs}
            if len(ranks) > 1:
                found.append(f"{op.type}: {[t.shape for t in op.inputs]} ({op.name})")
        for attr in op.node_def.attr.values():
            name = attr.func.name
            if name and name not in seen:
                seen.add(name)
                found += broadcast_products(graph._get_function(name).graph, seen)
    return found
