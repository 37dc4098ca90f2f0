"""A tiny nnU-Net dataset ready for our trainers: 2 labelled cases planned and preprocessed by nnU-Net, 2 extra
cases faked from them in the `_unlabeled` and `_pseudolabels` folders, and very short trainer variants in a
folder that `nnUNet_extTrainer` points to beside `nnsam_trainer_dir`: what a user has after nnsam_refine -d."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

DATASET = "Dataset990_SyntheticCT"
CONFIGURATION = "3d_fullres"
LABELLED = ("syntheticctTr_000", "syntheticctTr_001")


def fake_model_record(folds: list[str], trainer: str = "nnUNetTrainer", folder: str = "unused") -> dict:
    """An initial model as refine_report.json records it."""
    return {"trainer": trainer, "folds": folds, "checkpoint": "checkpoint_final.pth", "tta": False, "folder": folder}


def fake_extra_cases(data_folder: Path, case_ids: dict[str, str], plans_file: Path) -> None:
    """Copy preprocessed labelled cases (`case_ids`: labelled id -> new id) into the `_unlabeled` folder
    (placeholder labels, no class locations) and write their labels as pseudo labels (`write_pseudo_label`, the
    format's owner) for folds 0, 1 and all: the layout of nnsam_preprocess_unlabeled and nnsam_refine -d."""
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle, write_pickle
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_sam.nnunet.datasets import pseudo_label_folder, unlabeled_folder
    from nnunet_sam.nnunet.pseudolabels import write_pseudo_label

    plans = PlansManager(load_json(str(plans_file)))
    label_manager = plans.get_label_manager(load_json(str(plans_file.parent / "dataset.json")))
    patch_size = plans.get_configuration(CONFIGURATION).patch_size
    unlabeled = unlabeled_folder(data_folder)
    unlabeled.mkdir(exist_ok=True)
    cases = {}
    for source, target in case_ids.items():
        seg = blosc2.open(str(data_folder / f"{source}_seg.b2nd"), mode="r")[:]
        properties = load_pickle(str(data_folder / f"{source}.pkl"))
        cases[target] = seg, properties
        shutil.copy(data_folder / f"{source}.b2nd", unlabeled / f"{target}.b2nd")
        blosc2.asarray(np.where(seg < 0, -1, 0).astype(np.int16), urlpath=str(unlabeled / f"{target}_seg.b2nd"),
                       mode="w")
        write_pickle({**properties, "class_locations": {}}, str(unlabeled / f"{target}.pkl"))
    for fold in ("0", "1", "all"):  # one pseudo-label set per training fold, each made by "that fold's model"
        pseudo = pseudo_label_folder(data_folder, "nnUNetPlans", fold)
        for target, (seg, properties) in cases.items():
            write_pseudo_label(pseudo, target, seg, properties, label_manager, patch_size)
        (pseudo / "refine_report.json").write_text(json.dumps({"initial_model": fake_model_record([fold])}))


def prepare_dataset(root: Path, trainer_folder: Path, epochs: int = 2, iterations: int = 2,
                    shape: tuple[int, int, int] = (32, 48, 48), nnsam_trainers: Path | None = None) -> dict[str, str]:
    """The whole set-up under `root`; returns the environment variables it needs, which it also sets.
    `nnsam_trainers`: our trainers' folder for nnUNet_extTrainer (default: this process's `nnsam_trainer_dir`)."""
    from batchgenerators.utilities.file_and_folder_operations import save_json

    from nnunet_sam.cli.trainer_dir import trainer_dir
    from nnunet_sam.demo.dataset import SyntheticDatasetSpec, write_synthetic_dataset
    from nnunet_sam.demo.nnunet_setup import plan_and_preprocess, write_short_trainers

    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"),
           "nnUNet_extTrainer": os.pathsep.join((str(trainer_folder), str(nnsam_trainers or trainer_dir())))}
    os.environ.update(env)
    spec = SyntheticDatasetSpec(labelled=2, unlabelled=2, test=0, shape=shape)
    write_synthetic_dataset(root / "raw", spec)
    plan_and_preprocess(spec.dataset_id)
    preprocessed = root / "preprocessed" / DATASET
    save_json([{"train": [LABELLED[0]], "val": [LABELLED[1]]}, {"train": [LABELLED[1]], "val": [LABELLED[0]]}],
              str(preprocessed / "splits_final.json"))
    fake_extra_cases(preprocessed / f"nnUNetPlans_{CONFIGURATION}",
                     {LABELLED[0]: "syntheticctUn_000", LABELLED[1]: "syntheticctUn_001"},
                     preprocessed / "nnUNetPlans.json")
    write_short_trainers(trainer_folder, epochs, iterations)
    return env


@contextmanager
def environment(variables: dict[str, str]):
    """Set environment variables for the duration of the block; the whole environment is restored."""
    saved = dict(os.environ)
    os.environ.update(variables)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
