"""A documented, seeded degradation of label maps: what a weak model's predictions look like.

Per class, in this order: (1) over- or under-segmentation: dilate or erode in-plane by 1-2 pixels
(coin flip); (2) rough borders: threshold the blurred mask plus smooth noise; (3) one false-positive
blob (a small ellipsoid away from the organ, in the same number of slices as a third of the organ);
(4) missing slices: one interior slice of the class is emptied. Classes never overlap (lower label wins).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_IN_PLANE = np.ones((1, 3, 3), dtype=bool)


def _resize_in_plane(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    steps = int(rng.integers(1, 3))
    if rng.random() < 0.5:
        return ndimage.binary_dilation(mask, _IN_PLANE, iterations=steps)
    eroded = ndimage.binary_erosion(mask, _IN_PLANE, iterations=steps)
    return eroded if eroded.any() else mask


def _roughen(mask: np.ndarray, rng: np.random.Generator, strength: float = 0.35) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(mask.shape), sigma=(0.5, 1.5, 1.5))
    noise /= np.abs(noise).max() + 1e-8
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma=(0, 1.0, 1.0)) + strength * noise > 0.5


def _false_positive_blob(mask: np.ndarray, allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    z_extent = max(1, int(mask.any(axis=(1, 2)).sum()) // 3)
    radius = max(2.0, 0.4 * np.sqrt(mask.sum() / max(1, mask.any(axis=(1, 2)).sum()) / np.pi))
    far = allowed & ~ndimage.binary_dilation(mask, iterations=int(3 * radius))
    candidates = np.argwhere(far)
    if candidates.size == 0:
        return np.zeros_like(mask)
    cz, cy, cx = candidates[rng.integers(len(candidates))]
    zz, yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    blob = ((zz - cz) / (z_extent / 2 + 0.5)) ** 2 + ((yy - cy) / radius) ** 2 + ((xx - cx) / radius) ** 2 <= 1
    return blob & allowed


def _drop_a_slice(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    if slices.size < 3:
        return mask
    out = mask.copy()
    out[int(rng.choice(slices[1:-1]))] = False
    return out


def degrade_labels(labels: np.ndarray, seed: int = 0, body: np.ndarray | None = None) -> np.ndarray:
    """Degrade every class of a (Z, Y, X) label map as described in the module docstring.
    `body` (optional, boolean) limits where false-positive blobs may appear."""
    rng = np.random.default_rng(seed)
    allowed = np.ones(labels.shape, dtype=bool) if body is None else body.astype(bool)
    out = np.zeros_like(labels)
    for label in sorted(int(v) for v in np.unique(labels) if v > 0):
        truth = labels == label
        mask = _roughen(_resize_in_plane(truth, rng), rng)
        mask |= _false_positive_blob(truth, allowed & (labels == 0), rng)
        mask = _drop_a_slice(mask, rng)
        out[mask & (out == 0)] = label
    return out


def soft_probabilities(labels: np.ndarray, seed: int = 0, n_classes: int | None = None,
                       spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), temperature: float = 2.0,
                       noise: float = 0.5) -> np.ndarray:
    """A softmax map (K, Z, Y, X, float32) whose argmax is exactly `labels`: what a segmentation model that is
    unsure near its own borders gives. Per class: the signed distance to the class's border (positive inside;
    physical distance from `spacing`, in units of the finest axis's voxel, so thick slices count as far), times
    a smooth positive noise field exp(N(0, `noise`)) (Gaussian-smoothed, sigma 2 voxels), divided by
    `temperature`, then a softmax over the classes. The noise never changes a sign, so the argmax stays `labels`;
    with the defaults the probability is about 0.6-0.8 on a border voxel and above 0.9 from about three voxels
    inside."""
    count = int(labels.max()) + 1 if n_classes is None else n_classes
    sampling = np.asarray(spacing, dtype=float) / min(spacing)
    crop = _around_foreground(labels, np.ceil(8 * temperature / sampling).astype(int) + 1)
    if crop is not None:  # far from every object the background is certain: compute near them only
        probabilities = np.zeros((count, *labels.shape), dtype=np.float32)
        probabilities[0] = 1.0
        probabilities[(slice(None), *crop)] = soft_probabilities(labels[crop], seed, count, spacing, temperature,
                                                                 noise)
        return probabilities
    rng = np.random.default_rng(seed)
    scores = np.empty((count, *labels.shape), dtype=np.float32)
    far = float(sum(labels.shape))
    for label in range(count):
        inside = labels == label
        if not inside.any() or inside.all():
            distance = np.full(labels.shape, far if inside.all() else -far, dtype=np.float32)
        else:
            distance = (ndimage.distance_transform_edt(inside, sampling=sampling)
                        - ndimage.distance_transform_edt(~inside, sampling=sampling))
        field = ndimage.gaussian_filter(rng.standard_normal(labels.shape), sigma=2.0)
        field *= noise / (field.std() + 1e-8)
        scores[label] = distance * np.exp(field) / temperature
    scores -= scores.max(axis=0, keepdims=True)
    probabilities = np.exp(scores)
    return (probabilities / probabilities.sum(axis=0, keepdims=True)).astype(np.float32)


def _around_foreground(labels: np.ndarray, margin: np.ndarray) -> tuple[slice, ...] | None:
    """The box around every foreground voxel grown by `margin` voxels per axis, or None where it is the whole
    array (or there is no foreground)."""
    where = np.argwhere(labels > 0)
    if where.size == 0:
        return None
    low = np.maximum(where.min(axis=0) - margin, 0)
    high = np.minimum(where.max(axis=0) + margin + 1, labels.shape)
    if np.all(low == 0) and np.all(high == labels.shape):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))
