"""PNG overlays of an image slice with label contours: for a person to look at, not to parse."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_sam.utils.atomic import atomic_path

_COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"]


def pick_slices(masks: list[np.ndarray], count: int = 3) -> list[int]:
    """Up to `count` slice indices (axis 0) spread over the slices where any mask has foreground,
    preferring the ones with the most foreground around each spread position."""
    area = sum((m > 0).reshape(m.shape[0], -1).sum(axis=1) for m in masks)
    occupied = np.flatnonzero(area)
    if occupied.size == 0:
        return [masks[0].shape[0] // 2]
    chunks = np.array_split(occupied, min(count, occupied.size))
    return [int(chunk[np.argmax(area[chunk])]) for chunk in chunks]


def save_overlay(path: Path, image: np.ndarray, masks: dict[str, np.ndarray], title: str = "",
                 count: int = 3) -> None:
    """Save a grid: one column per picked slice, one row per mask (contours drawn on the image).

    image and masks are (Z, Y, X) with slices along axis 0; image is drawn with a 1-99 percentile window.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = pick_slices(list(masks.values()), count)
    lower, upper = np.percentile(image, (1, 99))
    labels = sorted({int(v) for m in masks.values() for v in np.unique(m) if v > 0})
    fig, axes = plt.subplots(len(masks), len(slices), figsize=(3.2 * len(slices), 3.2 * len(masks)),
                             squeeze=False)
    for row, (name, mask) in enumerate(masks.items()):
        for col, index in enumerate(slices):
            ax = axes[row, col]
            ax.imshow(image[index], cmap="gray", vmin=lower, vmax=upper, interpolation="nearest")
            for k, label in enumerate(labels):
                if (mask[index] == label).any():
                    ax.contour(mask[index] == label, levels=[0.5], colors=_COLOURS[k % len(_COLOURS)],
                               linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
            if row == 0:
                ax.set_title(f"slice {index}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def save_case_overlay(path: Path, image: np.ndarray, masks: dict[str, np.ndarray | None], axis: int,
                      title: str | None = None) -> None:
    """`save_overlay` for a (Z, Y, X) case sliced along `axis`; masks that are None are left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    moved = {name: np.moveaxis(mask, axis, 0) for name, mask in masks.items() if mask is not None}
    save_overlay(path, np.moveaxis(image, axis, 0), moved, title=title or path.stem)


def save_view_comparison(path: Path, views: dict[str, np.ndarray], mask: np.ndarray, axis: int,
                         count: int = 3) -> None:
    """Side by side, for a person to compare: each named view of a (Z, Y, X) case (intensities in [0, 1], drawn as
    they are, no window of their own) on the slices `mask` covers most, sliced along `axis`, the mask's contours on
    each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = np.moveaxis(mask, axis, 0)
    slices = pick_slices([mask], count)
    labels = [int(v) for v in np.unique(mask) if v > 0]
    fig, axes = plt.subplots(len(views), len(slices), figsize=(3.2 * len(slices), 3.2 * len(views)), squeeze=False)
    for row, (name, view) in enumerate(views.items()):
        view = np.moveaxis(view, axis, 0)
        for col, index in enumerate(slices):
            ax = axes[row, col]
            ax.imshow(view[index], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            for k, label in enumerate(labels):
                if (mask[index] == label).any():
                    ax.contour(mask[index] == label, levels=[0.5], colors=_COLOURS[k % len(_COLOURS)], linewidths=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def save_curves(path: Path, curves: dict[str, list[float]], title: str, ylabel: str) -> None:
    """One line per named curve over epochs (1, 2, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
