"""The experiment the COVID-SemiSeg benchmark trains (`tfcovseg.benchmarks.semiseg`): an
experiment config as ``python -m tfcovseg.train`` reads one, its rows, the shortcuts its
command offers for keys, and the settings a run records. Light (no Keras): the command
checks ``--config`` and ``--set`` with it before the network's libraries load.
"""

from __future__ import annotations

import json

from tfcovseg.configs import experiment as ex

CLASSES = ("ggo", "consolidation")
# The experiment the benchmark trains by default (``--config``): the built-in ``semiseg``
# recipe without intensity augmentation (TensorFlow: oneDNN kernels, no XLA; JAX: compiled).
DEFAULT_CONFIG = "semiseg_benchmark"
# What each row changes in the experiment: the coarse-refine network with the config's loss,
# the U-Net baseline with plain BCE (the paper's comparison).
ROWS = {
    "coarse_refine": {"model.architecture": "coarse_refine"},
    "unet": {"model.architecture": "unet", "train.loss": "bce", "train.positive_weights": []},
}
MODELS = tuple(ROWS)
# run()'s keywords (the CLI's options) that set a key of the experiment.
SHORTCUTS = {
    "epochs": "train.epochs",
    "patience": "train.early_stopping_patience",
    "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate",
    "seed": "train.seed",
    "intensity": "data.intensity_augment",
    "spatial": "data.spatial_augment",
    "semi_method": "semi.method",
    "semi_rounds": "semi.rounds",
    "semi_pool": "semi.pool",
    "semi_keep": "semi.keep",
    "semi_tta": "semi.views",
    "semi_epochs": "semi.epochs",
    "semi_learning_rate": "semi.learning_rate",
}
# The benchmark's own settings (not the experiment's): augmented passes over the training
# slices per epoch, the fraction held out for early stopping, test-time views.
BENCH_DEFAULTS = {"passes": 2, "val_fraction": 0.2, "tta": 1}
WIDTH_KEYS = (
    "stem_filters",
    "encoder_filters",
    "encoder_blocks",
    "se_reduction",
    "aspp_filters",
    "decoder_filters",
    "refine_filters",
    "unet_filters",
)


def widths_of(model) -> dict:
    """A `ModelConfig`'s network widths by their flat keys (as results.json records them)."""
    component = {k: ex.FLAT_MODEL_KEYS[k] for k in WIDTH_KEYS}
    return {k: getattr(getattr(model, c), field) for k, (c, field) in component.items()}


def _experiment_widths(experiment: str | None = None) -> dict:
    """The widths of a built-in experiment; None: the paper's (`ModelConfig`)."""
    return widths_of(ex.load_config(experiment).model if experiment else ex.ModelConfig())


# A quarter of the paper's widths, as the quickstart and its U-Net baseline have them
# (defined there, once): trains in minutes on a CPU.
WIDTHS = _experiment_widths("quickstart_unet")

# --width: "quarter" fits a 2-core CPU; "full" is the paper's network (for a GPU); without
# it, the experiment's own widths.
WIDTH_PRESETS = {"quarter": lambda: WIDTHS, "full": _experiment_widths}


class BenchmarkError(Exception):
    """Bad input; the message names the folder or file (exit code 2)."""


def benchmark_config(config=None, overrides=(), *, size=None, widths=None, **shortcuts):
    """The experiment the benchmark trains, as `tfcovseg.train` reads one.

    Args:
        config: A built-in experiment's name, a YAML file or an `ExperimentConfig`;
            default `DEFAULT_CONFIG`.
        overrides: ``KEY=VALUE`` strings (``--set``), applied last.
        size: ``model.input_size`` (square).
        widths: Network widths by their flat keys (`WIDTH_PRESETS`).
        **shortcuts: `SHORTCUTS` keywords (None: the experiment's value).

    Raises:
        BenchmarkError: on an unknown key or a bad value (the message names the key), or
            an experiment the benchmark cannot train (`_check_experiment`).
    """
    unknown = sorted(set(shortcuts) - set(SHORTCUTS))
    if unknown:
        raise BenchmarkError(f"unknown settings {unknown}; the benchmark takes {list(SHORTCUTS)}")
    more = [_override("model.input_size", [size, size])] if size is not None else []
    for key, value in (widths or {}).items():
        more.append(_override("model.{}.{}".format(*ex.FLAT_MODEL_KEYS[key]), value))
    more += [_override(SHORTCUTS[k], v) for k, v in shortcuts.items() if v is not None]
    more += list(overrides)
    try:
        if isinstance(config, ex.ExperimentConfig):
            config = _overridden(config, more, f"{config.name} + overrides")
        else:
            config = ex.load_config(config or DEFAULT_CONFIG, more)
    except ex.ConfigError as e:
        raise BenchmarkError(str(e)) from None
    _check_experiment(config)
    return config


def _check_experiment(config) -> None:
    """The benchmark feeds 8-bit windowed slices and scores GGO and consolidation, on
    square inputs."""
    model = config.model
    if tuple(model.class_names) != CLASSES:
        raise BenchmarkError(
            f"model.class_names must be {list(CLASSES)} (the masks' labels 1 and 2), got "
            f"{list(model.class_names)}"
        )
    if not model.pre_windowed:
        raise BenchmarkError("model.pre_windowed must be true: the slices are windowed JPEGs")
    if model.input_size[0] != model.input_size[1]:
        raise BenchmarkError(f"model.input_size must be square, got {list(model.input_size)}")


def row_config(config, row: str):
    """The experiment of one row of the table (`ROWS`)."""
    more = [_override(k, v) for k, v in ROWS[row].items()]
    return _overridden(config, more, f"{config.name}, row {row}")


def _override(key: str, value) -> str:
    """One ``KEY=VALUE`` override, as ``--set`` takes it (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def _overridden(config, overrides, source: str):
    """`config` with ``KEY=VALUE`` `overrides` applied, validated again."""
    return ex.config_from_dict(ex.apply_overrides(ex.config_to_dict(config), overrides), source)


def settings_record(config, bench: dict, semi_row: bool = True) -> dict:
    """The run's settings as results.json and the fold store record them: the figures the
    benchmark has always recorded, and every other key of the experiment that differs from
    `DEFAULT_CONFIG`'s (a run in the same folder must match them all to resume). Without a
    semi-supervised row (`semi_row` false: no --unlabelled-dir) no ``semi`` key is recorded:
    they change nothing the run trains."""
    t, semi = config.train, config.semi
    settings = {
        "size": config.model.input_size[0],
        "epochs": t.epochs,
        "patience": t.early_stopping_patience,
        "batch_size": t.batch_size,
        "learning_rate": t.learning_rate,
        "passes": bench["passes"],
        "val_fraction": bench["val_fraction"],
        "widths": widths_of(config.model),
        "tta": bench["tta"],
        "intensity": config.data.intensity_augment,
        "semi_rounds": semi.rounds,
        "semi_pool": semi.pool,
        "semi_keep": semi.keep,
        "semi_tta": semi.views,
        "semi_epochs": semi.epochs,
        # The students' rate, even at its default: the recipe's default changed (1e-3,
        # then 1e-4), so a run folder of the old default must not resume under the new one.
        "semi_learning_rate": config.for_student().train.learning_rate,
    }
    if config.data.spatial_augment:  # recorded when on, so older runs resume
        settings["spatial"] = True
    if semi.method == "fixmatch":  # recorded when not the default, so older runs resume
        settings["semi_method"] = semi.method
    # `ex.ARITHMETIC_KEYS` change how the steps compute, not the recipe: a run folder goes
    # on under others, as in `tfcovseg.train`, and each fold records its own.
    recorded = {"model.input_size", "train.seed", *ex.ARITHMETIC_KEYS, *SHORTCUTS.values()}
    recorded |= {f"model.{c}.{f}" for c, f in (ex.FLAT_MODEL_KEYS[k] for k in WIDTH_KEYS)}
    ours = ex.dotted_values(ex.config_to_dict(config))
    default = ex.dotted_values(ex.config_to_dict(ex.load_config(DEFAULT_CONFIG)))
    other = {k: v for k, v in ours.items() if k not in recorded and default.get(k) != v}
    settings |= {"experiment": other} if other else {}
    return settings if semi_row else without_semi(settings)


def comparable(recorded: dict, semi_row: bool = True, prefix: str = "settings.") -> dict:
    """The settings an earlier run recorded, as this run compares them: less the keys that
    are free now (`ex.ARITHMETIC_KEYS`: older runs recorded ``train.jit_compile`` when not
    the default), and less the semi-supervised row's when this run has none."""
    other = dict(recorded.get(f"{prefix}experiment") or {})
    for key in ex.ARITHMETIC_KEYS:
        other.pop(key, None)
    kept = {k: v for k, v in recorded.items() if k != f"{prefix}experiment"}
    kept |= {f"{prefix}experiment": other} if other else {}
    return kept if semi_row else without_semi(kept, prefix)


def without_semi(settings: dict, prefix: str = "") -> dict:
    """`settings` less the keys of the semi-supervised row (``semi_*``, and ``semi.`` keys
    under ``experiment``); `prefix`: ``settings.`` for the fold store's record of them."""
    kept = {k: v for k, v in settings.items() if not k.startswith(f"{prefix}semi_")}
    other = kept.pop(f"{prefix}experiment", None) or {}
    other = {k: v for k, v in other.items() if not k.startswith("semi.")}
    return kept | ({f"{prefix}experiment": other} if other else {})
