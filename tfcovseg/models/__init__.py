"""The networks of tfcovseg, pure Keras 3 (no TensorFlow import): any backend runs them.

`build_model(model_config)` is the one entry point: the paper's coarse-refine network, the
rungs of its Table 7 ablation, the U-Net / U-Net++ baselines and the plain SE-ResNet-34
classifier of Table 6, chosen by `ModelConfig.architecture`. `build_classifier(segmenter)`
puts the slice-classifier head on a segmenter's encoder, sharing its weights.
"""

from __future__ import annotations

from tfcovseg.models.baselines import UNet, UNetPlusPlus
from tfcovseg.models.classifier import CovidClassifier, build_classifier, head_options
from tfcovseg.models.encoder import PYRAMID_LEVELS, SEResNetEncoder
from tfcovseg.models.layers import ResizeToMatch, SqueezeAxis
from tfcovseg.models.preprocessing import HUWindow, window_hu
from tfcovseg.models.saving import ModelFileError, model_file_problem, save_model, save_weights
from tfcovseg.models.segmenter import CoarseRefineNet

__all__ = [
    "PYRAMID_LEVELS",
    "CoarseRefineNet",
    "CovidClassifier",
    "HUWindow",
    "ModelFileError",
    "ResizeToMatch",
    "SEResNetEncoder",
    "SqueezeAxis",
    "UNet",
    "UNetPlusPlus",
    "build_classifier",
    "build_model",
    "load_model",
    "load_run_models",
    "model_file_problem",
    "run_model_path",
    "save_model",
    "save_weights",
    "window_hu",
]

# architecture -> (use_aspp, use_refinement) of the SE-ResNet U-Net family (Table 7).
_LADDER = {
    "seresnet_unet": (False, False),
    "seresnet_unet_aspp": (True, False),
    "coarse_refine": (True, True),
}


def build_model(model_config=None):
    """Builds the network a `ModelConfig` describes.

    Args:
        model_config: A `tfcovseg.configs.experiment.ModelConfig` (None: the paper's defaults).

    Returns:
        A functional `keras.Model` taking "hu" [N, H, W, 1] float32. Segmenters return a
        dict of float32 sigmoid probabilities [N, H, W, C]: {"coarse", "final"} for
        coarse_refine, {"final"} for the other architectures. The classifier architecture
        ("seresnet_classifier") returns `covid_probability` [N].
    """
    from tfcovseg.configs.experiment import ModelConfig

    cfg = model_config if model_config is not None else ModelConfig()
    common = dict(
        input_size=cfg.input_size,
        hu_window=cfg.hu_window,
        pre_windowed=cfg.pre_windowed,
    )
    if cfg.architecture in _LADDER:
        use_aspp, use_refinement = _LADDER[cfg.architecture]
        return CoarseRefineNet(
            **common,
            class_names=cfg.class_names,
            stem_filters=cfg.encoder.stem_filters,
            encoder_filters=cfg.encoder.filters,
            encoder_blocks=cfg.encoder.blocks,
            se_reduction=cfg.encoder.se_reduction,
            use_aspp=use_aspp,
            aspp_rates=cfg.bridge.rates,
            aspp_filters=cfg.bridge.filters,
            decoder_filters=cfg.decoder.filters,
            decoder_convs=cfg.decoder.convs,
            use_refinement=use_refinement,
            refine_filters=cfg.refinement.filters,
            name=cfg.architecture,
        )
    if cfg.architecture == "unet":
        return UNet(**common, class_names=cfg.class_names, filters=cfg.unet.filters)
    if cfg.architecture == "unet_plus_plus":
        return UNetPlusPlus(**common, class_names=cfg.class_names, filters=cfg.unetpp.filters)
    if cfg.architecture == "seresnet_classifier":
        encoder = SEResNetEncoder(
            input_size=cfg.input_size,
            stem_filters=cfg.encoder.stem_filters,
            stage_filters=cfg.encoder.filters,
            stage_blocks=cfg.encoder.blocks,
            se_reduction=cfg.encoder.se_reduction,
        )
        return CovidClassifier(
            encoder,
            hu_window=cfg.hu_window,
            pre_windowed=cfg.pre_windowed,
            **head_options(cfg),
            name="seresnet_classifier",
        )
    raise ValueError(f"unknown model.architecture {cfg.architecture!r}")


def load_model(path):
    """Loads the network of a tfcovseg ``.keras`` file in safe mode, in any process.

    Importing this package registers the networks and layers. The optimizer, loss and
    metrics a training checkpoint also holds are not restored (the training room's
    `tfcovseg.training.losses` and `tfcovseg.evaluation.metrics` register those for
    ``keras.saving.load_model(path, compile=True)``): evaluation, export and prediction
    need the network only, and the models room stays below the rooms that use it.

    Args:
        path: A ``.keras`` file written by tfcovseg.

    Raises:
        ModelFileError: a missing, empty or truncated file (`model_file_problem`).
    """
    import keras

    problem = model_file_problem(path)
    if problem:
        raise ModelFileError(problem)
    return keras.saving.load_model(path, compile=False, safe_mode=True)


def load_run_models(run) -> tuple:
    """(segmenter, classifier) of a training run folder, each None when absent.

    The best checkpoint (``*_best.keras``) is preferred over the last one; `evaluate`,
    `export` and `predict` all load run folders through this.
    """
    found = []
    for stem in ("segmenter", "classifier"):
        path = run_model_path(run, stem)
        model = None if path is None else load_model(path)
        # A classifier saved under the segmenter's name (or the reverse) loads, then
        # failed on a missing attribute deep in export or evaluation.
        if model is not None and isinstance(model, CovidClassifier) != (stem == "classifier"):
            raise ModelFileError(
                f"{path} holds a {type(model).__name__}, not the run's {stem} (files "
                "swapped or copied from elsewhere?)"
            )
        found.append(model)
    return tuple(found)


def run_model_path(run, stem: str):
    """The file `load_run_models` loads for `stem` ("segmenter" or "classifier"), or None."""
    from pathlib import Path

    for name in (f"{stem}_best.keras", f"{stem}_last.keras"):
        if (Path(run) / name).is_file():
            return Path(run) / name
    return None
