"""Fine-tuning SAM's mask decoder on a few labelled volumes, on cached image embeddings (CFR's stage 2).

The image encoder and the prompt encoder stay frozen. Every labelled slice is encoded once
(`EmbeddingCache`, reused across epochs and runs); only the mask decoder learns. Each step shows the
decoder, for every class on a slice, the true box grown by the refinement's margin and jittered (where a
weak model's mask would put it), and fits the masks with Dice + BCE on the slice grid and the IoU estimate
(which the refinement guard reads) with MSE. Views are built by `VolumeViews`, exactly as refinement
builds them, so the fine-tuned decoder is used on the kind of input it learnt from.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nnunet_sam.errors import NnsamError
from nnunet_sam.sam.embedding_cache import EmbeddingCache
from nnunet_sam.sam.models import FINETUNE_KEY, SamModel, read_checkpoint
from nnunet_sam.sam.prompts import bounding_box
from nnunet_sam.sam.refine import RefineSettings, encoder_batch_size
from nnunet_sam.sam.views import ViewGeometry, VolumeViews
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
    labels: np.ndarray  # (K,) the classes on this slice
    masks: np.ndarray  # (K, H, W) bool, on the slice grid
    boxes: np.ndarray  # (K, 4) tight xyxy boxes in slice pixels
    valid: np.ndarray | None = None  # (H, W) bool: pixels the labels speak for (None: all)


@dataclass
class FinetuneSettings:
    """How the decoder is trained; the defaults suit LiteMedSAM on a few volumes."""

    epochs: int = 30
    learning_rate: float = 1e-4  # AdamW, cosine decay to 0 over all steps
    weight_decay: float = 0.01
    slices_per_step: int = 4  # slices (with all their classes) per optimiser step
    box_jitter: float = 0.1  # each box side moves by up to this fraction of the box size (at least 2 px)
    min_pixels: int = 4  # a class shown on fewer pixels of a slice is not trained on there
    seed: int = 0


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

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([r.seconds for r in self.history])) if self.history else 0.0


def slice_examples(volumes: Iterable[LabelledVolume], cache: EmbeddingCache, settings: RefineSettings,
                   labels: Sequence[int] | None = None, min_pixels: int = 4,
                   progress: bool = False) -> list[SliceExample]:
    """The slices with foreground of every volume, their embeddings cached (encoded only if not yet).

    settings: the refinement settings whose views (context, axis, CT window) the decoder will serve.
    labels: the classes to learn (default: every label > 0 found)."""
    examples: list[SliceExample] = []
    model = cache.model
    for volume in volumes:
        if volume.image.shape != volume.labels.shape:
            raise NnsamError(f"{volume.name}: image shape {volume.image.shape} differs from its labels' "
                             f"{volume.labels.shape}")
        views = VolumeViews.prepare(volume.image, volume.spacing, model.input_size, settings.context,
                                    settings.axis, settings.ct_window)
        truth = views.to_slices(volume.labels)
        ignored = None if volume.ignore is None else views.to_slices(volume.ignore)
        wanted = [int(v) for v in np.unique(truth) if v > 0] if labels is None else [int(v) for v in labels]
        per_slice = []
        for index in range(truth.shape[0]):
            present = [label for label in wanted if int((truth[index] == label).sum()) >= min_pixels]
            if present:
                per_slice.append((index, present))
        batch = encoder_batch_size(settings, model.device)
        chunks = [per_slice[i:i + 16] for i in range(0, len(per_slice), 16)]
        for chunk in tqdm(chunks, desc=f"embeddings {volume.name}", unit="chunk", disable=not progress, leave=False):
            keys = cache.ensure(views.model_inputs([index for index, _ in chunk]), batch)
            for key, (index, present) in zip(keys, chunk):
                masks = np.stack([truth[index] == label for label in present])
                valid = None if ignored is None or not ignored[index].any() else ~ignored[index]
                examples.append(SliceExample(case=volume.name, index=index, key=key, geometry=views.geometry,
                                             labels=np.array(present), masks=masks,
                                             boxes=np.stack([bounding_box(m) for m in masks]), valid=valid))
    return examples


def jittered_boxes(boxes: np.ndarray, geometry: ViewGeometry, margin: float, jitter: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Model-input boxes of tight slice boxes: grown by `margin`, each side moved at random by up to
    `jitter` of the box's size (at least 2 input pixels), kept inside the image and non-degenerate."""
    boxes = geometry.boxes_to_input(boxes, margin)
    size = np.maximum(boxes[:, 2:] - boxes[:, :2], 1.0)
    amplitude = np.maximum(2.0, jitter * np.concatenate([size, size], axis=1))
    moved = boxes + rng.uniform(-1.0, 1.0, boxes.shape) * amplitude
    h, w = geometry.resized_shape
    moved = np.clip(moved, 0, [w - 1, h - 1, w - 1, h - 1])
    low = np.minimum(moved[:, :2], moved[:, 2:])
    high = np.minimum(np.maximum(np.maximum(moved[:, :2], moved[:, 2:]), low + 1), [w - 1, h - 1])
    low = np.clip(np.minimum(low, high - 1), 0, None)  # at the far edge a box grows inwards
    return np.concatenate([low, high], axis=1)


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


class DecoderFinetuner:
    """Trains `model`'s mask decoder in place on slice examples; `restore()` puts the original back."""

    def __init__(self, model: SamModel, cache: EmbeddingCache, refine_settings: RefineSettings,
                 settings: FinetuneSettings | None = None) -> None:
        self.model, self.cache = model, cache
        self.refine_settings = refine_settings
        self.settings = settings or FinetuneSettings()
        self.initial_state = copy.deepcopy(model.module.mask_decoder.state_dict())

    def restore(self) -> None:
        """The decoder as it was before fitting (the zero-shot model)."""
        self.model.module.mask_decoder.load_state_dict(self.initial_state)

    def decoder_state(self) -> dict:
        """A copy of the decoder's current weights."""
        return copy.deepcopy(self.model.module.mask_decoder.state_dict())

    def fit(self, examples: list[SliceExample], progress: bool = True) -> FinetuneResult:
        """Train for `settings.epochs` epochs over `examples`; returns the loss and time per epoch."""
        if not examples:
            raise NnsamError("no labelled slices to fine-tune on (are the training cases' labels empty?)")
        s = self.settings
        rng = np.random.default_rng(s.seed)
        torch.manual_seed(s.seed)
        module = self.model.module
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        decoder = module.mask_decoder
        parameters = list(decoder.parameters())
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimiser = torch.optim.AdamW(parameters, lr=s.learning_rate, weight_decay=s.weight_decay)
        steps_per_epoch = -(-len(examples) // s.slices_per_step)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=s.epochs * steps_per_epoch)
        result = FinetuneResult(slices=len(examples), masks=int(sum(len(e.labels) for e in examples)))
        decoder.train()
        try:
            epochs = tqdm(range(s.epochs), desc="fine-tune decoder", unit="epoch", disable=not progress)
            for epoch in epochs:
                started, losses = time.perf_counter(), []
                order = rng.permutation(len(examples))
                for start in range(0, len(order), s.slices_per_step):
                    batch = [examples[i] for i in order[start:start + s.slices_per_step]]
                    loss = self._batch_loss(batch, rng)
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
        finally:
            decoder.eval()
            for parameter in parameters:
                parameter.requires_grad_(False)
        return result

    def _batch_loss(self, batch: list[SliceExample], rng: np.random.Generator) -> torch.Tensor:
        s, margin = self.settings, self.refine_settings.box_margin
        embeddings = self.cache.load([example.key for example in batch])
        total = torch.zeros((), device=self.model.device)
        for j, example in enumerate(batch):
            boxes = jittered_boxes(example.boxes, example.geometry, margin, s.box_jitter, rng)
            low_res, iou_estimate = self.model.decoder_logits(embeddings[j:j + 1], boxes)
            logits = example.geometry.logits_to_slice(low_res)
            targets = torch.from_numpy(example.masks).to(logits.device, torch.float32)
            valid = None if example.valid is None else torch.from_numpy(example.valid).to(logits.device)
            loss, iou = mask_losses(logits, targets, valid)
            total = total + loss + F.mse_loss(iou_estimate, iou)
        return total / len(batch)


@torch.inference_mode()
def decoder_dice(model: SamModel, cache: EmbeddingCache, examples: list[SliceExample],
                 margin: float) -> dict[str, dict[int, float]]:
    """Dice per case and class of the decoder's masks from the true boxes (grown by `margin`, no guard,
    classes resolved by the highest logit), over the slices that have the class: the decoder alone."""
    sums: dict[str, dict[int, list[int]]] = {}
    for example in examples:
        embedding = cache.load([example.key])
        boxes = example.geometry.boxes_to_input(example.boxes, margin)
        logits = example.geometry.logits_to_slice(model.decode(embedding, boxes).low_res_logits)
        best, winner = logits.max(dim=0)
        predicted = np.where((best > 0).cpu().numpy(), winner.cpu().numpy(), -1)
        valid = np.ones(predicted.shape, dtype=bool) if example.valid is None else example.valid
        for k, (label, truth) in enumerate(zip(example.labels, example.masks)):
            mask = (predicted == k) & valid
            counts = sums.setdefault(example.case, {}).setdefault(int(label), [0, 0])
            counts[0] += 2 * int((mask & truth).sum())
            counts[1] += int(mask.sum()) + int(truth.sum())
    return {case: {label: (a / b if b else 1.0) for label, (a, b) in sorted(per.items())}
            for case, per in sums.items()}


def save_finetuned(model: SamModel, path: str | Path, record: dict) -> Path:
    """Write the model as a checkpoint that `load_sam(model.name, path)` loads like the base model: the base
    checkpoint's weights with the fine-tuned decoder in place, plus `record` (JSON-like: what was trained
    on, the views' settings). Written atomically."""
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"model": state, FINETUNE_KEY: record}, tmp)
    return path


def view_record(settings: RefineSettings) -> dict:
    """The refinement settings that shape the views (what a checkpoint's decoder was trained on)."""
    window = None if settings.ct_window is None else [float(v) for v in settings.ct_window]
    return {"context": settings.context, "axis": settings.axis, "ct_window": window,
            "box_margin": float(settings.box_margin)}
