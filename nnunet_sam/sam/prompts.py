"""Mask cleaning and prompt geometry, as pure functions on numpy arrays.

Coordinates of boxes and points are (x, y) = (column, row) in pixels of the 2D slice, as SAM expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


@dataclass
class SlicePrompt:
    """The prompts for one class on one slice."""

    label: int
    box: np.ndarray  # (4,) x0, y0, x1, y1 (inclusive pixel extent)
    point: np.ndarray | None = None  # (2,) positive point x, y, inside the mask
    negatives: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (K, 2) negative points
    interpolated: bool = False  # box interpolated across slices the initial mask misses
    from_probabilities: bool = False  # box around where the class's probability is high but never wins the
    # argmax (SAM-Mix's activation-map prompt; `region` holds that area)
    region: np.ndarray | None = None  # (H, W) the initial piece this prompt stands for (keep="pieces");
    # None: the class's whole slice mask


KEEP_MODES = ("largest", "all", "pieces")
PIECE_MARGIN = 0.1  # keep="largest" with probabilities: also keep objects whose mean probability is within this
# of the best one's (the evidence is split: e.g. a bilateral organ, both halves predicted with confidence)


LINK_PROBABILITY = 0.3  # slice_objects: pixels where the class's probability reaches this join the pieces they
# touch into one object (the default of the activation-map prompts: where the model still sees the class)


def slice_objects(mask2d: np.ndarray, probability: np.ndarray | None = None, link_pixels: int = 0,
                  link_probability: float = LINK_PROBABILITY) -> list[np.ndarray]:
    """The objects of a 2D mask, largest first: its face-connected pieces, where pieces that a thin gap cuts
    count as one object: gaps of up to 2 * `link_pixels` pixels, and gaps the class's `probability` (same shape)
    bridges with values of `link_probability` or more (a weak mask cracked where the model was unsure). Each
    object holds only the mask's own pixels."""
    mask = np.asarray(mask2d, dtype=bool)
    linking = mask.copy()
    if link_pixels > 0:
        linking = ndimage.binary_dilation(mask, ndimage.generate_binary_structure(2, 1), iterations=int(link_pixels))
    if probability is not None:
        linking |= np.asarray(probability) >= link_probability
    labels, _ = _components(mask, linking)
    objects = [labels == k for k in np.unique(labels[mask])]
    return sorted(objects, key=lambda obj: -int(obj.sum()))


def link_pixels_of(link_gap: float, pixel_spacing: tuple[float, float]) -> int:
    """The `slice_objects` dilation that joins pieces up to `link_gap` mm apart on pixels of `pixel_spacing` (mm,
    row and column; the finer one counts): the gap in pixels, halved, rounded to the nearest pixel (a half down, so
    that a dilation never joins pieces further apart than `link_gap`: one pixel of 2 mm is not bridged by 2 mm)."""
    if link_gap <= 0:
        return 0
    return max(0, int(np.ceil(link_gap / min(pixel_spacing) / 2 - 0.5)))


def slice_pieces(mask2d: np.ndarray) -> list[np.ndarray]:
    """The face-connected pieces of a 2D mask, largest first (drop specks first: `drop_small_components`)."""
    labels, n = _components(np.asarray(mask2d, dtype=bool))
    pieces = [labels == k for k in range(1, n + 1)]
    return sorted(pieces, key=lambda piece: -int(piece.sum()))


def _components(mask: np.ndarray, linking: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Label face-connected components; `linking` (a dilated mask) merges nearby pieces into one."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    if linking is None:
        return ndimage.label(mask, structure=structure)
    linked, n = ndimage.label(linking, structure=structure)
    return np.where(mask, linked, 0), n


def clean_mask(mask: np.ndarray, probabilities: np.ndarray | None = None, keep: str = "largest",
               axis: int | None = None, max_gap: int = 0, speck_fraction: float = 0.05,
               min_size: int = 4, fill_holes: bool = True, piece_margin: float = PIECE_MARGIN) -> np.ndarray:
    """Clean a binary mask of one class.

    - Components are face-connected; with `axis` and `max_gap`, pieces separated by up to `max_gap`
      empty slices along `axis` count as one object (weak models drop slices).
    - Specks (smaller than `min_size` voxels or `speck_fraction` of the largest object) are dropped.
    - keep="largest": keep one object, the largest; or, when `probabilities` (same shape, this class's softmax)
      is given, the one with the highest mean probability (SAM Carries the Burden's rule, never size) and every
      object whose mean probability is within `piece_margin` of it (split evidence keeps several).
      keep="all" or "pieces": keep every non-speck (the two differ in how the refinement prompts them).
    - Holes are filled, slice by slice along `axis` when given, else in n-D.
    """
    if keep not in KEEP_MODES:
        raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    linking = _extend_along_axis(mask, axis, max_gap) if axis is not None and max_gap > 0 else None
    labels, n = _components(mask, linking)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    big = sizes >= max(min_size, speck_fraction * sizes.max())
    if not big.any():  # everything is tiny: keep the largest piece rather than nothing
        big = sizes == sizes.max()
    candidates = np.flatnonzero(big) + 1
    if keep == "largest":
        if probabilities is not None:
            means = np.asarray(ndimage.mean(probabilities, labels=labels, index=candidates))
            candidates = candidates[means >= means.max() - piece_margin]
        else:
            candidates = candidates[[int(np.argmax(sizes[candidates - 1]))]]
    cleaned = np.isin(labels, candidates)
    if fill_holes:
        cleaned = fill_holes_slicewise(cleaned, axis) if axis is not None else ndimage.binary_fill_holes(cleaned)
    return cleaned


def activation_region(probability: np.ndarray, prompted: np.ndarray, threshold: float, reach: int,
                      min_size: int = 4) -> np.ndarray:
    """Where a class's probability map (N, H, W; slices along axis 0) says the class is, on slices where it has
    no prompt yet (`prompted`, (N,) bool): pixels with probability >= `threshold` (SAM-Mix's activation-map
    prompts, with the segmentation model's softmax as the activation map). Pieces smaller than `min_size`
    pixels are dropped. If the class has prompts, only gaps inside its extent count, none longer than `reach`
    slices (beyond its ends the probability fades slice by slice even where the argmax is right: measured on
    true labels, prompting there only added false slices); if it has none (the argmax never predicts it), the
    3D object with the largest probability mass.
    """
    candidate = np.asarray(probability) >= threshold
    candidate[np.asarray(prompted, dtype=bool)] = False
    if not candidate.any():
        return candidate
    for index in np.flatnonzero(candidate.any(axis=(1, 2))):
        labels, n = _components(candidate[index])
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        candidate[index] &= sizes[labels] >= min_size
    prompted_slices = np.flatnonzero(prompted)
    if prompted_slices.size:
        inside_gap = np.zeros(len(candidate), dtype=bool)
        for lower, upper in zip(prompted_slices[:-1], prompted_slices[1:]):
            if 1 < upper - lower <= reach + 1:
                inside_gap[lower + 1:upper] = True
        candidate[~inside_gap] = False
        return candidate
    labels, n = _components(candidate)
    if n == 0:
        return candidate
    mass = ndimage.sum(probability, labels=labels, index=np.arange(1, n + 1))
    return labels == int(np.argmax(mass)) + 1


def _extend_along_axis(mask: np.ndarray, axis: int, steps: int) -> np.ndarray:
    """The mask smeared `steps` slices forward along `axis`: pieces with up to `steps` empty slices
    between them touch."""
    extended = mask.copy()
    moved = np.moveaxis(extended, axis, 0)
    source = np.moveaxis(mask, axis, 0)
    for step in range(1, min(steps, source.shape[0] - 1) + 1):
        moved[step:] |= source[:-step]
    return extended


def fill_holes_slicewise(mask: np.ndarray, axis: int) -> np.ndarray:
    """Fill the holes of every 2D slice along `axis`."""
    moved = np.moveaxis(mask, axis, 0)
    filled = np.stack([ndimage.binary_fill_holes(s) if s.any() else s for s in moved])
    return np.moveaxis(filled, 0, axis)


def drop_small_components(mask2d: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Remove 2D pieces smaller than `fraction` of the slice's largest piece (keeps boxes tight)."""
    labels, n = _components(np.asarray(mask2d, dtype=bool))
    if n <= 1:
        return np.asarray(mask2d, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = np.flatnonzero(sizes >= fraction * sizes.max()) + 1
    return np.isin(labels, keep)


def bounding_box(mask2d: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Tight box (x0, y0, x1, y1) of a non-empty 2D mask, grown by `margin` pixels, clipped to the slice."""
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    if rows.size == 0:
        raise ValueError("bounding_box of an empty mask")
    h, w = mask2d.shape
    box = np.array([cols[0] - margin, rows[0] - margin, cols[-1] + margin, rows[-1] + margin], dtype=float)
    return clip_box(box, (h, w))


def clip_box(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Clip an xyxy box to a (height, width) image."""
    h, w = shape
    return np.clip(np.asarray(box, dtype=float), 0, [w - 1, h - 1, w - 1, h - 1])


def interior_point(mask2d: np.ndarray) -> np.ndarray:
    """A positive point guaranteed inside the mask: the pixel deepest inside it (largest distance to
    the border); ties go to the pixel nearest the mask's centroid. Returns (x, y)."""
    mask2d = np.asarray(mask2d, dtype=bool)
    if not mask2d.any():
        raise ValueError("interior_point of an empty mask")
    depth = ndimage.distance_transform_edt(np.pad(mask2d, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(depth >= depth.max() - 1e-6)
    cy, cx = np.argwhere(mask2d).mean(axis=0)
    best = int(np.argmin((rows - cy) ** 2 + (cols - cx) ** 2))
    return np.array([cols[best], rows[best]], dtype=float)


def background_points(mask2d: np.ndarray, box: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` negative points inside `box` but outside the mask, each as far as possible from
    the mask and from the points already chosen. Returns (K, 2) xy."""
    if count <= 0:
        return np.zeros((0, 2))
    x0, y0, x1, y1 = np.round(box).astype(int)
    inside = np.zeros(mask2d.shape, dtype=bool)
    inside[y0:y1 + 1, x0:x1 + 1] = True
    free = inside & ~np.asarray(mask2d, dtype=bool)
    chosen: list[np.ndarray] = []
    blocked = np.asarray(mask2d, dtype=bool).copy()
    for _ in range(count):
        if not free.any():
            break
        distance = ndimage.distance_transform_edt(~blocked)
        distance[~free] = 0
        if distance.max() < 2:  # only a thin rim left: a point there would sit on the border
            break
        y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
        chosen.append(np.array([x, y], dtype=float))
        blocked[y, x] = True
        free[y, x] = False
    return np.array(chosen).reshape(-1, 2)


def interpolate_boxes(boxes: dict[int, np.ndarray], max_gap: int) -> dict[int, np.ndarray]:
    """Boxes for slices missing between two slices that have one, linearly interpolated from the two
    neighbours; gaps longer than `max_gap` slices stay empty. Returns only the new slices' boxes."""
    filled: dict[int, np.ndarray] = {}
    indices = sorted(boxes)
    for lower, upper in zip(indices[:-1], indices[1:]):
        gap = upper - lower - 1
        if gap < 1 or gap > max_gap:
            continue
        for index in range(lower + 1, upper):
            t = (index - lower) / (upper - lower)
            filled[index] = (1 - t) * boxes[lower] + t * boxes[upper]
    return filled


def evaluation_dice(truth: np.ndarray, prediction: np.ndarray) -> float | None:
    """Dice as nnU-Net's evaluation counts it: None (left out of every mean) when the class is absent from both,
    0.0 when it is in one only. Every Dice of a report or benchmark against the truth is this one."""
    if not (np.any(truth) or np.any(prediction)):
        return None
    return dice(truth, prediction)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two binary masks; 1.0 when both are empty (the agreement of two masks, e.g. the guard's;
    against the truth use `evaluation_dice`)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total
