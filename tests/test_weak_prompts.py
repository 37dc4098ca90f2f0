"""The imperfect masks whose boxes fine-tuning shows the decoder (sam/weak_prompts.py), how often, and how long
fine-tuning trains a few slices."""

from __future__ import annotations

import numpy as np
import pytest

from nnunet_sam.sam.finetune import FinetuneSettings, SliceExample, training_boxes
from nnunet_sam.sam.prompts import bounding_box, dice
from nnunet_sam.sam.views import view_geometry
from nnunet_sam.sam.weak_prompts import ERRORS, imperfect_mask


def _ellipse(shape=(64, 64), centre=(30, 34), radii=(10, 15)) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1


@pytest.mark.parametrize("error", ERRORS)
def test_each_error_is_imperfect_but_overlaps_the_truth(error):
    truth = _ellipse()
    rng = np.random.default_rng(0)
    masks = [imperfect_mask(truth, rng, error) for _ in range(40)]
    scores = np.array([dice(m, truth) for m in masks])
    assert (scores < 1.0).all() and (scores > 0.5).all()
    areas = np.array([m.sum() for m in masks])
    if error in ("grown", "spilt"):
        assert (areas > truth.sum()).all() and all(m[truth].all() for m in masks)
    else:  # shrunk, part missing: inside the truth
        assert (areas < truth.sum()).all() and all(not m[~truth].any() for m in masks)
    assert len({m.tobytes() for m in masks}) > 1  # the error's size is drawn


def test_imperfect_masks_are_drawn_from_every_error_reproducibly():
    truth = _ellipse()
    drawn = []
    for seed in range(20):
        mask = imperfect_mask(truth, np.random.default_rng(seed))
        assert np.array_equal(mask, imperfect_mask(truth, np.random.default_rng(seed)))
        rng = np.random.default_rng(seed)
        error = ERRORS[int(rng.integers(len(ERRORS)))]  # the draw imperfect_mask makes first
        assert np.array_equal(mask, imperfect_mask(truth, rng, error))
        drawn.append(error)
    assert set(drawn) == set(ERRORS)


def test_an_object_at_the_image_edge_keeps_reaching_it():
    truth = np.zeros((32, 32), dtype=bool)
    truth[:12, 4:20] = True  # cut by the top edge
    rng = np.random.default_rng(0)
    for _ in range(10):
        assert imperfect_mask(truth, rng, "shrunk")[0].any()
        spilt = imperfect_mask(truth, rng, "spilt")
        assert spilt[truth].all() and spilt.sum() > truth.sum()


def test_a_tiny_mask_is_never_emptied_and_bad_input_is_refused():
    dot = np.zeros((16, 16), dtype=bool)
    dot[8, 8] = True
    rng = np.random.default_rng(0)
    assert all(imperfect_mask(dot, rng, error).any() for error in ERRORS for _ in range(5))
    with pytest.raises(ValueError, match="empty"):
        imperfect_mask(np.zeros((8, 8), dtype=bool), rng)
    with pytest.raises(ValueError, match="must be one of"):
        imperfect_mask(dot, rng, "blurred")


def test_training_boxes_take_the_share_of_weak_prompts_asked_for():
    masks = np.stack([_ellipse(), _ellipse(centre=(20, 20), radii=(6, 6))])
    boxes = np.stack([bounding_box(m) for m in masks])
    example = SliceExample(case="c", index=0, key="k", geometry=view_geometry((64, 64), (1.0, 1.0), 256),
                           labels=np.array([1, 2]), masks=masks, boxes=boxes)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert np.array_equal(training_boxes(example, 0.0, rng), boxes)
    assert rng.bit_generator.state == state  # true boxes only: no draw, training as before weak prompts
    draws = np.stack([training_boxes(example, 1.0, rng) for _ in range(30)])
    assert (np.abs(draws - boxes).max(axis=2) > 0).mean() > 0.9  # nearly every box moved
    half = np.stack([training_boxes(example, 0.5, rng) for _ in range(200)])
    moved = (np.abs(half - boxes).max(axis=2) > 0).mean()
    assert 0.3 < moved < 0.7


@pytest.mark.parametrize("slices, per_step, min_steps, epochs", [
    (2, 1, 500, 250),  # two labelled slices: raised to 500 steps
    (36, 1, 500, 30),  # enough slices: --epochs stands
    (2, 1, 0, 30),  # --min-steps 0: exactly --epochs
    (10, 4, 500, 167),  # 3 steps per epoch
])
def test_a_few_slices_train_for_min_steps(slices, per_step, min_steps, epochs):
    settings = FinetuneSettings(epochs=30, slices_per_step=per_step, min_steps=min_steps)
    assert settings.epochs_for(slices) == epochs
