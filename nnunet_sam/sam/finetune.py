"""Fine-tuning SAM's mask decoder on a few labelled volumes, on cached image embeddings (CFR's stage 2).

The image encoder and the prompt encoder stay frozen. Every labelled model input (a slice's view, or a
tile) is encoded once (`EmbeddingCache`, reused across epochs and runs); only the mask decoder learns,
with the class prompts if the model has them (`attach_class_prompts`, trained on the slices next to the
objects too). Each step shows the
decoder, for every class on a slice, a box grown by the refinement's margin and jittered: the true box, or
(`weak_prompts` of the time) the box of an imperfect mask (`sam/weak_prompts.py`: the kind of box a weak
model's mask gives refinement), and fits the masks with Dice + BCE on the slice grid and the IoU estimate
(which the refinement guard reads) with MSE. Views are built by `VolumeViews`, exactly as refinement
builds them, so the fine-tuned decoder is used on the kind of input it learnt from.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nnunet_sam.errors import NnsamError, SettingError, SettingText
from nnunet_sam.sam.embedding_cache import EmbeddingCache
from nnunet_sam.sam.class_prompts import PROMPT_MODES, ClassPrompts, class_prototypes
from nnunet_sam.sam.models import CLASS_PROMPTS_KEY, FINETUNE_KEY, SamModel, read_checkpoint
from nnunet_sam.sam.prompts import bounding_box
from nnunet_sam.sam.refine import RefineSettings, box_margin_pixels, encoder_batch_size, view_intensities
from nnunet_sam.sam.views import ViewGeometry, VolumeViews
from nnunet_sam.sam.weak_prompts import imperfect_mask
from nnunet_sam.utils.atomic import atomic_path

logger = logging.getLogger(__name__)


@dataclass
class LabelledVolume:
    """A labelled case: image (Z, Y, X, one channel chosen), integer labels of the same shape, spacing."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: Sequence[float]
    ignore: np.ndarray | None = None  # bool, True where the labels say nothing (nnU-Net's ignore label)


@dataclass
class SliceExample:
    """One labelled slice: where its embedding is cached, its geometry, and its classes' true masks."""

    case: str
    index: int  # slice index along the slicing axis
    key: str  # EmbeddingCache key of the slice's model input
    geometry: ViewGeometry
    labels: np.ndarray  # (K,) the classes on this slice (K = 0 on a slice without foreground)
    masks: np.ndarray  # (K, H, W) bool, on the slice grid
    boxes: np.ndarray  # (K, 4) tight xyxy boxes in slice pixels
    valid: np.ndarray | None = None  # (H, W) bool: pixels the labels speak for (None: all)


@dataclass
class FinetuneSettings:
    """How the decoder is trained; the defaults suit LiteMedSAM on a few volumes."""

    epochs: int = 30  # passes over the slices; more when that is fewer than `min_steps` optimiser steps
    min_steps: int = 500  # a few labelled slices still get this many steps (2 slices x 30 epochs: only 60)
    learning_rate: float = 1e-4  # AdamW, cosine decay to 0 over all steps
    weight_decay: float = 0.01
    slices_per_step: int = 1  # slices (with all their classes) per optimiser step (few slices: many steps)
    box_jitter: float = 0.1  # each box side moves by up to this fraction of the box size (at least 2 px)
    weak_prompts: float = 0.5  # fraction of box prompts taken from an imperfect mask instead of the truth
    min_pixels: int = 4  # a class shown on fewer pixels of a slice is not trained on there
    prompt_lr_factor: float = 100.0  # class prompts (new, untrained) learn this many times faster
    class_prompts: str | None = None  # also train prompt-free class prompts: "learnt" or "fewshot"
    negatives: int = 3  # with class prompts: also train on slices this close to foreground (where a class ends)
    seed: int = 0

    def epochs_for(self, slices: int) -> int:
        """Epochs over `slices` training slices: `epochs`, or more to reach `min_steps` optimiser steps."""
        steps_per_epoch = max(1, -(-slices // self.slices_per_step))
        return max(self.epochs, -(-self.min_steps // steps_per_epoch))

    @property
    def slices_beyond_foreground(self) -> int:
        """How far from foreground `slice_examples` should reach: `negatives` with class prompts, else 0."""
        return self.negatives if self.class_prompts else 0


@dataclass
class EpochRecord:
    """Mean training loss and wall time of one epoch."""

    epoch: int
    loss: float
    seconds: float


@dataclass
class FinetuneResult:
    """What `DecoderFinetuner.fit` did: per-epoch records and how much it trained on."""

    history: list[EpochRecord] = field(default_factory=list)
    slices: int = 0
    masks: int = 0
    resumed_epochs: int = 0  # epochs an interrupted run had finished (fit's `resume`)

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([r.seconds for r in self.history])) if self.history else 0.0


def slice_examples(volumes: Iterable[LabelledVolume], cache: EmbeddingCache, settings: RefineSettings,
                   labels: Sequence[int] | None = None, min_pixels: int = 4, negatives: int = 0,
                   progress: bool = False) -> list[SliceExample]:
    """The slices with foreground of every volume (and, for `negatives` > 0, the slices up to that many
    slices away from foreground, which teach class prompts where a class ends), their model inputs'
    embeddings cached (encoded only if not yet).

    settings: the refinement settings whose views (context, axis, CT window, grid) the decoder will serve.
    labels: the classes to learn (default: every label > 0 found)."""
    examples: list[SliceExample] = []
    model = cache.model
    for volume in volumes:
        if volume.image.shape != volume.labels.shape:
            raise NnsamError(f"{volume.name}: image shape {volume.image.shape} differs from its labels' "
                             f"{volume.labels.shape}")
        views = VolumeViews.prepare(volume.image, volume.spacing, model.input_size, settings.context,
                                    settings.axis, settings.ct_window, settings.grid, settings.modality)
        truth = views.to_slices(volume.labels)
        ignored = None if volume.ignore is None else views.to_slices(volume.ignore)
        wanted = [int(v) for v in np.unique(truth) if v > 0] if labels is None else [int(v) for v in labels]
        present = {index: [label for label in wanted if int((truth[index] == label).sum()) >= min_pixels]
                   for index in range(truth.shape[0])}
        with_foreground = [index for index, found in present.items() if found]
        chosen = sorted({i for index in with_foreground
                         for i in range(max(0, index - negatives), min(truth.shape[0], index + negatives + 1))})
        inputs = sorted({views.input_of(index) for index in chosen})
        batch = encoder_batch_size(settings, model.device)
        chunks = [inputs[i:i + 16] for i in range(0, len(inputs), 16)]
        keys: dict[int, str] = {}
        for chunk in tqdm(chunks, desc=f"embeddings {volume.name}", unit="chunk", disable=not progress, leave=False):
            keys.update(zip(chunk, cache.ensure(views.model_inputs(chunk), batch)))
        for index in chosen:
            found = present[index]
            masks = np.stack([truth[index] == label for label in found]) if found else \
                np.zeros((0, *truth.shape[1:]), dtype=bool)
            valid = None if ignored is None or not ignored[index].any() else ~ignored[index]
            examples.append(SliceExample(case=volume.name, index=index, key=keys[views.input_of(index)],
                                         geometry=views.geometry_of(index), labels=np.array(found, dtype=int),
                                         masks=masks, boxes=np.stack([bounding_box(m) for m in masks]) if found
                                         else np.zeros((0, 4), dtype=int), valid=valid))
    return examples


def jittered_boxes(boxes: np.ndarray, geometry: ViewGeometry, margin: float, jitter: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Model-input boxes of tight slice boxes: grown by `margin`, each side moved at random by up to
    `jitter` of the box's size (at least 2 input pixels), kept inside the image and non-degenerate."""
    boxes = geometry.boxes_to_input(boxes, margin)
    size = np.maximum(boxes[:, 2:] - boxes[:, :2], 1.0)
    amplitude = np.maximum(2.0, jitter * np.concatenate([size, size], axis=1))
    moved = boxes + rng.uniform(-1.0, 1.0, boxes.shape) * amplitude
    first, last = geometry.bounds[:2], geometry.bounds[2:]
    moved = np.clip(moved, np.tile(first, 2), np.tile(last, 2))
    low = np.minimum(moved[:, :2], moved[:, 2:])
    high = np.minimum(np.maximum(np.maximum(moved[:, :2], moved[:, 2:]), low + 1), last)
    low = np.maximum(np.minimum(low, high - 1), first)  # at the far edge a box grows inwards
    return np.concatenate([low, high], axis=1)


def training_boxes(example: SliceExample, weak_prompts: float, rng: np.random.Generator) -> np.ndarray:
    """The example's tight slice boxes, each replaced with probability `weak_prompts` by the box of an
    imperfect version of its class's mask (`imperfect_mask`)."""
    boxes = example.boxes.astype(float)
    if weak_prompts <= 0:  # no draw: true boxes only trains exactly as before weak prompts existed
        return boxes
    for k in np.flatnonzero(rng.random(len(boxes)) < weak_prompts):
        boxes[k] = bounding_box(imperfect_mask(example.masks[k], rng))
    return boxes


def mask_losses(logits: torch.Tensor, targets: torch.Tensor,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE (mean over pixels) + soft Dice loss (mean over masks) of (K, H, W) logits, and the masks' IoU
    (K,) of the thresholded logits, for the IoU head's target. valid: (H, W) weights, 0 where the labels
    say nothing (ignored pixels count for neither loss nor IoU)."""
    weight = torch.ones_like(targets[0]) if valid is None else valid.to(targets.dtype)
    bce = (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight).sum() / (
        weight.sum().clamp(min=1) * len(targets))
    probabilities = torch.sigmoid(logits) * weight
    intersection = (probabilities * targets).sum(dim=(1, 2))
    dice = (2 * intersection + 1) / (probabilities.sum(dim=(1, 2)) + (targets * weight).sum(dim=(1, 2)) + 1)
    with torch.no_grad():
        hard = (logits > 0) & (weight > 0)
        truth = targets > 0.5
        iou = (hard & truth).sum(dim=(1, 2)) / (hard | truth).sum(dim=(1, 2)).clamp(min=1)
    return bce + (1 - dice).mean(), iou.float()


def attach_class_prompts(model: SamModel, cache: EmbeddingCache, examples: Sequence[SliceExample],
                         labels: Sequence[int], mode: str = "learnt") -> ClassPrompts:
    """Give `model` untrained class prompts for `labels` ("learnt", or "fewshot" with prototypes pooled
    from the examples' embeddings); `DecoderFinetuner` then trains them with the decoder."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"class prompt mode must be one of {PROMPT_MODES}, got {mode!r}")
    prototypes = class_prototypes(cache, examples, labels).to(model.device) if mode == "fewshot" else None
    model.class_prompts = ClassPrompts.initial(model, labels, prototypes)
    return model.class_prompts


class DecoderFinetuner:
    """Trains `model`'s mask decoder (and its class prompts, if it has them: `attach_class_prompts`) in
    place on slice examples; `restore()` puts the original back."""

    def __init__(self, model: SamModel, cache: EmbeddingCache, refine_settings: RefineSettings,
                 settings: FinetuneSettings | None = None) -> None:
        self.model, self.cache = model, cache
        self.refine_settings = refine_settings
        self.settings = settings or FinetuneSettings()
        self.initial_state = copy.deepcopy(model.module.mask_decoder.state_dict())
        self.initial_prompts = copy.deepcopy(model.class_prompts)

    def restore(self) -> None:
        """The decoder and class prompts as they were when this finetuner was made (the zero-shot model)."""
        self.model.module.mask_decoder.load_state_dict(self.initial_state)
        self.model.class_prompts = copy.deepcopy(self.initial_prompts)

    def decoder_state(self) -> dict:
        """A copy of the decoder's current weights."""
        return copy.deepcopy(self.model.module.mask_decoder.state_dict())

    def fit(self, examples: list[SliceExample], progress: bool = True, state_path: str | Path | None = None,
            resume: bool = False) -> FinetuneResult:
        """Train for `epochs_for(len(examples))` epochs over `examples`; returns the loss and time per epoch.

        state_path: where to keep a resumable training state (`training_state_path` of the checkpoint), written
        atomically after each epoch (see `_STATE_SAVE_SHARE`) and after the last; `save_finetuned` removes it.
        resume: go on from that state (refused unless it was written for the same training: see
        `training_fingerprint`); without `resume` an existing state is discarded. The seeded random draws, the
        slice order, the optimiser and the learning-rate schedule go on where they stopped, so a resumed run
        ends with the same weights as an uninterrupted one (bit for bit on CPU)."""
        if not any(len(e.labels) for e in examples) and not (examples and self.model.class_prompts is not None):
            raise NnsamError("no labelled slices to fine-tune on (are the training cases' labels empty?)")
        s = self.settings
        rng = np.random.default_rng(s.seed)
        torch.manual_seed(s.seed)
        module = self.model.module
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        decoder = module.mask_decoder
        groups = [{"params": list(decoder.parameters()), "lr": s.learning_rate}]
        if self.model.class_prompts is not None:  # new parameters, far from their optimum: a faster rate
            groups.append({"params": list(self.model.class_prompts.parameters()),
                           "lr": s.learning_rate * s.prompt_lr_factor, "weight_decay": 0.0})
        parameters = [parameter for group in groups for parameter in group["params"]]
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimiser = torch.optim.AdamW(groups, lr=s.learning_rate, weight_decay=s.weight_decay)
        steps_per_epoch = -(-len(examples) // s.slices_per_step)
        epoch_count = s.epochs_for(len(examples))
        if epoch_count > s.epochs:
            logger.info("%d slice(s) x %d epochs would be fewer than %d optimiser steps (min_steps): training %d "
                        "epochs", len(examples), s.epochs, s.min_steps, epoch_count)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epoch_count * steps_per_epoch)
        result = FinetuneResult(slices=len(examples), masks=int(sum(len(e.labels) for e in examples)))
        saver = None
        if state_path is not None:
            saver = _StateSaver(Path(state_path), training_fingerprint(self.model, self.refine_settings, s, examples),
                                self.model, optimiser, schedule, rng)
            saver.start(resume, result, epoch_count)
        decoder.train()
        try:
            epochs = tqdm(range(len(result.history), epoch_count), desc="fine-tune decoder", unit="epoch",
                          disable=not progress, initial=len(result.history), total=epoch_count)
            for epoch in epochs:
                started, losses = time.perf_counter(), []
                order = rng.permutation(len(examples))
                for start in range(0, len(order), s.slices_per_step):
                    batch = [examples[i] for i in order[start:start + s.slices_per_step]]
                    loss = self._batch_loss(batch, rng)
                    if not loss.requires_grad:  # slices without foreground and no class prompts to train
                        continue
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    schedule.step()
                    losses.append(float(loss.detach()))
                record = EpochRecord(epoch=epoch, loss=float(np.mean(losses)),
                                     seconds=time.perf_counter() - started)
                result.history.append(record)
                epochs.set_postfix(loss=f"{record.loss:.4f}")
                logger.debug("epoch %d: loss %.4f (%.1f s)", epoch, record.loss, record.seconds)
                if saver is not None:
                    saver.epoch_done(result, last=epoch + 1 == epoch_count)
        finally:
            decoder.eval()
            for parameter in parameters:
                parameter.requires_grad_(False)
        return result

    def _batch_loss(self, batch: list[SliceExample], rng: np.random.Generator) -> torch.Tensor:
        """Mean over the batch's slices of the box-prompted loss (slices with foreground) plus, with class
        prompts, the prompt-free loss of every class (an absent class's target is an empty mask)."""
        s = self.settings
        embeddings = self.cache.load([example.key for example in batch])
        prompts = self.model.class_prompts
        total = torch.zeros((), device=self.model.device)
        for j, example in enumerate(batch):
            embedding = embeddings[j:j + 1]
            if len(example.labels):
                boxes = jittered_boxes(training_boxes(example, s.weak_prompts, rng), example.geometry,
                                       box_margin_pixels(example.geometry, self.refine_settings),
                                       s.box_jitter, rng)
                total = total + self._example_loss(example, *self.model.decoder_logits(embedding, boxes),
                                                   example.masks)
            if prompts is not None:
                targets = np.stack([example.masks[example.labels == label].any(axis=0) for label in prompts.labels])
                logits, _ = self.model.class_logits(embedding, prompts.labels)
                total = total + self._example_loss(example, logits, None, targets)
        return total / len(batch)

    def _example_loss(self, example: SliceExample, low_res: torch.Tensor, iou_estimate: torch.Tensor | None,
                      masks: np.ndarray) -> torch.Tensor:
        """Dice + BCE on the slice grid, plus the IoU head's MSE if its estimate is given (box prompts: the
        refinement guard reads it; class prompts are judged by their stability instead)."""
        logits = example.geometry.logits_to_slice(low_res)
        targets = torch.from_numpy(masks).to(logits.device, torch.float32)
        valid = None if example.valid is None else torch.from_numpy(example.valid).to(logits.device)
        loss, iou = mask_losses(logits, targets, valid)
        return loss if iou_estimate is None else loss + F.mse_loss(iou_estimate, iou)


TRAINING_STATE_FORMAT = "nnsam_finetune training state"  # the marker that tells a state from other .pth files
TRAINING_STATE_VERSION = 1
_STATE_SAVE_SHARE = 0.1  # the state is written after an epoch if writing it takes at most this share of the time
# since it was last written (many short epochs: not after each); always after the first and the last epoch

_FINGERPRINT_NAMES = {  # how a refused resume names what changed, where that is not the setting of the
    # fingerprint key's last part (views.grid: {grid}); SettingText fields
    "sam": "{model_type}", "settings.class_prompts": "class prompts ({context}/{prompts})",
    "cases": "training cases ({fold}, splits_final.json)", "slices": "number of labelled training slices",
    "digest": "training slices (their images, labels or views)",
}


def training_state_path(checkpoint: str | Path) -> Path:
    """Where fine-tuning toward `checkpoint` keeps its resumable state: CHECKPOINT_STEM.partial.pth beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.partial.pth")


def training_fingerprint(model: SamModel, refine_settings: RefineSettings, settings: FinetuneSettings,
                         examples: Sequence[SliceExample]) -> dict:
    """What a training state is valid for (JSON-like): the model and its base checkpoint, the views, the
    settings, the training cases and a digest of their slices (cache keys, classes, masks, ignored pixels)."""
    digest = hashlib.sha1()
    for example in examples:
        digest.update(f"{example.case}/{example.index}/{example.key}/{example.labels.tolist()}".encode())
        digest.update(np.packbits(example.masks).tobytes())
        if example.valid is not None:
            digest.update(np.packbits(example.valid).tobytes())
    checkpoint = None if model.checkpoint is None else str(Path(model.checkpoint).resolve())
    return json.loads(json.dumps({
        "sam": model.name, "checkpoint": checkpoint, "views": view_record(refine_settings),
        "settings": asdict(settings), "cases": list(dict.fromkeys(e.case for e in examples)),
        "slices": len(examples), "digest": digest.hexdigest()}))


def read_training_state(path: str | Path, fingerprint: dict | None = None) -> dict:
    """The training state `DecoderFinetuner.fit` wrote to `path` (tensors on the CPU). One-line NnsamErrors for
    a file it did not write and, given `fingerprint` (`training_fingerprint`), for a state of another training."""
    path = Path(path)
    if not path.is_file():
        raise NnsamError(f"training state {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several types for files that are not its own
        state = None
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise SettingError("{path} exists and is not a training state written by nnsam_finetune; move it away or "
                           "choose another {output}", path=path)
    if state.get("version") != TRAINING_STATE_VERSION:
        raise SettingError("{path} was written by another version of nnsam_finetune; rerun without {resume} to "
                           "start over", path=path)
    if fingerprint is not None:
        _check_fingerprint(path, json.loads(state["fingerprint"]), fingerprint)
    return state


def _check_fingerprint(path: Path, then: dict, now: dict) -> None:
    """Refuse (one line) a state whose training differs from now's, naming the first difference's setting."""
    def flat(fingerprint: dict) -> dict:
        return {f"{key}.{inner}" if isinstance(value, dict) else key: inner_value
                for key, value in fingerprint.items()
                for inner, inner_value in (value.items() if isinstance(value, dict) else [(key, value)])}

    then, now = flat(then), flat(now)
    for key in list(now) + [key for key in then if key not in now]:
        if then.get(key) != now.get(key):
            name = _FINGERPRINT_NAMES.get(key, "{" + key.rpartition(".")[2] + "}")
            values = "" if key == "digest" else f": {_short(then.get(key))} then, {_short(now.get(key))} now"
            raise SettingError("cannot resume from {path}: the interrupted run had other " + name + "{values}; rerun "
                               "with its options, or without {resume} to start over", path=path, values=values)


def _short(value: object, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _StateSaver:
    """Writes `DecoderFinetuner.fit`'s training state after epochs and restores it (see `fit`)."""

    def __init__(self, path: Path, fingerprint: dict, model: SamModel, optimiser: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator) -> None:
        self.path, self.fingerprint, self.model = path, fingerprint, model
        self.optimiser, self.schedule, self.rng = optimiser, schedule, rng
        self.saved_at, self.save_seconds = time.perf_counter(), 0.0

    def start(self, resume: bool, result: FinetuneResult, epoch_count: int) -> None:
        """Resume from the state (`resume`: into `result` and the training objects), or discard it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            if resume:
                logger.info("no training state %s to resume: training starts at epoch 1 of %d", self.path, epoch_count)
            return
        state = read_training_state(self.path, self.fingerprint if resume else None)
        if not resume:
            logger.info(SettingText("discarding {path}, the training state of an interrupted run ({resume} resumes "
                                    "it): training starts over", path=self.path))
            self.path.unlink()
            return
        prompts = self.model.class_prompts
        if (prompts is None) != (state["class_prompts"] is None):
            trained = "did not train" if prompts is not None else "trained"
            raise SettingError("cannot resume from {path}: the interrupted run {trained} class prompts; rerun "
                               "without {resume} to start over", path=self.path, trained=trained)
        self.model.module.mask_decoder.load_state_dict(state["decoder"])
        if prompts is not None:
            prompts.load_state_dict(state["class_prompts"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng.bit_generator.state = json.loads(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.model.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.model.device)
        result.history[:] = [EpochRecord(**record) for record in state["history"]]
        result.resumed_epochs = len(result.history)
        logger.info("resuming at epoch %d of %d (%s)", len(result.history) + 1, epoch_count, self.path)

    def epoch_done(self, result: FinetuneResult, last: bool) -> None:
        """Write the state after an epoch: always after the last, else if it keeps writing cheap enough."""
        started = time.perf_counter()
        if not last and (started - self.saved_at) * _STATE_SAVE_SHARE < self.save_seconds:
            return
        prompts = self.model.class_prompts
        cuda = self.model.device.type == "cuda"
        state = {
            "format": TRAINING_STATE_FORMAT, "version": TRAINING_STATE_VERSION,
            "fingerprint": json.dumps(self.fingerprint), "epochs_done": len(result.history),
            "history": [asdict(record) for record in result.history],
            "decoder": self.model.module.mask_decoder.state_dict(),
            "class_prompts": None if prompts is None else prompts.state_dict(),
            "optimiser": self.optimiser.state_dict(), "schedule": self.schedule.state_dict(),
            "numpy_rng": json.dumps(self.rng.bit_generator.state), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.model.device) if cuda else None,
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        self.saved_at = time.perf_counter()
        self.save_seconds = self.saved_at - started


@torch.inference_mode()
def decoder_dice(model: SamModel, cache: EmbeddingCache, examples: list[SliceExample],
                 settings: RefineSettings) -> dict[str, dict[int, float]]:
    """Dice per case and class of the decoder's masks from the true boxes (grown by the settings' margin, no guard,
    classes resolved by the highest logit), over the slices that have the class: the decoder alone."""
    scores = _DiceSums()
    for example in examples:
        if len(example.labels):
            boxes = example.geometry.boxes_to_input(example.boxes, box_margin_pixels(example.geometry, settings))
            low_res = model.decode(cache.load([example.key]), boxes).low_res_logits
            scores.add(example, example.labels, example.geometry.logits_to_slice(low_res))
    return scores.dice()


@torch.inference_mode()
def class_prompt_dice(model: SamModel, cache: EmbeddingCache,
                      examples: list[SliceExample]) -> dict[str, dict[int, float]]:
    """Dice per case and class of the prompt-free masks (`model.class_prompts`, no box, classes resolved by
    the highest logit) over all the examples' slices, those without the class included."""
    labels = np.array(model.class_prompts.labels)
    scores = _DiceSums()
    for example in examples:
        low_res, _ = model.class_logits(cache.load([example.key]), labels)
        scores.add(example, labels, example.geometry.logits_to_slice(low_res))
    return scores.dice()


class _DiceSums:
    """2|A and B| and |A| + |B| per case and class, summed over slices."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[int, list[int]]] = {}

    def add(self, example: SliceExample, labels: np.ndarray, logits: torch.Tensor) -> None:
        best, winner = logits.max(dim=0)
        predicted = np.where((best > 0).cpu().numpy(), winner.cpu().numpy(), -1)
        valid = np.ones(predicted.shape, dtype=bool) if example.valid is None else example.valid
        for k, label in enumerate(labels):
            hits = np.flatnonzero(example.labels == label)
            truth = example.masks[hits[0]] if len(hits) else np.zeros(predicted.shape, dtype=bool)
            mask = (predicted == k) & valid
            counts = self.sums.setdefault(example.case, {}).setdefault(int(label), [0, 0])
            counts[0] += 2 * int((mask & truth).sum())
            counts[1] += int(mask.sum()) + int(truth.sum())

    def dice(self) -> dict[str, dict[int, float]]:
        return {case: {label: (a / b if b else 1.0) for label, (a, b) in sorted(per.items())}
                for case, per in self.sums.items()}


def save_finetuned(model: SamModel, path: str | Path, record: dict) -> Path:
    """Write the model as a checkpoint that `load_sam(model.name, path)` loads like the base model: the base
    checkpoint's weights with the fine-tuned decoder in place, plus `record` (JSON-like: what was trained
    on, the views' settings) and the class prompts, if any. Written atomically; the training state kept beside it
    (`training_state_path`) is then removed."""
    if model.checkpoint is None:
        raise NnsamError("the model has no base checkpoint to write the fine-tuned decoder into")
    state, _ = read_checkpoint(Path(model.checkpoint), model.name)
    state = dict(state)
    decoder = {f"mask_decoder.{k}": v.detach().cpu().clone() for k, v in model.module.mask_decoder.state_dict().items()}
    unknown = sorted(set(decoder) - set(state))
    if unknown:
        raise NnsamError(f"base checkpoint {model.checkpoint} has no {unknown[0]}; cannot write the fine-tuned decoder")
    state.update(decoder)
    try:  # torch.load(weights_only=True) accepts only plain types: numpy strings and the like become JSON's
        record = json.loads(json.dumps({"sam": model.name, **record}))
    except TypeError as exc:
        raise NnsamError(f"the fine-tune record is not JSON-like ({exc})") from None
    if model.class_prompts is not None:
        record[CLASS_PROMPTS_KEY] = model.class_prompts.to_checkpoint()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"model": state, FINETUNE_KEY: record}, tmp)
    training_state_path(path).unlink(missing_ok=True)  # the checkpoint supersedes the state training kept
    return path


def view_record(settings: RefineSettings) -> dict:
    """The refinement settings that shape the views (what a checkpoint's decoder was trained on)."""
    window = None if settings.ct_window is None else [float(v) for v in settings.ct_window]
    return {"context": settings.context, "axis": settings.axis, "ct_window": window,
            "modality": settings.modality, "intensities": view_intensities(settings),
            "box_margin": float(settings.box_margin), "box_margin_unit": settings.box_margin_unit,
            "grid": int(settings.grid)}
