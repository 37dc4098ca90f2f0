"""The refinement plan (stage 1): which prompts SAM gets. Pure numpy, no model."""

import numpy as np

from nnunet_sam.sam.refine import RefineSettings
from nnunet_sam.sam.refine_plan import Planner


def _bilateral(slices: int = 5) -> np.ndarray:
    """One class as two separate objects (left and right) on every slice."""
    mask = np.zeros((slices, 24, 40), dtype=np.int16)
    mask[:, 6:18, 3:12] = 1
    mask[:, 6:18, 28:37] = 1
    return mask


def test_each_object_of_a_slice_gets_its_own_box_and_guard():
    mask = _bilateral()
    plan = Planner(RefineSettings(keep="all")).plan(mask, None, [1], [])
    assert all(len(prompts) == 2 for prompts in plan.prompts.values())
    boxes = sorted(tuple(p.box) for p in plan.prompts[2])
    assert boxes == [(3, 6, 11, 17), (28, 6, 36, 17)]  # never one box around both
    assert all(p.region is not None and p.region.sum() == 12 * 9 for p in plan.prompts[2])
    old = Planner(RefineSettings(keep="all", boxes="slice")).plan(mask, None, [1], [])
    assert [tuple(p.box) for p in old.prompts[2]] == [(3, 6, 36, 17)]  # the old rule: one box around both


def test_keep_largest_with_probabilities_keeps_both_sides_as_two_objects():
    mask = _bilateral()
    probabilities = np.zeros((2, *mask.shape), dtype=np.float32)
    probabilities[1] = np.where(mask == 1, 0.9, 0.02)
    probabilities[1][:, :, 28:] *= 0.95  # a little less sure of one side: within the margin, both kept
    probabilities[0] = 1 - probabilities[1]
    plan = Planner(RefineSettings()).plan(mask, probabilities, [1], [])
    assert all(len(prompts) == 2 for prompts in plan.prompts.values())


def test_a_thin_crack_keeps_one_box_and_margins_link_in_millimetres():
    mask = np.zeros((3, 24, 40), dtype=np.int16)
    mask[:, 6:18, 5:35] = 1
    mask[:, :, 19:21] = 0  # a 2-pixel crack
    on_1mm = Planner(RefineSettings(keep="all")).plan(mask, None, [1], [], pixel_spacing=(1.0, 1.0))
    assert all(len(p) == 1 for p in on_1mm.prompts.values())
    assert tuple(on_1mm.prompts[1][0].box) == (5, 6, 34, 17)
    on_3mm = Planner(RefineSettings(keep="all")).plan(mask, None, [1], [], pixel_spacing=(3.0, 3.0))
    assert all(len(p) == 2 for p in on_3mm.prompts.values())  # 6 mm apart: two objects


def test_interpolated_boxes_bridge_only_slices_with_one_object():
    mask = _bilateral(7)
    mask[3] = 0  # a missing slice between slices with two objects: no box around both is invented
    assert 3 not in Planner(RefineSettings(keep="all")).plan(mask, None, [1], []).prompts
    single = np.zeros((7, 24, 40), dtype=np.int16)
    single[:, 6:18, 3:12] = 1
    single[3] = 0
    filled = Planner(RefineSettings(keep="all")).plan(single, None, [1], []).prompts[3]
    assert len(filled) == 1 and filled[0].interpolated
