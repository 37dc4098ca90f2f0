"""Prompt geometry and mask cleaning: pure numpy."""

import numpy as np
import pytest

from nnunet_sam.sam.prompts import (background_points, bounding_box, clean_mask, dice, drop_small_components,
                                    evaluation_dice, interior_point, interpolate_boxes, link_pixels_of, slice_objects)


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


def test_slice_objects_keep_separate_objects_apart_and_join_a_cracked_one():
    left, right = _cube((1, 20, 30), (0, 5, 2), (1, 15, 8))[0], _cube((1, 20, 30), (0, 5, 22), (1, 15, 28))[0]
    assert len(slice_objects(left | right)) == 2  # bilateral: two objects, each its own box
    assert len(slice_objects(left | right, link_pixels=3)) == 2  # 14 pixels apart: not a crack
    organ = _cube((1, 20, 30), (0, 5, 5), (1, 15, 20))[0]
    cracked = organ.copy()
    cracked[:, 12:14] = False  # a 2-pixel crack across the organ
    assert len(slice_objects(cracked)) == 2
    joined = slice_objects(cracked, link_pixels=link_pixels_of(2.0, (1.0, 1.0)))
    assert len(joined) == 1 and joined[0].sum() == cracked.sum()  # one object, of the mask's own pixels only
    wide = organ.copy()
    wide[:, 10:16] = False  # 6 pixels: too wide for 2 mm, but the model's probability says it is one object
    probability = np.where(organ, 0.35, 0.0)
    assert len(slice_objects(wide, link_pixels=1)) == 2
    assert len(slice_objects(wide, probability, link_pixels=1)) == 1
    assert len(slice_objects(left | right, np.where(left | right, 0.9, 0.0))) == 2  # no probability between them
    assert link_pixels_of(2.0, (2.0, 2.0)) == 0 and link_pixels_of(0.0, (0.5, 0.5)) == 0


def test_evaluation_dice_leaves_out_a_class_absent_from_both():
    empty, one = np.zeros((4, 4), bool), _cube((4, 4), (0, 0), (2, 2))
    assert evaluation_dice(empty, empty) is None and dice(empty, empty) == 1.0
    assert evaluation_dice(one, empty) == 0.0 and evaluation_dice(empty, one) == 0.0
    assert evaluation_dice(one, one) == 1.0
