"""Stage 1 of refinement (`sam/refine.py`): the plan, every prompt of a case before SAM sees any slice.

Per class: clean the initial mask and derive prompts slice by slice: a box around each object of the slice's
mask (pieces a thin gap cuts count as one object; boxes "slice": one box around the slice's mask, or with
keep="pieces" one per piece), for `box+points` also a positive point and negative points; interpolated boxes on
slices the mask misses between two slices that have it (one object on each). With the model's probabilities: boxes
where a class's probability is high on slices without its prompts. For `box+points`: each class's positive point is
a negative point for the other classes on its slice. With a fine-tuned model's class prompts: where each class may be
recovered (`sam/recovery.py`).

Each prompt comes from a `PromptSource`, which also says how the agreement guard treats it. A new prompt source
is a new step of `Planner.plan` (and, if the guard should treat it in a new way, a new `PromptSource`): the
later stages only read `RefinePlan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from nnunet_sam.sam.prompts import (SlicePrompt, activation_region, background_points, bounding_box, clean_mask,
                                    drop_small_components, interior_point, interpolate_boxes, link_pixels_of,
                                    slice_objects, slice_pieces)
from nnunet_sam.sam.recovery import RecoveryPlan, plan_recovery

if TYPE_CHECKING:
    from nnunet_sam.sam.refine import RefineSettings


@dataclass(frozen=True)
class PromptSource:
    """Where a prompt comes from, and how the agreement guard (stage 2) treats SAM's mask for it."""

    name: str
    agree: bool  # SAM's mask must agree with the prompt's area (Dice >= `min_agreement`)
    evidence: bool  # ... and, with `evidence`, its border must fit the image at least as well
    keeps_initial: bool  # SAM's mask rejected: the initial mask stays (else the prompt adds nothing)
    accepted_count: str  # the `ClassStats` field counting the slices where SAM's mask was accepted
    rejected_count: str | None  # ... the field counting those where it was rejected (None: not counted)
    adds_slice: bool  # the slice lacks the class in the initial mask: an accepted mask is kept by the band


FROM_MASK = PromptSource("mask", agree=True, evidence=True, keeps_initial=True,
                         accepted_count="slices_refined", rejected_count="slices_kept", adds_slice=False)
INTERPOLATED = PromptSource("interpolated", agree=False, evidence=False, keeps_initial=True,
                            accepted_count="slices_filled", rejected_count=None, adds_slice=True)
FROM_PROBABILITIES = PromptSource("probabilities", agree=True, evidence=False, keeps_initial=False,
                                  accepted_count="slices_from_probabilities", rejected_count=None, adds_slice=True)


def source_of(prompt: SlicePrompt) -> PromptSource:
    """The source of a prompt, from its flags."""
    if prompt.interpolated:
        return INTERPOLATED
    if prompt.from_probabilities:
        return FROM_PROBABILITIES
    return FROM_MASK


@dataclass
class RefinePlan:
    """What refinement will do, slice by slice (slices along axis 0)."""

    labels: list[int]  # the foreground labels refined, ascending
    cleaned: dict[int, np.ndarray] = field(default_factory=dict)  # label -> its cleaned initial mask (N, H, W)
    prompts: dict[int, list[SlicePrompt]] = field(default_factory=dict)  # slice -> the prompts of all classes
    recovery: list[RecoveryPlan] = field(default_factory=list)  # where class prompts look for each class

    def slices(self) -> set[int]:
        """The slices the plan names: with prompts or recovery candidates (their model inputs are encoded)."""
        return set(self.prompts) | {index for plan in self.recovery for index in plan.regions}

    def recovery_at(self, index: int) -> list[RecoveryPlan]:
        """The recovery plans with slice `index` among their candidates."""
        return [plan for plan in self.recovery if index in plan.regions]

    def has_work(self, index: int) -> bool:
        """Slice `index` has prompts to decode or classes to look for."""
        return bool(self.prompts.get(index)) or bool(self.recovery_at(index))

    def initial_masks(self, index: int) -> list[np.ndarray]:
        """Per prompt of slice `index`, the initial mask it stands for: its piece or area, else its class's."""
        return [self.cleaned[p.label][index] if p.region is None else p.region for p in self.prompts[index]]


class Planner:
    """Builds the `RefinePlan` of a case from its initial labels (and the model's probabilities)."""

    def __init__(self, settings: RefineSettings) -> None:
        self.settings = settings
        self.link_pixels = 0  # set by `plan` from the slices' pixel spacing

    def plan(self, initial: np.ndarray, probabilities: np.ndarray | None, labels: list[int],
             recoverable: Sequence[int], pixel_spacing: Sequence[float] = (1.0, 1.0)) -> RefinePlan:
        """The plan for `labels` of `initial` (N, H, W); probabilities: (K, N, H, W) or None; recoverable: the
        labels the model's class prompts may look for (empty: no recovery); pixel_spacing: (row, column) mm of
        the slices."""
        self.link_pixels = link_pixels_of(self.settings.link_gap, tuple(pixel_spacing))
        plan = RefinePlan(labels)
        for label in labels:
            plan.cleaned[label], prompts = self._class_prompts(
                initial == label, None if probabilities is None else probabilities[label], label)
            for index, slice_prompts in prompts.items():
                plan.prompts.setdefault(index, []).extend(slice_prompts)
        if probabilities is not None and self.settings.activation is not None:
            self._add_probability_prompts(plan.prompts, probabilities, labels)
        if self.settings.prompts == "box+points":
            _add_other_classes_as_negatives(plan.prompts)
        plan.recovery = self._recovery_plans(plan, recoverable)
        return plan

    def _class_prompts(self, binary: np.ndarray, probabilities: np.ndarray | None,
                       label: int) -> tuple[np.ndarray, dict[int, list[SlicePrompt]]]:
        """Clean one class's mask (slices along axis 0) and derive its prompts slice by slice: one box per object
        of the slice (each refined or kept on its own, so that SAM never answers one box around two objects with
        one of them), or with boxes "slice" one box around the slice's mask (keep="pieces": one per piece); and
        interpolated boxes across gaps of up to `max_gap` slices between slices with one object each."""
        s = self.settings
        cleaned = clean_mask(binary, probabilities, keep=s.keep, axis=0, max_gap=s.max_gap)
        prompts: dict[int, list[SlicePrompt]] = {}
        outline: dict[int, np.ndarray] = {}  # slice -> box around all its pieces (for the gaps between slices)
        for index in np.flatnonzero(cleaned.any(axis=(1, 2))):
            whole = drop_small_components(cleaned[index])
            outline[int(index)] = bounding_box(whole)
            if s.boxes == "object":
                objects = self._objects(whole, None if probabilities is None else probabilities[index])
                prompts[int(index)] = [self._piece_prompt(obj, label, obj if len(objects) > 1 else None)
                                       for obj in objects]
            elif s.keep == "pieces":
                prompts[int(index)] = [self._piece_prompt(piece, label, piece) for piece in slice_pieces(whole)]
            else:
                prompts[int(index)] = [self._piece_prompt(whole, label)]
        single = {index for index, slice_prompts in prompts.items() if len(slice_prompts) == 1}
        for index, box in interpolate_boxes(outline, s.max_gap).items():
            below, above = max(i for i in outline if i < index), min(i for i in outline if i > index)
            if s.boxes == "slice" or (below in single and above in single):
                prompts[index] = [SlicePrompt(label=label, box=box, interpolated=True)]
        return cleaned, prompts

    def _objects(self, mask2d: np.ndarray, probability: np.ndarray | None) -> list[np.ndarray]:
        """The objects of a class's slice mask (`slice_objects`, with the settings' `link_gap`)."""
        return slice_objects(mask2d, probability, self.link_pixels)

    def _add_probability_prompts(self, by_slice: dict[int, list[SlicePrompt]], probabilities: np.ndarray,
                                 labels: list[int]) -> None:
        """Boxes where a class's probability reaches `activation` on slices without its prompts (SAM-Mix's
        activation-map prompts, the model's softmax as the activation map): one per slice, around that area."""
        n = probabilities.shape[1]
        for label in labels:
            prompted = np.zeros(n, dtype=bool)
            prompted[[i for i, prompts in by_slice.items() if any(p.label == label for p in prompts)]] = True
            region = activation_region(probabilities[label], prompted, self.settings.activation,
                                       self.settings.max_gap)
            for index in np.flatnonzero(region.any(axis=(1, 2))):
                area = drop_small_components(region[index])
                areas = self._objects(area, None) if self.settings.boxes == "object" else [area]
                for piece in areas:
                    prompt = self._piece_prompt(piece, label, piece)
                    prompt.from_probabilities = True
                    by_slice.setdefault(int(index), []).append(prompt)

    def _piece_prompt(self, piece: np.ndarray, label: int, region: np.ndarray | None = None) -> SlicePrompt:
        """The box (and with box+points, the points) of one piece of a class's slice mask."""
        with_points = self.settings.prompts == "box+points"
        box = bounding_box(piece)
        return SlicePrompt(label=label, box=box, point=interior_point(piece) if with_points else None,
                           negatives=background_points(piece, box, self.settings.background_points if with_points
                                                       else 0), region=region)

    def _recovery_plans(self, plan: RefinePlan, recoverable: Sequence[int]) -> list[RecoveryPlan]:
        """Where the model's class prompts may look for each recoverable class."""
        plans = []
        for label in plan.labels:
            if label in recoverable:
                own = {index: p for index, prompts in plan.prompts.items() for p in prompts if p.label == label}
                recovery = plan_recovery(label, own, plan.cleaned[label], self.settings.recover_reach)
                if recovery is not None:
                    plans.append(recovery)
        return plans


def _add_other_classes_as_negatives(by_slice: dict[int, list[SlicePrompt]]) -> None:
    """Each class's positive point is a negative point for the other classes on the same slice."""
    for prompts in by_slice.values():
        for prompt in prompts:
            others = [p.point for p in prompts if p is not prompt and p.point is not None]
            if others:
                prompt.negatives = np.concatenate([prompt.negatives, np.stack(others)])
