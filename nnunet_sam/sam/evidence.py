"""Image evidence for a mask, without labels: how well a mask's border separates what lies inside it
from what lies just outside. Used by the guard to choose between the initial and SAM's slice mask."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def region_contrast(image2d: np.ndarray, mask2d: np.ndarray, ring: int = 3) -> float:
    """Contrast between the mask and a ring of `ring` pixels around it: |mean_in - mean_ring| divided
    by the pooled standard deviation. A border on the object's edge scores highest; a border inside
    the object or out in the background mixes the two intensity populations and scores lower."""
    mask2d = np.asarray(mask2d, dtype=bool)
    if not mask2d.any():
        return 0.0
    around = ndimage.binary_dilation(mask2d, iterations=ring) & ~mask2d
    if not around.any():
        return 0.0
    inside, outside = image2d[mask2d], image2d[around]
    pooled = np.sqrt((inside.var() + outside.var()) / 2.0) + 1e-6
    return float(abs(inside.mean() - outside.mean()) / pooled)
