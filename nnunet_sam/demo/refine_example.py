"""Write a small synthetic example for `nnsam_refine`: images, weak masks and ground truth in nnU-Net
raw naming. `python -m nnunet_sam.demo.refine_example FOLDER [--cases N]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_sam.demo.degrade import degrade_labels
from nnunet_sam.demo.synthetic import synthetic_ct_case
from nnunet_sam.utils.atomic import atomic_path

logger = logging.getLogger(__name__)


def _write(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def write_refine_example(folder: Path, cases: int = 2, shape: tuple[int, int, int] = (32, 96, 96)) -> None:
    """imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz (truth) and weak_masks/CASE.nii.gz (degraded)."""
    for sub in ("imagesTr", "labelsTr", "weak_masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index in range(cases):
        case_id = f"example_{index:03d}"
        case = synthetic_ct_case(shape=shape, seed=index)
        weak = degrade_labels(case.labels, seed=index, body=case.image > -500)
        _write(case.image, case.spacing, folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        _write(case.labels, case.spacing, folder / "labelsTr" / f"{case_id}.nii.gz")
        _write(weak, case.spacing, folder / "weak_masks" / f"{case_id}.nii.gz")
    logger.info("wrote %d synthetic cases to %s", cases, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path, help="where to write imagesTr/, labelsTr/, weak_masks/")
    parser.add_argument("--cases", type=int, default=2, help="number of synthetic cases")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_refine_example(args.folder, args.cases)


if __name__ == "__main__":
    main()
