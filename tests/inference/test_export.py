"""python -m tfcovseg.export: the SavedModel for TF Serving and its signatures."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfcovseg.cli.export import main
from tfcovseg.data.dataset import make_dataset, split_dataset
from tfcovseg.evaluation import calibration
from tfcovseg.evaluation.burden import lesion_burdens
from tfcovseg.evaluation.calibration import (
    VALIDATION_CACHE,
    calibrate_burden_rule,
    calibrate_gate,
    validation_burdens,
)
from tfcovseg.evaluation.metrics import choose_burden_threshold
from tfcovseg.inference.export import (
    ASSET_NAME,
    SIGNATURES,
    ExportError,
    InferenceGraph,
    _windowing,
    export_run,
    prepare_run,
)
from tfcovseg.models import load_run_models
from tfcovseg.models.outputs import final_probabilities
from tfcovseg.models.preprocessing import grey_from_hu

from ..helpers import broadcast_products


@pytest.fixture(scope="module")
def exported(phantom_export):
    return phantom_export, tf.saved_model.load(str(phantom_export))


def _hu(rng, n=3, h=64, w=64):
    return rng.uniform(-1100.0, 300.0, (n, h, w)).astype(np.float32)


def test_layout_version_and_assets(exported, phantom_run):
    path, loaded = exported
    assert path.name == "1" and (path / "saved_model.pb").is_file()
    assert (path / "variables").is_dir()
    meta = json.loads((path / "assets" / ASSET_NAME).read_text())
    assert meta["class_names"] == ["ggo", "consolidation", "fibrosis"]
    assert meta["input_size"] == [64, 64] and meta["hu_window"] == [-1250.0, 250.0]
    assert meta["slice_score"] == "classifier"  # covid_probability is the classifier's
    # The quickstart's loss weights, which the served probabilities are corrected for.
    assert meta["positive_weights"] == [1.0, 10.0, 10.0]
    assert meta["model_version"] == 1 and "not a medical device" in meta["disclaimer"]
    # The severity rule was fitted on the fold's training + validation COVID patients.
    assert meta["severity"]["patients"] >= 1 and "grades" in meta["severity"]
    # The automatic gate never exceeds the paper's 0.5 and says how it was chosen.
    assert 0.0 <= meta["gate"]["threshold"] <= 0.5 and meta["gate"]["method"]
    # The lesion-burden rule is evaluate's: chosen on the run's validation patients.
    segmenter, _ = load_run_models(phantom_run.run)
    weights = phantom_run.config.train.positive_weights  # the maps are corrected for them
    burdens, diagnosis = lesion_burdens(
        segmenter, split_dataset(phantom_run.config), threshold=0.5, positive_weights=weights
    )
    expected = choose_burden_threshold(burdens, {p: d == "covid" for p, d in diagnosis.items()})
    assert meta["burden_rule"]["threshold"] == pytest.approx(expected["threshold"])
    assert meta["burden_rule"]["validation_patients"] == len(burdens) >= 1
    # The training slices' grey levels (windowed at the model's window), for predict to
    # match PNG/JPEG slices to.
    train = np.concatenate(
        [
            grey_from_hu(b["hu"], meta["hu_window"])
            for b in split_dataset(phantom_run.config, "train")
        ]
    )
    grey = meta["grey_levels"]
    assert grey["percentiles"] == [5.0, 95.0] and grey["slices"] == len(train)
    assert grey["reference"] == pytest.approx(
        np.median(np.percentile(train.reshape(len(train), -1), [5, 95], axis=1), axis=1), abs=0.01
    )
    # The metadata signature returns the same values.
    sig = loaded.signatures["metadata"]()
    assert [c.decode() for c in sig["class_names"].numpy()] == meta["class_names"]
    assert sig["input_size"].numpy().tolist() == [64, 64]
    assert sig["gate_threshold"].numpy() == pytest.approx(meta["gate"]["threshold"])
    assert json.loads(sig["json"].numpy().decode()) == meta
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_burden_rule_is_left_out_without_validation_records(phantom_run, tmp_path):
    import dataclasses

    config = phantom_run.config
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, records_dir=str(tmp_path / "gone"))
    )
    segmenter, _ = load_run_models(phantom_run.run)
    rule = calibrate_burden_rule(segmenter, config)
    assert rule["threshold"] is None and "gone" in rule["method"]


def test_moved_records_are_named_with_the_way_to_give_them(phantom_run, tmp_path, capsys):
    """Records moved since training: the export (and predict on a run folder) stopped
    with a FileNotFoundError traceback from the grey levels' read."""
    gone = f"data.records_dir={tmp_path / 'gone'}"
    args = ["--run", str(phantom_run.run), "--out", str(tmp_path / "m"), "--set", gone]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "grey levels" in err and "--set data.records_dir=DIR" in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()


class _Refuses:
    """A segmenter that must not be run: the burdens should come from the run's cache."""

    def predict_on_batch(self, x):
        raise AssertionError("the segmenter ran although the burdens were cached")


def test_validation_burdens_are_kept_in_the_run_and_keyed(phantom_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(phantom_run.run, run)
    config = phantom_run.config
    segmenter, _ = load_run_models(run)
    weights = config.train.positive_weights
    expected = lesion_burdens(segmenter, split_dataset(config), positive_weights=weights)
    first = validation_burdens(segmenter, config, run=run)
    assert first == expected and (run / VALIDATION_CACHE).is_file()
    # Same segmenter file, records, fold and mask threshold: read back, not recomputed.
    assert validation_burdens(_Refuses(), config, run=run) == expected
    assert calibrate_burden_rule(_Refuses(), config, run=run)["threshold"] is not None
    # Any part of the key changed: computed again.
    with pytest.raises(AssertionError, match="ran although"):
        validation_burdens(_Refuses(), config, mask_threshold=0.3, run=run)
    with pytest.raises(AssertionError, match="ran although"):
        validation_burdens(_Refuses(), config, fold=1 - config.data.fold, run=run)
    unweighted = dataclasses.replace(
        config, train=dataclasses.replace(config.train, positive_weights=[])
    )  # the maps' correction is part of the key
    with pytest.raises(AssertionError, match="ran although"):
        validation_burdens(_Refuses(), unweighted, run=run)
    retrained = load_run_models(run)[0]
    retrained.set_weights([w + 0.01 for w in retrained.get_weights()])
    retrained.save(run / "segmenter_best.keras")  # another file digest
    with pytest.raises(AssertionError, match="ran although"):
        validation_burdens(_Refuses(), config, run=run)
    # A corrupt cache is recomputed and rewritten, not an error.
    (run / VALIDATION_CACHE).write_text("{not json")
    again = validation_burdens(retrained, config, run=run)
    assert set(again[0]) == set(expected[0])
    assert json.loads((run / VALIDATION_CACHE).read_text())


def test_evaluate_then_export_run_the_validation_split_once(phantom_run, tmp_path, monkeypatch):
    from tfcovseg.evaluation.run import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(phantom_run.run, run)
    (run / VALIDATION_CACHE).unlink(missing_ok=True)
    results = evaluate_run(run, split="test", figures=False)
    assert (run / VALIDATION_CACHE).is_file()
    calls = []

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    # The export's two passes over validation: the segmenter's burdens, the gate's slices.
    monkeypatch.setattr(calibration, "lesion_burdens", counting("burdens", lesion_burdens))
    monkeypatch.setattr(
        calibration, "classify_label", counting("slices", calibration.classify_label)
    )
    graph = prepare_run(run)
    assert calls == []
    burden = results["classification"]["lesion_burden"]
    assert graph.metadata["burden_rule"]["threshold"] == pytest.approx(burden["threshold"])
    # The gate from the kept scores is the gate computed afresh, without the cache.
    fresh = calibrate_gate(graph.classify, phantom_run.config)
    assert calls == ["slices"] * len(calls) and calls
    assert graph.metadata["gate"]["threshold"] == pytest.approx(fresh["threshold"], abs=1e-5)
    assert graph.metadata["gate"]["method"].split("(")[0] == fresh["method"].split("(")[0]


def test_a_run_without_a_classifier_records_its_slice_score_as_lesion(phantom_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(phantom_run.run, run)
    (run / "classifier_best.keras").unlink()
    graph = prepare_run(run, overrides=["train.phases=[segmentation]"])
    assert graph.classifier is None and graph.metadata["slice_score"] == "lesion"


def test_savedmodel_matches_the_keras_models(exported, phantom_run, rng):
    path, loaded = exported
    segmenter, classifier = load_run_models(phantom_run.run)
    hu = _hu(rng)
    served = loaded.signatures["serving_default"](hu=tf.constant(hu))
    assert served["masks"].shape == (3, 64, 64, 3) and served["covid_probability"].shape == (3,)
    # At the model's size the resize is the identity: the masks are the segmenter's output,
    # corrected for its loss's positive weights (`tfcovseg.models.outputs`).
    expected = np.asarray(
        final_probabilities(
            segmenter.predict_on_batch(hu[..., None]), phantom_run.config.train.positive_weights
        )
    )
    np.testing.assert_allclose(served["masks"].numpy(), expected, atol=1e-5)
    prob = np.asarray(classifier.predict_on_batch(hu[..., None])).reshape(-1)
    np.testing.assert_allclose(served["covid_probability"].numpy(), prob, atol=1e-5)
    gate = loaded.signatures["classify"](hu=tf.constant(hu))
    np.testing.assert_allclose(gate["covid_probability"].numpy(), prob, atol=1e-5)
    masks = loaded.signatures["segment"](hu=tf.constant(hu))["masks"]
    np.testing.assert_allclose(masks.numpy(), expected, atol=1e-5)


def test_served_graphs_broadcast_no_matrix_over_a_batch(exported):
    """TF Serving and TensorFlow itself run oneDNN kernels on CPUs with AVX-512 VNNI by
    default, and those read past a matrix broadcast over a batch of matrices
    (tensorflow/tensorflow#117700); the resize of any input size to the model's was one."""
    _, loaded = exported
    for name, function in loaded.signatures.items():
        assert broadcast_products(function.graph) == [], name


def test_any_input_size_is_resized_in_and_out(exported, phantom_run, rng):
    path, loaded = exported
    segmenter, _ = load_run_models(phantom_run.run)
    graph = InferenceGraph(segmenter, None, json.loads((path / "assets" / ASSET_NAME).read_text()))
    hu = _hu(rng, n=2, h=96, w=80)
    served = loaded.signatures["serving_default"](hu=tf.constant(hu))
    assert served["masks"].shape == (2, 96, 80, 3)
    masks = served["masks"].numpy()
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    # The same computation in process (what predict runs on a run folder).
    np.testing.assert_allclose(masks, graph.segment(hu)["masks"].numpy(), atol=1e-5)


def test_shared_encoder_runs_once_and_agrees(phantom_run, rng):
    segmenter, classifier = load_run_models(phantom_run.run)
    meta = {
        "class_names": ["ggo", "consolidation", "fibrosis"],
        "pre_windowed": False,
        "hu_window": [-1250.0, 250.0],
    }
    graph = InferenceGraph(segmenter, classifier, meta)
    assert graph.joint is not None  # the classifier's encoder holds the segmenter's weights
    hu = _hu(rng, n=2)
    out = graph.serve(hu)
    np.testing.assert_allclose(
        out["covid_probability"].numpy(), graph.classify(hu)["covid_probability"].numpy(), atol=1e-5
    )
    # Another encoder: the graph falls back to two separate calls.
    classifier.encoder.weights[0].assign(classifier.encoder.weights[0] + 1.0)
    assert InferenceGraph(segmenter, classifier, meta).joint is None


def test_served_masks_are_corrected_for_the_loss_positive_weights(phantom_run, rng):
    """A model trained with positive weights [1, 10, 10] served raw maps in which 0.5
    meant about 0.09 for the weighted classes (precision traded away); every graph of an
    export now serves the corrected map, and older exports (no key) the raw one."""
    from tfcovseg.models.outputs import unweighted_probabilities

    segmenter, classifier = load_run_models(phantom_run.run)
    meta = {
        "class_names": ["ggo", "consolidation", "fibrosis"],
        "pre_windowed": False,
        "hu_window": [-1250.0, 250.0],
    }
    hu = _hu(rng, n=2)
    raw = InferenceGraph(segmenter, classifier, meta)
    weighted = InferenceGraph(segmenter, classifier, {**meta, "positive_weights": [1, 10, 10]})
    expected = np.asarray(unweighted_probabilities(raw.segment(hu)["masks"].numpy(), [1, 10, 10]))
    np.testing.assert_allclose(weighted.segment(hu)["masks"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(weighted.serve(hu)["masks"].numpy(), expected, atol=1e-5)
    assert not np.allclose(raw.segment(hu)["masks"].numpy()[..., 1:], expected[..., 1:])


def test_predict_examples_reads_the_records_spec(exported, phantom_run):
    path, loaded = exported
    records = phantom_run.records
    manifest = json.loads((records / "manifest.json").read_text())
    raw = next(iter(tf.data.TFRecordDataset(str(records / manifest["shards"][0])).batch(4)))
    out = loaded.signatures["predict_examples"](examples=raw)
    assert out["masks"].shape == (4, 64, 64, 3) and out["covid_probability"].shape == (4,)
    assert [s.decode()[:1] for s in out["patient_id"].numpy()] == ["P"] * 4
    ds = make_dataset(records, "all", batch_size=64, training=False, task="inspect")
    batch = next(iter(ds))
    ids = [s.decode() for s in batch["slice/id"].numpy()]
    rows = [ids.index(s.decode()) for s in out["slice_id"].numpy()]
    direct = loaded.signatures["serving_default"](hu=tf.gather(batch["hu"], rows))
    np.testing.assert_allclose(out["masks"].numpy(), direct["masks"].numpy(), atol=1e-5)


def test_bad_requests_raise_instead_of_returning_garbage(exported, rng):
    _, loaded = exported
    serve = loaded.signatures["serving_default"]
    hu = _hu(rng, n=1)
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        serve(hu=tf.constant(hu.astype(np.int32)))  # wrong dtype
    with pytest.raises(TypeError):
        serve()  # missing input
    with pytest.raises(TypeError):
        serve(image=tf.constant(hu))  # wrong input name
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["predict_examples"](examples=tf.constant([b"not an example"]))


@pytest.mark.parametrize("signature", ["serving_default", "classify", "segment"])
def test_signatures_check_their_input_and_name_the_expected_one(exported, rng, signature):
    # A wrong rank or an empty slice is refused at the input, naming the expected shape
    # and dtype (not deep inside the resize); NaN is refused; an empty batch is answered.
    _, loaded = exported
    call = loaded.signatures[signature]
    hu = _hu(rng, n=2, h=40, w=48)
    for bad in (hu[..., None], hu[0], hu[:, :, :0]):
        with pytest.raises(tf.errors.InvalidArgumentError) as err:
            call(hu=tf.constant(bad))
        assert "hu: float32 [batch, height, width] Hounsfield units" in str(err.value)
        assert str(list(bad.shape)).replace(",", "") in str(err.value)
    hu[1, 3, 4] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or infinite"):
        call(hu=tf.constant(hu))
    out = call(hu=tf.constant(np.zeros((0, 40, 48), np.float32)))
    if signature != "classify":
        assert out["masks"].shape == (0, 40, 48, 3)
    if signature != "segment":
        assert out["covid_probability"].shape == (0,)
    meta = json.loads(loaded.signatures["metadata"]()["json"].numpy().decode())
    assert "non_finite" in meta["input"] and "empty_batch" in meta["input"]


def test_an_empty_batch_is_answered_with_onednn_kernels_on(exported):
    """TensorFlow (and TF Serving) run oneDNN kernels by default on CPUs with AVX-512
    VNNI, whose strided convolution gives an empty batch its input's shape: the served
    graph must answer an empty batch there too. Forced on here, in a fresh process."""
    path, _ = exported
    script = (
        "import sys, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "for name in ('serving_default', 'classify', 'segment'):\n"
        "    out = m.signatures[name](hu=tf.zeros((0, 40, 48)))\n"
        "    print(name, sorted((k, tuple(v.shape)) for k, v in out.items()))\n"
    )
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "serving_default [('covid_probability', (0,)), ('masks', (0, 40, 48, 3))]",
        "classify [('covid_probability', (0,))]",
        "segment [('masks', (0, 40, 48, 3))]",
    ]


def test_saved_model_cli_lists_the_signatures(exported):
    path, _ = exported
    cli = shutil.which("saved_model_cli") or str(Path(sys.executable).parent / "saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--dir", str(path), "--all"], capture_output=True, text=True, check=True
    ).stdout
    for name in SIGNATURES:
        assert f"signature_def['{name}']" in shown, name
    assert "inputs['hu'] tensor_info:" in shown and "outputs['masks'] tensor_info:" in shown
    # hu of any rank reaches the graph's own check (`check_hu`), which names the shape.
    assert "shape: unknown_rank" in shown and "shape: (-1, -1, -1, 3)" in shown


def test_versions_are_never_overwritten(phantom_run, phantom_export, tmp_path, capsys):
    out = tmp_path / "model"
    first = out / "1"  # an export of the same run (a copy: one export less to wait for)
    shutil.copytree(phantom_export, first)
    before = sorted(p.name for p in first.rglob("*"))
    assert main(["--run", str(phantom_run.run), "--out", str(out), "--version", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in first.rglob("*")) == before
    assert main(["--run", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert f"--run {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--run", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    assert main(["--run", str(phantom_run.run), "--out", str(out), "--gate-threshold", "x"]) == 2
    # --out a file: refused before any work (it raised FileExistsError after 8 s).
    (tmp_path / "afile").write_text("x")
    for path in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["--run", str(phantom_run.run), "--out", str(path)]) == 2
        assert "give a folder" in capsys.readouterr().err
    # What a killed export left (its temporary version folder) goes with the next one.
    (out / ".2-k1lled" / "variables").mkdir(parents=True)
    (out / ".notes-kept").mkdir()
    said = []
    second = export_run(phantom_run.run, out, gate_threshold=0.3, log=said.append)
    assert any(".2-k1lled" in line and "interrupted export" in line for line in said)
    assert (out / ".notes-kept").is_dir()
    (out / ".notes-kept").rmdir()
    assert second.name == "2"
    assert json.loads((second / "assets" / ASSET_NAME).read_text())["gate"] == {
        "threshold": 0.3,
        "method": "given",
    }
    assert sorted(p.name for p in out.iterdir()) == ["1", "2"]


def test_a_run_without_a_segmenter_is_refused(phantom_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(phantom_run.run / "config.yaml", run)
    shutil.copy(phantom_run.run / "classifier_best.keras", run)
    with pytest.raises(ExportError, match="no segmenter"):
        export_run(run, tmp_path / "out", log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_a_run_that_does_not_load_is_named_without_class_names(phantom_run, tmp_path):
    """A corrupt .keras file or a broken config.yaml said "cannot load the run R:
    ModelFileError: ..." (our own errors' class names, which tell a user nothing)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(phantom_run.run / "config.yaml", run)
    (run / "segmenter_best.keras").write_bytes(b"x" * 2000)
    with pytest.raises(ExportError, match="not a complete .keras file") as error:
        export_run(run, tmp_path / "out", log=lambda *a: None)
    assert "ModelFileError" not in str(error.value) and str(run) in str(error.value)
    (run / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ExportError, match="not valid YAML") as error:
        export_run(run, tmp_path / "out", log=lambda *a: None)
    assert "ConfigError" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_gate_keeps_lesion_slices_or_switches_off():
    from tfcovseg.evaluation.calibration import gate_from_scores

    rng = np.random.default_rng(3)
    labels = np.arange(200) < 80
    good = np.where(labels, rng.uniform(0.3, 1.0, 200), rng.uniform(0.0, 0.32, 200))
    gate = gate_from_scores(good, labels)
    assert gate["validation_slice_auc"] > 0.95 and 0.3 <= gate["threshold"] <= 0.5
    assert gate["validation_lesion_recall"] >= 0.98  # GATE_RECALL
    assert gate["validation_pass_rate"] < 0.6  # it does skip slices
    # A classifier that already separates at 0.5 keeps the paper's threshold.
    sharp = np.where(labels, 0.9, 0.1)
    assert gate_from_scores(sharp, labels)["threshold"] == 0.5
    # A classifier that cannot tell lesion slices apart must not drop them: the gate is off.
    fair = np.where(labels, rng.uniform(0.3, 1.0, 200), rng.uniform(0.0, 0.5, 200))  # AUC ~0.9
    off = gate_from_scores(fair, labels)
    assert off["threshold"] == 0.0 and off["validation_lesion_recall"] == 1.0
    assert off["method"].startswith("off") and "the classifier's validation" in off["method"]
    # A run without a classifier: its segmenter scores the slices, and the reason says so
    # (it named "the classifier's" AUC of a classifier that did not exist).
    by_segmenter = gate_from_scores(fair, labels, scorer=calibration.SEGMENTER_SCORER)
    assert "segmenter's maximum lesion probability" in by_segmenter["method"]
    assert "classifier's" not in by_segmenter["method"]
    # Nothing to check it on: off as well.
    unchecked = gate_from_scores(good, np.zeros(200, bool))
    assert unchecked["threshold"] == 0.0 and unchecked["method"].startswith("off")
    # Every validation slice a lesion slice (COVID-SemiSeg): the AUC is undefined, and said so.
    lesions_only = gate_from_scores(good, np.ones(200, bool))
    assert (
        lesions_only["threshold"] == 0.0
        and "every validation slice has a lesion" in (lesions_only["method"])
    )


def test_no_burden_rule_when_every_validation_patient_is_covid(phantom_run, monkeypatch):
    # Any cut "separates" patients of one kind: the exported threshold would mean nothing.
    def one_kind(*args, **kwargs):
        return {"P1": 0.02, "P2": 0.2}, {"P1": "covid", "P2": "covid"}

    monkeypatch.setattr(calibration, "validation_burdens", one_kind)
    rule = calibrate_burden_rule(None, phantom_run.config)
    assert rule["threshold"] is None and "every validation patient is COVID-19" in rule["method"]


def test_conv_head_classifier_shares_the_encoder_in_the_served_graph(phantom_run, rng):
    from tfcovseg.models import build_classifier

    segmenter, _ = load_run_models(phantom_run.run)
    classifier = build_classifier(segmenter, head="conv", head_filters=4)
    for w in classifier._head.logit.weights:
        w.assign(w + 0.3)  # a head unlike a fresh one: the copy into the graph must carry it
    meta = {
        "class_names": ["ggo", "consolidation", "fibrosis"],
        "pre_windowed": False,
        "hu_window": [-1250.0, 250.0],
    }
    graph = InferenceGraph(segmenter, classifier, meta)
    assert graph.joint is not None
    hu = _hu(rng, n=2)
    np.testing.assert_allclose(
        graph.serve(hu)["covid_probability"].numpy(),
        graph.classify(hu)["covid_probability"].numpy(),
        atol=1e-5,
    )


def test_image_signatures_agree_with_hu_ones_through_the_window(exported, rng):
    # A PNG/JPEG slice windowed at the model's HU window gives the masks of its HU slice.
    _, loaded = exported
    # Inside the window (values it clips would be clipped before the resize as images).
    hu = rng.uniform(-1240.0, 240.0, (2, 48, 56)).astype(np.float32)
    grey = np.asarray(grey_from_hu(hu, (-1250.0, 250.0)))
    by_hu = loaded.signatures["segment"](hu=tf.constant(hu))["masks"].numpy()
    by_image = loaded.signatures["segment_image"](image=tf.constant(grey))["masks"].numpy()
    np.testing.assert_allclose(by_image, by_hu, atol=1e-4)
    served = loaded.signatures["serve_image"](image=tf.constant(grey))
    np.testing.assert_allclose(served["masks"].numpy(), by_hu, atol=1e-4)
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        loaded.signatures["segment_image"](image=tf.constant(grey[0]))
    assert "image: float32 [batch, height, width] grey levels 0-255" in str(err.value)


def test_a_pre_windowed_model_takes_hu_through_its_images_window(rng):
    # A model trained on windowed JPEGs: HU reach it as the grey levels of model.hu_window;
    # grey levels reach it unchanged; examples of pre-windowed records as grey levels.
    from tests.conftest import tiny_config
    from tfcovseg.models import build_model

    window = (-1000.0, 200.0)
    segmenter = build_model(tiny_config(pre_windowed=True, hu_window=window))
    meta = {"class_names": ["ggo", "consolidation", "fibrosis"], "pre_windowed": True}
    graph = InferenceGraph(segmenter, None, {**meta, "hu_window": list(window)})
    hu = _hu(rng, n=2)
    grey = np.clip((hu - window[0]) / (window[1] - window[0]), 0, 1) * 255.0
    expected = np.asarray(segmenter.predict_on_batch(grey[..., None])["final"])
    np.testing.assert_allclose(graph.segment(hu)["masks"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(graph.segment_image(grey)["masks"].numpy(), expected, atol=1e-5)
    # The window matters: another one gives other masks.
    other = InferenceGraph(segmenter, None, {**meta, "hu_window": [-1250.0, 250.0]})
    assert np.abs(other.segment(hu)["masks"].numpy() - expected).max() > 1e-3
    assert "correspond to HU [-1000, 200]" in _windowing(
        tiny_config(pre_windowed=True, hu_window=window)
    )


def test_a_bad_gate_threshold_is_refused_before_the_models_load(
    phantom_run, tmp_path, capsys, monkeypatch
):
    """--gate-threshold 2 or nan was refused only after the run's models had loaded."""
    import tfcovseg.inference.export as export_module

    def loaded(*args):
        raise AssertionError("the models were loaded")

    monkeypatch.setattr(export_module, "load_run_models", loaded)
    for bad in ("2", "nan", "-0.1"):
        argv = ["--run", str(phantom_run.run), "--out", str(tmp_path / "m")]
        assert main([*argv, "--gate-threshold", bad]) == 2
        assert "--gate-threshold must be in [0, 1] or 'auto'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
