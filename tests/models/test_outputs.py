"""The final map's probabilities corrected for the loss's positive-pixel weights."""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

from tfcovseg.models.outputs import final_probabilities, unweighted_probabilities


def test_the_correction_undoes_the_weighted_bce_optimum():
    # For a pixel that is lesion with probability p, the expected weighted BCE
    # -(w p log q + (1 - p) log(1 - q)) is smallest at q = w p / (w p + 1 - p): the
    # network learns q. The correction gives p back, so 0.5 means 0.5 again.
    q_grid = np.linspace(1e-4, 1 - 1e-4, 20001)
    for w in (4.0, 10.0):
        for p in (0.05, 0.3, 0.5, 0.8):
            loss = -(w * p * np.log(q_grid) + (1 - p) * np.log(1 - q_grid))
            learnt = q_grid[np.argmin(loss)]
            back = ops.convert_to_numpy(
                unweighted_probabilities(np.array([[learnt]], np.float32), [w])
            )
            assert back[0, 0] == pytest.approx(p, abs=1e-3)
    # Threshold 0.5 on the corrected map is w / (1 + w) on the raw one.
    q = np.array([[0.90, 0.92, 0.5]], np.float32).reshape(1, 1, 3)
    out = ops.convert_to_numpy(unweighted_probabilities(q, [10.0, 10.0, 1.0]))
    assert out[0, 0, 0] < 0.5 < out[0, 0, 1] and out[0, 0, 2] == pytest.approx(0.5)


def test_weights_of_one_or_none_leave_the_map_alone_and_the_ends_stay():
    q = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    for weights in (None, [], [1, 1, 1]):
        assert unweighted_probabilities(q, weights) is q
    ends = np.array([0.0, 1.0], np.float32).reshape(1, 1, 2)
    out = ops.convert_to_numpy(unweighted_probabilities(ends, [10.0, 10.0]))
    np.testing.assert_allclose(out.ravel(), [0.0, 1.0])
    corrected = ops.convert_to_numpy(final_probabilities({"final": q}, [1, 10, 10]))
    np.testing.assert_array_equal(corrected[..., 0], q[..., 0])
    assert (corrected[..., 1:] <= q[..., 1:] + 1e-7).all()
    # Order is kept: the correction is monotone per class.
    flat = np.sort(q[..., 1].ravel())
    again = ops.convert_to_numpy(unweighted_probabilities(flat[:, None], [10.0]))[:, 0]
    assert (np.diff(again) >= 0).all()
