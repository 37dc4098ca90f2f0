"""The pure parts of probability-guided refinement: which pieces the probabilities keep, the confidence band,
the fusion of SAM's and the model's probabilities, the activation-map regions, and the honest probability maps
of the benchmarks."""

import numpy as np
import pytest
import torch

from nnunet_sam.demo.degrade import degrade_labels, soft_probabilities
from nnunet_sam.sam.prompts import activation_region, clean_mask
from nnunet_sam.sam.refine import ClassStats, RefineSettings, _assemble, _keep_confident


def _row(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int16).reshape(1, 1, -1)


def _two_pieces() -> np.ndarray:
    mask = np.zeros((1, 20, 40), dtype=bool)
    mask[0, 5:15, 2:8] = True  # small piece
    mask[0, 2:18, 20:36] = True  # large piece
    return mask


def test_probabilities_keep_a_smaller_right_piece_over_a_larger_wrong_one():
    mask = _two_pieces()
    probabilities = np.where(mask, 0.55, 0.0).astype(np.float32)
    probabilities[0, 5:15, 2:8] = 0.95  # the model is sure of the small piece only
    assert clean_mask(mask, keep="largest")[0, 2:18, 20:36].all()  # size alone keeps the wrong one
    kept = clean_mask(mask, probabilities, keep="largest")
    assert kept[0, 5:15, 2:8].all() and not kept[0, :, 20:].any()


def test_split_evidence_keeps_both_pieces():
    mask = _two_pieces()
    probabilities = np.where(mask, 0.9, 0.0).astype(np.float32)
    probabilities[0, 2:18, 20:36] = 0.85  # within the margin of the best piece: both are the class
    assert clean_mask(mask, probabilities, keep="largest").sum() == mask.sum()
    assert clean_mask(mask, probabilities, keep="largest", piece_margin=0.01)[0, :, 20:].sum() == 0


def test_the_band_keeps_the_models_sure_labels_and_counts_them():
    refined = _row(1, 0, 1, 1, 0)  # SAM's labels
    cleaned = {1: _row(0, 1, 1, 0, 0).astype(bool), 2: _row(0, 0, 0, 1, 0).astype(bool)}
    probabilities = np.array([[0.95, 0.05, 0.50, 0.10, 0.60],   # background
                              [0.03, 0.92, 0.40, 0.20, 0.30],   # class 1
                              [0.02, 0.03, 0.10, 0.70, 0.10]],  # class 2
                             dtype=np.float32).reshape(3, 1, 1, 5)
    stats = {1: ClassStats(1), 2: ClassStats(2)}
    result = _keep_confident(refined, probabilities, cleaned, 0.9, stats, band="max")
    np.testing.assert_array_equal(result, _row(0, 1, 1, 1, 0))  # voxels 0 and 1: the model was sure
    assert result.dtype == refined.dtype
    assert (stats[1].voxels_confident, stats[1].voxels_sam_decided, stats[1].voxels_overruled) == (1, 2, 2)
    assert (stats[2].voxels_confident, stats[2].voxels_sam_decided) == (0, 0)
    np.testing.assert_array_equal(_keep_confident(refined, probabilities, cleaned, 0.96, stats, band="max"), refined)
    # band "class" (the default): only the model's sure foreground is locked; its sure background (voxel 0) is
    # SAM's to change, as a weak model's missed border is
    result = _keep_confident(refined, probabilities, cleaned, 0.9, stats)
    np.testing.assert_array_equal(result, _row(1, 1, 1, 1, 0))
    assert (stats[1].voxels_confident, stats[1].voxels_sam_decided) == (1, 3)


def test_a_piece_that_cleaning_dropped_is_not_restored_by_the_band():
    refined = _row(0, 0, 1, 1)
    cleaned = {1: _row(0, 0, 1, 1).astype(bool)}  # the model's piece at voxels 0-1 was cleaned away
    probabilities = np.array([[0.02, 0.02, 0.05, 0.05], [0.98, 0.98, 0.95, 0.95]],
                             dtype=np.float32).reshape(2, 1, 1, 4)
    result = _keep_confident(refined, probabilities, cleaned, 0.9, {1: ClassStats(1)})
    np.testing.assert_array_equal(result, _row(0, 0, 1, 1))


def test_fusion_averages_sams_and_the_models_probabilities():
    scores = [torch.tensor([[4.0, -4.0, 0.5, -0.5]]), torch.tensor([[-4.0, 4.0, -4.0, -4.0]])]
    probabilities = np.array([[0.1, 0.1, 0.9, 0.1],   # background
                              [0.8, 0.1, 0.05, 0.8],  # class 1
                              [0.1, 0.8, 0.05, 0.1]],  # class 2
                             dtype=np.float32).reshape(3, 1, 4)
    plain = _assemble([1, 2], scores, np.int16)
    fused = _assemble([1, 2], scores, np.int16, probabilities)
    np.testing.assert_array_equal(plain, [[1, 2, 1, 0]])
    # pixel 2: SAM barely says 1 (0.62), the model is sure of background; pixel 3: the reverse
    np.testing.assert_array_equal(fused, [[1, 2, 0, 1]])


def test_activation_region_fills_gaps_and_finds_an_absent_class_but_not_beyond_the_ends():
    probability = np.zeros((9, 20, 20), dtype=np.float32)
    probability[1:8, 5:12, 5:12] = 0.4  # the class's probability reaches 0.4 on slices 1..7
    prompted = np.zeros(9, dtype=bool)
    prompted[[2, 3, 5, 6]] = True  # the argmax has it on these slices: slice 4 is a gap
    region = activation_region(probability, prompted, threshold=0.3, reach=3)
    assert list(np.flatnonzero(region.any(axis=(1, 2)))) == [4]  # slices 1 and 7 lie beyond the ends
    assert not activation_region(probability, prompted, threshold=0.5, reach=3).any()
    assert not activation_region(probability, prompted, threshold=0.3, reach=0).any()  # gap longer than reach
    # a class the argmax never predicts: the 3D object with the largest probability mass
    probability[3:5, 15:18, 15:18] = 0.9
    absent = activation_region(probability, np.zeros(9, dtype=bool), threshold=0.3, reach=3)
    assert absent[1:8, 5:12, 5:12].all() and not absent[:, 15:, 15:].any()
    assert absent.sum() == 7 * 7 * 7


def test_activation_region_drops_specks():
    probability = np.zeros((3, 20, 20), dtype=np.float32)
    probability[1, 3:5, 3:4] = 0.8  # 2 pixels
    assert not activation_region(probability, np.zeros(3, dtype=bool), 0.3, 3).any()


def test_probability_settings_are_checked():
    with pytest.raises(ValueError, match="confident must be a probability"):
        RefineSettings(confident=1.5)
    with pytest.raises(ValueError, match="activation must be a probability"):
        RefineSettings(activation=0.0)
    assert RefineSettings(confident=None, activation=None).confident is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_probabilities_argmax_is_the_mask_and_the_model_is_unsure_near_borders(seed):
    truth = np.zeros((8, 40, 40), dtype=np.uint8)
    truth[2:6, 10:30, 8:20] = 1
    truth[2:6, 12:28, 24:34] = 2
    labels = degrade_labels(truth, seed=seed)
    probabilities = soft_probabilities(labels, seed=seed, n_classes=3, spacing=(3.0, 1.0, 1.0))
    assert probabilities.shape == (3, *labels.shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=0), labels)
    top = probabilities.max(axis=0)
    from scipy import ndimage
    border = (labels > 0) & ~ndimage.binary_erosion(labels > 0, np.ones((1, 3, 3)))  # in-plane border
    deep = ndimage.binary_erosion(labels > 0, np.ones((1, 3, 3)), iterations=4)
    assert deep.any()
    assert np.median(top[border]) < 0.9 < np.median(top[deep])


def test_the_band_does_not_undo_a_slice_that_sam_added_from_3d_context():
    refined = np.zeros((3, 1, 4), dtype=np.int16)
    refined[:, 0, 1:3] = 1  # SAM: the class on all three slices; the model missed the middle one
    cleaned = {1: refined == 1}
    cleaned[1][1] = False
    probabilities = np.zeros((2, 3, 1, 4), dtype=np.float32)
    probabilities[1] = cleaned[1] * 0.97
    probabilities[0] = 1 - probabilities[1]  # sure of background on the middle slice
    stats = {1: ClassStats(1)}
    np.testing.assert_array_equal(_keep_confident(refined, probabilities, cleaned, 0.9, stats, band="max")[1], 0)
    stats[1]._added_slices.add(1)  # the middle slice was filled from the boxes of its neighbours
    np.testing.assert_array_equal(_keep_confident(refined, probabilities, cleaned, 0.9, stats, band="max"), refined)
    assert stats[1].voxels_sam_decided == 2 and "_added_slices" not in stats[1].to_dict()


def test_with_sure_sam_a_label_changes_only_where_sam_is_sure_and_the_model_is_not():
    refined = _row(1, 1, 0, 0)  # SAM's labels
    cleaned = {1: _row(0, 0, 1, 1).astype(bool)}  # the model's
    probabilities = np.array([[0.6, 0.6, 0.4, 0.4], [0.4, 0.4, 0.6, 0.6]], dtype=np.float32).reshape(2, 1, 1, 4)
    sam_certainty = np.array([0.99, 0.7, 0.95, 0.6], dtype=np.float32).reshape(1, 1, 4)  # the model: never sure
    stats = {1: ClassStats(1)}
    result = _keep_confident(refined, probabilities, cleaned, 0.9, stats, sam_certainty)
    np.testing.assert_array_equal(result, _row(1, 0, 0, 1))
    assert (stats[1].voxels_sam_decided, stats[1].voxels_confident, stats[1].voxels_overruled) == (1, 1, 2)
