"""Configuration: YAML files, dotted overrides and the errors a user sees."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tfcovseg.configs.experiment import (
    BUILTIN_EXPERIMENTS,
    PHANTOM_MIXES,
    BridgeConfig,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    builtin_experiment,
    builtin_experiments,
    config_to_dict,
    load_config,
    model_config,
    resolve_config,
    save_config,
)

EXPERIMENTS = Path(__file__).resolve().parents[2] / "tfcovseg" / "configs" / "experiments"


def test_phantom_mix_is_checked_against_the_phantoms_mixes():
    from data_tools.phantom import COHORT_MIXES

    assert sorted(COHORT_MIXES) == sorted(PHANTOM_MIXES)
    with pytest.raises(ConfigError, match="data.phantom_mix must be one of"):
        load_config(overrides=["data.phantom_mix=covid-only"])
    assert load_config(overrides=["data.phantom_mix=pneumonia"]).data.phantom_mix == "pneumonia"


def test_phantom_slices_default_and_bounds():
    from data_tools.phantom import SLICE_RANGE

    assert load_config().data.phantom_slices == SLICE_RANGE
    assert load_config(overrides=["data.phantom_slices=[8,16]"]).data.phantom_slices == (8, 16)
    for bad in ("[2,16]", "[16,8]"):
        with pytest.raises(ConfigError, match="data.phantom_slices must be"):
            load_config(overrides=[f"data.phantom_slices={bad}"])


def test_paper_yaml_holds_the_papers_settings():
    cfg = load_config(EXPERIMENTS / "paper.yaml")
    assert cfg.name == "paper"
    assert cfg.model.input_size == (512, 512)
    assert cfg.model.num_classes == 3
    assert cfg.model.encoder.blocks == (3, 4, 6, 3)
    assert cfg.model.bridge.rates == (3, 6, 9)
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.train.batch_size == 8
    assert cfg.train.epochs == 200
    assert cfg.train.loss == "hybrid"
    assert cfg.train.early_stopping_patience > 0
    # The defaults are the paper's settings too.
    assert load_config() == dataclasses.replace(cfg, name="default")


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_file_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_builtin_experiments_are_the_package_files():
    assert BUILTIN_EXPERIMENTS == EXPERIMENTS
    assert builtin_experiments() == sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
    assert {"paper", "quickstart", "unet", "unetpp"} <= set(builtin_experiments())


def test_a_builtin_name_loads_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no experiment files here
    paper = load_config(EXPERIMENTS / "paper.yaml")
    assert load_config("paper") == paper
    assert load_config("paper.yaml") == paper
    assert load_config(Path("paper")) == paper  # what --config (type=Path) passes
    assert load_config("quickstart", ["train.epochs=2"]).train.epochs == 2
    assert resolve_config("paper") == resolve_config("paper.yaml") == EXPERIMENTS / "paper.yaml"
    assert builtin_experiment("quickstart") == EXPERIMENTS / "quickstart.yaml"


def test_an_existing_path_wins_over_a_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "paper.yaml").write_text("name: mine\ntrain:\n  epochs: 3\n")
    cfg = load_config("paper.yaml")
    assert cfg.name == "mine" and cfg.train.epochs == 3
    assert resolve_config("paper.yaml") == Path("paper.yaml")
    assert load_config("paper").name == "paper"  # no file named "paper" here: the built-in
    (tmp_path / "paper").write_text("name: bare\n")
    assert load_config("paper").name == "bare"
    # builtin_experiment (the train default) never looks at the working directory.
    assert load_config(builtin_experiment("paper.yaml")).name == "paper"


def test_an_unknown_name_lists_the_builtin_experiments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config("nosuch")
    message = str(e.value)
    assert "config file nosuch does not exist" in message
    assert "'nosuch' is not a built-in experiment" in message
    assert "path of a YAML file" in message
    assert message.endswith(", ".join(builtin_experiments()))
    # A path with a folder is never looked up among the built-in experiments.
    with pytest.raises(ConfigError, match=r"elsewhere.paper.yaml does not exist; .*paper"):
        load_config("elsewhere/paper.yaml")
    with pytest.raises(ConfigError, match="not a built-in experiment; .*paper, quickstart"):
        builtin_experiment("nosuch")


def test_overrides_parse_yaml_values():
    cfg = load_config(
        None,
        [
            "model.aspp_rates=[2,4,8]",
            "train.epochs=5",
            "train.learning_rate=1e-3",
            "model.pre_windowed=true",
            "name=trial",
        ],
    )
    assert cfg.model.bridge.rates == (2, 4, 8)
    assert cfg.train.epochs == 5
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.model.pre_windowed is True
    assert cfg.name == "trial"


def test_unknown_override_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.aspp_rate=[3,6,9]"])
    msg = str(e.value)
    assert "model.aspp_rate" in msg and "bridge" in msg and "input_size" in msg
    with pytest.raises(ConfigError, match=r"'model.bridge.rate'.*allowed keys in 'model.bridge'"):
        load_config(None, ["model.bridge.rate=[3,6,9]"])
    with pytest.raises(ConfigError, match="'model.input_size' in override .* has no keys"):
        load_config(None, ["model.input_size.x=1"])


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  input_sise: [64, 64]\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.input_sise' in .*x.yaml"):
        load_config(path)
    path.write_text("modle:\n  input_size: [64, 64]\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'.*allowed top-level keys"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.input_size=[100,100]", "multiples of 32"),
        ("model.input_size=[320000,320000]", "at most 2048 pixels"),
        ("model.input_size=[64]", "list of 2 values"),
        ("model.aspp_rates=abc", "must be a list"),
        ("train.batch_size=eight", "must be an integer"),
        ("train.batch_size=0", r"must be positive and finite, got 0 "),  # was "got [0]"
        ("model.input_size=[64, 0]", r"got \[64, 0\]"),
        ("train.loss=dice", "must be one of"),
        ("train.phases=[segmentation, nap]", "must be one of"),
        ("data.fold=5", r"data.fold must be in \[0, 4\]"),
        ("model.pre_windowed=maybe", "true or false"),
        ("model.hu_window=[250,-1250]", "hu_window"),
        ("model.class_names=[ggo,ggo]", "duplicates"),
        ("epochs=3", "unknown key 'epochs'"),
        ("train.learning_rate=.nan", "positive and finite"),
        ("train.learning_rate=inf", "positive and finite"),
        ("train.coarse_loss_weight=.nan", "finite"),
        ("data.records_dir=null", "must be a string"),
        ("model.class_names=[ggo, null]", "must be a string"),
        ("train.phases=[classification, segmentation]", "in the order"),
        ("train.phases=[segmentation, segmentation]", "once"),
        ("train.early_stopping_patience=-1", ">= 0"),
        ("model.aspp_rates=[]", "must not be empty"),
        ("model.architecture=unet", "set train.phases to \\[segmentation\\]"),
        ("model.architecture=seresnet_classifier", "must be \\[classification\\]"),
        ("train.epochs", "section.key=value"),
        ("train.strategy=tpu", "train.strategy must be one of"),
        ("train.overlay_images=-1", "overlay_images"),
        ("model.classifier_pooling=median", "model.classifier.pooling must be one of"),
        ("model.classifier_head=mlp", "model.classifier.head must be one of"),
        ("model.classifier_head_filters=0", "model.classifier.head_filters"),
        ("data.oversample_pneumonia=0", "oversample_pneumonia"),
        ("train.classifier_aux_weight=-0.5", "classifier_aux_weight"),
        ("train.positive_weights=[1, 0, 4]", r"positive_weights must be finite and > 0"),
        ("train.positive_weights=[1, 4]", r"2 values for the 3 classes"),
        # These went on to a converter refusal, a phantom written into the working folder,
        # or NumPy's traceback.
        ("data.num_folds=1", "data.num_folds must be at least 2"),
        ("data.records_dir=", "data.records_dir must name a folder"),
        ("train.seed=-1", r"train.seed must be in \[0, 2\*\*32 - 1\]"),
        ("data.phantom_seed=4294967296", "data.phantom_seed must be in"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_spatial_augment_needs_the_papers_augmentation():
    """It follows the quarter turn and flip: without them it would be silently off."""
    with pytest.raises(ConfigError, match="data.spatial_augment needs data.augment: true"):
        load_config(None, ["data.augment=false", "data.spatial_augment=true"])
    assert load_config(None, ["data.spatial_augment=true"]).data.spatial_augment


def test_classifier_aux_weight_needs_an_se_resnet_segmenter():
    with pytest.raises(ConfigError, match="classifier_aux_weight needs a segmenter"):
        load_config(
            None,
            [
                "model.architecture=unet",
                "train.phases=[segmentation]",
                "train.classifier_aux_weight=0.5",
            ],
        )
    assert load_config(None, ["train.classifier_aux_weight=0.5"]).train.classifier_aux_weight == 0.5


def test_sections_must_be_mappings(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model: []\n")
    with pytest.raises(ConfigError, match="'model' in .* must be a mapping"):
        load_config(path)
    path.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path, ["model.input_size=[64,64]"])
    path.write_text("model:\n")  # an empty section means the defaults
    assert load_config(path).model == ModelConfig()


def test_lists_become_tuples_outside_yaml_too():
    cfg = ModelConfig(input_size=[64, 64], bridge=BridgeConfig(rates=[1, 2]))
    assert cfg.input_size == (64, 64) and cfg.bridge.rates == (1, 2)
    assert hash(cfg)
    assert model_config(input_size=[64, 64], bridge={"rates": [1, 2]}) == cfg


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(EXPERIMENTS / "quickstart.yaml", ["train.epochs=2"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert config_to_dict(cfg)["model"]["input_size"] == [128, 128]


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    run = tmp_path / "run"  # a run folder: it said "does not exist"
    run.mkdir()
    (run / "config.yaml").write_text("base: quickstart\n")
    with pytest.raises(ConfigError, match="is a folder, not a YAML file: give .*config.yaml"):
        load_config(run)
    empty = tmp_path / "empty.yaml"  # trained the default experiment as "default"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(empty)
    binary = tmp_path / "model.keras"  # a model file given as --config: a traceback
    binary.write_bytes(b"PK\x03\x04\xff\xfe\xd7")
    with pytest.raises(ConfigError, match="model.keras is not a YAML file"):
        load_config(binary)
    twice = tmp_path / "twice.yaml"  # the last value won in silence
    twice.write_text("base: quickstart\ntrain:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(
        ConfigError, match="twice.yaml is not valid YAML: .*'epochs' is given twice"
    ):
        load_config(twice)
    # PyYAML's own error spans six lines (a caret under a copy of the line): one line here.
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  input_size: [64, 64\n")
    with pytest.raises(ConfigError) as error:
        load_config(broken)
    assert "\n" not in str(error.value) and "at line 3, column 1" in str(error.value)
    with pytest.raises(ConfigError, match=r"value is not valid YAML: .* at line 1") as error:
        load_config(None, ["train.epochs=[1"])
    assert "\n" not in str(error.value)


def test_dataclass_defaults():
    assert ExperimentConfig().model == ModelConfig()
    assert ModelConfig().class_names == ("ggo", "consolidation", "fibrosis")
    assert ModelConfig().hu_window == (-1250.0, 250.0)


def test_base_inheritance_states_only_what_differs(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        "name: parent\nmodel:\n  input_size: [64, 64]\n  aspp_rates: [2, 4, 6]\n"
        "train:\n  epochs: 3\n  phases: [segmentation, classification]\n"
    )
    (tmp_path / "child.yaml").write_text(
        "base: parent.yaml\nname: child\nmodel:\n  aspp_rates: [1, 2]\n"
        "train:\n  phases: [segmentation]\n"
    )
    cfg = load_config(tmp_path / "child.yaml", ["train.epochs=5"])
    assert cfg.name == "child"
    assert cfg.model.input_size == (64, 64)  # from the base: sections merge key by key
    assert cfg.model.bridge.rates == (1, 2)  # lists replace, never append
    assert cfg.train.phases == ("segmentation",)
    assert cfg.train.epochs == 5  # --set applies after the chain


def test_builtin_baselines_start_from_the_quickstart():
    quick, unet = load_config("quickstart"), load_config("quickstart_unet")
    unetpp = load_config("quickstart_unetpp")  # a base of a base
    assert unet.data == quick.data and unetpp.data == quick.data
    assert unet.model.input_size == quick.model.input_size == (128, 128)
    assert (unet.train.epochs, unet.train.learning_rate) == (16, 1e-3)
    assert unet.train.positive_weights == () and unet.train.export_dir == ""
    assert unetpp.model.architecture == "unet_plus_plus" and unetpp.train.loss == "bce"
    big = load_config("quickstart_256")
    assert big.model.input_size == (256, 256) and big.model.encoder.stem_filters == 16
    assert big.data.records_dir != quick.data.records_dir and not big.train.export_dir


def test_bad_bases_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match=r"their own base: a.yaml -> b.yaml -> a.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: [quickstart]\nname: c\n")
    with pytest.raises(ConfigError, match=r"c.yaml: base must name another experiment"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: nowhere\nname: d\n")
    with pytest.raises(ConfigError, match="'nowhere' is not a built-in experiment"):
        load_config(tmp_path / "d.yaml")


def test_components_nest_and_older_flat_keys_still_load(tmp_path):
    """``model.encoder.filters`` and the flat ``model.encoder_filters`` of configs written
    before the components mean the same; a run folder's old config.yaml loads."""
    nested = load_config(None, ["model.encoder.filters=[8,16,16,32]", "model.classifier.head=conv"])
    flat = load_config(None, ["model.encoder_filters=[8,16,16,32]", "model.classifier_head=conv"])
    assert nested == flat and nested.model.encoder.filters == (8, 16, 16, 32)
    assert nested.model.encoder.blocks == (3, 4, 6, 3)  # the rest of the component stays
    old = tmp_path / "config.yaml"
    old.write_text("name: old\nmodel:\n  stem_filters: 8\n  refine_filters: 4\n")
    cfg = load_config(old, ["model.refinement.filters=6"])  # an override wins over the file
    assert (cfg.model.encoder.stem_filters, cfg.model.refinement.filters) == (8, 6)
    save_config(cfg, tmp_path / "new.yaml")  # written nested, and reads back the same
    assert "refinement:" in (tmp_path / "new.yaml").read_text()
    assert load_config(tmp_path / "new.yaml") == cfg
    both = tmp_path / "both.yaml"
    both.write_text("model:\n  aspp_filters: 8\n  bridge:\n    filters: 16\n")
    with pytest.raises(ConfigError, match="model.aspp_filters and model.bridge.filters"):
        load_config(both)
