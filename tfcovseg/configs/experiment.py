"""Experiment configuration: frozen dataclasses, YAML files and dotted overrides.

An experiment is one YAML file with up to five top-level keys (``name``, ``model``,
``data``, ``train``, ``semi``); every key that is left out takes the dataclass default below, which
are the settings of Huang et al. (2021) where the paper gives them. Overrides use dotted
keys and YAML values, as on the command line::

    cfg = load_config("paper", overrides=["model.aspp_rates=[3,6,9]"])

The built-in experiments ship with the package in ``tfcovseg/configs/experiments/`` and are named
without the folder (``"paper"`` or ``"paper.yaml"``; `builtin_experiments` lists them); any
other path is a YAML file of one's own, and a file that exists at the given path always
wins over a built-in experiment of the same name.

An unknown key is an error that names the key, where it came from, and the allowed keys.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tfcovseg import CPU_KERNELS
from tfcovseg.constants import LESION_CLASSES

ARCHITECTURES = (
    "coarse_refine",  # the paper's network: SE-ResNet-34 U-Net + ASPP + refinement module
    "seresnet_unet_aspp",  # Table 7 ladder: SE-ResNet-34 U-Net + ASPP bridge
    "seresnet_unet",  # Table 7 ladder: plain SE-ResNet-34 U-Net
    "unet",  # classic U-Net baseline (Ronneberger et al. 2015)
    "unet_plus_plus",  # U-Net++ baseline (Zhou et al. 2018)
    "seresnet_classifier",  # plain SE-ResNet-34 slice classifier (Table 6)
)
LOSSES = ("hybrid", "bce")
PHASES = ("segmentation", "self_training", "classification")  # in this order
DEFAULT_PHASES = ("segmentation", "classification")
SEMI_METHODS = ("none", "self_training", "fixmatch")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
POOLINGS = ("avg", "max", "avg_max")
HEADS = ("dense", "conv")
STRATEGIES = ("auto", "mirrored", "multi_worker", "default")
PHANTOM_MIXES = ("default", "pneumonia")  # data_tools.phantom.COHORT_MIXES


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says which key."""


# The experiment YAML files shipped with the package (package data of the wheel).
# The largest model.input_size side: four times a CT slice's 512.
MAX_INPUT_SIZE = 2048
BUILTIN_EXPERIMENTS = Path(__file__).resolve().parent / "experiments"


def builtin_experiments() -> list[str]:
    """The names of the built-in experiments (``--config NAME``), sorted."""
    return sorted(p.stem for p in BUILTIN_EXPERIMENTS.glob("*.yaml"))


def _experiment_name(path: Path) -> str | None:
    """The built-in name `path` could mean: a bare ``NAME`` or ``NAME.yaml``, else None."""
    if path.parent != Path(".") or not path.name:
        return None
    return path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name


def builtin_experiment(name: str) -> Path:
    """The YAML file of the built-in experiment `name` (``"paper"`` or ``"paper.yaml"``).

    Raises:
        ConfigError: when there is no such built-in experiment; the message lists them.
    """
    stem = _experiment_name(Path(name))
    if stem is None or stem not in builtin_experiments():
        raise ConfigError(
            f"{name!r} is not a built-in experiment; built-in experiments: "
            f"{', '.join(builtin_experiments())}"
        )
    return BUILTIN_EXPERIMENTS / f"{stem}.yaml"


def resolve_config(path: str | Path) -> Path:
    """The experiment file `path` means: the path itself when it exists, else a built-in.

    ``"paper"`` and ``"paper.yaml"`` name the built-in experiment when no file of that name
    exists at that path (relative to the working directory); a path that exists is always
    used as a path.

    Raises:
        ConfigError: when `path` neither exists nor names a built-in experiment; the
            message lists the built-in experiments.
    """
    path = Path(path)
    if path.is_file():
        return path
    stem = _experiment_name(path)
    names = builtin_experiments()
    if stem in names:
        return BUILTIN_EXPERIMENTS / f"{stem}.yaml"
    if path.is_dir():  # a run folder, say: `_yaml_mapping` names its config.yaml
        return path
    unknown = f", and {stem!r} is not a built-in experiment" if stem is not None else ""
    raise ConfigError(
        f"config file {path} does not exist{unknown}; give the path of a YAML file or the "
        f"name of a built-in experiment: {', '.join(names)}"
    )


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The SE-ResNet encoder (Section 2.1), ``model.encoder``.

    Attributes:
        stem_filters: Filters of the 7x7/2 input convolution.
        filters: Filters of the four SE-ResNet stages.
        blocks: SE basic blocks per stage (3, 4, 6, 3 for SE-ResNet-34).
        se_reduction: Squeeze-excitation reduction ratio.
    """

    stem_filters: int = 64
    filters: tuple[int, int, int, int] = (64, 128, 256, 512)
    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)
    se_reduction: int = 16

    def __post_init__(self):
        _normalise(self)
        _check_positive("model.encoder.stem_filters", self.stem_filters)
        _check_positive("model.encoder.filters", *self.filters)
        _check_positive("model.encoder.blocks", *self.blocks)
        _check_positive("model.encoder.se_reduction", self.se_reduction)


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
    """The ASPP bridge (Section 2.2), ``model.bridge``; the refinement module's bridge
    is the same.

    Attributes:
        rates: Dilation rates of the three atrous branches.
        filters: Filters of each branch and of the projection.
    """

    rates: tuple[int, ...] = (3, 6, 9)
    filters: int = 64

    def __post_init__(self):
        _normalise(self)
        _check_positive("model.bridge.rates", *self.rates)
        _check_positive("model.bridge.filters", self.filters)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The coarse decoder, ``model.decoder``.

    Attributes:
        filters: Filters of the four decoder stages, deepest first.
        convs: 3x3 conv + BN + ReLU layers per stage.
    """

    filters: tuple[int, int, int, int] = (256, 128, 64, 64)
    convs: int = 3

    def __post_init__(self):
        _normalise(self)
        _check_positive("model.decoder.filters", *self.filters)
        _check_positive("model.decoder.convs", self.convs)


@dataclasses.dataclass(frozen=True)
class RefinementConfig:
    """The residual refinement module (Section 2.3), ``model.refinement``.

    Attributes:
        filters: Filters of every refinement-module convolution.
    """

    filters: int = 64

    def __post_init__(self):
        _check_positive("model.refinement.filters", self.filters)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The U-Net baseline's levels (Ronneberger et al.), ``model.unet``.

    Attributes:
        filters: Filters per level (2 to 6 levels: at most 5 poolings).
    """

    filters: tuple[int, ...] = (64, 128, 256, 512, 1024)
    _key: typing.ClassVar[str] = "model.unet.filters"

    def __post_init__(self):
        _normalise(self)
        _check_positive(self._key, *self.filters)
        if len(self.filters) < 2 or 2 ** (len(self.filters) - 1) > 32:
            raise ConfigError(f"{self._key} needs 2 to 6 levels (at most 5 poolings)")


@dataclasses.dataclass(frozen=True)
class UNetPlusPlusConfig(UNetConfig):
    """The U-Net++ baseline's levels (Zhou et al.), ``model.unetpp``."""

    filters: tuple[int, ...] = (32, 64, 128, 256, 512)
    _key: typing.ClassVar[str] = "model.unetpp.filters"


@dataclasses.dataclass(frozen=True)
class ClassifierHeadConfig:
    """The slice classifier's head on the encoder, ``model.classifier``.

    Attributes:
        dropout: Dropout before the dense layer.
        pooling: Global pooling: "avg" (the paper's SE-ResNet-34 head), "max" or "avg_max"
            (keeps small lesions' responses).
        head: "dense" (the paper: pooling + dense on the last stage) or "conv" (two 3x3
            convolutions on stages 2-4 at stride 8 before the pooling; see
            `tfcovseg.models.classifier`).
        head_filters: Filters of the "conv" head's convolutions.
        norm: Batch-normalise the pooled features before the dense layer (an affine map:
            still a linear classifier on them, but one that trains; see
            `tfcovseg.models.classifier.CovidClassifier`). False: the paper's bare head.
    """

    dropout: float = 0.0
    pooling: str = "avg"
    head: str = "dense"
    head_filters: int = 32
    norm: bool = True

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.classifier.dropout must be in [0, 1)")
        _check_choice("model.classifier.pooling", self.pooling, POOLINGS)
        _check_choice("model.classifier.head", self.head, HEADS)
        _check_positive("model.classifier.head_filters", self.head_filters)


# The network's components: ``model.<name>`` sections of an experiment.
COMPONENTS = {
    "encoder": EncoderConfig,
    "bridge": BridgeConfig,
    "decoder": DecoderConfig,
    "refinement": RefinementConfig,
    "unet": UNetConfig,
    "unetpp": UNetPlusPlusConfig,
    "classifier": ClassifierHeadConfig,
}
# Keys of configs written before the components (flat ``model.*`` keys): still read.
FLAT_MODEL_KEYS = {
    "stem_filters": ("encoder", "stem_filters"),
    "encoder_filters": ("encoder", "filters"),
    "encoder_blocks": ("encoder", "blocks"),
    "se_reduction": ("encoder", "se_reduction"),
    "aspp_rates": ("bridge", "rates"),
    "aspp_filters": ("bridge", "filters"),
    "decoder_filters": ("decoder", "filters"),
    "decoder_convs": ("decoder", "convs"),
    "refine_filters": ("refinement", "filters"),
    "unet_filters": ("unet", "filters"),
    "unetpp_filters": ("unetpp", "filters"),
    "classifier_dropout": ("classifier", "dropout"),
    "classifier_pooling": ("classifier", "pooling"),
    "classifier_head": ("classifier", "head"),
    "classifier_head_filters": ("classifier", "head_filters"),
    "classifier_norm": ("classifier", "norm"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network (Huang et al. 2021, Sections 2.1-2.3), composed of its components.

    Attributes:
        architecture: One of `ARCHITECTURES`.
        input_size: (height, width) the network runs at; multiples of 32.
        class_names: Lesion types, one output channel each, in this order.
        hu_window: (low, high) Hounsfield window mapped to [0, 1].
        pre_windowed: Inputs are already windowed 8-bit images (0-255, e.g. PNG/JPEG
            datasets); they are only rescaled to [0, 1].
        encoder: `EncoderConfig` (the SE-ResNet architectures and the classifier).
        bridge: `BridgeConfig` (ASPP; coarse_refine and seresnet_unet_aspp).
        decoder: `DecoderConfig` (the SE-ResNet U-Nets).
        refinement: `RefinementConfig` (coarse_refine).
        unet: `UNetConfig` of the U-Net baseline.
        unetpp: `UNetPlusPlusConfig` of the U-Net++ baseline.
        classifier: `ClassifierHeadConfig` of the slice classifier.
    """

    architecture: str = "coarse_refine"
    input_size: tuple[int, int] = (512, 512)
    class_names: tuple[str, ...] = LESION_CLASSES
    hu_window: tuple[float, float] = (-1250.0, 250.0)
    pre_windowed: bool = False
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    bridge: BridgeConfig = dataclasses.field(default_factory=BridgeConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    refinement: RefinementConfig = dataclasses.field(default_factory=RefinementConfig)
    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    unetpp: UNetPlusPlusConfig = dataclasses.field(default_factory=UNetPlusPlusConfig)
    classifier: ClassifierHeadConfig = dataclasses.field(default_factory=ClassifierHeadConfig)

    def __post_init__(self):
        _normalise(self)
        _check_choice("model.architecture", self.architecture, ARCHITECTURES)
        if any(s <= 0 or s % 32 for s in self.input_size):
            raise ConfigError(
                f"model.input_size must be positive multiples of 32 (the encoder downsamples "
                f"by 32), got {list(self.input_size)}"
            )
        if any(s > MAX_INPUT_SIZE for s in self.input_size):  # 320000 asked for 381 GiB
            raise ConfigError(
                f"model.input_size must be at most {MAX_INPUT_SIZE} pixels a side (CT slices "
                f"are 512), got {list(self.input_size)}"
            )
        if not self.class_names:
            raise ConfigError("model.class_names must name at least one class")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"model.class_names has duplicates: {list(self.class_names)}")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ConfigError(f"model.hu_window must be (low, high), got {list(self.hu_window)}")
        if any(not name for name in self.class_names):
            raise ConfigError(f"model.class_names must be non-empty names, got {self.class_names}")
        for name, cls in COMPONENTS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(
                    f"model.{name} must be a {cls.__name__} (model_config() builds one from "
                    "a mapping)"
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def model_config(**values) -> ModelConfig:
    """A `ModelConfig` from keyword values: components as mappings or configs, and the
    flat keys of older configs (``encoder_filters=...``); validated as a YAML file is."""
    return _build_section(ModelConfig, values, "model", "<keywords>")


TRAIN_SPLITS = ("train", "development")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the TFRecords are and how batches are made.

    Attributes:
        records_dir: Directory written by `python -m data_tools.convert` ("~" expands).
        phantom_patients: When > 0 and `records_dir` holds no records yet, training first
            writes a synthetic phantom cohort of this many patients beside it and converts
            it at the model's input size (the embedded default data).
        phantom_seed: Seed of that cohort.
        phantom_mix: Its diagnosis mix: "default" (6 COVID-19 : 2 healthy : 1 bacterial :
            1 viral) or "pneumonia" (5 : 1 : 2 : 2, more hard negatives); see
            `data_tools.phantom.cohort_plan`.
        phantom_slices: [low, high] slices per phantom patient, drawn per patient; they
            always cover 300 mm of chest, so fewer slices are thicker and the same number
            of slices holds more patients.
        classifier_phantom_patients: When > 0 (with `phantom_patients`), phase 2 trains
            the classifier head on a second phantom cohort of this many patients (seed
            `phantom_seed` + 1, same mix and slices; written and converted once beside the
            first, in ``classifier-phantom/`` and ``classifier-records/``), all of its
            slices, instead of on the fold's training split: the head has few weights and
            wants many patients, the segmenter's cohort stays small. The validation and
            test patients stay the first cohort's. With the "dense" head the frozen
            encoder's pooled features are computed once and the head trains on them.
        compression: "" or "GZIP", as the records were written.
        fold: Which patient-level fold to train on.
        num_folds: Number of folds in the records' manifest.
        shuffle_buffer: Slices held by the shuffle buffer.
        augment: The paper's online augmentation of training batches: rotation by a
            random multiple of 90 degrees and a random horizontal flip.
        oversample_lesions: Integer factor by which training slices with lesions are
            repeated in each epoch (1: none).
        oversample_pneumonia: Integer factor by which the training slices of patients
            with another pneumonia (bacterial, viral) are repeated in each epoch, in both
            phases: few patients, and patterns that look like COVID-19 lesions (1: none).
        cache: Cache decoded slices in memory after the first epoch.
        intensity_augment: Random window shift, contrast, gamma and noise on training
            slices (`tfcovseg.data.intensity.IntensityJitter`, in grey levels of the model's
            window), so that one model serves slices windowed differently.
        spatial_augment: After the paper's quarter turns and flips (so only with
            ``augment``), a small random rotation, zoom and shift of half the training
            slices, masks with them (`tfcovseg.data.spatial.SpatialJitter`).
        train_split: The patients the network trains on: "train" (the fold's training
            split), or "development" (its training and test patients: a final model to
            ship, trained on all but the validation patients that choose its epoch; it
            leaves no test patient, so ``--evaluate`` is refused).
    """

    records_dir: str = "data/records"
    phantom_patients: int = 0
    phantom_seed: int = 0
    phantom_mix: str = "default"
    phantom_slices: tuple[int, int] = (20, 40)  # data_tools.phantom.SLICE_RANGE
    classifier_phantom_patients: int = 0
    compression: str = ""
    fold: int = 0
    num_folds: int = 5
    shuffle_buffer: int = 1024
    augment: bool = True
    oversample_lesions: int = 1
    oversample_pneumonia: int = 1
    cache: bool = False
    intensity_augment: bool = False
    spatial_augment: bool = False
    train_split: str = "train"

    def __post_init__(self):
        _normalise(self)
        _check_choice("data.train_split", self.train_split, TRAIN_SPLITS)
        _check_choice("data.compression", self.compression, ("", "GZIP"))
        _check_choice("data.phantom_mix", self.phantom_mix, PHANTOM_MIXES)
        _check_positive("data.num_folds", self.num_folds)
        if self.num_folds < 2:  # the converter's --folds: one fold leaves nothing to test on
            raise ConfigError(f"data.num_folds must be at least 2, got {self.num_folds}")
        if not str(self.records_dir).strip():
            raise ConfigError("data.records_dir must name a folder, got an empty value")
        if self.spatial_augment and not self.augment:
            # It follows the paper's quarter turn and flip and runs only with them.
            raise ConfigError("data.spatial_augment needs data.augment: true")
        _check_seed("data.phantom_seed", self.phantom_seed)
        if self.phantom_patients < 0:
            raise ConfigError(f"data.phantom_patients must be >= 0, got {self.phantom_patients}")
        if self.classifier_phantom_patients < 0:
            raise ConfigError(
                f"data.classifier_phantom_patients must be >= 0, "
                f"got {self.classifier_phantom_patients}"
            )
        if self.classifier_phantom_patients and not self.phantom_patients:
            raise ConfigError(
                "data.classifier_phantom_patients needs a phantom cohort "
                "(data.phantom_patients > 0)"
            )
        low, high = self.phantom_slices
        if not 4 <= low <= high:  # data_tools.phantom.MIN_SLICES
            raise ConfigError(
                f"data.phantom_slices must be [low, high] with 4 <= low <= high, "
                f"got {list(self.phantom_slices)}"
            )
        if not 0 <= self.fold < self.num_folds:
            raise ConfigError(
                f"data.fold must be in [0, {self.num_folds - 1}] for {self.num_folds} folds, "
                f"got {self.fold}"
            )
        _check_positive("data.shuffle_buffer", self.shuffle_buffer)
        _check_positive("data.oversample_lesions", self.oversample_lesions)
        _check_positive("data.oversample_pneumonia", self.oversample_pneumonia)


# How TensorFlow computes the training steps, not what they compute (its CPU kernels,
# XLA): a resumed run (`tfcovseg.training.run_folder`) or benchmark run folder
# (`tfcovseg.benchmarks.semiseg_config`) may go on under other values.
ARITHMETIC_KEYS = ("train.cpu_kernels", "train.jit_compile")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation (Huang et al. 2021, Section 3.2: Adam 3e-4, batch 8, 200 epochs).

    Attributes:
        phases: Which phases to run, in order: "segmentation", "self_training" (with
            ``semi.method: self_training``), "classification".
        loss: "hybrid" (BCE + SSIM + IoU, BASNet) or "bce" (the Table 7 ablation).
        coarse_loss_weight: Weight of the loss on the coarse output (deep supervision).
        final_loss_weight: Weight of the loss on the refined output.
        positive_weights: BCE weight of lesion pixels, one per class of
            ``model.class_names`` (empty: 1 for all, the paper's loss). Rare lesion types
            collapse to "never" without it (`tfcovseg.training.losses`).
        learning_rate: Adam learning rate of the segmentation phase (its peak with a
            schedule).
        lr_schedule: "constant" (the paper's) or "cosine": the segmentation phase's rate
            (and self-training's) falls along a half cosine from ``learning_rate`` to 1 %
            of it over the phase's maximum epochs (`tfcovseg.training.recipe`). A short
            schedule ends on small steps instead of being cut mid-stride by its last epoch.
        ema_momentum: 0 (the paper's) or the momentum of an exponential moving average
            of the segmenter's weights (Polyak averaging, Keras' ``use_ema``), in [0, 1):
            validation, early stopping and the best checkpoint then see the averaged
            weights, the steps go on from the raw ones (`tfcovseg.training.recipe.EMAWeights`),
            in the segmentation phase and self-training's students. On 32-slice folds the
            validation loss swings from epoch to epoch; the average smooths it.
        batch_size: Global batch size.
        epochs: Maximum segmentation epochs.
        early_stopping_patience: Epochs without a better validation loss before stopping.
        classifier_learning_rate: Adam learning rate of the classification phase.
        classifier_aux_weight: When > 0, phase 1 also trains the classifier head on the
            segmenter's encoder with this weight on its binary cross-entropy (the slice
            labels), so the stage-4 features learn to say whether a slice has lesions;
            phase 2 then trains the paper's head on the frozen encoder as usual. 0 is the
            paper's recipe (segmentation loss only).
        classifier_epochs: Maximum classification epochs.
        precision: "float32", "mixed_float16" or "mixed_bfloat16".
        jit_compile: Compile TensorFlow's train steps with XLA (under JAX the
            segmenter's steps are always compiled, `tfcovseg.training.recipe`).
        cpu_kernels: TensorFlow's CPU kernels for ``tfcovseg.train`` and the COVID-SemiSeg
            benchmark's folds: "eigen" (the package's default, `tfcovseg/__init__.py`) or
            "onednn" (1.6-2.1x faster training steps on an AVX2 CPU; figures differ in
            the last digits, and so, through training, in the second).
            TF_ENABLE_ONEDNN_OPTS, when set, wins.
        strategy: "auto" (MultiWorkerMirroredStrategy when TF_CONFIG names several
            workers, MirroredStrategy over several local GPUs, else none), "mirrored",
            "multi_worker" or "default".
        overlay_images: Validation slices shown as overlays in TensorBoard (0: none).
        seed: Seed for weights, shuffling and augmentation.
        evaluate: Evaluate the fold's test patients after training (as ``--evaluate``).
        export_dir: Export the run for TF Serving into this folder after training (as
            ``--export DIR``; empty: only with ``--export``).
    """

    phases: tuple[str, ...] = DEFAULT_PHASES
    loss: str = "hybrid"
    coarse_loss_weight: float = 1.0
    final_loss_weight: float = 1.0
    positive_weights: tuple[float, ...] = ()
    learning_rate: float = 3e-4
    lr_schedule: str = "constant"
    ema_momentum: float = 0.0
    batch_size: int = 8
    epochs: int = 200
    early_stopping_patience: int = 10
    classifier_learning_rate: float = 3e-4
    classifier_epochs: int = 50
    classifier_aux_weight: float = 0.0
    precision: str = "float32"
    jit_compile: bool = False
    cpu_kernels: str = "eigen"
    strategy: str = "auto"
    overlay_images: int = 4
    seed: int = 42
    evaluate: bool = False
    export_dir: str = ""

    def __post_init__(self):
        _normalise(self)
        if not self.phases:
            raise ConfigError(f"train.phases must name at least one of {list(PHASES)}")
        for phase in self.phases:
            _check_choice("train.phases", phase, PHASES)
        if list(self.phases) != [p for p in PHASES if p in self.phases]:
            raise ConfigError(
                f"train.phases must list each phase once, in the order {list(PHASES)}, got "
                f"{list(self.phases)}"
            )
        _check_choice("train.loss", self.loss, LOSSES)
        _check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_choice("train.strategy", self.strategy, STRATEGIES)
        _check_choice("train.cpu_kernels", self.cpu_kernels, CPU_KERNELS)
        if self.overlay_images < 0:
            raise ConfigError(f"train.overlay_images must be >= 0, got {self.overlay_images}")
        _check_positive("train.learning_rate", self.learning_rate)
        if not 0.0 <= self.ema_momentum < 1.0:  # NaN fails too
            raise ConfigError(f"train.ema_momentum must be in [0, 1), got {self.ema_momentum}")
        _check_positive("train.classifier_learning_rate", self.classifier_learning_rate)
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.classifier_epochs", self.classifier_epochs)
        for key in ("coarse_loss_weight", "final_loss_weight", "classifier_aux_weight"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"train.{key} must be finite and >= 0, got {value}")
        if self.early_stopping_patience < 0:
            raise ConfigError(
                f"train.early_stopping_patience must be >= 0, got {self.early_stopping_patience}"
            )
        _check_seed("train.seed", self.seed)
        if any(not math.isfinite(w) or w <= 0 for w in self.positive_weights):
            raise ConfigError(
                f"train.positive_weights must be finite and > 0, got {list(self.positive_weights)}"
            )


@dataclasses.dataclass(frozen=True)
class SemiConfig:
    """Semi-supervised training on slices without masks (the "self_training" phase).

    Self-training as Semi-Inf-Net does it: the segmentation phase's model is the teacher;
    it labels unlabelled slices, the surest of its labels join the training batches, and a
    student starting from the teacher's weights trains on both, under the same callbacks,
    early stopping and run folder; the student becomes the run's segmenter.

    FixMatch-style consistency (``fixmatch``, `tfcovseg.training.consistency`) is measured
    against it by the COVID-SemiSeg benchmark only (docs/semiseg.md); ``tfcovseg.train``
    runs self-training.

    Attributes:
        method: "none", "self_training" or "fixmatch" (the benchmark's).
        records_dir: Records of the unlabelled slices (``data_tools.convert`` of a folder
            without masks); all of their slices are used. "": the slices without masks
            of the training split of ``data.records_dir``.
        rounds: Teacher -> student rounds (the student is the next round's teacher).
        pool: Unlabelled slices drawn at random in each round (0: all of them).
        keep: The fraction (0, 1] of the pool kept as pseudo-labels: the slices the
            teacher is surest of (`tfcovseg.training.semisup.confidence`).
        views: Test-time views (1-8 quarter turns and flips) averaged for the labels.
        share: The fraction of every training batch drawn from the pseudo-labels.
        epochs: Maximum epochs of each round (``train.early_stopping_patience`` applies).
        learning_rate: Adam learning rate of the students (the peak of their cosine, as
            ``train.learning_rate`` is the teacher's); 0: ``train.learning_rate``. A student
            starts from the teacher's optimum, where the teacher's peak rate throws it out.
        match_intensity: Map the unlabelled slices' grey levels onto the labelled ones'
            (`tfcovseg.data.intensity.match_intensity`) before labelling them; for pre-windowed
            slices from sources windowed differently (HU records need none).
        confidence: fixmatch: a weak-view probability p counts as a target where
            max(p, 1 - p) reaches this, in (0.5, 1).
        consistency_weight: fixmatch: the weight of the consistency term (> 0).
    """

    method: str = "none"
    records_dir: str = ""
    rounds: int = 1
    pool: int = 400
    keep: float = 0.5
    views: int = 2
    share: float = 0.5
    epochs: int = 20
    learning_rate: float = 0.0
    match_intensity: bool = True
    confidence: float = 0.9
    consistency_weight: float = 1.0

    def __post_init__(self):
        _normalise(self)
        _check_choice("semi.method", self.method, SEMI_METHODS)
        _check_positive("semi.rounds", self.rounds)
        _check_positive("semi.epochs", self.epochs)
        if self.pool < 0:
            raise ConfigError(f"semi.pool must be >= 0 (0: all), got {self.pool}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ConfigError(
                "semi.learning_rate must be >= 0 (0: train.learning_rate), got "
                f"{self.learning_rate}"
            )
        if not 1 <= self.views <= 8:
            raise ConfigError(f"semi.views must be 1 to 8, got {self.views}")
        for key in ("keep", "share"):
            value = getattr(self, key)
            if not 0.0 < value <= 1.0 or (key == "share" and value >= 1.0):
                raise ConfigError(f"semi.{key} must be in (0, 1{']' if key == 'keep' else ')'}"
                                  f", got {value}")  # fmt: skip
        if not 0.5 < self.confidence < 1.0:
            raise ConfigError(f"semi.confidence must be in (0.5, 1), got {self.confidence}")
        if not (math.isfinite(self.consistency_weight) and self.consistency_weight > 0):
            raise ConfigError(
                f"semi.consistency_weight must be finite and > 0, got {self.consistency_weight}"
            )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A named experiment: model, data and training settings together."""

    name: str = "default"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    semi: SemiConfig = dataclasses.field(default_factory=SemiConfig)

    def __post_init__(self):
        arch, phases = self.model.architecture, self.train.phases
        weights, classes = self.train.positive_weights, self.model.class_names
        if weights and len(weights) != len(classes):
            raise ConfigError(
                f"train.positive_weights has {len(weights)} values for the "
                f"{len(classes)} classes of model.class_names {list(classes)}: give one "
                "per class, or [] for the paper's loss (1 for every class)"
            )
        semi = self.semi.method != "none"
        if semi != ("self_training" in phases):
            raise ConfigError(
                "semi.method self_training and the train.phases entry self_training go "
                f"together: semi.method is {self.semi.method}, train.phases {list(phases)}"
            )
        if semi and arch == "seresnet_classifier":
            raise ConfigError("semi.method self_training needs a segmenter")
        if arch == "seresnet_classifier" and "segmentation" in phases:
            raise ConfigError(
                "model.architecture seresnet_classifier is a classifier: train.phases must "
                "be [classification]"
            )
        if self.train.classifier_aux_weight and arch in (
            "unet",
            "unet_plus_plus",
            "seresnet_classifier",
        ):
            raise ConfigError(
                f"train.classifier_aux_weight needs a segmenter with an SE-ResNet encoder; "
                f"model.architecture is {arch}"
            )
        if arch in ("unet", "unet_plus_plus") and "classification" in phases:
            raise ConfigError(
                f"model.architecture {arch} has no SE-ResNet encoder for the classifier "
                "phase: set train.phases to [segmentation]"
            )

    def for_student(self) -> ExperimentConfig:
        """The experiment a self-training student trains under: ``semi.learning_rate``,
        when set, as its ``train.learning_rate``."""
        if not self.semi.learning_rate:
            return self
        train = dataclasses.replace(self.train, learning_rate=self.semi.learning_rate)
        return dataclasses.replace(self, train=train)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "semi": SemiConfig}


def _normalise(instance):
    """Lists given for tuple fields become tuples, so configs stay hashable and comparable."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if isinstance(value, list):
            object.__setattr__(instance, f.name, tuple(value))


def _check_choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


MAX_SEED = 2**32 - 1  # NumPy's and the phantom's seeds


def _check_seed(key, value):
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{key} must be in [0, 2**32 - 1], got {value}")


def _check_positive(key, *values):
    if not values:
        raise ConfigError(f"{key} must not be empty")
    if any(not math.isfinite(v) or v <= 0 for v in values):
        got = values[0] if len(values) == 1 else list(values)  # "got [0]" for one value
        raise ConfigError(f"{key} must be positive and finite, got {got}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Converts a YAML value to the field's annotated type, or raises naming the key."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        items = list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {items!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
    if origin in (typing.Union, types.UnionType):
        return value  # not used by the current fields
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def nest_flat_keys(model: Mapping[str, Any], source: str = "<dict>") -> dict[str, Any]:
    """A ``model`` mapping with the flat keys of older configs (`FLAT_MODEL_KEYS`, e.g.
    ``encoder_filters``) moved into their components (``encoder: {filters: ...}``)."""
    out = {k: v for k, v in model.items() if k not in FLAT_MODEL_KEYS}
    for key, (component, field) in FLAT_MODEL_KEYS.items():
        if key not in model:
            continue
        section = out.get(component)
        if dataclasses.is_dataclass(section):
            section = dataclasses.asdict(section)
        section = {} if section is None else section
        if not isinstance(section, Mapping):
            raise ConfigError(f"'model.{component}' in {source} must be a mapping")
        if field in section:
            raise ConfigError(
                f"model.{key} and model.{component}.{field} in {source} set the same value; "
                f"keep model.{component}.{field}"
            )
        out[component] = {**section, field: model[key]}
    return out


def _build_section(cls, values: Mapping[str, Any], section: str, source: str):
    if not isinstance(values, Mapping):
        raise ConfigError(f"'{section}' in {source} must be a mapping of keys to values")
    if cls is ModelConfig:
        values = nest_flat_keys(values, source)
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(
                f"unknown key '{section}.{key}' in {source}; allowed keys in '{section}': "
                f"{', '.join(allowed)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and not isinstance(value, hint):
            value = {} if value is None else value
            kwargs[key] = _build_section(hint, value, f"{section}.{key}", source)
        else:
            kwargs[key] = _coerce(value, hint, f"{section}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{e} (in {source})") from None


def config_from_dict(values: Mapping[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Builds an `ExperimentConfig` from nested plain values, validating every key."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source} must hold a mapping with keys name, model, data, train")
    allowed = ["name", *_SECTIONS]
    for key in values:
        if key not in allowed:
            raise ConfigError(
                f"unknown key '{key}' in {source}; allowed top-level keys: {', '.join(allowed)} "
                "(and base, in an experiment file)"
            )
    sections = {
        name: _build_section(cls, {} if values.get(name) is None else values[name], name, source)
        for name, cls in _SECTIONS.items()
    }
    name = values.get("name", "default")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"'name' in {source} must be a non-empty string, got {name!r}")
    return ExperimentConfig(name=name, **sections)


def dotted_values(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested values (`config_to_dict`'s) as one level of dotted keys, ``train.epochs``."""
    out = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out |= dotted_values(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_to_dict(config) -> dict[str, Any]:
    """Plain nested values (tuples as lists) of a config, ready for YAML or JSON."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(config))


def _override_path(dotted: str, override: str) -> list[str]:
    """The checked key path of an override: ``section.key`` or ``model.component.key``
    (a flat key of older configs maps to its component)."""
    section, _, key = dotted.partition(".")
    if section not in _SECTIONS or not key:
        raise ConfigError(
            f"unknown key '{dotted}' in override {override!r}; use name or "
            f"<section>.<key> with section one of {', '.join(_SECTIONS)}"
        )
    path = key.split(".")
    if section == "model" and len(path) == 1 and key in FLAT_MODEL_KEYS:
        path = list(FLAT_MODEL_KEYS[key])
    cls, where = _SECTIONS[section], section
    for i, part in enumerate(path):
        allowed = [f.name for f in dataclasses.fields(cls)]
        if part not in allowed:
            raise ConfigError(
                f"unknown key '{dotted}' in override {override!r}; allowed keys in "
                f"'{where}': {', '.join(allowed)}"
            )
        hint = typing.get_type_hints(cls)[part]
        if i < len(path) - 1:
            if not dataclasses.is_dataclass(hint):
                raise ConfigError(f"'{where}.{part}' in override {override!r} has no keys")
            cls, where = hint, f"{where}.{part}"
    return [section, *path]


def apply_overrides(values: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` (and ``model.component.key=value``) overrides, values
    parsed as YAML, to nested values."""
    values = {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
    if isinstance(values.get("model"), Mapping):
        values["model"] = nest_flat_keys(values["model"])
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        dotted, raw = override.split("=", 1)
        dotted = dotted.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {override!r}: value is not valid YAML: {_yaml_problem(e)}"
            ) from None
        if dotted == "name":
            values["name"] = value
            continue
        path = _override_path(dotted, override)
        node = values
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            child = {} if child is None else child
            if not isinstance(child, Mapping):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"'{where}' must be a mapping of keys to values, got {child!r}")
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return values


MAX_BASE_DEPTH = 8


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in a mapping (the last one won,
    silently: ``epochs: 3`` then ``epochs: 4`` trained 4)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_mapping(path: Path) -> dict:
    if path.is_dir():  # a run folder, say: its config.yaml is what was meant
        inside = path / "config.yaml"
        hint = f": give {inside}" if inside.is_file() else ""
        raise ConfigError(f"config file {path} is a folder, not a YAML file{hint}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a YAML file (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    if values is None:  # an empty file trained the default experiment, named "default"
        raise ConfigError(
            f"{path} is empty: an experiment names at least a base (say base: quickstart) "
            "or its sections (model, data, train)"
        )
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping with keys name, base, model, data, train")
    return values


def _base_path(base, path: Path) -> Path:
    """The file a ``base:`` names: a path relative to the experiment's own folder, else
    (like ``--config``) a file or the name of a built-in experiment."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(
            f"{path}: base must name another experiment (a built-in name or a YAML file), "
            f"got {base!r}"
        )
    beside = path.parent / base
    return beside if beside.is_file() else resolve_config(base)


def merge_values(base: Mapping, values: Mapping) -> dict:
    """`values` over `base`: mappings (the sections) merge key by key, anything else (a
    list included) replaces the base's value."""
    merged = dict(base)
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_experiment(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """An experiment file's values with its ``base:`` chain resolved (not yet validated).

    ``base: quickstart`` (a built-in name, or a YAML file relative to this one) starts
    from that experiment's values; this file states only what differs. Sections merge
    key by key; lists and scalars replace.

    Raises:
        ConfigError: a missing or invalid file, a bad ``base``, or a cycle of bases.
    """
    values = dict(_yaml_mapping(path))
    if isinstance(values.get("model"), Mapping):
        values["model"] = nest_flat_keys(values["model"], str(path))
    if "base" not in values:
        return values
    base = _base_path(values.pop("base"), path)
    chain = _chain + (path.resolve(),)
    if base.resolve() in chain or len(chain) > MAX_BASE_DEPTH:
        names = " -> ".join(p.name for p in chain + (base,))
        raise ConfigError(f"{chain[0]}: experiments that are their own base: {names}")
    return merge_values(read_experiment(base, chain), values)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: its problem, where, and while doing what (its own text
    spans six lines with a caret under a copy of the line)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
    context = getattr(e, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Loads an experiment YAML file (or the defaults) and applies dotted overrides.

    Args:
        path: A YAML file, or the name of a built-in experiment (``"paper"``, see
            `resolve_config`); None gives the defaults (the paper's settings). A file may
            start from another with ``base:`` (`read_experiment`).
        overrides: Strings like ``"model.aspp_rates=[3,6,9]"`` or ``"train.epochs=5"``.

    Returns:
        A frozen, validated `ExperimentConfig`.

    Raises:
        ConfigError: on an unknown key, a value of the wrong type or out of range, a file
            that is missing (and no built-in experiment's name; the message lists them) or
            not valid YAML; the message names the key and file.
    """
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = resolve_config(path)
        source = str(path)
        values = read_experiment(path)
    overrides = list(overrides)
    if overrides:
        values = apply_overrides(values, overrides)
        source += " + overrides"
    return config_from_dict(values, source)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML (loadable again by `load_config`), atomically:
    ``--resume`` compares against it, so a kill must not leave half of it."""
    from data_tools.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
