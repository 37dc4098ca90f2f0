"""Imperfect slice masks for fine-tuning: the kind of mask whose box refinement will give SAM.

Refinement prompts SAM with boxes around a weak model's masks, not around the truth. A decoder fine-tuned
only on true boxes learns to trust its box; here it also sees boxes of imperfect masks and must still draw
the true mask. `imperfect_mask` makes one such mask from a true slice mask, with one of these errors
(equally likely), each scaled by the object's size `d` (the square root of its area in pixels):
- *grown*: dilated by 1 to max(1, 0.15 d) pixels (a model that over-segments);
- *shrunk*: eroded by as much (a model that under-segments; the truth if erosion empties it);
- *part missing*: the pixels beyond a random straight cut through the object removed, 10-60% of it
  (a model that stops short of one end);
- *spilt*: united with a copy of itself moved by 0.2-0.5 d in a random direction (a model that leaks into a
  neighbour).
A mask too small for its error (one eroded away, a cut that keeps every pixel) stays true: a few-pixel
object's box rarely changes, so the share of boxes that differ is a little below the share asked for.
This generator is fixed here, before measuring, and differs from the benchmarks' test degradations
(`nnunet_sam.demo.degrade`: 1-2 pixel resizing, rough borders, blobs far from the object, dropped slices)
and from the real nnU-Net predictions that benchmarks/finetune_quality.py refines.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ERRORS = ("grown", "shrunk", "part missing", "spilt")
_CROSS = ndimage.generate_binary_structure(2, 1)


def imperfect_mask(truth: np.ndarray, rng: np.random.Generator, error: str | None = None) -> np.ndarray:
    """An imperfect version of a non-empty 2D boolean mask (one of `ERRORS`, drawn at random unless given);
    never empty."""
    truth = np.asarray(truth, dtype=bool)
    if not truth.any():
        raise ValueError("imperfect_mask of an empty mask")
    error = error or ERRORS[int(rng.integers(len(ERRORS)))]
    size = float(np.sqrt(truth.sum()))
    if error in ("grown", "shrunk"):
        steps = int(rng.integers(1, max(1, int(round(0.15 * size))) + 1))
        if error == "grown":
            out = ndimage.binary_dilation(truth, _CROSS, iterations=steps)
        else:  # an object cut by the image's edge still reaches it
            out = ndimage.binary_erosion(truth, _CROSS, iterations=steps, border_value=1)
    elif error == "part missing":
        out = _cut(truth, rng, removed=rng.uniform(0.1, 0.6))
    elif error == "spilt":
        angle = rng.uniform(0, 2 * np.pi)
        shift = rng.uniform(0.2, 0.5) * size * np.array([np.sin(angle), np.cos(angle)])
        out = truth | ndimage.shift(truth.astype(np.uint8), shift, order=0, mode="grid-constant", cval=0).astype(bool)
    else:
        raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
    return out if out.any() else truth


def _cut(mask: np.ndarray, rng: np.random.Generator, removed: float) -> np.ndarray:
    """`mask` without the fraction `removed` of its pixels that lie furthest along a random direction."""
    rows, cols = np.nonzero(mask)
    angle = rng.uniform(0, 2 * np.pi)
    along = rows * np.sin(angle) + cols * np.cos(angle)
    keep = along <= np.quantile(along, 1.0 - removed)
    out = np.zeros_like(mask)
    out[rows[keep], cols[keep]] = True
    return out
