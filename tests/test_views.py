"""Views of volumes for SAM and the slice <-> model-input geometry: pure numpy/torch, no model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_sam.sam.prompts import dice
from nnunet_sam.errors import NnsamError
from nnunet_sam.sam.views import (DEFAULT_CT_WINDOW, TileLayout, VolumeViews, looks_like_hounsfield, resize_view,
                                  resolve_modality, sam_intensities, slice_view, slicing_axis, view_geometry)


@pytest.mark.parametrize("spacing, shape, axis", [
    ((5.0, 0.8, 0.8), (20, 64, 64), 0),
    ((0.8, 0.8, 3.0), (64, 64, 20), 2),
    ((1.0, 1.0, 1.0), (30, 30, 30), 0),
    ((999.0, 0.5, 0.5), (1, 64, 64), 0),  # nnU-Net's 2D images
    ((1.0, 1.0, 1.0), (64, 1, 64), 1),
])
def test_slicing_axis(spacing, shape, axis):
    assert slicing_axis(spacing, shape) == axis


def test_ct_is_shown_through_its_window_in_hu():
    v = np.linspace(-1000, 1000, 1001)
    w = sam_intensities(v, "CT", (-100, 100))
    assert w.min() == 0.0 and w.max() == 1.0
    assert w[v == 0][0] == pytest.approx(0.5)
    default = sam_intensities(v, "CT")  # the soft-tissue window: level 40, width 400
    low, high = DEFAULT_CT_WINDOW
    assert (high + low) / 2 == 40 and high - low == 400
    assert default[v <= low].max() == 0.0 and default[v >= high].min() == 1.0
    assert default[np.argmin(abs(v - 40))] == pytest.approx(0.5, abs=0.01)


def test_other_images_are_scaled_on_their_nonzero_voxels_with_black_background():
    rng = np.random.default_rng(0)
    brain = np.zeros((4, 40, 40), dtype=np.float32)  # a skull-stripped MR: zero outside the brain
    brain[:, 10:30, 10:30] = rng.normal(500, 50, (4, 20, 20))
    shown = sam_intensities(brain, "MR")
    assert (shown[brain == 0] == 0).all()  # the background stays black
    inside = shown[brain != 0]
    assert np.percentile(inside, 50) == pytest.approx(0.5, abs=0.05)  # tissue spans the range, not squeezed at 1
    assert inside.min() == 0.0 and inside.max() == 1.0
    # the same brain z-scored on its nonzero voxels (nnU-Net's normalisation) and shown by the old rule: the
    # background becomes the tissue's mean grey, exactly what these views avoid
    zscored = np.where(brain != 0, (brain - brain[brain != 0].mean()) / brain[brain != 0].std(), 0)
    old = sam_intensities(zscored, "range")
    assert old[brain == 0].mean() == pytest.approx(0.5, abs=0.1)
    assert not sam_intensities(np.zeros(5), "MR").any() and not sam_intensities(np.full(5, 3.0), "range").any()


def test_hounsfield_rule_tells_ct_from_mr():
    rng = np.random.default_rng(1)
    ct = np.full((4, 32, 32), -1000.0)  # air around a body of soft tissue
    ct[:, 4:28, 4:28] = rng.normal(40, 20, (4, 24, 24))
    mr = np.abs(rng.normal(300, 100, (4, 32, 32)))
    assert looks_like_hounsfield(ct) and resolve_modality(ct, "auto") == "CT"
    assert not looks_like_hounsfield(mr) and resolve_modality(mr, "auto") == "MR"
    assert not looks_like_hounsfield(mr - 200)  # negative values, but nowhere near air
    assert resolve_modality(mr, "CT") == "CT"  # named: no guessing
    with pytest.raises(ValueError):
        resolve_modality(mr, "PET")


def test_margin_in_millimetres_is_the_same_physical_size_at_any_resolution():
    fine = view_geometry((512, 512), (0.5, 0.5), 256)  # 256 mm field of view at 0.5 mm
    coarse = view_geometry((128, 128), (2.0, 2.0), 256)  # the same field of view at 2 mm
    assert fine.margin_pixels(5.0) == pytest.approx(coarse.margin_pixels(5.0)) == pytest.approx(5.0)
    assert view_geometry((100, 100), (1.0, 1.0), 256).margin_pixels(5.0) == pytest.approx(12.8)
    assert fine.margin_pixels(6.0, "input") == 6.0
    with pytest.raises(ValueError):
        fine.margin_pixels(1.0, "px")


def test_slice_view_adjacent_uses_neighbours_and_clamps_at_borders():
    vol = np.arange(3, dtype=np.float32)[:, None, None] * np.ones((3, 2, 2), dtype=np.float32)
    assert slice_view(vol, 1, "adjacent")[0, 0].tolist() == [0, 1, 2]
    assert slice_view(vol, 0, "adjacent")[0, 0].tolist() == [0, 0, 1]
    assert slice_view(vol, 2, "single")[0, 0].tolist() == [2, 2, 2]
    with pytest.raises(ValueError):
        slice_view(vol, 0, "tile")


def test_geometry_keeps_physical_aspect_ratio():
    assert view_geometry((100, 50), (1.0, 1.0), 256).resized_shape == (256, 128)
    assert view_geometry((50, 100), (2.0, 1.0), 256).resized_shape == (256, 256)
    assert view_geometry((64, 64), (1.0, 0.5), 256).resized_shape == (256, 128)


def test_boxes_map_to_input_and_clip_to_the_resized_image():
    g = view_geometry((100, 50), (1.0, 1.0), 256)  # scale 2.56 in both directions
    assert np.allclose(g.boxes_to_input(np.array([[0, 0, 49, 99]])), [[0, 0, 127, 255]])
    grown = g.boxes_to_input(np.array([[10, 10, 20, 20]]), margin=5)
    assert np.allclose(grown, [[10 * 2.56 - 5, 10 * 2.56 - 5, 21 * 2.56 - 1 + 5, 21 * 2.56 - 1 + 5]])
    assert np.allclose(g.boxes_to_input(np.array([[0, 0, 49, 99]]), margin=10), [[0, 0, 127, 255]])


def test_resize_view_pads_with_zeros_outside_the_image():
    g = view_geometry((100, 50), (1.0, 1.0), 256)
    out = resize_view(np.ones((100, 50, 3), dtype=np.float32), g)
    assert out.shape == (256, 256, 3)
    assert out[:, :128].min() == pytest.approx(1.0)
    assert out[:, 128:].max() == 0.0


def test_logits_map_back_onto_the_slice_grid():
    g = view_geometry((100, 50), (1.0, 1.0), 256)
    low = torch.full((1, 1, 256, 256), -10.0)
    low[..., :128, :128] = 10.0  # the upper half of the resized (256 x 128) image
    back = g.logits_to_slice(low)
    assert back.shape == (1, 100, 50)
    positive = (back[0] > 0).numpy()
    assert positive[:48].all() and not positive[52:].any()


def test_tiles_place_each_slice_in_its_cell_and_come_back():
    volume = np.zeros((5, 30, 40), dtype=np.float32)
    for index in range(5):
        volume[index, 5 + index:15 + index, 10:20] = 1.0  # a square that moves down slice by slice
    layout = TileLayout.for_slices((30, 40), (1.0, 1.0), 256, grid=2)
    assert layout.cell.input_size == 128 and layout.cell.resized_shape == (96, 128)
    canvas = layout.tile(volume, [1, 2, 3])
    assert canvas.shape == (256, 256, 3) and canvas[128:, 128:].max() == 0  # the 4th cell is unused
    for position, index in enumerate([1, 2, 3]):
        row, col = layout.cell_origin(position)
        cell = canvas[row:row + 128, col:col + 128, 0]
        single = resize_view(slice_view(volume, index), layout.cell)[..., 0]
        assert np.allclose(cell, single)
    # logits that are the canvas itself come back as each slice's mask; boxes and points land in the cell
    logits = F.interpolate(torch.from_numpy(canvas[..., 0] * 20 - 10)[None, None], size=(64, 64), mode="bilinear")
    for position, index in enumerate([1, 2, 3]):
        geometry = layout.cell_geometry(position)
        back = geometry.logits_to_slice(logits)
        assert back.shape == (1, 30, 40) and dice(back[0].numpy() > 0, volume[index] > 0.5) > 0.9
        row, col = layout.cell_origin(position)
        box = geometry.boxes_to_input(np.array([[10, 5 + index, 19, 14 + index]]))[0]
        assert np.allclose(box, [col + 10 * 3.2, row + (5 + index) * 3.2, col + 20 * 3.2 - 1,
                                 row + (15 + index) * 3.2 - 1])
        assert np.allclose(geometry.boxes_to_input(np.array([[0, 0, 39, 29]]), margin=50)[0],
                           [col, row, col + 127, row + 95])  # clipped to the cell's image
        assert np.allclose(geometry.points_to_input(np.array([[0, 0]]))[0], [col + 1.1, row + 1.1])
        grid = geometry.mask_to_grid(volume[index] > 0.5, 64)
        assert grid.shape == (64, 64) and abs(float(grid.sum()) - 100 * 3.2 ** 2 / 16) < 1.0
        cell = grid[row // 4:(row + 96) // 4, col // 4:(col + 128) // 4]
        assert float(cell.sum()) == pytest.approx(float(grid.sum()))
    with pytest.raises(ValueError):
        layout.tile(volume, [0, 1, 2, 3, 4])


def test_tiled_volume_views_map_slices_to_tiles_and_cells():
    image = np.random.default_rng(0).normal(size=(9, 30, 40)).astype(np.float32)
    views = VolumeViews.prepare(image, (3.0, 1.0, 1.0), 256, "tile", grid=2)
    assert [views.input_of(i) for i in range(9)] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert list(views.slices_of(2)) == [8]
    assert views.geometry_of(5).origin == (0, 128) and views.geometry_of(4).origin == (0, 0)
    inputs = views.model_inputs([1, 2])
    assert inputs.shape == (2, 256, 256, 3)
    assert np.array_equal(inputs[0], views.layout.tile(views.volume, [4, 5, 6, 7]))
    assert inputs[1][:, 128:].max() == 0 and inputs[1][128:].max() == 0  # one slice in the last tile
    single = VolumeViews.prepare(image, (3.0, 1.0, 1.0), 256, "single")
    assert single.input_of(5) == 5 and single.geometry_of(5) == single.geometry
    with pytest.raises(NnsamError, match="^grid 40: .* use a smaller grid$"):
        VolumeViews.prepare(image, (3.0, 1.0, 1.0), 256, "tile", grid=40)
