"""The refinement engine: turn an imperfect label map into a SAM-refined one, slice by slice.

Per class: clean the mask, derive prompts per slice (box, and for `box+points` a positive point and
negative points), fill slices the mask misses between two slices that have it with interpolated
boxes. Per model input (a slice's view, or a tile of slices): encode it once; per slice, decode all
classes' prompts together, keep the initial mask where SAM disagrees (the agreement guard), resolve
overlaps by the highest logit. A fine-tuned model with class prompts also looks for each class on slices
near it that the initial mask misses (`sam/recovery.py`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnunet_sam.errors import NnsamError, SettingError, SettingText
from nnunet_sam.sam.evidence import region_contrast
from nnunet_sam.sam.models import SamModel
from nnunet_sam.sam.prompts import (KEEP_MODES, SlicePrompt, activation_region, background_points, bounding_box,
                                    clean_mask, dice, drop_small_components, interior_point, interpolate_boxes,
                                    slice_pieces)
from nnunet_sam.sam.recovery import MIN_STABILITY, RecoveryPlan, plan_recovery, region_mask, stability_score
from nnunet_sam.sam.views import CONTEXTS, ViewGeometry, VolumeViews

if TYPE_CHECKING:
    from nnunet_sam.sam.embedding_cache import EmbeddingCache

logger = logging.getLogger(__name__)

PROMPT_SETS = ("box", "box+points")
PREPROCESSED_UNITS = "nnU-Net preprocessed intensities"  # the units of a dataset-mode --ct-window (and of the
# window recorded in a checkpoint fine-tuned by nnsam_finetune)
_KEEP_SCORE = 1e4  # score of a guard-kept initial mask: beats any SAM logit


@dataclass
class RefineSettings:
    """How the engine refines; the defaults suit LiteMedSAM (box-trained)."""

    prompts: str = "box"  # "box" or "box+points" (two stages: box, then points + stage-1 mask)
    context: str = "single"  # "single" slice, "adjacent" slices as SAM's three channels, or "tile"
    grid: int = 2  # context "tile": grid x grid consecutive slices per model input
    axis: int | None = None  # slicing axis of the (z, y, x) array; None: through-plane axis
    ct_window: tuple[float, float] | None = None  # intensity window; None: robust percentiles
    box_margin: float = 6.0  # grow boxes by this many model-input pixels
    keep: str = "largest"  # connected components kept per class: "largest" or "all" (one box around them per
    # slice), or "pieces": all, each piece of a slice with its own box and its own guard decision, so that SAM
    # cannot trade a piece on the right organ for one on a neighbour (see `_class_prompts`)
    max_gap: int = 3  # bridge up to this many missing slices (one object; interpolated boxes)
    background_points: int = 1  # negative points inside the box (box+points only)
    min_sam_iou: float = 0.5  # guard: keep the initial slice mask if SAM's IoU estimate is lower
    min_agreement: float = 0.5  # guard: ... or if Dice(initial, SAM) on the slice is lower
    evidence: bool = True  # guard: keep the initial slice mask where its border fits the image better
    batch_size: int | None = None  # model inputs per encoder call; None: 8 on GPU, 1 on CPU
    recover_reach: int = 5  # with class prompts (a fine-tuned checkpoint): look for a class this many slices
    # beyond its initial mask's ends and in gaps inside it (-1: no recovery; see sam/recovery.py)
    # With the initial model's probabilities (`refine(..., probabilities=)`; measured in benchmarks/RESULTS.md):
    confident: float | None = 0.9  # where the model's highest softmax value is >= this, its (cleaned) label is
    # kept and SAM decides only the rest: SAM cannot undo what the model is sure of (None: off)
    sure_sam: bool = True  # in the band, SAM's label replaces the model's only where SAM's own probability is
    # also >= `confident` (where neither is sure, the model's label stays: a change needs one sure side)
    fuse: bool = False  # instead of the band: per pixel, the mean of SAM's probability and the model's decides
    activation: float | None = 0.3  # boxes where a class's probability reaches this on slices without its
    # prompts (SAM-Mix's activation-map prompts): finds slices, and classes, that never win the argmax (None: off)

    def __post_init__(self) -> None:
        if self.prompts not in PROMPT_SETS:
            raise ValueError(f"prompts must be one of {PROMPT_SETS}, got {self.prompts!r}")
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
        if self.keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {KEEP_MODES}, got {self.keep!r}")
        for name in ("confident", "activation"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be a probability in (0, 1] or None, got {value!r}")


def encoder_batch_size(settings: RefineSettings, device) -> int:
    """Model inputs per encoder call: the settings' choice, else 8 on GPU and 1 on CPU (batching does not help
    there)."""
    if settings.batch_size:
        return settings.batch_size
    return 8 if device.type == "cuda" else 1


@dataclass
class ClassStats:
    """What refinement did to one class of one case."""

    label: int
    voxels_before: int = 0
    voxels_after: int = 0
    slices_refined: int = 0  # slices where SAM's mask was accepted
    slices_kept: int = 0  # slices where the guard kept the initial mask (SAM unsure, disagreeing, or
    # its border fitting the image worse than the initial one's)
    slices_filled: int = 0  # slices missing in the initial mask, recovered from interpolated boxes
    slices_recovered: int = 0  # slices missing in the initial mask, found by the fine-tuned class prompts
    slices_from_probabilities: int = 0  # slices without initial mask found from the probability map's boxes
    voxels_confident: int | None = None  # with probabilities (the band): voxels of the class where the model's
    # label was kept (the model was sure, or SAM was not)
    voxels_sam_decided: int | None = None  # ... where SAM's label was taken (the model unsure, SAM sure)
    voxels_overruled: int | None = None  # ... where SAM's label differed and the model's label was kept
    mean_sam_iou: float | None = None  # SAM's own IoU estimate, averaged over decoded prompts
    dice_initial_refined: float | None = None  # Dice between the initial and the refined mask
    _iou_values: list[float] = field(default_factory=list, repr=False)
    _added_slices: set[int] = field(default_factory=set, repr=False)  # slices without initial mask where SAM's
    # mask of the class was accepted (filled, recovered, found from probabilities): the band does not undo them

    @property
    def found_by_probabilities(self) -> bool:
        """The initial mask lacks the class, and the probability map's boxes found it."""
        return self.voxels_before == 0 and self.slices_from_probabilities > 0 and self.voxels_after > 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("_iou_values")
        data.pop("_added_slices")
        data["found_by_probabilities"] = self.found_by_probabilities
        return data


@dataclass
class RefineResult:
    mask: np.ndarray  # refined label map, same shape and dtype as the input mask
    classes: dict[int, ClassStats]
    axis: int
    slices_encoded: int  # model inputs encoded (a tile of context "tile" counts once)


class SamRefiner:
    """Refine label maps with a SAM model. Like `SamPredictor`: construct once, call `refine` per case."""

    def __init__(self, model: SamModel, settings: RefineSettings | None = None,
                 cache: EmbeddingCache | None = None) -> None:
        """cache: optional on-disk embedding cache (slices refined more than once are encoded once)."""
        self.model = model
        self.settings = settings or RefineSettings()
        if cache is not None and cache.model is not model:
            raise ValueError("the embedding cache belongs to another model")
        self.cache = cache
        self.views_match = True  # the views are those the decoder was fine-tuned on (or it was not)
        if model.finetuned:
            trained = _views_name(model.finetuned.get("context"), model.finetuned.get("grid", self.settings.grid))
            current = _views_name(self.settings.context, self.settings.grid)
            self.views_match = not model.finetuned.get("context") or trained == current
            if not self.views_match:
                logger.warning(SettingText(
                    "the SAM decoder in {path} was fine-tuned on {trained} views but refinement uses {current}; pass "
                    "the same {context} (and {grid}){note}", path=model.checkpoint, trained=trained, current=current,
                    note="; its class prompts recover no slices on other views" if model.class_prompts else ""))
            trained_axis = model.finetuned.get("axis", self.settings.axis)  # (a record without it: no warning)
            if trained_axis != self.settings.axis:
                logger.warning(SettingText("the SAM decoder in {path} was fine-tuned on slices along {trained} but "
                                           "refinement slices along {current}; pass the same {axis}",
                                           path=model.checkpoint, trained=_axis_name(trained_axis),
                                           current=_axis_name(self.settings.axis)))
            if self.settings.prompts != "box":
                logger.warning(SettingText("the SAM decoder in {path} was fine-tuned with box prompts only; {prompts} "
                                           "{value} also gives it points it was not fine-tuned on",
                                           path=model.checkpoint, value=self.settings.prompts))

    def check_finetuned_for(self, labels: Sequence[int], window_units: str) -> None:
        """Before any work: refuse `labels` that the checkpoint's fine-tuned class prompts do not know; warn when
        its decoder was fine-tuned on another CT window (compared where both windows are in `window_units`)."""
        record = self.model.finetuned
        if not record:
            return
        prompts = self.model.class_prompts
        unknown = [] if prompts is None else sorted({int(v) for v in labels} - set(prompts.labels))
        if unknown:
            raise SettingError("the class prompts of {path} were fine-tuned for labels {labels}, not {unknown}; "
                               "fine-tune them on this dataset (nnsam_finetune) or pass another {checkpoint}",
                               path=self.model.checkpoint, labels=prompts.labels, unknown=unknown)
        trained = record.get("ct_window")
        current = None if self.settings.ct_window is None else [float(v) for v in self.settings.ct_window]
        if record.get("ct_window_units") == window_units and "ct_window" in record and (
                (trained is None) != (current is None) or (current is not None and not np.allclose(trained, current))):
            logger.warning(SettingText("the SAM decoder in {path} was fine-tuned on slices with CT window {trained} "
                                       "but refinement uses {current} ({units}); pass the same {ct_window}",
                                       path=self.model.checkpoint, trained=trained, current=current,
                                       units=window_units))

    @property
    def batch_size(self) -> int:
        return encoder_batch_size(self.settings, self.model.device)

    def refine(self, image: np.ndarray, mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
               probabilities: np.ndarray | None = None, labels: Iterable[int] | None = None,
               progress: bool = False) -> RefineResult:
        """Refine `mask` (Z, Y, X integer labels) on `image` (Z, Y, X, one channel already chosen).

        spacing: voxel spacing of the three axes (nnU-Net order). probabilities: optional softmax
        (K, Z, Y, X) of the model that produced the mask: it picks connected components, keeps the model's label
        where the model is sure (`confident`, or `fuse`), and prompts classes where the argmax misses them
        (`activation`). labels: the foreground labels to refine (default: those present in the mask, or with
        probabilities every class 1..K-1).
        """
        s = self.settings
        if image.shape != mask.shape:
            raise ValueError(f"image shape {image.shape} differs from mask shape {mask.shape}")
        if mask.ndim != 3:
            raise ValueError(f"expected 3D arrays (use shape (1, Y, X) for 2D images), got {mask.ndim}D")
        if probabilities is not None:
            _check_probabilities(probabilities, mask)
            if labels is None:
                labels = range(1, probabilities.shape[0])
        views = VolumeViews.prepare(image, spacing, self.model.input_size, s.context, s.axis, s.ct_window, s.grid)
        volume = views.volume
        initial = views.to_slices(mask)
        probs = None if probabilities is None else views.to_slices(probabilities, leading=1)

        labels = sorted(int(v) for v in (np.unique(initial) if labels is None else labels) if v > 0)
        stats = {label: ClassStats(label=label, voxels_before=int((initial == label).sum())) for label in labels}
        cleaned: dict[int, np.ndarray] = {}
        by_slice: dict[int, list[SlicePrompt]] = {}
        for label in labels:
            cleaned[label], class_prompts = self._class_prompts(
                initial == label, None if probs is None else probs[label], label)
            for index, prompts in class_prompts.items():
                by_slice.setdefault(index, []).extend(prompts)
        if probs is not None and s.activation is not None:
            self._add_probability_prompts(by_slice, probs, labels)
        if s.prompts == "box+points":
            _add_other_classes_as_negatives(by_slice)

        plans = self._recovery_plans(by_slice, cleaned, labels)
        recover_at: dict[int, list[RecoveryPlan]] = {}
        for plan in plans:
            for index in plan.regions:
                recover_at.setdefault(index, []).append(plan)
        found: dict[int, set[int]] = {plan.label: set() for plan in plans}
        pending: dict[int, tuple[list[int], list[torch.Tensor]]] = {}

        refined = np.zeros_like(initial)
        fused = probs if probs is not None and s.fuse else None  # per slice, SAM and the model decide together
        band = probs is not None and not s.fuse and s.confident is not None
        # SAM's probability of the label it gave, where the band asks whether SAM is sure
        sam_certainty = np.ones(refined.shape, dtype=np.float32) if band and s.sure_sam else None

        def place(index: int, slice_labels: list[int], scores: list[torch.Tensor]) -> None:
            refined[index] = _assemble(slice_labels, scores, refined.dtype, None if fused is None else fused[:, index])
            if sam_certainty is not None:
                sam_certainty[index] = torch.stack(scores).amax(dim=0).abs().sigmoid().cpu().numpy()

        order = sorted({views.input_of(index) for index in [*by_slice, *recover_at]})
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        encoded = 0
        for batch in tqdm(batches, desc="SAM views", unit="batch", disable=not progress, leave=False):
            inputs = views.model_inputs(batch)
            if self.cache is not None:
                misses = self.cache.misses
                embeddings = self.cache.embeddings(inputs, self.batch_size)
                encoded += self.cache.misses - misses
            else:
                embeddings = self.model.encode(inputs)
                encoded += len(batch)
            for j, input_id in enumerate(batch):
                for index in views.slices_of(input_id):
                    prompts, candidates = by_slice.get(index, []), recover_at.get(index, [])
                    if not prompts and not candidates:
                        continue
                    geometry = views.geometry_of(index)
                    scores = self._decode_slice(embeddings[j:j + 1], index, prompts, geometry, volume[index],
                                                [cleaned[p.label][index] if p.region is None else p.region
                                                 for p in prompts], stats) if prompts else []
                    slice_labels = [p.label for p in prompts]
                    recovered = self._recover_slice(embeddings[j:j + 1], candidates, index, geometry)
                    for label, score in recovered:
                        found[label].add(index)
                        slice_labels.append(label)
                        scores.append(score)
                    if recovered:  # kept until it is known which recovered slices continue their object
                        pending[index] = (slice_labels, [score.cpu() for score in scores])
                    if scores:
                        place(index, slice_labels, scores)
        dropped: dict[int, set[int]] = {}
        for plan in plans:  # beyond the ends, only slices that continue the object stay
            kept = plan.connected(found[plan.label])
            for index in found[plan.label] - kept:
                dropped.setdefault(index, set()).add(plan.label)
            stats[plan.label].slices_recovered = len(kept)
            stats[plan.label]._added_slices |= kept
        for index, labels_dropped in dropped.items():  # assembled again: other classes get their pixels back
            slice_labels, scores = pending[index]
            keep = [k for k, label in enumerate(slice_labels) if label not in labels_dropped]
            if keep:
                place(index, [slice_labels[k] for k in keep], [scores[k] for k in keep])
            else:
                refined[index] = 0
                if sam_certainty is not None:
                    sam_certainty[index] = 1.0
        if band:
            refined = _keep_confident(refined, probs, cleaned, s.confident, stats, sam_certainty)

        for label, stat in stats.items():
            stat.voxels_after = int((refined == label).sum())
            stat.dice_initial_refined = dice(initial == label, refined == label)
            stat.mean_sam_iou = float(np.mean(stat._iou_values)) if stat._iou_values else None
        return RefineResult(mask=views.from_slices(refined), classes=stats, axis=views.axis,
                            slices_encoded=encoded)

    def _class_prompts(self, binary: np.ndarray, probabilities: np.ndarray | None,
                       label: int) -> tuple[np.ndarray, dict[int, list[SlicePrompt]]]:
        """Clean one class's mask (slices along axis 0) and derive its prompts slice by slice: one box around
        the slice's mask, or with keep="pieces" one per piece (a mask on two organs gives two prompts, each
        refined or kept on its own; measured in benchmarks/RESULTS.md, "Semi-supervised gain")."""
        s = self.settings
        cleaned = clean_mask(binary, probabilities, keep=s.keep, axis=0, max_gap=s.max_gap)
        prompts: dict[int, list[SlicePrompt]] = {}
        outline: dict[int, np.ndarray] = {}  # slice -> box around all its pieces (for the gaps between slices)
        for index in np.flatnonzero(cleaned.any(axis=(1, 2))):
            whole = drop_small_components(cleaned[index])
            outline[int(index)] = bounding_box(whole)
            if s.keep == "pieces":
                prompts[int(index)] = [self._piece_prompt(piece, label, piece) for piece in slice_pieces(whole)]
            else:
                prompts[int(index)] = [self._piece_prompt(whole, label)]
        for index, box in interpolate_boxes(outline, s.max_gap).items():
            prompts[index] = [SlicePrompt(label=label, box=box, interpolated=True)]
        return cleaned, prompts

    def _add_probability_prompts(self, by_slice: dict[int, list[SlicePrompt]], probs: np.ndarray,
                                 labels: list[int]) -> None:
        """Boxes where a class's probability reaches `activation` on slices without its prompts (SAM-Mix's
        activation-map prompts, the model's softmax as the activation map): one per slice, around that area."""
        n = probs.shape[1]
        for label in labels:
            prompted = np.zeros(n, dtype=bool)
            prompted[[i for i, prompts in by_slice.items() if any(p.label == label for p in prompts)]] = True
            region = activation_region(probs[label], prompted, self.settings.activation, self.settings.max_gap)
            for index in np.flatnonzero(region.any(axis=(1, 2))):
                area = drop_small_components(region[index])
                prompt = self._piece_prompt(area, label, area)
                prompt.from_probabilities = True
                by_slice.setdefault(int(index), []).append(prompt)

    def _piece_prompt(self, piece: np.ndarray, label: int, region: np.ndarray | None = None) -> SlicePrompt:
        """The box (and with box+points, the points) of one piece of a class's slice mask."""
        with_points = self.settings.prompts == "box+points"
        box = bounding_box(piece)
        return SlicePrompt(label=label, box=box, point=interior_point(piece) if with_points else None,
                           negatives=background_points(piece, box, self.settings.background_points if with_points
                                                       else 0), region=region)

    def _recovery_plans(self, by_slice: dict[int, list[SlicePrompt]], cleaned: dict[int, np.ndarray],
                        labels: list[int]) -> list[RecoveryPlan]:
        """Where the model's class prompts may look for each class (none without class prompts)."""
        class_prompts = self.model.class_prompts
        if class_prompts is None or self.settings.recover_reach < 0 or not self.views_match:
            return []
        plans = []
        for label in labels:
            if label in class_prompts.labels:
                own = {index: p for index, prompts in by_slice.items() for p in prompts if p.label == label}
                plan = plan_recovery(label, own, cleaned[label], self.settings.recover_reach)
                if plan is not None:
                    plans.append(plan)
        return plans

    @torch.inference_mode()
    def _recover_slice(self, embedding: torch.Tensor, plans: list[RecoveryPlan], index: int,
                       geometry: ViewGeometry) -> list[tuple[int, torch.Tensor]]:
        """The classes the class prompts find on a slice within their search boxes, with their scores."""
        if not plans:
            return []
        low_res, _ = self.model.class_logits(embedding, [plan.label for plan in plans])
        logits = geometry.logits_to_slice(low_res)
        recovered = []
        for plan, slice_logits in zip(plans, logits):
            region = torch.from_numpy(region_mask(plan.regions[index], geometry.slice_shape)).to(slice_logits.device)
            score = torch.where(region, slice_logits.float(), torch.full_like(slice_logits, -_KEEP_SCORE))
            if int((score > 0).sum()) >= plan.min_pixels[index] and stability_score(score) >= MIN_STABILITY:
                recovered.append((plan.label, score))
        return recovered

    def _decode_slice(self, embedding: torch.Tensor, index: int, prompts: list[SlicePrompt], geometry: ViewGeometry,
                      image: np.ndarray, initial_masks: list[np.ndarray],
                      stats: dict[int, ClassStats]) -> list[torch.Tensor]:
        """Decode all prompts of one slice and apply the guard: per prompt, SAM's logits where accepted,
        else +-_KEEP_SCORE on the initial mask. Updates the classes' statistics."""
        s = self.settings
        boxes = geometry.boxes_to_input(np.stack([p.box for p in prompts]), s.box_margin)
        decoded = self.model.decode(embedding, boxes)
        if s.prompts == "box+points":
            points, point_labels = _point_arrays(prompts, geometry)
            decoded = self.model.decode(embedding, boxes, points, point_labels, decoded.low_res_logits)
        logits = geometry.logits_to_slice(decoded.low_res_logits)
        scores = []
        for prompt, initial, slice_logits, iou in zip(prompts, initial_masks, logits, decoded.iou):
            stat = stats[prompt.label]
            stat._iou_values.append(float(iou))
            sam_mask = (slice_logits > 0).cpu().numpy()
            confident = iou >= s.min_sam_iou and sam_mask.any()
            if prompt.interpolated:
                accepted = bool(confident)
                stat.slices_filled += int(accepted)
            elif prompt.from_probabilities:  # `initial` is the probability map's area: SAM must find about it
                accepted = bool(confident and dice(initial, sam_mask) >= s.min_agreement)
                stat.slices_from_probabilities += int(accepted)
            else:
                accepted = bool(confident and dice(initial, sam_mask) >= s.min_agreement)
                if accepted and s.evidence:
                    accepted = region_contrast(image, sam_mask) >= region_contrast(image, initial)
                stat.slices_refined += int(accepted)
                stat.slices_kept += int(not accepted)
            if accepted and (prompt.interpolated or prompt.from_probabilities):
                stat._added_slices.add(index)
            if accepted:
                score = slice_logits.float()
            else:
                score = torch.full(slice_logits.shape, -_KEEP_SCORE, device=slice_logits.device)
                if not prompt.from_probabilities:  # a rejected probability box adds nothing
                    score[torch.from_numpy(initial).to(slice_logits.device)] = _KEEP_SCORE
            scores.append(score)
        return scores


def _axis_name(axis: int | None) -> str:
    return "the through-plane axis" if axis is None else f"axis {axis}"


def _views_name(context: str | None, grid: int) -> str:
    return f"{context!r}" + (f" (grid {grid})" if context == "tile" else "")


def _assemble(labels: list[int], scores: list[torch.Tensor], dtype: np.dtype,
              probabilities: np.ndarray | None = None) -> np.ndarray:
    """One label per pixel: the class with the highest positive score wins, else background. With the model's
    probabilities (K, H, W) of the slice: the highest mean of SAM's probability (sigmoid of the score; a kept
    initial mask counts as 1) and the model's, background included."""
    if probabilities is None:
        best, winner = torch.stack(scores).max(dim=0)
        labels = torch.tensor(labels, device=best.device)[winner]
        labels = torch.where(best > 0, labels, torch.zeros_like(labels))
        return labels.cpu().numpy().astype(dtype)
    classes = sorted(set(labels))
    sam = torch.stack([torch.stack([score for label, score in zip(labels, scores) if label == c]).amax(dim=0)
                       for c in classes]).sigmoid()
    model = torch.from_numpy(np.asarray(probabilities[classes], dtype=np.float32)).to(sam.device)
    background = ((1 - sam.amax(dim=0)) + (1 - model.sum(dim=0))) / 2
    winner = torch.cat([background[None], (sam + model) / 2]).argmax(dim=0)
    return torch.tensor([0, *classes], device=winner.device)[winner].cpu().numpy().astype(dtype)


def _check_probabilities(probabilities: np.ndarray, mask: np.ndarray) -> None:
    """The softmax must be (K, *mask.shape) with a channel for every label of the mask."""
    if probabilities.ndim != mask.ndim + 1 or probabilities.shape[1:] != mask.shape:
        raise ValueError(f"probabilities of shape {probabilities.shape} do not match the mask's {mask.shape}: "
                         f"expected (classes, {', '.join(map(str, mask.shape))})")
    if mask.size and int(mask.max()) >= probabilities.shape[0]:
        raise ValueError(f"the mask has label {int(mask.max())} but the probabilities only {probabilities.shape[0]} "
                         f"classes (0..{probabilities.shape[0] - 1})")


def _keep_confident(refined: np.ndarray, probs: np.ndarray, cleaned: dict[int, np.ndarray], threshold: float,
                    stats: dict[int, ClassStats], sam_certainty: np.ndarray | None = None) -> np.ndarray:
    """The refined labels with the model's cleaned label wherever its highest probability is >= `threshold`
    (and, with `sam_certainty`, SAM's probability of its own label, wherever that is below `threshold`),
    counting per class the voxels each side decided and those where the model overruled SAM. A class's slices
    that the initial mask lacks but SAM added from 3D context (`ClassStats._added_slices`: boxes interpolated
    across a gap, recovered or found from the probability map) keep SAM's pixels of that class: there the
    model's slice-wise certainty is what the 3D context contradicts."""
    model_labels = np.zeros_like(refined)
    for label, mask in cleaned.items():
        model_labels[mask & (model_labels == 0)] = label
    sure = probs.max(axis=0) >= threshold
    if sam_certainty is not None:
        sure |= sam_certainty < threshold
    for label, stat in stats.items():
        for index in stat._added_slices:
            sure[index][refined[index] == label] = False
    result = np.where(sure, model_labels, refined)
    overruled = sure & (refined != model_labels)
    for label, stat in stats.items():
        mine = result == label
        stat.voxels_confident = int((mine & sure).sum())
        stat.voxels_sam_decided = int((mine & ~sure).sum())
        stat.voxels_overruled = int((overruled & ((refined == label) | (model_labels == label))).sum())
    return result


def _add_other_classes_as_negatives(by_slice: dict[int, list[SlicePrompt]]) -> None:
    """Each class's positive point is a negative point for the other classes on the same slice."""
    for prompts in by_slice.values():
        for prompt in prompts:
            others = [p.point for p in prompts if p is not prompt and p.point is not None]
            if others:
                prompt.negatives = np.concatenate([prompt.negatives, np.stack(others)])


def _point_arrays(prompts: list[SlicePrompt], geometry: ViewGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Pad every prompt's points to the same count: (N, P, 2) input-pixel coordinates, (N, P) labels."""
    rows = []
    for p in prompts:
        positives = [p.point] if p.point is not None else []
        coords = np.array(positives + list(p.negatives), dtype=float).reshape(-1, 2)
        rows.append((coords, [1] * len(positives) + [0] * len(p.negatives)))
    count = max(1, max(len(labels) for _, labels in rows))
    points = np.zeros((len(prompts), count, 2))
    point_labels = -np.ones((len(prompts), count), dtype=np.int64)
    for i, (coords, labels) in enumerate(rows):
        if len(labels):
            points[i, :len(labels)] = geometry.points_to_input(coords)
            point_labels[i, :len(labels)] = labels
    return points, point_labels
