"""2D views of a 3D volume for SAM, and the geometry between a slice and the model input.

A view is (H, W, 3) in [0, 1]: one slice copied to three channels, or (context "adjacent") the slices
before, at and after the index as SAM's three channels (2.5D). Views are resized so that physical
aspect ratio is kept (pixel spacing) and the longer side fills the model input, then padded at the
bottom/right, as SAM's own preprocessing does. With context "tile" (CFR's concatenation) grid x grid
consecutive slices share one model input, each in its own cell: SAM sees a 3D patch in one image, and
one encoder call serves grid * grid slices.

Intensities are shown as LiteMedSAM (like MedSAM) saw them in training (`sam_intensities`): CT in Hounsfield
units through a window (default `DEFAULT_CT_WINDOW`, the soft-tissue window level 40 / width 400), any other image
scaled by the 0.5-99.5 percentiles of its nonzero voxels with its zero background kept black. `modality` "auto"
tells CT from the intensities themselves (`looks_like_hounsfield`; a given window names CT); "range" is the rule
nnunet-sam used before these views (the 0.5-99.5 percentiles of every voxel), kept to measure against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_sam.errors import SettingError

logger = logging.getLogger(__name__)

CONTEXTS = ("single", "adjacent", "tile")
MODALITIES = ("auto", "CT", "MR", "range")  # MR: any image that is not CT (MR, PET, ultrasound, ...)
DEFAULT_CT_WINDOW = (-160.0, 240.0)  # HU: level 40, width 400, the abdomen window of LiteMedSAM's training data
NONZERO_PERCENTILES = (0.5, 99.5)  # non-CT images: scaled between these percentiles of their nonzero voxels
HU_AIR_BELOW = -500.0  # looks_like_hounsfield: air in the image (about -1000 HU) ...
HU_AIR_FRACTION = 0.005  # ... in at least this share of the voxels
MARGIN_UNITS = ("mm", "input")  # box margins in millimetres, or in model-input pixels (the old rule)


def slicing_axis(spacing: Sequence[float], shape: Sequence[int]) -> int:
    """The axis to slice along: a singleton axis (2D images) if any, else the through-plane axis (the
    largest spacing); ties go to the first axis (nnU-Net's z)."""
    for axis, size in enumerate(shape):
        if size == 1:
            return axis
    spacing = np.asarray(spacing, dtype=float)
    return int(np.flatnonzero(np.isclose(spacing, spacing.max(), rtol=1e-3))[0])


def looks_like_hounsfield(volume: np.ndarray) -> bool:
    """Whether an image is CT in Hounsfield units, by the intensities alone: at least `HU_AIR_FRACTION` of its
    voxels are at or below `HU_AIR_BELOW` (air, about -1000 HU, is in nearly every CT scan, around the body or in
    the lungs and bowel; MR, PET and ultrasound intensities are never that negative)."""
    volume = np.asarray(volume)
    return bool(volume.size) and float(np.mean(volume <= HU_AIR_BELOW)) >= HU_AIR_FRACTION


def resolve_modality(volume: np.ndarray, modality: str, ct_window: Sequence[float] | None = None) -> str:
    """The modality a volume is shown as: `modality` itself; for "auto" CT where a `ct_window` is given (a window
    names HU) or the volume `looks_like_hounsfield`, else MR."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if modality != "auto":
        return modality
    return "CT" if ct_window is not None or looks_like_hounsfield(volume) else "MR"


def window_of(ct_window: Sequence[float] | None) -> tuple[float, float]:
    """The CT window used: the given one, else `DEFAULT_CT_WINDOW`."""
    return DEFAULT_CT_WINDOW if ct_window is None else (float(ct_window[0]), float(ct_window[1]))


def sam_intensities(volume: np.ndarray, modality: str = "auto",
                    ct_window: Sequence[float] | None = None) -> np.ndarray:
    """A volume's intensities in [0, 1] as SAM is shown them (see the module's docstring): CT (in HU) clipped to
    `ct_window` (None: `DEFAULT_CT_WINDOW`); MR between the percentiles of its nonzero voxels, zero kept at 0;
    "range" between the percentiles of all voxels."""
    volume = np.asarray(volume, dtype=np.float32)
    modality = resolve_modality(volume, modality, ct_window)
    if modality == "CT":
        return _scaled(volume, *window_of(ct_window))
    if modality == "range":
        return _scaled(volume, *(float(v) for v in np.percentile(volume, NONZERO_PERCENTILES)))
    nonzero = volume != 0
    if not nonzero.any():
        return np.zeros_like(volume)
    lower, upper = (float(v) for v in np.percentile(volume[nonzero], NONZERO_PERCENTILES))
    return np.where(nonzero, _scaled(volume, lower, upper), 0.0).astype(np.float32)


def describe_intensities(modality: str, ct_window: Sequence[float] | None) -> str:
    """What `sam_intensities` shows, in words (reports, logs, fine-tuned checkpoints' records)."""
    if modality == "CT":
        low, high = window_of(ct_window)
        return f"CT window {low:g}..{high:g} HU"
    if modality == "range":
        return "0.5-99.5 percentiles of all voxels"
    if modality == "MR":
        return "0.5-99.5 percentiles of the nonzero voxels"
    return "auto"


def _scaled(volume: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """`volume` clipped to [lower, upper] and scaled to [0, 1] (all 0 for an empty range)."""
    if upper <= lower:
        return np.zeros_like(volume)
    return np.clip((np.clip(volume, lower, upper) - lower) / (upper - lower), 0.0, 1.0).astype(np.float32)


def slice_view(volume: np.ndarray, index: int, context: str = "single") -> np.ndarray:
    """The (H, W, 3) view of slice `index` of a normalised volume (slices along axis 0)."""
    if context == "single":
        return np.repeat(volume[index][..., None], 3, axis=-1)
    if context == "adjacent":
        last = volume.shape[0] - 1
        neighbours = [max(index - 1, 0), index, min(index + 1, last)]
        return np.stack([volume[i] for i in neighbours], axis=-1)
    raise ValueError(f"slice views are 'single' or 'adjacent' (tiles are built by TileLayout), got {context!r}")


@dataclass(frozen=True)
class ViewGeometry:
    """How a slice of `slice_shape` maps onto the square model input of `input_size`: resized to
    `resized_shape` with its top-left pixel at `origin` (row, column); (0, 0) unless the slice is a
    tile's cell."""

    slice_shape: tuple[int, int]
    resized_shape: tuple[int, int]
    input_size: int
    origin: tuple[int, int] = (0, 0)
    spacing: tuple[float, float] = (1.0, 1.0)  # (row, column) pixel spacing of the slice, in mm

    def margin_pixels(self, margin: float, unit: str = "mm") -> float:
        """A box margin in model-input pixels: `margin` millimetres (unit "mm"; the physical aspect ratio is
        kept, so a millimetre is as many input pixels along both axes) or input pixels (unit "input")."""
        if unit not in MARGIN_UNITS:
            raise ValueError(f"margin unit must be one of {MARGIN_UNITS}, got {unit!r}")
        return float(margin) if unit == "input" else float(margin) * self.scale[0] / self.spacing[1]

    @property
    def bounds(self) -> np.ndarray:
        """The slice's pixels in the model input as an inclusive xyxy box."""
        (row, col), (h, w) = self.origin, self.resized_shape
        return np.array([col, row, col + w - 1, row + h - 1], dtype=float)

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) factors from slice pixels to model-input pixels."""
        return (self.resized_shape[1] / self.slice_shape[1], self.resized_shape[0] / self.slice_shape[0])

    def points_to_input(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) xy slice pixel centres -> model-input pixels."""
        sx, sy = self.scale
        points = np.asarray(points, dtype=float)
        row, col = self.origin
        return np.stack([(points[..., 0] + 0.5) * sx - 0.5 + col, (points[..., 1] + 0.5) * sy - 0.5 + row], axis=-1)

    def boxes_to_input(self, boxes: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """(N, 4) xyxy slice boxes (inclusive pixels) -> model-input boxes grown by `margin` input
        pixels and clipped to the slice's resized (unpadded) image."""
        boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
        sx, sy = self.scale
        out = np.stack([boxes[:, 0] * sx, boxes[:, 1] * sy,
                        (boxes[:, 2] + 1) * sx - 1, (boxes[:, 3] + 1) * sy - 1], axis=1)
        out += np.array([-margin, -margin, margin, margin])
        row, col = self.origin
        out += np.array([col, row, col, row])
        bounds = self.bounds
        return np.clip(out, bounds[[0, 1, 0, 1]], bounds[[2, 3, 2, 3]])

    def logits_to_slice(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """(N, 1, L, L) decoder logits over the whole input -> (N, H, W) logits on the slice grid."""
        full = F.interpolate(low_res_logits, size=(self.input_size, self.input_size),
                             mode="bilinear", align_corners=False)
        (row, col), (h, w) = self.origin, self.resized_shape
        full = full[..., row:row + h, col:col + w]
        return F.interpolate(full, size=self.slice_shape, mode="bilinear", align_corners=False)[:, 0]

    def mask_to_grid(self, mask: np.ndarray, size: int) -> torch.Tensor:
        """The fraction of each cell of a `size` x `size` grid over the model input (the embedding grid)
        that a slice mask (H, W) covers, as a float tensor."""
        x = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        x = F.interpolate(x, size=self.resized_shape, mode="bilinear", align_corners=False)
        (row, col), (h, w) = self.origin, self.resized_shape
        x = F.pad(x, (col, self.input_size - col - w, row, self.input_size - row - h))
        return F.adaptive_avg_pool2d(x, size)[0, 0]


def view_geometry(slice_shape: Sequence[int], pixel_spacing: Sequence[float], input_size: int) -> ViewGeometry:
    """Geometry that keeps the physical aspect ratio ((row, column) spacing) and fills `input_size`."""
    h, w = int(slice_shape[0]), int(slice_shape[1])
    physical_h, physical_w = h * float(pixel_spacing[0]), w * float(pixel_spacing[1])
    factor = input_size / max(physical_h, physical_w)
    resized = (max(1, min(input_size, int(round(physical_h * factor)))),
               max(1, min(input_size, int(round(physical_w * factor)))))
    return ViewGeometry(slice_shape=(h, w), resized_shape=resized, input_size=input_size,
                        spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])))


def resize_view(view: np.ndarray, geometry: ViewGeometry) -> np.ndarray:
    """Resize an (H, W, 3) view to the geometry's resized shape and zero-pad it to the model input."""
    x = torch.from_numpy(np.ascontiguousarray(view, dtype=np.float32)).permute(2, 0, 1)[None]
    shrinking = geometry.resized_shape[0] < view.shape[0] or geometry.resized_shape[1] < view.shape[1]
    x = F.interpolate(x, size=geometry.resized_shape, mode="bilinear", align_corners=False,
                      antialias=shrinking)
    size = geometry.input_size
    x = F.pad(x, (0, size - geometry.resized_shape[1], 0, size - geometry.resized_shape[0]))
    return x[0].permute(1, 2, 0).clamp_(0, 1).numpy()


@dataclass
class VolumeViews:
    """A volume made ready for SAM: normalised, its slicing axis moved first, its slices' model inputs.

    The refiner and the fine-tuner both build their model inputs here, so a decoder fine-tuned on these
    views sees exactly what refinement will show it."""

    volume: np.ndarray  # (N, H, W) in [0, 1], slices along axis 0
    axis: int  # slicing axis of the original (z, y, x) array
    geometry: ViewGeometry  # of a slice that fills the model input alone
    context: str = "single"
    layout: TileLayout | None = None  # context "tile": the cells of the model input
    modality: str = "MR"  # how the intensities were shown (`sam_intensities`; "auto" resolved)

    @classmethod
    def prepare(cls, image: np.ndarray, spacing: Sequence[float], input_size: int, context: str = "single",
                axis: int | None = None, ct_window: tuple[float, float] | None = None,
                grid: int = 2, modality: str = "auto") -> "VolumeViews":
        """Scale `image` (Z, Y, X, its own intensities: HU for CT) as `sam_intensities` does and choose the slicing
        axis (None: the through-plane axis). grid: cells per side of a tile (context "tile" only)."""
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        axis = axis if axis is not None else slicing_axis(spacing, image.shape)
        modality = resolve_modality(image, modality, ct_window)
        volume = np.moveaxis(sam_intensities(image, modality, ct_window), axis, 0)
        in_plane = [float(sp) for i, sp in enumerate(spacing) if i != axis]
        layout = TileLayout.for_slices(volume.shape[1:], in_plane, input_size, grid) if context == "tile" else None
        return cls(volume, axis, view_geometry(volume.shape[1:], in_plane, input_size), context, layout, modality)

    def input_of(self, index: int) -> int:
        """The model input that shows slice `index`: the slice itself, or its tile."""
        return index if self.layout is None else index // self.layout.slices_per_tile

    def geometry_of(self, index: int) -> ViewGeometry:
        """Where slice `index` lies in its model input."""
        if self.layout is None:
            return self.geometry
        return self.layout.cell_geometry(index % self.layout.slices_per_tile)

    def slices_of(self, input_id: int) -> range:
        """The slices that model input `input_id` shows."""
        if self.layout is None:
            return range(input_id, input_id + 1)
        n = self.layout.slices_per_tile
        return range(input_id * n, min((input_id + 1) * n, self.volume.shape[0]))

    def to_slices(self, array: np.ndarray, leading: int = 0) -> np.ndarray:
        """An array of the original layout (after `leading` extra axes) with the slicing axis first."""
        return np.moveaxis(array, self.axis + leading, leading)

    def from_slices(self, array: np.ndarray) -> np.ndarray:
        """The inverse of `to_slices` for an array without leading axes."""
        return np.moveaxis(array, 0, self.axis)

    def model_inputs(self, input_ids: Sequence[int]) -> np.ndarray:
        """(B, S, S, 3) model inputs `input_ids` (slice indices, or tile indices for context "tile")."""
        if self.layout is not None:
            return np.stack([self.layout.tile(self.volume, self.slices_of(int(t))) for t in input_ids])
        return np.stack([resize_view(slice_view(self.volume, int(i), self.context), self.geometry)
                         for i in input_ids])


@dataclass(frozen=True)
class TileLayout:
    """CFR's concatenation: `grid` x `grid` consecutive slices tiled row by row into one model input.

    Each slice is resized into a square cell of `input_size // grid` pixels with its physical aspect ratio
    kept (padded at the bottom/right, as a single view is), so SAM sees a 3D patch in one image."""

    grid: int
    cell: ViewGeometry  # one slice inside one cell (its input_size is the cell size)
    input_size: int

    @classmethod
    def for_slices(cls, slice_shape: Sequence[int], pixel_spacing: Sequence[float], input_size: int,
                   grid: int) -> "TileLayout":
        if grid < 1 or input_size // grid < 8:
            raise SettingError("{grid} {value}: a {value}x{value} tiling does not fit the {size}-pixel model input "
                               "(cells need 8 pixels or more); use a smaller {grid}", value=grid, size=input_size)
        return cls(grid, view_geometry(slice_shape, pixel_spacing, input_size // grid), input_size)

    @property
    def slices_per_tile(self) -> int:
        return self.grid * self.grid

    def cell_origin(self, position: int) -> tuple[int, int]:
        """(row, column) of the top-left pixel of cell `position` (row-major) in the model input."""
        size = self.cell.input_size
        return (position // self.grid) * size, (position % self.grid) * size

    def tile(self, volume: np.ndarray, indices: Sequence[int]) -> np.ndarray:
        """The (S, S, 3) model input with slices `indices` (at most grid * grid) of a normalised (N, H, W)
        volume in its cells; unused cells stay black."""
        if len(indices) > self.slices_per_tile:
            raise ValueError(f"{len(indices)} slices do not fit {self.grid}x{self.grid} cells")
        canvas = np.zeros((self.input_size, self.input_size, 3), dtype=np.float32)
        size = self.cell.input_size
        for position, index in enumerate(indices):
            row, col = self.cell_origin(position)
            canvas[row:row + size, col:col + size] = resize_view(slice_view(volume, int(index)), self.cell)
        return canvas

    def cell_geometry(self, position: int) -> ViewGeometry:
        """Where the slice in cell `position` lies in the tiled model input."""
        return replace(self.cell, input_size=self.input_size, origin=self.cell_origin(position))
