"""The Mean Teacher's own view of a patch (`nnunet_sam.nnunet.teacher_views`), on nnU-Net's real training
transforms: the teacher's view differs from the student's by its intensity augmentation, not by its geometry, and
its own mirroring is undone on its output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sam.nnunet.teacher_views import TwoViewTransform, mirrored_forward, random_flip_axes, split_views

PATCH = (48, 48)


def nnunet_training_transforms(mirror_axes=(0, 1), mask_for_norm: bool = False):
    """nnU-Net's own 2d training transforms with deep supervision (two scales)."""
    return nnUNetTrainer.get_training_transforms(PATCH, (-np.pi, np.pi), [[1, 1], [0.5, 0.5]], mirror_axes, False,
                                                 use_mask_for_norm=[mask_for_norm], is_cascaded=False,
                                                 foreground_labels=[1], regions=None, ignore_label=None)


def asymmetric_sample() -> dict:
    """A bright L-shaped object (label 1) on a dark, slightly textured background: any flip or rotation shows."""
    torch.manual_seed(0)
    image = torch.randn(1, 64, 64) * 0.05
    segmentation = torch.zeros(1, 64, 64, dtype=torch.int16)
    segmentation[0, 12:50, 14:24] = 1
    segmentation[0, 40:50, 14:46] = 1
    image[segmentation > 0] += 4.0
    return {"image": image, "segmentation": segmentation}


@pytest.mark.parametrize("mask_for_norm", [False, True])
def test_teacher_view_shares_the_geometry_and_not_the_intensities(mask_for_norm):
    transform = TwoViewTransform(nnunet_training_transforms(mask_for_norm=mask_for_norm))
    assert transform.mirror_axes == (0, 1)
    differ = 0
    for draw in range(12):
        torch.manual_seed(draw)
        out = transform(**asymmetric_sample())
        student, teacher = split_views(out["image"][None])
        target = out["segmentation"][0][0]  # full-resolution deep-supervision target: the student's geometry
        assert student.shape == teacher.shape == (1, 1, *PATCH)
        assert [s.shape[-2:] for s in out["segmentation"]] == [PATCH, (24, 24)]
        for view in (student, teacher):  # the object sits where the student's target says, in both views
            inside, outside = view[0, 0][target > 0], view[0, 0][target == 0]
            assert inside.numel() > 50 and inside.median() > outside.median() + 1.0
        differ += not torch.allclose(student, teacher)
    assert differ >= 10  # intensity augmentation drawn independently (each transform applies with p < 1)


def test_the_clean_teacher_view_is_the_geometry_without_intensity_augmentation():
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    training = nnunet_training_transforms()
    transform = TwoViewTransform(training, teacher_intensity=False)
    torch.manual_seed(3), np.random.seed(3)
    teacher = split_views(transform(**asymmetric_sample())["image"][None])[1]
    geometry_only = ComposeTransforms(list(transform.shared.transforms))  # the same draws again, no intensity
    torch.manual_seed(3), np.random.seed(3)
    torch.testing.assert_close(teacher[0], geometry_only(**asymmetric_sample())["image"])


def test_without_training_mirroring_the_teacher_is_not_mirrored_either():
    transform = TwoViewTransform(nnunet_training_transforms(mirror_axes=None))
    assert transform.mirror_axes == ()
    assert random_flip_axes(transform.mirror_axes) == ()


def test_a_transform_list_without_spatial_part_is_refused():
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    with pytest.raises(ValueError, match="no SpatialTransform.*teacher_view = 'student'"):
        TwoViewTransform(ComposeTransforms([]))


def test_mirrored_forward_undoes_its_flip():
    data = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
    ramp = torch.linspace(0, 1, 6)  # a position-dependent "network": the flip changes what it sees

    def network(x):
        return x * ramp

    torch.testing.assert_close(mirrored_forward(lambda x: x, data, (0, 1)), data)  # equivariant: unchanged
    torch.testing.assert_close(mirrored_forward(network, data, ()), network(data))
    flipped = mirrored_forward(network, data, (1,))
    torch.testing.assert_close(flipped, data * ramp.flip(0))
    assert not torch.allclose(flipped, network(data))
    torch.testing.assert_close(mirrored_forward(network, data, (0,)), network(data))  # ramp is along axis 1 only


def test_random_flip_axes_follow_nnunets_rule():
    generator = torch.Generator().manual_seed(0)
    draws = [random_flip_axes((0, 1, 2), generator) for _ in range(2000)]
    for axis in (0, 1, 2):
        share = sum(axis in d for d in draws) / len(draws)
        assert 0.45 < share < 0.55
    assert len(set(draws)) == 8
