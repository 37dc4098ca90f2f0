"""Few-label nnU-Net datasets of 2D cases (one slice each, nnU-Net's `2d` configuration), as the demo and the
semi-supervised benchmark use them: a pool of labelled slices is split into a few labelled training cases,
labelled validation cases (a fold's validation set, never trained on), unlabelled cases whose truth is kept
aside, and test cases.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_sam.demo.dataset import dataset_folder_name
from nnunet_sam.demo.synthetic import PatientVariation, synthetic_ct_slice
from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.datasets import UNLABELED_IMAGES

__all__ = ["SliceCase", "CaseSplit", "draw_split", "write_slice_dataset", "synthetic_slice_pool", "SPLIT_FOLD"]

THROUGH_PLANE_SPACING = 999.0  # nnU-Net's spacing for the missing axis of 2D images
SPLIT_FOLD = "0"  # the one fold of the written splits_final.json: labelled cases train, validation cases validate
UNLABELED_TRUTH = "labelsUnlabeledTruth"


@dataclass
class SliceCase:
    """One 2D case: an image (Y, X) and its labels (Y, X), with the in-plane spacing (y, x) in mm."""

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float] = (1.0, 1.0)


@dataclass
class CaseSplit:
    """Which cases of a pool play which part."""

    labelled: list[str]  # imagesTr/labelsTr, fold 0's training cases
    validation: list[str]  # imagesTr/labelsTr, fold 0's validation cases
    unlabelled: list[str]  # imagesUnlabeled/ (truth aside in labelsUnlabeledTruth/)
    test: list[str]  # imagesTs/ (truth in labelsTs/)

    def to_dict(self) -> dict:
        return asdict(self)


def draw_split(cases: list[SliceCase], n_classes: int, seed: int, labelled: int = 2, validation: int = 4,
               unlabelled_share: float = 0.5) -> CaseSplit:
    """A seeded split. The labelled cases are spread over the pool as a person labelling a few slices would
    spread them: the pool (in its order, e.g. slice position) is cut into `labelled` consecutive blocks and one
    case is drawn from each, among the draws that show every class at least once (a class no labelled case
    shows cannot be learnt). Then `validation` random cases, and the rest shared between unlabelled
    (`unlabelled_share`) and test cases."""
    rng = np.random.default_rng(seed)
    ids = [c.case_id for c in cases]
    present = {c.case_id: set(np.unique(c.labels).tolist()) - {0} for c in cases}
    wanted = set(range(1, n_classes + 1))
    blocks = np.array_split(np.arange(len(ids)), labelled)
    for _ in range(10000):
        chosen = [ids[int(rng.choice(block))] for block in blocks]
        if wanted <= set().union(*(present[c] for c in chosen)):
            break
    else:
        raise NnsamError(f"no {labelled} cases of the pool, one per block of {len(ids) // labelled}, show all "
                         f"{n_classes} classes together")
    rest = [ids[i] for i in rng.permutation(len(ids)) if ids[i] not in chosen]
    valid, rest = rest[:validation], rest[validation:]
    n_unlabelled = int(round(unlabelled_share * len(rest)))
    return CaseSplit(sorted(chosen), sorted(valid), sorted(rest[:n_unlabelled]), sorted(rest[n_unlabelled:]))


def _write(array: np.ndarray, spacing: tuple[float, float], path: Path) -> None:
    image = sitk.GetImageFromArray(array[None])
    image.SetSpacing((float(spacing[1]), float(spacing[0]), THROUGH_PLANE_SPACING))  # sitk: (x, y, z)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def write_slice_dataset(raw_root: Path, dataset_id: int, name: str, cases: list[SliceCase], split: CaseSplit,
                        label_names: list[str], channel: str, description: str) -> Path:
    """Write `nnUNet_raw/DatasetXXX_name/` for `split` and return the folder. The fold-0 split (labelled cases
    train, validation cases validate) is `split_file_content(split)`: write it to the preprocessed folder."""
    folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
    by_id = {c.case_id: c for c in cases}
    groups = ((split.labelled + split.validation, "imagesTr", "labelsTr"),
              (split.unlabelled, UNLABELED_IMAGES, UNLABELED_TRUTH), (split.test, "imagesTs", "labelsTs"))
    for ids, images, labels in groups:
        for case_id in ids:
            case = by_id[case_id]
            _write(case.image.astype(np.float32), case.spacing, folder / images / f"{case_id}_0000.nii.gz")
            _write(case.labels.astype(np.uint8), case.spacing, folder / labels / f"{case_id}.nii.gz")
    dataset_json = {"channel_names": {"0": channel},
                    "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(label_names)}},
                    "numTraining": len(split.labelled) + len(split.validation), "file_ending": ".nii.gz",
                    "name": name, "description": description}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
    return folder


def split_file_content(split: CaseSplit) -> list[dict]:
    """nnU-Net's splits_final.json content: one fold, the labelled cases train, the validation cases validate."""
    return [{"train": list(split.labelled), "val": list(split.validation)}]


def synthetic_slice_pool(n_cases: int, n_organs: int = 3, shape: tuple[int, int] = (96, 96), anatomy_seed: int = 0,
                         variation: PatientVariation = PatientVariation(), prefix: str = "patient") -> list[SliceCase]:
    """`n_cases` synthetic patients (one CT-like slice each) of one anatomy; patient i is drawn with seed i."""
    pool = []
    for index in range(n_cases):
        image, labels = synthetic_ct_slice(shape, n_organs, seed=1000 + index, anatomy_seed=anatomy_seed,
                                           variation=variation)
        pool.append(SliceCase(f"{prefix}_{index:03d}", image, labels))
    return pool
