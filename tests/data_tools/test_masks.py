"""Label maps to lesion channels (`data_tools.masks.labels_to_channels`)."""

from __future__ import annotations

import numpy as np
import pytest

from data_tools.masks import labels_to_channels


@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 7), (7,), (1, 1), (), (0, 4), (2, 0, 3)])
@pytest.mark.parametrize("classes", [0, 1, 3, 5])
def test_channel_k_is_label_k_plus_1(shape, classes):
    rng = np.random.default_rng(len(shape) + classes)
    labels = rng.integers(0, classes + 2, shape).astype(np.uint8)  # one label beyond too
    channels = labels_to_channels(labels, classes)
    assert channels.shape == (*shape, classes) and channels.dtype == np.uint8
    for k in range(classes):
        np.testing.assert_array_equal(channels[..., k], labels == k + 1)


def test_wide_labels_and_strided_input():
    labels = np.arange(60, dtype=np.uint16).reshape(3, 4, 5) % 4
    channels = labels_to_channels(labels[:, ::2, ::-1], 3)
    for k in range(3):
        np.testing.assert_array_equal(channels[..., k], labels[:, ::2, ::-1] == k + 1)
