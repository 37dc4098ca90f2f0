"""Box prompts that do not inherit the start box's error (`sam/box_prompts.py`): pure numpy/torch, with a fake
decoder standing in for SAM."""

import numpy as np
import pytest
import torch

from nnunet_sam.sam.box_prompts import decode_boxes, ensemble_decode, redrawn_boxes, scaled_boxes
from nnunet_sam.sam.refine import RefineSettings

BOUNDS = np.array([0.0, 0.0, 255.0, 255.0])


def test_scaled_boxes_keep_the_centre_and_clip_to_the_bounds():
    boxes = scaled_boxes(np.array([[10.0, 10.0, 29.0, 29.0]]), (0.5, 1.0, 2.0), BOUNDS)
    assert boxes.shape == (3, 4)
    np.testing.assert_allclose(boxes[1], [10, 10, 29, 29])
    np.testing.assert_allclose(boxes[0], [14.75, 14.75, 24.25, 24.25])
    np.testing.assert_allclose(boxes[2], [0.5, 0.5, 38.5, 38.5])
    clipped = scaled_boxes(np.array([[0.0, 0.0, 100.0, 100.0]]), (3.0,), BOUNDS)
    np.testing.assert_allclose(clipped[0], [0, 0, 200, 200])


def test_ensemble_averages_each_box_over_its_scales():
    seen = []

    def decode(boxes):
        seen.append(boxes.copy())
        widths = torch.as_tensor(boxes[:, 2] - boxes[:, 0], dtype=torch.float32)
        return widths.view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone(), boxes[:, 3] - boxes[:, 1]

    boxes = np.array([[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 60.0, 70.0]])
    logits, iou = ensemble_decode(decode, boxes, (0.5, 1.5), BOUNDS)
    assert len(seen) == 1 and len(seen[0]) == 4  # one decoder call for every box and scale
    np.testing.assert_allclose(logits[:, 0, 0, 0].numpy(), [20.0, 10.0])  # (10 + 30) / 2, (5 + 15) / 2
    np.testing.assert_allclose(iou, [20.0, 20.0])
    same, _ = ensemble_decode(decode, boxes, (1.0,), BOUNDS)
    np.testing.assert_allclose(same[:, 0, 0, 0].numpy(), [20.0, 10.0])
    assert len(seen[-1]) == 2


def test_redrawn_box_follows_the_answer_touching_the_box_only():
    logits = -torch.ones(1, 1, 64, 64)
    logits[0, 0, 2:10, 2:12] = 1  # overlaps the box: rows 8..39, columns 8..47 of the 256-pixel input
    logits[0, 0, 40:50, 40:50] = 1  # elsewhere: another object, left out
    box = redrawn_boxes(logits, np.array([[0.0, 0.0, 20.0, 20.0]]), 2.0, 256, BOUNDS)
    np.testing.assert_allclose(box[0], [6, 6, 49, 41])


def test_redrawn_box_stays_where_the_answer_is_empty_or_outside_the_bounds():
    logits = -torch.ones(2, 1, 64, 64)
    logits[1, 0, 50:60, 50:60] = 1  # only outside the slice's bounds (a tile's other cell)
    boxes = np.array([[0.0, 0.0, 20.0, 20.0], [100.0, 100.0, 120.0, 120.0]])
    out = redrawn_boxes(logits, boxes, 2.0, 256, np.array([0.0, 0.0, 127.0, 127.0]))
    np.testing.assert_allclose(out, boxes)


def test_rounds_move_a_too_small_box_to_the_object():
    """A fake SAM that answers with the box grown by 4 pixels, up to the object (rows and columns 40..119):
    each round the box grows towards the object's border and stops there."""
    def decode(boxes):
        logits = -torch.ones(len(boxes), 1, 256, 256)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            r0, c0 = max(40, int(y0) - 4), max(40, int(x0) - 4)
            r1, c1 = min(119, int(y1) + 4), min(119, int(x1) + 4)
            logits[i, 0, r0:r1 + 1, c0:c1 + 1] = 1
        return logits, np.ones(len(boxes))

    start = np.array([[60.0, 60.0, 80.0, 80.0]])
    widths = [int((decode_boxes(decode, start, (1.0,), rounds, 0.0, 256, BOUNDS)[0][0, 0] > 0).sum(0).max())
              for rounds in (1, 2, 3, 20)]
    assert widths[0] < widths[1] < widths[2] <= widths[3] == 80
    _, _, final = decode_boxes(decode, start, (1.0,), 20, 0.0, 256, BOUNDS)  # a points pass starts from these
    np.testing.assert_allclose(final[0], [40, 40, 119, 119])
    _, _, unchanged = decode_boxes(decode, start, (1.0,), 1, 0.0, 256, BOUNDS)
    np.testing.assert_allclose(unchanged, start)


@pytest.mark.parametrize("changes", [{"box_scales": ()}, {"box_scales": (0.0, 1.0)}, {"box_rounds": 0}])
def test_settings_refuse_bad_box_options(changes):
    with pytest.raises(ValueError):
        RefineSettings(**changes)
