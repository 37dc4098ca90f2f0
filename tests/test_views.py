"""Views of volumes for SAM and the slice <-> model-input geometry: pure numpy/torch, no model."""

import numpy as np
import pytest
import torch

from nnunet_sam.sam.views import (normalize_intensities, resize_view, slice_view, slicing_axis, view_geometry)


@pytest.mark.parametrize("spacing, shape, axis", [
    ((5.0, 0.8, 0.8), (20, 64, 64), 0),
    ((0.8, 0.8, 3.0), (64, 64, 20), 2),
    ((1.0, 1.0, 1.0), (30, 30, 30), 0),
    ((999.0, 0.5, 0.5), (1, 64, 64), 0),  # nnU-Net's 2D images
    ((1.0, 1.0, 1.0), (64, 1, 64), 1),
])
def test_slicing_axis(spacing, shape, axis):
    assert slicing_axis(spacing, shape) == axis


def test_normalize_with_window_and_percentiles():
    v = np.linspace(-1000, 1000, 1001)
    w = normalize_intensities(v, window=(-100, 100))
    assert w.min() == 0.0 and w.max() == 1.0
    assert w[v == 0][0] == pytest.approx(0.5)
    p = normalize_intensities(v, percentiles=(10, 90))
    assert p[v <= -800].max() == 0.0 and p[v >= 800].min() == 1.0
    assert not normalize_intensities(np.full(5, 3.0)).any()


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
