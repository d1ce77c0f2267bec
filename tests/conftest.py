"""Shared fixtures: tiny, seeded networks so the suite stays fast on two CPU cores."""

from __future__ import annotations

import contextlib

import tfcovseg  # noqa: F401  (first: its environment defaults, before Keras loads TensorFlow)

# isort: split
import keras
import numpy as np
import pytest

from tfcovseg.configs.experiment import ModelConfig, merge_values, model_config, nest_flat_keys

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    # Grappler's graph rewrites take ~3 s on the first run of each traced train step at
    # these tiny shapes (~0.7 s without them) and speed nothing up at them. The tests that
    # run our commands in subprocesses (the training and predict CLIs, the quickstart from
    # the wheel, multi-worker training through the CLI) keep them on, as users run them;
    # test_distributed's own subprocesses import this module and run without them.
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})

TINY = dict(
    input_size=(64, 64),
    encoder=dict(stem_filters=8, filters=(8, 16, 16, 32), blocks=(1, 1, 1, 1), se_reduction=4),
    bridge=dict(filters=8),
    decoder=dict(filters=(16, 8, 8, 8), convs=1),
    refinement=dict(filters=8),
    unet=dict(filters=(4, 8, 16)),
)


# Config overrides of a tiny coarse-refine network for training tests (64 px, narrow).
TINY_MODEL = [
    "model.input_size=[64,64]",
    "model.encoder.stem_filters=8",
    "model.encoder.filters=[8,16,16,32]",
    "model.encoder.blocks=[1,1,1,1]",
    "model.encoder.se_reduction=4",
    "model.bridge.filters=8",
    "model.decoder.filters=[16,8,8,8]",
    "model.decoder.convs=1",
    "model.refinement.filters=8",
]


def tiny_config(**overrides) -> ModelConfig:
    """A narrow 64x64 model config of the given architecture and overrides (components as
    mappings, or the flat keys of older configs, e.g. ``classifier_head="conv"``)."""
    return model_config(**merge_values(TINY, nest_flat_keys(overrides)))


@contextlib.contextmanager
def eager_functions():
    """Keras' train, test and predict functions run op by op instead of traced.

    For tests of the plumbing around tiny networks (benchmark folds, training runs,
    resumes): tracing a coarse-refine train step takes ~15 s on these CPUs, longer than all
    the eager steps of such a test (the COVID-SemiSeg benchmark's resume test: 240 s traced,
    40 s eager). Tests of tracing itself, of the SavedModel and of what users run in
    subprocesses keep graph mode. TensorFlow backend only (a no-op under others).
    """
    if keras.backend.backend() != "tensorflow":
        yield
        return
    before = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(before)


@pytest.fixture
def eager():
    """`eager_functions` for one test."""
    with eager_functions():
        yield


@pytest.fixture(scope="module")
def eager_module():
    """`eager_functions` for a whole module, its module fixtures included: name it first
    in the module's ``pytestmark = pytest.mark.usefixtures("eager_module")``."""
    with eager_functions():
        yield


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def hu_batch(rng, n=2, size=64):
    """Random CT-like slices in Hounsfield units, [n, size, size, 1] float32."""
    return rng.uniform(-1100.0, 300.0, size=(n, size, size, 1)).astype("float32")


@pytest.fixture(scope="session")
def phantom_run(tmp_path_factory):
    """An untrained tiny run folder over a converted 64 px phantom cohort (8 patients).

    Returns a namespace with ``cohort`` (DICOM + NIfTI), ``records``, ``run`` (config.yaml,
    segmenter_best.keras, classifier_best.keras sharing its encoder) and ``config``.
    Untrained weights are enough for what export and predict must get right: shapes,
    geometry, files and the agreement between the SavedModel and the Keras models.
    """
    import types

    from data_tools.conversion.pipeline import convert
    from data_tools.phantom import make_cohort
    from tfcovseg.configs.experiment import load_config, save_config
    from tfcovseg.models import build_classifier, build_model

    root = tmp_path_factory.mktemp("phantom_run")
    make_cohort(root / "cohort", 8, 3, 64)
    convert(root / "cohort", root / "records", size=64, folds=2, seed=3, progress=False, salt="t")
    config = load_config(
        "quickstart",
        TINY_MODEL + [f"data.records_dir={root / 'records'}", "data.num_folds=2", "name=tiny"],
    )
    run = root / "run"
    run.mkdir()
    keras.utils.set_random_seed(5)
    segmenter = build_model(config.model)
    classifier = build_classifier(segmenter)
    segmenter.save(run / "segmenter_best.keras")
    classifier.save(run / "classifier_best.keras")
    save_config(config, run / "config.yaml")
    return types.SimpleNamespace(
        root=root, cohort=root / "cohort", records=root / "records", run=run, config=config
    )


@pytest.fixture(scope="session")
def phantom_export(phantom_run, tmp_path_factory):
    """The phantom run exported once as a TF Serving model folder: ``<tmp>/tfcovseg/1``."""
    from tfcovseg.inference.export import export_run

    out = tmp_path_factory.mktemp("saved") / "tfcovseg"
    return export_run(phantom_run.run, out, log=lambda *a: None)
