"""A synthetic CT-like nnU-Net raw dataset with few labelled cases, unlabelled scans in
`imagesUnlabeled/`, and held-out test cases whose truth is kept aside for evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_sam.demo.synthetic import synthetic_ct_case
from nnunet_sam.nnunet.datasets import UNLABELED_IMAGES

ORGAN_NAMES = ("liver", "kidney", "spleen", "pancreas", "stomach", "gallbladder")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name of a dataset: DatasetXXX_Name."""
    return f"Dataset{dataset_id:03d}_{name}"


@dataclass
class SyntheticDatasetSpec:
    dataset_id: int = 990
    name: str = "SyntheticCT"
    labelled: int = 2
    unlabelled: int = 4
    test: int = 2
    organs: int = 2
    shape: tuple[int, int, int] = (32, 48, 48)
    spacing: tuple[float, float, float] = (3.0, 1.0, 1.0)
    seed: int = 0

    @property
    def folder_name(self) -> str:
        return dataset_folder_name(self.dataset_id, self.name)


def _write(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # sitk wants (x, y, z)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def write_synthetic_dataset(raw_root: Path, spec: SyntheticDatasetSpec = SyntheticDatasetSpec()) -> Path:
    """Write the dataset under `raw_root` and return its folder.

    imagesTr/labelsTr: labelled training cases; imagesUnlabeled/: unlabelled cases (their truth in
    labelsUnlabeledTruth/, for measuring pseudo-label quality only); imagesTs/labelsTs: test cases."""
    folder = Path(raw_root) / spec.folder_name
    groups = (("Tr", "imagesTr", "labelsTr", spec.labelled),
              ("Un", UNLABELED_IMAGES, "labelsUnlabeledTruth", spec.unlabelled),
              ("Ts", "imagesTs", "labelsTs", spec.test))
    seed = spec.seed
    for prefix, images, labels, count in groups:
        for index in range(count):
            case = synthetic_ct_case(spec.shape, n_organs=spec.organs, seed=seed, spacing=spec.spacing,
                                     anatomy_seed=spec.seed)
            seed += 1
            case_id = f"{spec.name.lower()}{prefix}_{index:03d}"
            _write(case.image, case.spacing, folder / images / f"{case_id}_0000.nii.gz")
            _write(case.labels, case.spacing, folder / labels / f"{case_id}.nii.gz")
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{ORGAN_NAMES[i]: i + 1 for i in range(spec.organs)}},
        "numTraining": spec.labelled,
        "file_ending": ".nii.gz",
        "name": spec.name,
        "description": "synthetic CT-like organs (nnunet-sam demo)",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
    return folder
