"""Box prompts that do not inherit every error of the box they start from (stage 2 of `sam/refine.py`).

A box drawn around a weak model's mask is as wrong as the mask: too small where the model missed part of an
object, shifted where it leaked. SAM answers a box with the object the box frames, so its answer inherits the
box's error. Two remedies, both on the decoder alone (the slice is encoded once):
- a scale ensemble: every box decoded at several sizes around its centre, the logits averaged (SAM's answer
  where it does not depend on the exact box);
- redrawn boxes: the box drawn again around SAM's own answer (the pieces of it that touch the box) and decoded
  again, `rounds - 1` times: where the image shows the object's border, the box moves towards it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

# (boxes (N, 4) xyxy in model-input pixels) -> (low-resolution logits (N, 1, L, L) over the input, IoU (N,))
BoxDecoder = Callable[[np.ndarray], tuple[torch.Tensor, np.ndarray]]


def scaled_boxes(boxes: np.ndarray, scales: Sequence[float], bounds: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy boxes -> (N * S, 4): each box at every scale of its half-size about its centre (box-major),
    clipped to the inclusive xyxy `bounds`."""
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2
    factors = np.asarray(scales, dtype=float)[None, :, None]
    out = np.concatenate([centre[:, None] - half[:, None] * factors, centre[:, None] + half[:, None] * factors],
                         axis=2).reshape(-1, 4)
    return np.clip(out, bounds[[0, 1, 0, 1]], bounds[[2, 3, 2, 3]])


def ensemble_decode(decode: BoxDecoder, boxes: np.ndarray, scales: Sequence[float],
                    bounds: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Decode every box at each of `scales` in one call; per box, the mean of the logits and of the IoU
    estimates over the scales. `scales` (1.0,): the box as it is."""
    if tuple(scales) == (1.0,):
        return decode(np.asarray(boxes, dtype=float))
    n, k = len(boxes), len(scales)
    logits, iou = decode(scaled_boxes(boxes, scales, bounds))
    return logits.reshape(n, k, *logits.shape[1:]).mean(dim=1), iou.reshape(n, k).mean(axis=1)


def redrawn_boxes(low_res_logits: torch.Tensor, boxes: np.ndarray, margin: float, input_size: int,
                  bounds: np.ndarray) -> np.ndarray:
    """Per prompt, the box around SAM's answer (logits > 0 on the low-resolution grid over the model input, the
    pieces that overlap the prompt's box, inside `bounds`), grown by `margin` input pixels; where SAM's answer
    is empty there, the box as it was."""
    masks = (low_res_logits[:, 0] > 0).cpu().numpy()
    size = masks.shape[-1]
    scale = input_size / size
    lo = np.floor(bounds[:2] / scale).astype(int)
    hi = np.ceil((bounds[2:] + 1) / scale).astype(int)
    out = np.asarray(boxes, dtype=float).copy()
    for i, (mask, box) in enumerate(zip(masks, out)):
        inside = np.zeros_like(mask)
        inside[lo[1]:hi[1], lo[0]:hi[0]] = mask[lo[1]:hi[1], lo[0]:hi[0]]
        pieces, count = ndimage.label(inside)
        if count == 0:
            continue
        x0, y0 = (int(np.floor(v / scale)) for v in box[:2])
        x1, y1 = (int(np.ceil((v + 1) / scale)) for v in box[2:])
        touching = np.unique(pieces[max(0, y0):y1, max(0, x0):x1])
        keep = np.isin(pieces, touching[touching > 0])
        if not keep.any():
            continue
        rows, cols = np.nonzero(keep)
        drawn = np.array([cols.min() * scale, rows.min() * scale, (cols.max() + 1) * scale - 1,
                          (rows.max() + 1) * scale - 1]) + np.array([-margin, -margin, margin, margin])
        out[i] = np.clip(drawn, bounds[[0, 1, 0, 1]], bounds[[2, 3, 2, 3]])
    return out


def decode_boxes(decode: BoxDecoder, boxes: np.ndarray, scales: Sequence[float], rounds: int, margin: float,
                 input_size: int, bounds: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """SAM's logits and IoU estimates for `boxes` (model-input pixels, margin included): the scale ensemble,
    then `rounds - 1` times on boxes redrawn around the answer; with the boxes of the last round (for a
    points pass that follows)."""
    logits, iou = ensemble_decode(decode, boxes, scales, bounds)
    for _ in range(rounds - 1):
        boxes = redrawn_boxes(logits, boxes, margin, input_size, bounds)
        logits, iou = ensemble_decode(decode, boxes, scales, bounds)
    return logits, iou, boxes
