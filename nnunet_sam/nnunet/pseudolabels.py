"""Pseudo labels where the trainers read them (preprocessed space, nnU-Net's formats), and their
export to the raw images' geometry with nnU-Net's own export."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import write_pickle
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_sam.utils.atomic import TEMP_PREFIX

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
    """Write CASE_seg.b2nd and CASE.pkl (with class_locations for foreground oversampling), each
    atomically, the .pkl last so a case counts as finished only when complete (an earlier .pkl is removed
    first: never a new label with an old .pkl)."""
    folder.mkdir(parents=True, exist_ok=True)
    properties = dict(properties)
    properties["class_locations"] = DefaultPreprocessor._sample_foreground_locations(
        seg, oversampling_keys(label_manager))
    blocks, chunks = comp_blosc2_params(seg.shape, tuple(patch_size), seg.itemsize)
    temp = folder / f"{TEMP_PREFIX}{case_id}_seg"
    nnUNetDatasetBlosc2.save_seg(seg, str(temp), chunks_seg=chunks, blocks_seg=blocks)
    (folder / f"{case_id}.pkl").unlink(missing_ok=True)  # an earlier label's: unfinished until the new .pkl
    os.replace(f"{temp}.b2nd", folder / f"{case_id}_seg.b2nd")
    write_pickle(properties, str(folder / f"{TEMP_PREFIX}{case_id}.pkl"))
    os.replace(folder / f"{TEMP_PREFIX}{case_id}.pkl", folder / f"{case_id}.pkl")


def export_to_raw(labels: np.ndarray, properties: dict, plans_manager: PlansManager,
                  configuration_manager: ConfigurationManager, dataset_json: dict, target: Path) -> None:
    """Write a preprocessed-space label map in the raw image's geometry (resampling, uncropping and
    transposing back with nnU-Net's export), atomically. `target` includes the file ending."""
    n_classes = len(plans_manager.get_label_manager(dataset_json).all_labels)
    one_hot = (np.arange(n_classes)[:, None, None, None] == np.maximum(labels, 0)[None]).astype(np.float32)
    ending = dataset_json["file_ending"]
    temp = target.parent / f"{TEMP_PREFIX}{target.name[: -len(ending)]}"
    export_prediction_from_logits(one_hot, properties, configuration_manager, plans_manager, dataset_json,
                                  str(temp), save_probabilities=False)
    os.replace(f"{temp}{ending}", target)
