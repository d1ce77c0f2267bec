"""Inf-Net's evaluation protocol (tfcovseg.evaluation.protocol)."""

from __future__ import annotations

import numpy as np
import pytest

from tfcovseg.evaluation.protocol import (
    THRESHOLDS,
    dice_at_half,
    image_curves,
    normalise,
    score,
    to_uint8,
)


def _naive(map8, gt):
    """The protocol written out threshold by threshold, as the MATLAB loop does."""
    s = normalise(map8)
    dice, sen, spe = [], [], []
    for t in THRESHOLDS:
        b = s >= t
        tp = int((b & gt).sum())
        fp = int((b & ~gt).sum())
        fn = int((~b & gt).sum())
        tn = int((~b & ~gt).sum())
        if tp == 0:
            dice.append(0.0), sen.append(0.0), spe.append(0.0)
        else:
            dice.append(2 * tp / (gt.sum() + b.sum()))
            sen.append(tp / gt.sum())
            spe.append(tn / (tn + fp))
    return np.array(dice), np.array(sen), np.array(spe), float(np.abs(s - gt).mean()), fn


def test_curves_match_the_threshold_loop(rng):
    for _ in range(3):
        gt = rng.random((37, 41)) < 0.2
        prob = np.clip(gt * 0.6 + rng.random((37, 41)) * 0.5, 0, 1)
        map8 = to_uint8(prob)
        fast = image_curves(map8, gt)
        dice, sen, spe, mae, _ = _naive(map8, gt)
        np.testing.assert_allclose(fast["dice"], dice, atol=1e-12)
        np.testing.assert_allclose(fast["sensitivity"], sen, atol=1e-12)
        np.testing.assert_allclose(fast["specificity"], spe, atol=1e-12)
        assert fast["mae"] == pytest.approx(mae)
        # 0-255 masks read as > 128
        np.testing.assert_allclose(image_curves(map8, gt * 255)["dice"], dice, atol=1e-12)


def test_perfect_and_empty_cases():
    gt = np.zeros((10, 10), bool)
    gt[2:5, 2:6] = True
    perfect = score([to_uint8(gt)], [gt])
    p, n = gt.sum(), gt.size
    # every threshold above 0 gives the mask exactly; t = 0 predicts every pixel
    assert perfect["meanDic"] == pytest.approx((255 + 2 * p / (p + n)) / 256)
    assert perfect["maxDic"] == 1.0 and perfect["MAE"] == 0.0 and perfect["Dice@0.5"] == 1.0
    # no true positive anywhere: the protocol scores 0, including specificity
    empty = score([to_uint8(np.zeros((10, 10)))], [np.zeros((10, 10), bool)])
    assert empty["meanDic"] == 0.0 and empty["meanSpe"] == 0.0
    assert dice_at_half(to_uint8(np.zeros((4, 4))), np.zeros((4, 4))) == 1.0


def test_score_averages_images_of_any_size(rng):
    a_gt = rng.random((20, 30)) < 0.3
    b_gt = rng.random((50, 40)) < 0.1
    a = to_uint8(a_gt * 0.9 + 0.05)
    b = to_uint8(rng.random((50, 40)))
    both = score([a, b], [a_gt, b_gt])
    one_a, one_b = score([a], [a_gt]), score([b], [b_gt])
    assert both["images"] == 2
    # meanDic is the mean over thresholds of the per-threshold mean over images: linear
    assert both["meanDic"] == pytest.approx((one_a["meanDic"] + one_b["meanDic"]) / 2)
    assert both["MAE"] == pytest.approx((one_a["MAE"] + one_b["MAE"]) / 2)
    assert one_a["meanDic"] > one_b["meanDic"]
    with pytest.raises(ValueError):
        score([a], [])


def test_uint8_rounding():
    assert to_uint8([0.0, 0.5, 1.0, 1.2, -1]).tolist() == [0, 128, 255, 255, 0]
