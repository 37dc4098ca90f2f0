"""Recovering slices the initial mask misses, with a fine-tuned model's class prompts (prompt-free masks).

Box prompts come from the initial mask, so a slice where the initial model found nothing gets no box
(unless interpolation bridges a short gap). With class prompts (`ClassPrompts`, from nnsam_finetune
--context tile or --prompts fewshot) SAM can look for the class there without a box. To stay safe, it looks
only where the object continues: on the slices within `reach` of the initial mask's first and last slice
and in gaps inside it, and only inside the box of the nearest slice with an initial mask, grown by a
quarter of its size. A recovered slice needs a stable mask (SAM's stability score: the area above logit +1
over the area above -1, at least 0.6; computed on the slice itself, whereas the IoU head scores a whole
tile) and at least a tenth of that neighbour's area; beyond the ends, recovery stops at the first slice
where SAM finds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nnunet_sam.sam.prompts import SlicePrompt

_GROWTH = 0.25  # search box: the nearest initial box grown by this fraction of its size per side
_MIN_AREA_FRACTION = 0.1  # a recovered mask has at least this fraction of the nearest initial mask's area
MIN_STABILITY = 0.6  # a recovered mask's stability score (area of logits > 1 / area of logits > -1)


@dataclass
class RecoveryPlan:
    """Where one class may be recovered: its candidate slices, each with a search box and a minimum size."""

    label: int
    first: int  # first and last slice with an initial-mask prompt
    last: int
    regions: dict[int, np.ndarray]  # slice -> (4,) inclusive xyxy search box in slice pixels
    min_pixels: dict[int, int]

    def connected(self, found: set[int]) -> set[int]:
        """The found slices that continue the object: all inside [first, last], and beyond each end those
        up to the first slice where nothing was found."""
        kept = {i for i in found if self.first < i < self.last}
        for start, step in ((self.first - 1, -1), (self.last + 1, 1)):
            index = start
            while index in found:
                kept.add(index)
                index += step
        return kept


def plan_recovery(label: int, prompts: dict[int, SlicePrompt], cleaned: np.ndarray, reach: int) -> RecoveryPlan | None:
    """The recovery plan of one class from its prompts (slice -> prompt) and its cleaned initial mask
    (N, H, W), or None if the class has no initial mask, `reach` < 0 or there is no slice to look at."""
    anchors = sorted(i for i, p in prompts.items() if not p.interpolated)
    if not anchors or reach < 0:
        return None
    n, h, w = cleaned.shape
    first, last = anchors[0], anchors[-1]
    regions, min_pixels = {}, {}
    for index in range(max(0, first - reach), min(n, last + reach + 1)):
        if index in prompts:
            continue
        nearest = min(anchors, key=lambda a: (abs(a - index), a))
        box = np.asarray(prompts[nearest].box, dtype=float)
        grow = np.maximum(2.0, _GROWTH * (box[2:] - box[:2] + 1))
        grown = np.concatenate([box[:2] - grow, box[2:] + grow])
        regions[index] = np.clip(np.round(grown), 0, [w - 1, h - 1, w - 1, h - 1]).astype(int)
        min_pixels[index] = max(4, int(_MIN_AREA_FRACTION * cleaned[nearest].sum()))
    return RecoveryPlan(label, first, last, regions, min_pixels) if regions else None


def region_mask(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (H, W) bool mask of an inclusive xyxy box."""
    mask = np.zeros(shape, dtype=bool)
    mask[box[1]:box[3] + 1, box[0]:box[2] + 1] = True
    return mask


def stability_score(logits: torch.Tensor, offset: float = 1.0) -> float:
    """SAM's stability score of one mask's logits: |logits > offset| / |logits > -offset| (0 if empty)."""
    loose = int((logits > -offset).sum())
    return int((logits > offset).sum()) / loose if loose else 0.0
