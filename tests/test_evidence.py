"""The label-free evidence used by the guard: a border on the object's edge fits best."""

import numpy as np
from scipy import ndimage

from nnunet_sam.sam.evidence import region_contrast


def test_the_true_border_has_more_contrast_than_grown_or_shrunk_ones():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    truth = (yy - 30) ** 2 + (xx - 34) ** 2 <= 12 ** 2
    image = np.where(truth, 0.7, 0.4) + rng.normal(0, 0.05, truth.shape)
    exact = region_contrast(image, truth)
    assert exact > region_contrast(image, ndimage.binary_dilation(truth, iterations=2))
    assert exact > region_contrast(image, ndimage.binary_erosion(truth, iterations=2))
    shifted = np.roll(truth, 3, axis=1)
    assert exact > region_contrast(image, shifted)


def test_empty_masks_have_no_contrast():
    assert region_contrast(np.ones((8, 8)), np.zeros((8, 8), dtype=bool)) == 0.0
    assert region_contrast(np.ones((8, 8)), np.ones((8, 8), dtype=bool)) == 0.0
