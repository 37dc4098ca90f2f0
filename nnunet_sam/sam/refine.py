"""The refinement engine: turn an imperfect label map into a SAM-refined one, slice by slice.

`SamRefiner.refine` runs in four stages, each with its own small state (the pattern of segment-anything's
automatic mask generator: `refine -> _decode -> _process_slice -> _decode_prompts`):

1. plan (`sam/refine_plan.py`, state `RefinePlan`): per class, clean the mask and derive prompts per slice:
   boxes (and points), interpolated boxes across gaps, the probability map's boxes, other classes' points as
   negatives, and where a fine-tuned model's class prompts may recover each class.
2. encode/decode (state `EncodeRun`, result `SliceDecoding` per slice): per model input (a slice's view, or a
   tile of slices), encode once (in batches, through the embedding cache); per slice, decode all classes'
   prompts together and apply the agreement guard (`Verdict`): keep the initial mask where SAM is unsure,
   disagrees, or its border fits the image worse.
3. recover (state `Recovery`): with class prompts, look for each class on slices near it that the initial mask
   misses (while the slice's embedding is at hand, `sam/recovery.py`); after the last slice, keep only the
   slices that continue their object.
4. assemble (state `LabelCanvas`): per slice, resolve overlaps by the highest score (a slice that lost a
   recovered class is assembled again); with the model's probabilities, keep its sure labels (the band) or
   fuse; count the statistics -> `RefineResult`.

Only the plan knows where prompts come from: a new prompt source changes `sam/refine_plan.py` alone.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnunet_sam.errors import SettingError, SettingText
from nnunet_sam.sam.box_prompts import decode_boxes
from nnunet_sam.sam.evidence import region_contrast
from nnunet_sam.sam.models import SamModel
from nnunet_sam.sam.prompts import KEEP_MODES, SlicePrompt, dice
from nnunet_sam.sam.recovery import MIN_STABILITY, RecoveryPlan, region_mask, stability_score
from nnunet_sam.sam.refine_plan import Planner, PromptSource, RefinePlan, source_of
from nnunet_sam.sam.views import (CONTEXTS, MARGIN_UNITS, MODALITIES, ViewGeometry, VolumeViews,
                                  describe_intensities)

if TYPE_CHECKING:
    from nnunet_sam.sam.embedding_cache import EmbeddingCache

logger = logging.getLogger(__name__)

PROMPT_SETS = ("box", "box+points")
BOX_MODES = ("object", "slice")
BAND_MODES = ("class", "max")
PREPROCESSED_UNITS = "nnU-Net preprocessed intensities"  # what checkpoints fine-tuned by nnsam_finetune before SAM's
# views were shown (their record's ct_window_units): nnU-Net's normalised tensor
_KEEP_SCORE = 1e4  # score of a guard-kept initial mask: beats any SAM logit


@dataclass
class RefineSettings:
    """How the engine refines; the defaults suit LiteMedSAM (box-trained)."""

    prompts: str = "box"  # "box" or "box+points" (two stages: box, then points + stage-1 mask)
    context: str = "single"  # "single" slice, "adjacent" slices as SAM's three channels, or "tile"
    grid: int = 2  # context "tile": grid x grid consecutive slices per model input
    axis: int | None = None  # slicing axis of the (z, y, x) array; None: through-plane axis
    modality: str = "auto"  # how intensities are shown (`sam/views.py`): "CT" through `ct_window` (HU), "MR" (any
    # other image) between the percentiles of its nonzero voxels, "auto" tells them apart by the intensities
    # (dataset mode: by the plans' normalisation), "range" the old rule (percentiles of all voxels)
    ct_window: tuple[float, float] | None = None  # CT window in HU; None: DEFAULT_CT_WINDOW (-160, 240)
    box_margin: float = 2.0  # grow boxes by this many millimetres (`box_margin_unit`; 2 measured best of 1-5 on the
    # synthetic data, benchmarks/pseudo_quality.py)
    box_margin_unit: str = "mm"  # "mm", or "input": pixels of the model input (the old rule, 6.0 of them)
    box_scales: tuple[float, ...] = (1.0,)  # decode every box at these sizes about its centre (factors of its
    # half-size), the logits averaged (`sam/box_prompts.py`); (1.0,): the box as it is
    box_rounds: int = 1  # decode, then redraw each box around SAM's answer and decode again, rounds - 1 times
    keep: str = "largest"  # connected components kept per class: "largest" (highest mean probability, and those
    # within PIECE_MARGIN of it) or "all"; "pieces" is "all" (with boxes "slice": each piece its own box)
    boxes: str = "object"  # "object": one box per object of a slice (pieces a thin gap separates count as one,
    # `link_gap`), each guarded on its own; "slice": one box around all the class's pieces of a slice (the old rule)
    link_gap: float = 2.0  # boxes "object": pieces of a slice at most this many mm apart are one object (also
    # pieces the class's probability joins at LINK_PROBABILITY or more)
    max_gap: int = 3  # bridge up to this many missing slices (one object; interpolated boxes)
    background_points: int = 1  # negative points inside the box (box+points only)
    min_sam_iou: float = 0.5  # guard: keep the initial slice mask if SAM's IoU estimate is lower
    min_agreement: float = 0.5  # guard: ... or if Dice(initial, SAM) on the slice is lower
    evidence: bool = True  # guard: keep the initial slice mask where its border fits the image better
    batch_size: int | None = None  # model inputs per encoder call; None: 8 on GPU, 1 on CPU
    recover_reach: int = 5  # with class prompts (a fine-tuned checkpoint): look for a class this many slices
    # beyond its initial mask's ends and in gaps inside it (-1: no recovery; see sam/recovery.py)
    # With the initial model's probabilities (`refine(..., probabilities=)`; measured in benchmarks/RESULTS.md):
    confident: float | None = 0.9  # where the model is this sure of its (cleaned) label, that label is kept and
    # SAM decides only the rest: SAM cannot undo what the model is sure of (None: off)
    band: str = "class"  # what "sure" means: "class", the model's probability of its own foreground label (SAM
    # may grow a class where the model was sure of background: a weak model's usual error); "max", its highest
    # softmax value, background included (the old rule: SAM decided only where the model was unsure of anything)
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
        for name, allowed in (("keep", KEEP_MODES), ("modality", MODALITIES), ("box_margin_unit", MARGIN_UNITS),
                              ("boxes", BOX_MODES), ("band", BAND_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.box_scales or any(not 0.0 < f <= 4.0 for f in self.box_scales):
            raise ValueError(f"box_scales must be factors in (0, 4], got {self.box_scales!r}")
        if self.box_rounds < 1:
            raise ValueError(f"box_rounds must be 1 or more, got {self.box_rounds!r}")
        for name in ("confident", "activation"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be a probability in (0, 1] or None, got {value!r}")


def box_margin_pixels(geometry: ViewGeometry, settings: RefineSettings) -> float:
    """The settings' box margin in model-input pixels of a slice of `geometry`."""
    return geometry.margin_pixels(settings.box_margin, settings.box_margin_unit)


def view_intensities(settings: RefineSettings) -> str:
    """How the settings show intensities, in words (a fine-tuned checkpoint records it): `describe_intensities`."""
    return describe_intensities(settings.modality, settings.ct_window)


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
    intensities: str = ""  # how SAM was shown the image (`describe_intensities`)


# --- the stages' state ------------------------------------------------------------------------------------------

@dataclass
class RefineInputs:
    """A case made ready for the stages: its views, and its arrays with the slicing axis first."""

    views: VolumeViews
    initial: np.ndarray  # (N, H, W) the initial labels
    probabilities: np.ndarray | None  # (K, N, H, W) the initial model's softmax, if given
    labels: list[int]  # the foreground labels to refine, ascending


@dataclass
class EncodeRun:
    """Stage 2's state: the model inputs to encode, in batches, and how many were encoded (not cached)."""

    batches: list[list[int]]
    encoded: int = 0


@dataclass
class Verdict:
    """The agreement guard's decision on SAM's mask for one prompt."""

    prompt: SlicePrompt
    source: PromptSource
    iou: float  # SAM's IoU estimate
    accepted: bool


@dataclass
class SliceDecoding:
    """Stages 2 and 3 on one slice: a label and a score map (H, W) per decoded prompt, then per recovered class.
    A positive score claims the pixel; a guard-kept initial mask scores +_KEEP_SCORE, the rest -_KEEP_SCORE."""

    index: int
    labels: list[int]
    scores: list[torch.Tensor]
    verdicts: list[Verdict]  # one per decoded prompt
    recovered: list[int]  # the classes the class prompts found (the last entries of `labels`)

    def on_cpu(self) -> SliceDecoding:
        return replace(self, scores=[score.cpu() for score in self.scores])

    def without(self, dropped: set[int]) -> tuple[list[int], list[torch.Tensor]]:
        """The labels and scores of the classes not in `dropped`."""
        keep = [k for k, label in enumerate(self.labels) if label not in dropped]
        return [self.labels[k] for k in keep], [self.scores[k] for k in keep]


@dataclass
class Recovery:
    """Stage 3's state: the slices where the class prompts found each class, and those slices' decodings
    (scores on the CPU), kept until it is known which found slices continue their object."""

    plans: list[RecoveryPlan]
    found: dict[int, set[int]] = field(default_factory=dict)  # label -> slices where it was found
    pending: dict[int, SliceDecoding] = field(default_factory=dict)  # slice -> its decoding

    @classmethod
    def start(cls, plans: list[RecoveryPlan]) -> Recovery:
        return cls(plans, {plan.label: set() for plan in plans})

    def note(self, decoded: SliceDecoding) -> None:
        """Record the classes found on a decoded slice."""
        for label in decoded.recovered:
            self.found[label].add(decoded.index)
        if decoded.recovered:
            self.pending[decoded.index] = decoded.on_cpu()

    def settle(self, stats: dict[int, ClassStats]) -> dict[int, set[int]]:
        """Keep the found slices that continue their object (beyond its ends, only those next to it) and count
        them in `stats`; return, per slice, the classes dropped there."""
        dropped: dict[int, set[int]] = {}
        for plan in self.plans:
            kept = plan.connected(self.found[plan.label])
            for index in self.found[plan.label] - kept:
                dropped.setdefault(index, set()).add(plan.label)
            stats[plan.label].slices_recovered = len(kept)
            stats[plan.label]._added_slices |= kept
        return dropped


@dataclass
class LabelCanvas:
    """Stage 4's state: the refined label slices, assembled as their scores come."""

    refined: np.ndarray  # (N, H, W) labels, of the initial mask's dtype
    fused: np.ndarray | None  # (K, N, H, W) the model's probabilities, when SAM and the model decide together
    band: np.ndarray | None  # ... when the model's sure labels are kept (`confident`)
    sam_certainty: np.ndarray | None  # (N, H, W) SAM's probability of the label it gave, where the band asks
    # whether SAM is sure (`sure_sam`)

    @classmethod
    def start(cls, case: RefineInputs, settings: RefineSettings) -> LabelCanvas:
        probabilities = case.probabilities
        band = probabilities is not None and not settings.fuse and settings.confident is not None
        return cls(refined=np.zeros_like(case.initial),
                   fused=probabilities if probabilities is not None and settings.fuse else None,
                   band=probabilities if band else None,
                   sam_certainty=np.ones(case.initial.shape, dtype=np.float32) if band and settings.sure_sam else None)

    def put(self, index: int, labels: list[int], scores: list[torch.Tensor]) -> None:
        """Assemble slice `index` from its classes' scores (no scores: background)."""
        if not scores:
            self.refined[index] = 0
            if self.sam_certainty is not None:
                self.sam_certainty[index] = 1.0
            return
        self.refined[index] = _assemble(labels, scores, self.refined.dtype,
                                        None if self.fused is None else self.fused[:, index])
        if self.sam_certainty is not None:
            self.sam_certainty[index] = torch.stack(scores).amax(dim=0).abs().sigmoid().cpu().numpy()

    def finish(self, cleaned: dict[int, np.ndarray], settings: RefineSettings,
               stats: dict[int, ClassStats]) -> np.ndarray:
        """The refined labels; with the band, the model's cleaned labels where it is sure (`_keep_confident`)."""
        if self.band is None:
            return self.refined
        return _keep_confident(self.refined, self.band, cleaned, settings.confident, stats, self.sam_certainty,
                               settings.band)


# --- the engine -------------------------------------------------------------------------------------------------

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

    def check_finetuned_for(self, labels: Sequence[int]) -> None:
        """Before any work: refuse `labels` that the checkpoint's fine-tuned class prompts do not know; warn when
        its decoder was fine-tuned on views of other intensities (`view_intensities`)."""
        record = self.model.finetuned
        if not record:
            return
        prompts = self.model.class_prompts
        unknown = [] if prompts is None else sorted({int(v) for v in labels} - set(prompts.labels))
        if unknown:
            raise SettingError("the class prompts of {path} were fine-tuned for labels {labels}, not {unknown}; "
                               "fine-tune them on this dataset (nnsam_finetune) or pass another {checkpoint}",
                               path=self.model.checkpoint, labels=prompts.labels, unknown=unknown)
        current = view_intensities(self.settings)
        if record.get("ct_window_units") == PREPROCESSED_UNITS:
            trained = "nnU-Net's normalised intensities"
        else:
            trained = record.get("intensities", current)  # (a record without it: no warning)
        if trained != current:
            logger.warning(SettingText("the SAM decoder in {path} was fine-tuned on views with {trained} but "
                                       "refinement shows {current}; fine-tune it again or pass the same {modality} "
                                       "and {ct_window}", path=self.model.checkpoint, trained=trained,
                                       current=current))

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
        case = self._prepare(image, mask, spacing, probabilities, labels)
        # 1. plan: the prompts per slice, and where class prompts may recover each class
        plan = Planner(self.settings).plan(case.initial, case.probabilities, case.labels, self._recoverable_labels(),
                                           case.views.geometry.spacing)
        stats = {label: ClassStats(label=label, voxels_before=int((case.initial == label).sum()))
                 for label in case.labels}
        run = EncodeRun(self._batches(case.views, plan))
        recovery, canvas = Recovery.start(plan.recovery), LabelCanvas.start(case, self.settings)
        # 2. encode each model input once, decode its slices (3. searching them for recoverable classes), 4. assemble
        for decoded in self._decode(case.views, plan, run, progress):
            _count_verdicts(stats, decoded)
            recovery.note(decoded)
            canvas.put(decoded.index, decoded.labels, decoded.scores)
        # 3. recover: keep the recovered slices that continue their object; assemble the others again without them
        for index, dropped in recovery.settle(stats).items():
            canvas.put(index, *recovery.pending[index].without(dropped))
        # 4. assemble: with the band, the model's sure labels stay; then the statistics of the final labels
        refined = canvas.finish(plan.cleaned, self.settings, stats)
        _count_voxels(stats, case.initial, refined)
        return RefineResult(mask=case.views.from_slices(refined), classes=stats, axis=case.views.axis,
                            slices_encoded=run.encoded,
                            intensities=describe_intensities(case.views.modality, self.settings.ct_window))

    def _prepare(self, image: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
                 probabilities: np.ndarray | None, labels: Iterable[int] | None) -> RefineInputs:
        """Check the case's arrays, build its views, and move the slicing axis first."""
        _check_arrays(image, mask, probabilities)
        if probabilities is not None and labels is None:
            labels = range(1, probabilities.shape[0])
        s = self.settings
        views = VolumeViews.prepare(image, spacing, self.model.input_size, s.context, s.axis, s.ct_window, s.grid,
                                    s.modality)
        initial = views.to_slices(mask)
        return RefineInputs(
            views=views, initial=initial,
            probabilities=None if probabilities is None else views.to_slices(probabilities, leading=1),
            labels=sorted(int(v) for v in (np.unique(initial) if labels is None else labels) if v > 0))

    def _recoverable_labels(self) -> list[int]:
        """The labels the model's class prompts may recover: none without class prompts, with recover_reach < 0,
        or on views the decoder was not fine-tuned on."""
        class_prompts = self.model.class_prompts
        if class_prompts is None or self.settings.recover_reach < 0 or not self.views_match:
            return []
        return list(class_prompts.labels)

    # --- stage 2: encode and decode ---

    def _batches(self, views: VolumeViews, plan: RefinePlan) -> list[list[int]]:
        """The model inputs that show the plan's slices, in order, `batch_size` per encoder call."""
        order = sorted({views.input_of(index) for index in plan.slices()})
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _decode(self, views: VolumeViews, plan: RefinePlan, run: EncodeRun,
                progress: bool) -> Iterator[SliceDecoding]:
        """Stage 2: encode each batch of model inputs once; decode, in order, every slice of theirs with work."""
        for batch in tqdm(run.batches, desc="SAM views", unit="batch", disable=not progress, leave=False):
            embeddings = self._embed(views.model_inputs(batch), run)
            for j, input_id in enumerate(batch):
                for index in views.slices_of(input_id):
                    if plan.has_work(index):  # (a tile also shows slices without prompts)
                        yield self._process_slice(embeddings[j:j + 1], index, views, plan)

    def _embed(self, inputs: np.ndarray, run: EncodeRun) -> torch.Tensor:
        """The embeddings of a batch of model inputs, from the cache where it has them; counts those encoded."""
        if self.cache is None:
            run.encoded += len(inputs)
            return self.model.encode(inputs)
        misses = self.cache.misses
        embeddings = self.cache.embeddings(inputs, self.batch_size)
        run.encoded += self.cache.misses - misses
        return embeddings

    def _process_slice(self, embedding: torch.Tensor, index: int, views: VolumeViews,
                       plan: RefinePlan) -> SliceDecoding:
        """Stages 2 and 3 on one slice: decode its prompts under the guard, then look for its recovery candidates."""
        geometry, prompts = views.geometry_of(index), plan.prompts.get(index, [])
        verdicts, scores = self._decode_prompts(embedding, prompts, geometry, views.volume[index],
                                                plan.initial_masks(index)) if prompts else ([], [])
        recovered = self._recover_slice(embedding, plan.recovery_at(index), index, geometry)
        found = [label for label, _ in recovered]
        return SliceDecoding(index, [p.label for p in prompts] + found, scores + [score for _, score in recovered],
                             verdicts, found)

    def _decode_prompts(self, embedding: torch.Tensor, prompts: list[SlicePrompt], geometry: ViewGeometry,
                        image: np.ndarray, initial_masks: list[np.ndarray]) -> tuple[list[Verdict], list[torch.Tensor]]:
        """Decode all prompts of one slice together and apply the guard: per prompt, the verdict and the score
        (SAM's logits where accepted, else `_guarded_score`)."""
        logits, ious = self._sam_logits(embedding, prompts, geometry)
        verdicts, scores = [], []
        for prompt, initial, slice_logits, iou in zip(prompts, initial_masks, logits, ious):
            verdicts.append(self._judge(prompt, initial, (slice_logits > 0).cpu().numpy(), iou, image))
            scores.append(_guarded_score(verdicts[-1], slice_logits, initial))
        return verdicts, scores

    def _sam_logits(self, embedding: torch.Tensor, prompts: list[SlicePrompt],
                    geometry: ViewGeometry) -> tuple[torch.Tensor, np.ndarray]:
        """SAM's logits on the slice grid (N, H, W) and IoU estimates (N,) for a slice's prompts: their boxes,
        and with box+points a second pass with the points and the first pass's masks."""
        s = self.settings
        margin = box_margin_pixels(geometry, s)
        boxes = geometry.boxes_to_input(np.stack([p.box for p in prompts]), margin)

        def decode(candidates: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
            decoded = self.model.decode(embedding, candidates)
            return decoded.low_res_logits, decoded.iou

        low_res, iou, boxes = decode_boxes(decode, boxes, s.box_scales, s.box_rounds, margin,
                                           geometry.input_size, geometry.bounds)
        if s.prompts == "box+points":
            points, point_labels = _point_arrays(prompts, geometry)
            decoded = self.model.decode(embedding, boxes, points, point_labels, low_res)
            low_res, iou = decoded.low_res_logits, decoded.iou
        return geometry.logits_to_slice(low_res), iou

    def _judge(self, prompt: SlicePrompt, initial: np.ndarray, sam_mask: np.ndarray, iou: np.floating,
               image: np.ndarray) -> Verdict:
        """The agreement guard: SAM's mask is accepted if SAM is confident (IoU estimate, a non-empty mask) and,
        as the prompt's source asks, it agrees with the initial mask (the prompt's area) and its border fits the
        image at least as well."""
        s, source = self.settings, source_of(prompt)
        accepted = bool(iou >= s.min_sam_iou and sam_mask.any())
        if accepted and source.agree:
            accepted = dice(initial, sam_mask) >= s.min_agreement
        if accepted and source.evidence and s.evidence:
            accepted = region_contrast(image, sam_mask) >= region_contrast(image, initial)
        return Verdict(prompt, source, float(iou), bool(accepted))

    # --- stage 3: recover (the search; `Recovery` settles it) ---

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


def _axis_name(axis: int | None) -> str:
    return "the through-plane axis" if axis is None else f"axis {axis}"


def _views_name(context: str | None, grid: int) -> str:
    return f"{context!r}" + (f" (grid {grid})" if context == "tile" else "")


def _check_arrays(image: np.ndarray, mask: np.ndarray, probabilities: np.ndarray | None) -> None:
    """The image and the mask must be 3D of one shape, the probabilities fit them (`_check_probabilities`)."""
    if image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} differs from mask shape {mask.shape}")
    if mask.ndim != 3:
        raise ValueError(f"expected 3D arrays (use shape (1, Y, X) for 2D images), got {mask.ndim}D")
    if probabilities is not None:
        _check_probabilities(probabilities, mask)


def _guarded_score(verdict: Verdict, slice_logits: torch.Tensor, initial: np.ndarray) -> torch.Tensor:
    """A prompt's score on its slice: SAM's logits where the guard accepted its mask, else -_KEEP_SCORE, and
    +_KEEP_SCORE on the initial mask where its source keeps that (a rejected probability box adds nothing)."""
    if verdict.accepted:
        return slice_logits.float()
    score = torch.full(slice_logits.shape, -_KEEP_SCORE, device=slice_logits.device)
    if verdict.source.keeps_initial:
        score[torch.from_numpy(initial).to(slice_logits.device)] = _KEEP_SCORE
    return score


def _count_verdicts(stats: dict[int, ClassStats], decoded: SliceDecoding) -> None:
    """Count a decoded slice's verdicts: SAM's IoU estimates, and per prompt source the slices accepted (and
    rejected); a slice that an accepted prompt adds to its class is remembered for the band."""
    for verdict in decoded.verdicts:
        stat, source = stats[verdict.prompt.label], verdict.source
        stat._iou_values.append(verdict.iou)
        _increment(stat, source.accepted_count, int(verdict.accepted))
        if source.rejected_count is not None:
            _increment(stat, source.rejected_count, int(not verdict.accepted))
        if verdict.accepted and source.adds_slice:
            stat._added_slices.add(decoded.index)


def _increment(stat: ClassStats, name: str, amount: int) -> None:
    setattr(stat, name, getattr(stat, name) + amount)


def _count_voxels(stats: dict[int, ClassStats], initial: np.ndarray, refined: np.ndarray) -> None:
    """The statistics of the final labels: voxels, Dice with the initial mask, SAM's mean IoU estimate."""
    for label, stat in stats.items():
        stat.voxels_after = int((refined == label).sum())
        stat.dice_initial_refined = dice(initial == label, refined == label)
        stat.mean_sam_iou = float(np.mean(stat._iou_values)) if stat._iou_values else None


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
                    stats: dict[int, ClassStats], sam_certainty: np.ndarray | None = None,
                    band: str = "class") -> np.ndarray:
    """The refined labels with the model's cleaned label wherever the model is sure of it: band "class", its
    probability of that foreground label is >= `threshold` (background is never locked); band "max", its highest
    probability, background included, is >= `threshold` (and, with `sam_certainty`, wherever SAM's probability of
    its own label is below `threshold`),
    counting per class the voxels each side decided and those where the model overruled SAM. A class's slices
    that the initial mask lacks but SAM added from 3D context (`ClassStats._added_slices`: boxes interpolated
    across a gap, recovered or found from the probability map) keep SAM's pixels of that class: there the
    model's slice-wise certainty is what the 3D context contradicts."""
    model_labels = np.zeros_like(refined)
    for label, mask in cleaned.items():
        model_labels[mask & (model_labels == 0)] = label
    if band == "class":
        own = np.take_along_axis(probs, model_labels[None].astype(np.int64), axis=0)[0]
        sure = (model_labels > 0) & (own >= threshold)
    else:
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
