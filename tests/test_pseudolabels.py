"""How a pseudo label is composed from SAM's mask and the initial model's prediction (pure functions)."""

from __future__ import annotations

import numpy as np
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_sam.nnunet.pseudolabels import keep_confident, mark_disagreement, unsure_label


def _labels(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int16).reshape(1, 1, -1)


def test_keep_confident_lets_sam_decide_only_where_the_model_is_unsure():
    initial = _labels(0, 1, 1, 2, 0)
    sam = _labels(1, 0, 1, 1, 0)
    probabilities = np.array([[0.95, 0.05, 0.50, 0.10, 0.60],   # background
                              [0.03, 0.90, 0.40, 0.20, 0.30],   # class 1
                              [0.02, 0.05, 0.10, 0.70, 0.10]],  # class 2
                             dtype=np.float32).reshape(3, 1, 1, 5)
    fused = keep_confident(sam, initial, probabilities, threshold=0.9)
    np.testing.assert_array_equal(fused, _labels(0, 1, 1, 1, 0))  # voxels 0, 1 confident: the model's label
    assert fused.dtype == sam.dtype
    np.testing.assert_array_equal(keep_confident(sam, initial, probabilities, threshold=0.96), sam)


def test_mark_disagreement_and_the_unsure_value():
    manager = LabelManager({"background": 0, "a": 1, "b": 2}, regions_class_order=None)
    assert unsure_label(manager) == 3 and isinstance(unsure_label(manager), int)
    with_ignore = LabelManager({"background": 0, "a": 1, "b": 2, "ignore": 3}, regions_class_order=None)
    assert unsure_label(with_ignore) == 3
    marked = mark_disagreement(_labels(0, 1, 2, 2), _labels(0, 1, 1, 0), unsure=3)
    np.testing.assert_array_equal(marked, _labels(0, 1, 3, 3))
