"""Metrics: known answers on 4x4 masks, streaming = global counts, empty cases."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tfcovseg.evaluation.metrics import (
    DiceScore,
    IoUScore,
    LesionSliceDice,
    PixelPrecision,
    PixelRecall,
    SliceAUC,
    confusion_counts,
    lesion_slice_mean,
    scores_from_counts,
    segmentation_metrics,
    segmentation_scores,
    slice_dice,
)

T = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], "float32")
# Found 2 of the 4 lesion pixels; one false positive at exactly the 0.5 threshold.
P = np.array([[0.9, 0.6, 0, 0], [0.4, 0.2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.5]], "float32")
EXPECTED = {"dice": 4 / 7, "iou": 2 / 5, "precision": 2 / 3, "recall": 2 / 4}
CLASSES = {"dice": DiceScore, "iou": IoUScore, "precision": PixelPrecision, "recall": PixelRecall}


def _img(a):
    return a[None, :, :, None]


def _result(metric):
    return float(keras.ops.convert_to_numpy(metric.result()))


def test_numpy_known_answers():
    tp, fp, fn = confusion_counts(_img(T), _img(P))
    assert (tp.tolist(), fp.tolist(), fn.tolist()) == ([2], [1], [2])
    scores = scores_from_counts(tp, fp, fn)
    for name, value in EXPECTED.items():
        assert scores[name][0] == pytest.approx(value)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_streaming_known_answers(name):
    metric = CLASSES[name](class_index=0, class_name="ggo")
    metric.update_state(_img(T), _img(P))
    assert metric.name == f"{name}_ggo"
    assert _result(metric) == pytest.approx(EXPECTED[name], rel=1e-6)


def test_threshold_is_inclusive_and_configurable():
    assert _result(_updated(DiceScore(threshold=0.5), T, P)) == pytest.approx(4 / 7)
    # At 0.55 the pixel at 0.5 is no longer a false positive: 2 TP, 0 FP, 2 FN.
    assert _result(_updated(DiceScore(threshold=0.55), T, P)) == pytest.approx(4 / 6)


def _updated(metric, t, p, **kw):
    metric.update_state(_img(t), _img(p), **kw)
    return metric


def test_streaming_accumulates_global_counts_not_batch_averages():
    empty = np.zeros((4, 4), "float32")
    three_fp = np.zeros((4, 4), "float32")
    three_fp[3, :3] = 0.9
    metric = _updated(_updated(DiceScore(), T, P), empty, three_fp)
    # Global: TP 2, FP 1 + 3, FN 2 -> 4 / (4 + 4 + 2); a batch average would be 2/7.
    assert _result(metric) == pytest.approx(0.4)
    metric.reset_state()
    assert _result(metric) == 1.0  # nothing seen: empty vs empty


@pytest.mark.parametrize("name", list(EXPECTED))
def test_empty_cases(name):
    empty, some = np.zeros((4, 4), "float32"), T
    both_empty = _result(_updated(CLASSES[name](), empty, empty))
    missed = _result(_updated(CLASSES[name](), some, empty))
    hallucinated = _result(_updated(CLASSES[name](), empty, some))
    assert (both_empty, missed, hallucinated) == (1.0, 0.0, 0.0)
    np_scores = [
        scores_from_counts(*confusion_counts(_img(t), _img(p)))[name][0]
        for t, p in ((empty, empty), (some, empty), (empty, some))
    ]
    assert np_scores == [1.0, 0.0, 0.0]


def test_lesion_slice_dice_leaves_out_slices_empty_in_truth_and_prediction():
    empty = np.zeros((4, 4), "float32")
    # Found half a lesion; an empty slice left empty (not counted); a lesion missed; a
    # false positive on an empty slice.
    t = np.stack([T, empty, T, empty])[..., None]
    p = np.stack([P, empty, empty, T])[..., None]
    metric = LesionSliceDice()
    metric.update_state(t, p)
    assert _result(metric) == pytest.approx((4 / 7 + 0 + 0) / 3)  # not (4/7 + 1) / 4
    dice, present = slice_dice(t, p)
    np.testing.assert_allclose(dice[:, 0], [4 / 7, 1, 0, 0])
    assert present[:, 0].tolist() == [True, False, True, True]
    np.testing.assert_allclose(lesion_slice_mean(dice, present), [(4 / 7) / 3])
    assert segmentation_scores(t, p, ["ggo"])["ggo"]["lesion_slices"] == 3
    weighted = LesionSliceDice()
    weighted.update_state(t, p, sample_weight=np.array([1.0, 1.0, 0.0, 0.0]))
    assert _result(weighted) == pytest.approx(4 / 7)
    # A class on no slice at all: nothing to find, nothing claimed.
    none = LesionSliceDice()
    none.update_state(np.stack([empty, empty])[..., None], np.stack([empty, empty])[..., None])
    assert _result(none) == 1.0
    np.testing.assert_allclose(lesion_slice_mean(np.ones((2, 1)), np.zeros((2, 1), bool)), [1.0])


def test_sample_weight_excludes_images():
    empty = np.zeros((4, 4), "float32")
    t = np.stack([T, empty])[..., None]
    p = np.stack([P, T])[..., None]
    metric = DiceScore()
    metric.update_state(t, p, sample_weight=np.array([1.0, 0.0]))
    assert _result(metric) == pytest.approx(4 / 7)


def test_per_pixel_sample_weights():
    weights = np.ones((1, 4, 4), "float32")
    weights[0, 3, 3] = 0.0  # ignore the false positive at the threshold
    metric = DiceScore()
    metric.update_state(_img(T), _img(P), sample_weight=weights)
    assert _result(metric) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="per image"):
        LesionSliceDice().update_state(_img(T), _img(P), sample_weight=weights)
    with pytest.raises(ValueError, match="sample_weight"):
        DiceScore().update_state(_img(T), _img(P), sample_weight=np.ones((1, 4)))


def test_lesion_slice_dice_before_any_image_follows_the_empty_rule():
    assert _result(LesionSliceDice()) == 1.0


def test_class_index_selects_channel_and_numpy_agrees():
    rng = np.random.default_rng(0)
    t = (rng.random((3, 8, 8, 2)) > 0.6).astype("float32")
    p = rng.random((3, 8, 8, 2)).astype("float32")
    metrics = segmentation_metrics(["ggo", "consolidation"])
    assert [m.name for m in metrics][:4] == [
        "dice_ggo",
        "dice_consolidation",
        "iou_ggo",
        "iou_consolidation",
    ]
    for m in metrics:
        m.update_state(t[:2], p[:2])
        m.update_state(t[2:], p[2:])
    offline = segmentation_scores(t, p, ["ggo", "consolidation"])
    keys = {
        "dice": "dice",
        "iou": "iou",
        "precision": "precision",
        "recall": "recall",
        "slice_dice": "lesion_slice_dice",
    }
    for m in metrics:
        prefix, cls = (
            m.name.split("_", 1)
            if not m.name.startswith("slice_dice")
            else ("slice_dice", m.name[len("slice_dice_") :])
        )
        assert _result(m) == pytest.approx(offline[cls][keys[prefix]], rel=1e-6), m.name


def test_metric_config_round_trip():
    m = IoUScore(class_index=2, class_name="fibrosis", threshold=0.3)
    clone = IoUScore.from_config(m.get_config())
    assert (clone.name, clone.class_index, clone.threshold) == ("iou_fibrosis", 2, 0.3)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        confusion_counts(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="class names"):
        segmentation_scores(np.zeros((1, 4, 4, 2)), np.zeros((1, 4, 4, 2)), ["ggo"])


# Patient-level rules ---------------------------------------------------------------------


def test_patient_score_is_the_kth_highest_slice():
    from tfcovseg.evaluation.metrics import patient_score

    assert patient_score([0.1, 0.9, 0.4, 0.7], 1) == 0.9
    assert patient_score([0.1, 0.9, 0.4, 0.7], 2) == 0.7
    assert patient_score([0.1, 0.9], 3) == 0.0  # fewer slices than k: never positive


def test_patient_calls_any_slice_and_k_slices():
    from tfcovseg.evaluation.metrics import patient_calls

    probs = {"a": [0.9, 0.1, 0.2], "b": [0.6, 0.7, 0.1], "c": [0.2, 0.3]}
    assert patient_calls(probs, 0.5, 1) == {"a": True, "b": True, "c": False}
    assert patient_calls(probs, 0.5, 2) == {"a": False, "b": True, "c": False}
    with pytest.raises(ValueError, match="min_slices"):
        patient_calls(probs, 0.5, 0)


def test_choose_patient_rule_needs_two_slices_when_negatives_have_one_outlier():
    from tfcovseg.evaluation.metrics import choose_patient_rule, patient_calls, patient_scores

    # Negatives each have one confident false-positive slice; positives have several.
    probs = {
        "pos1": [0.95, 0.9, 0.8, 0.1],
        "pos2": [0.85, 0.7, 0.2],
        "neg1": [0.97, 0.1, 0.05],
        "neg2": [0.9, 0.3, 0.2],
    }
    truth = {"pos1": True, "pos2": True, "neg1": False, "neg2": False}
    assert patient_scores(truth, patient_calls(probs, 0.5, 1))["accuracy"] == 0.5
    rule = choose_patient_rule(probs, truth, max_slices=3)
    assert rule["min_slices"] == 2 and rule["accuracy"] == 1.0
    # Midpoint of the widest separating gap of second-highest scores (0.3 .. 0.7).
    assert rule["threshold"] == pytest.approx(0.5) and rule["margin"] == pytest.approx(0.4)
    assert patient_scores(truth, patient_calls(probs, rule["threshold"], 2))["accuracy"] == 1.0


def test_choose_patient_rule_prefers_any_slice_when_it_separates_as_well():
    from tfcovseg.evaluation.metrics import choose_patient_rule

    probs = {"p": [0.9, 0.2], "n": [0.1, 0.05]}
    rule = choose_patient_rule(probs, {"p": True, "n": False})
    assert rule["min_slices"] == 1 and rule["accuracy"] == 1.0
    assert rule["threshold"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        choose_patient_rule({}, {})


def test_choose_burden_threshold_takes_the_widest_gap_of_the_best_cuts():
    from tfcovseg.evaluation.metrics import choose_burden_threshold

    # A false-positive burden (0.005) among negatives; positives at 0.012 and above.
    burdens = {"c1": 0.012, "c2": 0.06, "n1": 0.0, "n2": 0.005, "n3": 0.001}
    truth = {"c1": True, "c2": True, "n1": False, "n2": False, "n3": False}
    rule = choose_burden_threshold(burdens, truth)
    assert rule["accuracy"] == 1.0
    assert rule["threshold"] == pytest.approx(0.0085) and rule["margin"] == pytest.approx(0.007)
    # Overlapping classes: the cut with the fewest errors, here 1 of 4.
    rule = choose_burden_threshold(
        {"a": 0.02, "b": 0.01, "x": 0.015, "y": 0.0},
        truth | {"a": True, "b": True, "x": False, "y": False},
    )
    assert rule["accuracy"] == 0.75
    with pytest.raises(ValueError, match="ratios"):
        choose_burden_threshold({"a": 1.5}, {"a": True})
    with pytest.raises(ValueError):
        choose_burden_threshold({}, {})


def test_patient_scores_counts():
    from tfcovseg.evaluation.metrics import patient_scores

    s = patient_scores(
        {"a": True, "b": True, "c": False, "d": False},
        {"a": True, "b": False, "c": True, "d": False},
    )
    assert s["confusion"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}
    assert s["accuracy"] == 0.5 and s["precision"] == 0.5 and s["recall"] == 0.5
    with pytest.raises(ValueError, match="no prediction"):
        patient_scores({"a": True}, {})


def test_roc_auc_matches_pairwise_counting(rng):
    from tfcovseg.evaluation.metrics import roc_auc

    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60) + 0.5 * labels, 1)  # rounded: many ties
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert roc_auc(labels, scores) == pytest.approx(pairs)
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([1, 0], [0.1, 0.9]) == 0.0
    assert roc_auc([1, 1], [0.1, 0.9]) is None


def test_slice_auc_is_keras_auc_with_both_kinds_and_nan_with_one():
    y = np.array([0, 1, 1, 0, 1, 0], "float32")
    p = np.array([0.1, 0.8, 0.35, 0.4, 0.9, 0.2], "float32")
    ours, theirs = SliceAUC(num_thresholds=2000), keras.metrics.AUC(num_thresholds=2000)
    for m in (ours, theirs):
        m.update_state(y, p)
    assert float(ours.result()) == pytest.approx(float(theirs.result()))
    # 8 of the 9 (positive, negative) pairs ranked right (0.35 is below the negative 0.4).
    assert float(ours.result()) == pytest.approx(8 / 9, abs=1e-3)
    for kind in (0.0, 1.0):  # Keras reads 0 on all-negative labels; there is no AUC
        one = SliceAUC()
        one.update_state(np.full(4, kind, "float32"), np.array([0.1, 0.5, 0.7, 0.9], "float32"))
        assert np.isnan(float(one.result()))
    restored = keras.metrics.deserialize(keras.metrics.serialize(SliceAUC(name="auc")))
    assert isinstance(restored, SliceAUC) and restored.name == "auc"
