"""The Mean Teacher's own view of a patch: nnU-Net's training augmentation, drawn twice.

`TwoViewTransform` wraps nnU-Net's training transforms (`nnUNetTrainer.get_training_transforms`, a
batchgeneratorsv2 `ComposeTransforms`) for the extra stream. Each sample goes once through the spatial part
(crop, rotation, scaling, elastic deformation) and the mirroring, which the student and the teacher share so that
their outputs align voxel by voxel. The intensity part (noise, blur, brightness, contrast, low resolution, gamma)
then runs twice with independent draws: once, followed by the rest of nnU-Net's chain, for the student's view;
once for the teacher's (or not at all for the teacher: its "clean" view, FixMatch's weak-to-strong order).
The teacher's view is appended to the image as extra channels (nnU-Net's data loader stacks whatever the
transforms return); `split_views` takes the two apart. The trainer mirrors the teacher's
batch on its own (`mirrored_forward`) and undoes that mirroring on the output, before the consistency loss.

Moving nnU-Net's mirroring before the intensity transforms leaves the student's distribution as it was: those
transforms act voxel-wise or with symmetric kernels, so they commute with a flip.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform

__all__ = ["TwoViewTransform", "split_views", "mirrored_forward", "random_flip_axes"]


class TwoViewTransform(BasicTransform):
    """nnU-Net's training transforms with a second, independently intensity-augmented copy of the image
    (the teacher's view) appended to the image channels; spatial transform and mirroring shared."""

    def __init__(self, training: ComposeTransforms, teacher_intensity: bool = True) -> None:
        """`teacher_intensity` False: the teacher's view skips the intensity augmentation (a clean view of the
        student's geometry)."""
        super().__init__()
        steps = list(training.transforms)
        spatial_end = _index_of(steps, SpatialTransform, "SpatialTransform") + 1
        if spatial_end < len(steps) and isinstance(steps[spatial_end], Convert2DTo3DTransform):
            spatial_end += 1  # the dummy-2D augmentation of anisotropic 3D data ends here
        mirror = next((i for i, s in enumerate(steps) if isinstance(s, MirrorTransform)), None)
        intensity_end = len(steps) if mirror is None else mirror
        after = steps[intensity_end + (mirror is not None):]
        self.mirror_axes: tuple[int, ...] = () if mirror is None else tuple(steps[mirror].allowed_axes)
        self.shared = ComposeTransforms(steps[:spatial_end] + ([] if mirror is None else [steps[mirror]]))
        intensity = steps[spatial_end:intensity_end]
        self.student = ComposeTransforms(intensity + after)
        self.teacher = ComposeTransforms(intensity if teacher_intensity else [])
        self.teacher_mask = next((s for s in after if isinstance(s, MaskImageTransform)), None)

    def apply(self, data_dict: dict, **params) -> dict:
        shared = self.shared(**data_dict)
        teacher_image = shared["image"].clone()  # the student's transforms may work in place
        segmentation = shared["segmentation"].clone() if self.teacher_mask is not None else None
        student = self.student(**shared)
        teacher = self.teacher(image=teacher_image)["image"]
        if segmentation is not None:  # nnU-Net's zero outside the nonzero mask, for the teacher's view too
            teacher = self.teacher_mask(image=teacher, segmentation=segmentation)["image"]
        student["image"] = torch.cat((student["image"], teacher))
        return student


def _index_of(steps: Sequence[BasicTransform], kind: type, name: str) -> int:
    for i, step in enumerate(steps):
        if isinstance(step, kind):
            return i
    raise ValueError(f"nnU-Net's training transforms have no {name}: the teacher's view cannot share it "
                     f"(a trainer that overrides get_training_transforms needs teacher_view = 'student')")


def split_views(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student's view, teacher's view) of a batch from `TwoViewTransform` (the channels halved)."""
    channels = data.shape[1] // 2
    return data[:, :channels], data[:, channels:]


def random_flip_axes(mirror_axes: Sequence[int], generator: torch.Generator | None = None) -> tuple[int, ...]:
    """Each of the spatial `mirror_axes` with probability 1/2 (nnU-Net's mirroring rule)."""
    draws = torch.rand(len(mirror_axes), generator=generator)
    return tuple(a for a, d in zip(mirror_axes, draws) if d < 0.5)


def mirrored_forward(network: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor,
                     axes: Sequence[int]) -> torch.Tensor:
    """`network` on `data` (B, C, *spatial) flipped along the spatial `axes`, its output flipped back."""
    dims = [a + 2 for a in axes]
    if not dims:
        return network(data)
    return torch.flip(network(torch.flip(data, dims)), dims)
