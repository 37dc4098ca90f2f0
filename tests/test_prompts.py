"""Prompt geometry and mask cleaning: pure numpy."""

import numpy as np
import pytest

from nnunet_sam.sam.prompts import (background_points, bounding_box, clean_mask, dice, drop_small_components,
                                    interior_point, interpolate_boxes)


def _cube(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_clean_keeps_largest_component_and_drops_the_rest():
    big = _cube((10, 20, 20), (2, 2, 2), (8, 10, 10))
    small = _cube((10, 20, 20), (2, 14, 14), (4, 17, 17))
    cleaned = clean_mask(big | small)
    assert np.array_equal(cleaned, big)


def test_clean_prefers_highest_mean_probability_over_size():
    big = _cube((10, 20, 20), (2, 2, 2), (8, 10, 10))
    small = _cube((10, 20, 20), (2, 14, 14), (5, 18, 18))
    probs = np.where(big, 0.55, 0.0) + np.where(small, 0.95, 0.0)
    assert np.array_equal(clean_mask(big | small, probabilities=probs), small)


def test_clean_keep_all_drops_only_specks():
    a = _cube((10, 20, 20), (1, 1, 1), (6, 8, 8))
    b = _cube((10, 20, 20), (1, 12, 12), (6, 18, 18))
    speck = _cube((10, 20, 20), (8, 18, 1), (9, 19, 2))
    cleaned = clean_mask(a | b | speck, keep="all")
    assert np.array_equal(cleaned, a | b)


def test_clean_fills_holes_slice_by_slice():
    ring = _cube((3, 20, 20), (0, 4, 4), (3, 16, 16))
    ring[:, 8:12, 8:12] = False  # a tube: a hole in every slice, not a closed 3D cavity
    assert clean_mask(ring, axis=0)[:, 10, 10].all()
    assert not clean_mask(ring, axis=0, fill_holes=False)[:, 10, 10].any()


def test_clean_bridges_missing_slices_only_up_to_max_gap():
    top = _cube((20, 10, 10), (0, 2, 2), (6, 8, 8))
    bottom = _cube((20, 10, 10), (8, 2, 2), (12, 8, 8))  # 2 empty slices between
    assert np.array_equal(clean_mask(top | bottom, axis=0, max_gap=2), top | bottom)
    assert np.array_equal(clean_mask(top | bottom, axis=0, max_gap=1), top)


def test_clean_of_empty_mask_is_empty():
    assert not clean_mask(np.zeros((4, 5, 5), dtype=bool)).any()


def test_bounding_box_is_tight_grows_by_margin_and_clips():
    m = np.zeros((20, 30), dtype=bool)
    m[5:10, 2:12] = True
    assert bounding_box(m).tolist() == [2, 5, 11, 9]
    assert bounding_box(m, margin=3).tolist() == [0, 2, 14, 12]
    with pytest.raises(ValueError):
        bounding_box(np.zeros((4, 4), dtype=bool))


def test_interior_point_lies_inside_a_mask_whose_centroid_is_outside():
    yy, xx = np.mgrid[:41, :41]
    ring = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 18 ** 2) & ((yy - 20) ** 2 + (xx - 20) ** 2 >= 12 ** 2)
    ring[:, :20] &= ~((yy[:, :20] - 20) ** 2 < 49)  # C-shape: open on the left
    cy, cx = np.argwhere(ring).mean(axis=0).round().astype(int)
    assert not ring[cy, cx]
    x, y = interior_point(ring).astype(int)
    assert ring[y, x]


def test_interior_point_of_a_square_is_its_centre():
    m = np.zeros((11, 11), dtype=bool)
    m[2:9, 2:9] = True
    assert interior_point(m).tolist() == [5, 5]


def test_background_points_are_inside_the_box_and_outside_the_mask():
    m = np.zeros((30, 30), dtype=bool)
    m[10:20, 10:20] = True
    m[12:18, 12:18] = False
    box = np.array([8, 8, 22, 22])
    points = background_points(m, box, 2)
    assert points.shape == (2, 2)
    for x, y in points.astype(int):
        assert not m[y, x]
        assert 8 <= x <= 22 and 8 <= y <= 22
    assert background_points(m, box, 0).shape == (0, 2)


def test_drop_small_components_keeps_big_pieces():
    m = np.zeros((20, 20), dtype=bool)
    m[2:12, 2:12] = True
    m[15, 15] = True
    assert np.array_equal(drop_small_components(m), m & ~(np.arange(20)[:, None] == 15))


def test_interpolate_boxes_fills_short_gaps_linearly():
    boxes = {2: np.array([0.0, 0, 10, 10]), 5: np.array([3.0, 3, 13, 13]), 20: np.array([0.0, 0, 1, 1])}
    filled = interpolate_boxes(boxes, max_gap=3)
    assert sorted(filled) == [3, 4]
    assert np.allclose(filled[3], [1, 1, 11, 11])
    assert np.allclose(filled[4], [2, 2, 12, 12])


def test_dice():
    a = np.array([1, 1, 0, 0], dtype=bool)
    b = np.array([1, 0, 1, 0], dtype=bool)
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
