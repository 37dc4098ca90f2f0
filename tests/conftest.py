"""Shared fixtures: a small CT-like phantom with two organs, and the real LiteMedSAM model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

os.environ.setdefault("nnUNet_n_proc_DA", "1")
os.environ.setdefault("nnUNet_def_n_proc", "2")

CT_WINDOW = (-200.0, 400.0)
CONFIG = "3d_fullres"


@dataclass
class Phantom:
    image: np.ndarray  # (Z, Y, X) float32
    labels: np.ndarray  # (Z, Y, X) uint8
    spacing: tuple[float, float, float]  # (z, y, x)


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_phantom(shape=(16, 48, 48), seed: int = 0, spacing=(3.0, 1.0, 1.0)) -> Phantom:
    """Body of soft tissue in air with a bright and a dark organ; noise and blurred borders."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    body = _ellipsoid(shape, (z / 2, y / 2, x / 2), (z * 2, y * 0.46, x * 0.46))
    labels = np.zeros(shape, dtype=np.uint8)
    labels[_ellipsoid(shape, (z / 2, y * 0.36, x * 0.34), (z * 0.35, y * 0.2, x * 0.17))] = 1
    labels[_ellipsoid(shape, (z / 2 + 1, y * 0.64, x * 0.66), (z * 0.3, y * 0.16, x * 0.2))] = 2
    image = np.where(body, 40.0, -1000.0)
    image[labels == 1] = 220.0
    image[labels == 2] = -110.0
    image = ndimage.gaussian_filter(image, 0.7) + rng.normal(0, 12.0, shape)
    return Phantom(image=image.astype(np.float32), labels=labels, spacing=spacing)


def degrade(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A weak model's mask: class 1 over-segmented, class 2 under-segmented, a false-positive blob of
    class 1, and one slice of class 2 missing."""
    out = np.zeros_like(labels)
    out[ndimage.binary_dilation(labels == 1, iterations=2, structure=np.ones((1, 3, 3)))] = 1
    out[ndimage.binary_erosion(labels == 2, iterations=2, structure=np.ones((1, 3, 3)))] = 2
    out[2:4, 40:44, 4:8] = 1  # false positive far from the organ
    slices2 = np.flatnonzero((labels == 2).any(axis=(1, 2)))
    out[slices2[len(slices2) // 2]][out[slices2[len(slices2) // 2]] == 2] = 0
    return out


# --- test tiers: `make quick` runs `-m "not slow"` -------------------------------------------------------

SLOW_FIXTURES = {  # set-ups that plan nnU-Net datasets, train, fine-tune SAM or install the package
    "planned_dataset", "baseline", "nnunet_data", "trained", "fewshot", "finetuned", "finetune_run", "training",
    "finetuner", "installed", "unlabeled", "pseudo_labels", "pristine", "more_unlabelled", "preprocessed_reference",
    "refined_reference", "files_job", "files_reference", "degraded_result",
}


def pytest_collection_modifyitems(config, items) -> None:
    """A test that uses a slow set-up is slow: marked here, so that a new test on such a fixture cannot slip
    into the quick tier. Slow tests without one are marked where they are written."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def phantom() -> Phantom:
    return make_phantom()


@pytest.fixture(scope="session")
def litemedsam():
    from nnunet_sam.sam import load_sam

    return load_sam("litemedsam", device="cpu")


def write_nifti(array: np.ndarray, path: Path, spacing=(3.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                dtype=None) -> Path:
    """Write a (Z, Y, X) array as NIfTI with spacing given in (z, y, x) order."""
    image = sitk.GetImageFromArray(array if dtype is None else array.astype(dtype))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


# --- a planned and preprocessed nnU-Net dataset, shared by the nnU-Net integration tests ------------

@dataclass
class PlannedDataset:
    dataset_id: int
    name: str
    raw: Path  # nnUNet_raw/DatasetXXX_Name
    preprocessed: Path  # nnUNet_preprocessed/DatasetXXX_Name
    results: Path  # nnUNet_results
    env: dict  # environment variables a subprocess needs (nnU-Net paths, extTrainer, DA processes)


@pytest.fixture(scope="session")
def planned_dataset(tmp_path_factory) -> PlannedDataset:
    """A synthetic dataset (2 labelled, 2 unlabelled, 1 test case, 32x48x48, 2 organs) planned and
    preprocessed for 3d_fullres with nnU-Net's Python API; nnU-Net's environment variables point at
    it for the rest of the session, and nnUNet_extTrainer at short trainer variants + our trainers."""
    from nnunet_sam.cli.trainer_dir import trainer_dir
    from nnunet_sam.demo.dataset import SyntheticDatasetSpec, write_synthetic_dataset
    from nnunet_sam.demo.nnunet_setup import plan_and_preprocess, write_short_trainers

    root = tmp_path_factory.mktemp("nnunet")
    ext = root / "ext_trainers"
    write_short_trainers(ext, epochs=2, iterations=2)
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "2",
           "nnUNet_extTrainer": os.pathsep.join([str(ext), str(trainer_dir())])}
    os.environ.update(env)
    spec = SyntheticDatasetSpec(dataset_id=991, name="PipelineTest", labelled=2, unlabelled=2, test=1, organs=2)
    raw = write_synthetic_dataset(root / "raw", spec)
    plan_and_preprocess(spec.dataset_id)
    return PlannedDataset(dataset_id=spec.dataset_id, name=spec.folder_name, raw=raw,
                          preprocessed=root / "preprocessed" / spec.folder_name, results=root / "results",
                          env={**os.environ, **env})


def train_fold(dataset: PlannedDataset, trainer: str, fold: str = "0") -> Path:
    """Train `trainer` on one fold of the planned dataset (CPU); returns the fold's results folder."""
    import torch
    from nnunetv2.run.run_training import run_training

    run_training(str(dataset.dataset_id), CONFIG, fold, trainer, device=torch.device("cpu"))
    return dataset.results / dataset.name / f"{trainer}__nnUNetPlans__{CONFIG}" / f"fold_{fold}"


@pytest.fixture(scope="session")
def baseline(planned_dataset) -> Path:
    """nnUNetTrainerShort (2x2 iterations) trained on fold 0 of the planned dataset (after the leave-one-out
    split that nnsam_preprocess_unlabeled writes for its 2 labelled cases)."""
    from nnunet_sam.nnunet.datasets import dataset_folders
    from nnunet_sam.nnunet.splits import ensure_few_label_splits

    ensure_few_label_splits(dataset_folders(str(planned_dataset.dataset_id), CONFIG))
    return train_fold(planned_dataset, "nnUNetTrainerShort")


def error_of(main, argv: list[str], capsys) -> str:
    """Run a console script's main, expect the one-line error exit (status 2), return the message."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]
