"""Prompt-free decoding: per-class prompts that let SAM's mask decoder find a class without a box.

CFR's fine-tuned decoder segments tiled 3D patches with no user prompt; few-shot SAM derives its prompts
from the labelled slices. Both are `ClassPrompts`, trained with the decoder on cached embeddings:

- "learnt" (what context "tile" trains): per class, prompt tokens that start as the prompt encoder's
  embedding of a box over the whole input and are learnt; the dense prompt is SAM's "no mask" embedding.
- "fewshot" (prompts "fewshot"): the class prototype (the mean image embedding under the class's
  labelled pixels) is one more prompt token, and the dense prompt is a similarity map of the image to the
  class and background prototypes (temperature x (cosine to class - cosine to background)), given to SAM
  as a mask prompt. The prototypes stay fixed; tokens and temperature are learnt.

The refiner uses them to recover slices the initial mask misses (see `sam/recovery.py`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_sam.errors import NnsamError, SettingError

if TYPE_CHECKING:
    from nnunet_sam.sam.embedding_cache import EmbeddingCache
    from nnunet_sam.sam.finetune import SliceExample
    from nnunet_sam.sam.models import SamModel

PROMPT_MODES = ("learnt", "fewshot")


def class_prompt_mode(context: str, prompts: str) -> str | None:
    """The class prompts fine-tuning trains for views `context` and prompts `prompts` ("box" or
    "fewshot"): few-shot ones when asked, learnt ones for tiles (CFR's prompt-free decoder), else none."""
    if prompts == "fewshot":
        return "fewshot"
    return "learnt" if context == "tile" else None


class ClassPrompts(nn.Module):
    """Prompt tokens (and, for few-shot, prototypes) of the classes `labels`, for one SAM model."""

    def __init__(self, labels: Sequence[int], tokens: torch.Tensor, prototypes: torch.Tensor | None = None,
                 log_temperature: float = math.log(10.0)) -> None:
        super().__init__()
        self.labels = [int(v) for v in labels]
        if tokens.shape[0] != len(self.labels):
            raise ValueError(f"{tokens.shape[0]} token sets for {len(self.labels)} classes")
        self.tokens = nn.Parameter(tokens.detach().clone().float())
        self.log_temperature = nn.Parameter(torch.tensor(float(log_temperature)))
        if prototypes is not None and prototypes.shape[0] != len(self.labels) + 1:
            raise ValueError("prototypes need one row for the background and one per class")
        self.register_buffer("prototypes", None if prototypes is None else prototypes.detach().clone().float())

    @property
    def mode(self) -> str:
        return "learnt" if self.prototypes is None else "fewshot"

    @classmethod
    def initial(cls, model: SamModel, labels: Sequence[int], prototypes: torch.Tensor | None = None) -> "ClassPrompts":
        """Untrained prompts: every class's tokens are the prompt encoder's embedding of a whole-input box."""
        size = model.input_size
        box = torch.tensor([[0.0, 0.0, size - 1.0, size - 1.0]], device=model.device)
        with torch.no_grad():
            sparse, _ = model.module.prompt_encoder(points=None, boxes=box, masks=None)
        tokens = sparse.float().repeat(len(labels), 1, 1)
        return cls(labels, tokens, prototypes).to(model.device)

    def rows(self, labels: Sequence[int]) -> list[int]:
        """Row of each label; a label the prompts were not trained for is an error."""
        missing = [int(v) for v in labels if int(v) not in self.labels]
        if missing:
            raise NnsamError(f"the class prompts know labels {self.labels}, not {missing}")
        return [self.labels.index(int(v)) for v in labels]

    def embed(self, prompt_encoder: nn.Module, embedding: torch.Tensor,
              labels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (N, T, D) and dense (N, D, E, E) prompt embeddings of `labels` on one image embedding
        (1, D, E, E), for SAM's mask decoder."""
        rows = self.rows(labels)
        sparse = self.tokens[rows]
        size = embedding.shape[-2:]
        if self.prototypes is None:
            dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(rows), -1, *size)
            return sparse, dense
        features = F.normalize(embedding[0].flatten(1), dim=0)  # (D, E*E)
        cosine = F.normalize(self.prototypes, dim=1) @ features  # (C + 1, E*E)
        chosen = torch.tensor([r + 1 for r in rows], device=embedding.device)
        similarity = (cosine[chosen] - cosine[0:1]) * self.log_temperature.exp()
        masks = F.interpolate(similarity.reshape(len(rows), 1, *size), size=prompt_encoder.mask_input_size,
                              mode="bilinear", align_corners=False)
        dense = prompt_encoder.mask_downscaling(masks)
        sparse = torch.cat([sparse, self.prototypes[chosen][:, None]], dim=1)
        return sparse, dense

    def to_checkpoint(self) -> dict:
        """Plain tensors and lists (loadable with torch.load(weights_only=True))."""
        return {"labels": list(self.labels), "tokens": self.tokens.detach().cpu().clone(),
                "prototypes": None if self.prototypes is None else self.prototypes.detach().cpu().clone(),
                "log_temperature": float(self.log_temperature.detach())}

    @classmethod
    def from_checkpoint(cls, data: dict, device: torch.device) -> "ClassPrompts":
        try:
            prompts = cls(data["labels"], data["tokens"], data.get("prototypes"), data["log_temperature"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise NnsamError(f"malformed class prompts in the checkpoint ({exc}); write it again with "
                             f"nnsam_finetune") from None
        return prompts.to(device)


@torch.no_grad()
def class_prototypes(cache: EmbeddingCache, examples: Sequence[SliceExample], labels: Sequence[int]) -> torch.Tensor:
    """(1 + C, D) prototypes: the mean image embedding under the background (labelled pixels of no class)
    and under each class's pixels, over all examples, each slice's pixels weighted by their share of an
    embedding cell."""
    sums, weights = None, torch.zeros(1 + len(labels))
    for example in examples:
        embedding = cache.load([example.key])[0].cpu()  # (D, E, E)
        if sums is None:
            sums = torch.zeros(1 + len(labels), embedding.shape[0])
        size = embedding.shape[-1]
        valid = np.ones(example.geometry.slice_shape, bool) if example.valid is None else example.valid
        foreground = example.masks.any(axis=0) if len(example.masks) else np.zeros_like(valid)
        grids = [example.geometry.mask_to_grid(valid & ~foreground, size)]
        for label in labels:
            hits = np.flatnonzero(example.labels == label)
            grids.append(example.geometry.mask_to_grid(example.masks[hits[0]] & valid, size) if len(hits)
                         else torch.zeros(size, size))
        grid = torch.stack(grids)  # (1 + C, E, E)
        sums += grid.flatten(1) @ embedding.flatten(1).T
        weights += grid.flatten(1).sum(dim=1)
    if sums is None or (weights == 0).any():
        absent = [name for name, w in zip(["background", *labels], weights.tolist()) if w == 0]
        raise SettingError("no labelled pixels of {absent} to pool few-shot prototypes from (every class needs "
                           "labelled pixels in the training cases; otherwise use {prompts} box)", absent=absent)
    return sums / weights[:, None]
