"""The network, hybrid loss and metrics under KERAS_BACKEND=jax, with TensorFlow unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tests.no_tensorflow  # as on a JAX-only machine: `import tensorflow` fails
    import numpy as np
    import keras
    from tests.conftest import TINY
    from tfcovseg.configs.experiment import model_config
    from tfcovseg.training.losses import HybridLoss, deep_supervision
    from tfcovseg.evaluation.metrics import segmentation_metrics
    from tfcovseg.models import build_classifier, build_model

    assert keras.backend.backend() == "jax", keras.backend.backend()
    keras.utils.set_random_seed(0)
    cfg = model_config(**TINY)
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1000, 200, (2, 64, 64, 1)).astype("float32")
    y = np.zeros((2, 64, 64, 3), "float32")
    y[:, 20:40, 20:40, 0] = 1.0
    out = model(x)
    loss = float(HybridLoss()(y, out["final"]))
    fixed_rng = np.random.default_rng(1)
    fixed_true = (fixed_rng.random((2, 24, 24, 3)) > 0.7).astype("float32")
    fixed_pred = fixed_rng.random((2, 24, 24, 3)).astype("float32")
    fixed = float(HybridLoss()(fixed_true, fixed_pred))
    losses, weights = deep_supervision(list(model.output), "hybrid")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=losses, loss_weights=weights,
                  metrics={"final": segmentation_metrics(cfg.class_names)})
    before = [w.copy() for w in model.get_weights()]
    logs = model.train_on_batch(x, {"coarse": y, "final": y}, return_dict=True)
    changed = sum(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    classifier = build_classifier(model)
    p = np.asarray(classifier(x))
    # The recipe compiles JAX's steps whatever train.jit_compile says (False by default).
    from tfcovseg.configs.experiment import load_config
    from tfcovseg.training.recipe import compile_segmenter
    config = load_config()
    assert config.train.jit_compile is False
    recipe_model = build_model(cfg)
    compile_segmenter(config, recipe_model)
    print(json.dumps({
        "loss": loss, "fixed": fixed, "changed": changed,
        "logs": {k: float(v) for k, v in logs.items()},
        "n_weights": len(before), "classifier_shape": list(p.shape),
        "tensorflow_imported": "tensorflow" in sys.modules,
        "jax_type": type(out["final"]).__module__,
        "recipe_jit": recipe_model.jit_compile,
    }))
    """
)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("jax") is None,
    reason="jax is not installed: pip install -e '.[test]' installs it",
)
def test_segmenter_loss_and_gradient_step_under_jax():
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tensorflow_imported"] is False
    assert result["jax_type"].startswith("jax")
    assert result["recipe_jit"] is True
    assert 0.0 < result["loss"] < 10.0
    # The same loss on the same arrays as under TensorFlow (tf.image.ssim) in this process.
    from tfcovseg.training.losses import HybridLoss

    fixed_rng = np.random.default_rng(1)
    fixed_true = (fixed_rng.random((2, 24, 24, 3)) > 0.7).astype("float32")
    fixed_pred = fixed_rng.random((2, 24, 24, 3)).astype("float32")
    expected = float(HybridLoss(ssim_impl="tf")(fixed_true, fixed_pred))
    assert result["fixed"] == pytest.approx(expected, abs=1e-5)
    assert result["logs"]["loss"] == pytest.approx(
        result["logs"]["coarse_loss"] + result["logs"]["final_loss"], rel=1e-4
    )
    assert "final_dice_ggo" in result["logs"] or "dice_ggo" in result["logs"]
    # A gradient step moved (nearly) every trainable tensor.
    assert result["changed"] > result["n_weights"] // 2
    assert result["classifier_shape"] == [2]
