"""Pseudo labels where the trainers read them: the one owner of their file format (write, read, validate), their
values (the unsure label, disagreement, agreement), and their export to the raw images' geometry.

A pseudo-label set (`datasets.pseudo_label_folder`: one plans identifier and training fold) holds, per case,
`CASE_seg.b2nd` and `CASE.pkl` in nnU-Net's preprocessed format (`preprocessed_cases`), beside the case's image in
the `_unlabeled` folder, plus the set's `refine_report.json`. The `.pkl` carries the pseudo label's
`class_locations` (foreground oversampling) and the image's source record (`provenance`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.datasets import check_made_for_fold, unlabeled_folder
from nnunet_sam.nnunet.nnunet_internals import open_b2nd, sample_foreground_locations, save_segmentation
from nnunet_sam.nnunet.preprocessed_cases import (IMAGE, PROPERTIES, SEGMENTATION, finished_cases, part_path,
                                                  publish_case, read_properties, temporary_base, write_properties)
from nnunet_sam.nnunet.provenance import SOURCE_KEY, same_source

OUTSIDE = -1  # nnU-Net's label for voxels outside the nonzero mask


def as_training_seg(labels: np.ndarray, placeholder_seg: np.ndarray) -> np.ndarray:
    """(1, Z, Y, X) int16 labels, -1 where the preprocessed case's placeholder marks 'outside the
    nonzero mask' and no label was given, exactly as nnU-Net writes labelled cases."""
    seg = labels[None].astype(np.int16)
    seg[(seg == 0) & (np.asarray(placeholder_seg) == OUTSIDE)] = OUTSIDE
    return seg


def unsure_label(label_manager: LabelManager) -> int:
    """The pseudo-label value for 'unsure: no loss here': the label after the highest class, which is where
    nnU-Net puts its ignore label (and is that label when the dataset has one). The SAM-pseudo trainers leave
    these voxels out of the pseudo-label loss (`SemiSupervisedTrainer`)."""
    if label_manager.has_ignore_label:
        return int(label_manager.ignore_label)
    return int(max(label_manager.all_labels)) + 1


def mark_disagreement(labels: np.ndarray, initial: np.ndarray, unsure: int) -> np.ndarray:
    """`labels` with `unsure` wherever they differ from the initial model's prediction `initial`."""
    return np.where(labels == initial, labels, unsure).astype(labels.dtype)


def sam_agreement(labels: np.ndarray, initial: np.ndarray, foreground_labels: list[int]) -> float:
    """How far SAM's pseudo label agrees with the initial model's prediction on one case (SCtB's "SAM
    agreement"): the mean Dice over the foreground labels present in either map, 1.0 where neither has any
    (nothing to disagree on). A low value flags a case whose pseudo label is unreliable."""
    scores = []
    for label in foreground_labels:
        a, b = labels == label, initial == label
        total = int(a.sum()) + int(b.sum())
        if total:
            scores.append(2.0 * int(np.logical_and(a, b).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


def oversampling_keys(label_manager: LabelManager) -> list:
    """The `class_locations` keys nnU-Net's data loader reads: the foreground labels, and with an ignore
    label also the 'annotated' key (-1, *all labels), exactly as nnU-Net's preprocessor collects them."""
    keys = list(label_manager.foreground_labels)
    if label_manager.has_ignore_label:
        keys.append([-1] + label_manager.all_labels)
    return keys


def write_pseudo_label(folder: Path, case_id: str, seg: np.ndarray, properties: dict,
                       label_manager: LabelManager, patch_size: list[int]) -> None:
    """Write CASE_seg.b2nd and CASE.pkl (with class_locations for foreground oversampling), each under this
    writer's temporary name first, the .pkl published last (an earlier .pkl is removed first: never a new label
    with an old .pkl)."""
    folder.mkdir(parents=True, exist_ok=True)
    properties = dict(properties)
    properties["class_locations"] = sample_foreground_locations(seg, oversampling_keys(label_manager))
    temporary = temporary_base(folder, case_id)
    save_segmentation(seg, str(temporary), patch_size)
    write_properties(properties, temporary)
    publish_case(temporary, folder, case_id, (SEGMENTATION, PROPERTIES))


def pseudo_label_source(folder: Path, case_id: str) -> dict | None:
    """The source record (image files, preprocessing) in a preprocessed case's or a pseudo label's .pkl."""
    return read_properties(folder, case_id).get(SOURCE_KEY)


class PseudoLabelDataset(nnUNetDatasetBlosc2):
    """Unlabelled cases with their pseudo labels, read like nnU-Net's own training cases: images from the
    `_unlabeled` folder, labels and properties (with the pseudo labels' `class_locations`) from the set."""

    def __init__(self, images_folder: str | os.PathLike, labels_folder: str | os.PathLike,
                 identifiers: list[str] | None = None) -> None:
        self.labels_folder = Path(labels_folder)
        if identifiers is None:
            identifiers = finished_cases(self.labels_folder)
        super().__init__(str(images_folder), identifiers)

    def load_case(self, identifier: str):
        data, _, seg_prev, _ = super().load_case(identifier)
        seg = open_b2nd(str(part_path(self.labels_folder, identifier, SEGMENTATION)), self)
        return data, seg, seg_prev, read_properties(self.labels_folder, identifier)


def open_pseudo_label_dataset(preprocessed_data_folder: str | os.PathLike, labels: Path,
                              command_hint: str) -> PseudoLabelDataset:
    """The pseudo-labelled cases of the set in `labels` (`pseudo_label_folder`), checked before training: made for
    this fold (no leakage), from the current preprocessed images; clear errors naming `command_hint`."""
    images = unlabeled_folder(preprocessed_data_folder)
    cases = finished_cases(labels)
    if not cases:
        raise NnsamError(f"no pseudo labels in {labels}; run {command_hint}")
    check_made_for_fold(labels, labels.name.removeprefix("fold_"), command_hint)
    missing = [c for c in cases if not part_path(images, c, IMAGE).is_file()]
    if missing:
        raise NnsamError(f"pseudo label {missing[0]} in {labels} has no preprocessed image in {images}; "
                         f"rerun nnsam_preprocess_unlabeled and then {command_hint}")
    for case in cases:
        check_pseudo_label(labels, images, case, command_hint)
    return PseudoLabelDataset(images, labels, cases)


def check_pseudo_label(labels: Path, images: Path, case_id: str, command_hint: str) -> None:
    """Refuse a pseudo label whose shape or source record differs from its preprocessed image's."""
    image_shape = open_b2nd(str(part_path(images, case_id, IMAGE))).shape[1:]
    label_shape = open_b2nd(str(part_path(labels, case_id, SEGMENTATION))).shape[1:]
    if image_shape != label_shape:
        raise NnsamError(f"pseudo label {case_id} has shape {label_shape} but its preprocessed image {image_shape} "
                         f"(preprocessed again since?); make new pseudo labels: {command_hint}")
    if not same_source(pseudo_label_source(labels, case_id), pseudo_label_source(images, case_id)):
        raise NnsamError(f"pseudo label {case_id} in {labels} was made from an earlier preprocessing of its image "
                         f"(image file or plans changed since); make new pseudo labels: {command_hint}")


def export_to_raw(labels: np.ndarray, properties: dict, plans_manager: PlansManager,
                  configuration_manager: ConfigurationManager, dataset_json: dict, target: Path) -> None:
    """Write a preprocessed-space label map in the raw image's geometry (resampling, uncropping and
    transposing back with nnU-Net's export), atomically. `target` includes the file ending."""
    n_classes = len(plans_manager.get_label_manager(dataset_json).all_labels)
    one_hot = (np.arange(n_classes)[:, None, None, None] == np.maximum(labels, 0)[None]).astype(np.float32)
    ending = dataset_json["file_ending"]
    temp = temporary_base(target.parent, target.name[: -len(ending)])
    export_prediction_from_logits(one_hot, properties, configuration_manager, plans_manager, dataset_json,
                                  str(temp), save_probabilities=False)
    os.replace(f"{temp}{ending}", target)
