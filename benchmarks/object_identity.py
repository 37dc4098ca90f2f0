"""Can an initial object's class be told better than the weak model tells it? Two relabelling rules measured by
`benchmarks/pseudo_quality.py` (not engine options: both measured worse than the model, see RESULTS.md):

- prototypes: the mean LiteMedSAM embedding under each class of the fold's labelled cases (as few-shot
  segmentation pools them, `sam/class_prompts.class_prototypes`), and every connected piece of the initial mask on a
  slice relabelled to the class whose prototype is nearest (cosine) to the mean embedding under the piece;
- foreground pieces: every connected piece of the initial foreground (any class) relabelled to its majority class,
  so that an object split between two classes takes one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def slice_embeddings(views, cache) -> list[torch.Tensor]:
    """(D, E, E) embedding of every slice of `views` (a `VolumeViews`), through the embedding cache."""
    return [cache.embeddings(views.model_inputs([i]))[0].float() for i in range(views.volume.shape[0])]


def pooled_embedding(embedding: torch.Tensor, views, mask: np.ndarray) -> tuple[torch.Tensor, float]:
    """The mean embedding under a slice mask (its cells weighted by their covered share) and that weight."""
    grid = views.geometry.mask_to_grid(mask, embedding.shape[-1]).flatten()
    return grid @ embedding.flatten(1).T, float(grid.sum())


def labelled_prototypes(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], spacings: Sequence[Sequence[float]],
                        classes: Sequence[int], sam, cache, modality: str) -> torch.Tensor:
    """(C, D) unit prototypes of `classes` from labelled cases (image in its own intensities, labels, spacing)."""
    from nnunet_sam.sam.views import VolumeViews

    sums = {c: 0.0 for c in classes}
    weights = {c: 0.0 for c in classes}
    for image, label, spacing in zip(images, labels, spacings):
        views = VolumeViews.prepare(image.astype(np.float32), spacing, sam.input_size, modality=modality)
        label_s = views.to_slices(label)
        for index, embedding in enumerate(slice_embeddings(views, cache)):
            for c in classes:
                if (label_s[index] == c).any():
                    total, weight = pooled_embedding(embedding, views, label_s[index] == c)
                    sums[c] = sums[c] + total
                    weights[c] += weight
    missing = [c for c in classes if weights[c] == 0]
    if missing:
        raise ValueError(f"no labelled pixels of classes {missing}")
    return F.normalize(torch.stack([sums[c] / weights[c] for c in classes]), dim=1)


def relabel_by_prototypes(initial: np.ndarray, views, cache, prototypes: torch.Tensor,
                          classes: Sequence[int]) -> np.ndarray:
    """Every connected piece of each class of `initial` (per slice of `views`) given the nearest prototype's class."""
    labels = views.to_slices(initial)
    out = labels.copy()
    for index, embedding in enumerate(slice_embeddings(views, cache)):
        for c in np.unique(labels[index][labels[index] > 0]):
            pieces, count = ndimage.label(labels[index] == c)
            for k in range(1, count + 1):
                piece = pieces == k
                feature, _ = pooled_embedding(embedding, views, piece)
                out[index][piece] = classes[int(torch.argmax(prototypes @ F.normalize(feature, dim=0)))]
    return views.from_slices(out)


def relabel_foreground_pieces(initial: np.ndarray, views) -> np.ndarray:
    """Every connected piece of the foreground of `initial` (per slice) given its majority class."""
    labels = views.to_slices(initial)
    out = labels.copy()
    for index in range(labels.shape[0]):
        pieces, count = ndimage.label(labels[index] > 0)
        for k in range(1, count + 1):
            piece = pieces == k
            out[index][piece] = int(np.argmax(np.bincount(labels[index][piece].astype(np.int64))[1:])) + 1
    return views.from_slices(out)


def read_labelled(raw: Path, case_ids: Sequence[str], channel: int = 0
                  ) -> tuple[list[np.ndarray], list[np.ndarray], list[list[float]]]:
    """Images (one channel), labels and (z, y, x) spacings of labelled cases of an nnU-Net raw dataset."""
    import SimpleITK as sitk

    images, labels, spacings = [], [], []
    for case_id in case_ids:
        image = sitk.ReadImage(str(raw / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz"))
        images.append(sitk.GetArrayFromImage(image).astype(np.float32))
        labels.append(sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case_id}.nii.gz"))))
        spacings.append(list(image.GetSpacing())[::-1])
    return images, labels, spacings


def right_objects(right: np.ndarray, initial: np.ndarray, truth: np.ndarray, views, sam, cache, margin: float,
                  classes: Sequence[int]) -> list[dict]:
    """Every object of `right` (the right objects of `initial`, from pseudo_quality's `objects_by_truth`: connected
    pieces of class c on a slice whose truth is mostly c), against the true objects of c it touches: their size,
    whether the model gave more than a tenth of them to another class ("split"), and the Dice to them of the piece
    itself, of SAM from the piece's box and of SAM from their true box (both boxes grown by `margin` model-input
    pixels)."""
    from nnunet_sam.sam.prompts import bounding_box, evaluation_dice

    right_s, labels, truth_s = views.to_slices(right), views.to_slices(initial), views.to_slices(truth)
    geometry = views.geometry
    records = []
    for index in range(labels.shape[0]):
        embedding = None
        for c in classes:
            pieces, count = ndimage.label(right_s[index] == c)
            true_pieces, _ = ndimage.label(truth_s[index] == c)
            others = (labels[index] > 0) & (labels[index] != c)
            for k in range(1, count + 1):
                piece = pieces == k
                true_object = np.isin(true_pieces, np.unique(true_pieces[piece & (true_pieces > 0)]))
                if embedding is None:
                    embedding = cache.embeddings(views.model_inputs([index]))
                boxes = np.concatenate([geometry.boxes_to_input(bounding_box(piece)[None], margin),
                                        geometry.boxes_to_input(bounding_box(true_object)[None], margin)])
                sam_masks = (geometry.logits_to_slice(sam.decode(embedding, boxes).low_res_logits) > 0).numpy()
                records.append({"pixels": int(true_object.sum()),
                                "split": bool((true_object & others).sum() > 0.1 * true_object.sum()),
                                "model": evaluation_dice(true_object, piece),
                                "SAM from its box": evaluation_dice(true_object, sam_masks[0]),
                                "SAM from the true box": evaluation_dice(true_object, sam_masks[1])})
    return records
