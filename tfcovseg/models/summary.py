"""Parameters and forward GFLOPs of a configured network.

    python -m tfcovseg.summary --config paper [--set key=value ...]

``--config`` takes a YAML file or the name of a built-in experiment
(``tfcovseg/configs/experiments``).

At the paper's settings (512x512, 3 classes) the coarse-refine network has 25.97 M
parameters (25.95 M trainable; the rest are batch-norm moving statistics) and costs
133.9 GFLOP per slice, against the paper's "about 26 M" and "about 134 GFLOP": encoder
37.5, ASPP 0.5, coarse decoder 36.2, refinement module 59.8 GFLOP. The refinement module
runs at full resolution (its first and last stages are 64-channel 3x3 convolutions on
512x512 maps), so it costs more than the coarse decoder. FLOPs count 2 per
multiply-accumulate of convolutions and dense layers only (see `tfcovseg.models.flops`);
batch norm, activations, pooling and resizing would add well under 1 %.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m: the door answers --help before TensorFlow loads
    import sys

    from tfcovseg.cli.summary import main

    sys.exit(main())

import math
import sys

from tfcovseg.models import build_model
from tfcovseg.models.flops import flops_by_part


def summarize(config) -> dict:
    """Parameter counts and GFLOPs (total and per part) of `build_model(config.model)`."""
    model = build_model(config.model)
    parts = flops_by_part(model)
    trainable = sum(math.prod(int(d) for d in w.shape) for w in model.trainable_weights)
    return {
        "architecture": config.model.architecture,
        "input_size": list(config.model.input_size),
        "classes": list(config.model.class_names),
        "parameters": int(model.count_params()),
        "trainable_parameters": trainable,
        "gflops": sum(parts.values()) / 1e9,
        "gflops_by_part": {k: v / 1e9 for k, v in parts.items()},
    }
