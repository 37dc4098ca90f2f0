"""Where a dataset's files live, the nnU-Net way, which pseudo labels a fold may read, and the dataset of the
unlabelled cases (the pseudo labels' file format and dataset: `pseudolabels.py`).

Layout (beside nnU-Net's own folders; `<data_identifier>` is the configuration's, e.g.
`nnUNetPlans_3d_fullres`):

    nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/CASE_0000.nii.gz       unlabelled scans (user files)
    nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled/  CASE.b2nd, CASE_seg.b2nd
                                                                      (placeholder: 0 inside, -1 outside
                                                                      the nonzero mask), CASE.pkl
    nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_pseudolabels/<plans_identifier>/fold_<F>/
                                                                      CASE_seg.b2nd, CASE.pkl (with the
                                                                      pseudo labels' class_locations),
                                                                      refine_report.json

Pseudo labels belong to one plans identifier (nnU-Net's ResEnc presets share a data identifier with nnUNetPlans
but not a model) and to the one training fold F that may read them: those made by fold k's model are for fold k
(that model never saw fold k's validation cases); those of an ensemble of folds, or of fold `all`, are for fold
`all` only (each model of an ensemble saw other folds' validation cases).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.preprocessed_cases import finished_cases

UNLABELED_IMAGES = "imagesUnlabeled"
UNLABELED_SUFFIX = "_unlabeled"
PSEUDO_SUFFIX = "_pseudolabels"


def dataset_number(name: str) -> int:
    """The number in DatasetXXX_Name: what nnU-Net's commands take as -d."""
    return int(name[len("Dataset"):len("Dataset") + 3])


def unlabeled_folder(preprocessed_data_folder: str | os.PathLike) -> Path:
    """The preprocessed unlabelled cases of a configuration, beside its labelled ones.

    `preprocessed_data_folder` is nnU-Net's `nnUNet_preprocessed/DatasetXXX/<data_identifier>`
    (a trainer's `self.preprocessed_dataset_folder`)."""
    folder = Path(preprocessed_data_folder)
    return folder.parent / (folder.name + UNLABELED_SUFFIX)


def pseudo_label_root(preprocessed_data_folder: str | os.PathLike) -> Path:
    """The folder holding every pseudo-label set of a configuration's unlabelled cases (per plans and fold)."""
    folder = Path(preprocessed_data_folder)
    return folder.parent / (folder.name + PSEUDO_SUFFIX)


def pseudo_label_folder(preprocessed_data_folder: str | os.PathLike, plans_identifier: str, fold: str | int) -> Path:
    """The pseudo labels that training fold `fold` of plans `plans_identifier` reads (written by `nnsam_refine -d`
    with that fold's model, see `training_fold`)."""
    return pseudo_label_root(preprocessed_data_folder) / plans_identifier / f"fold_{fold}"


def pseudo_label_sets(preprocessed_data_folder: str | os.PathLike) -> list[Path]:
    """Every pseudo-label set (plans identifier and fold) of a configuration's unlabelled cases."""
    root = pseudo_label_root(preprocessed_data_folder)
    return sorted(p for p in root.glob("*/fold_*") if p.is_dir()) if root.is_dir() else []


def training_fold(model_folds: list[str] | tuple[str, ...]) -> str:
    """The one training fold that may read pseudo labels made by a model of `model_folds`: fold k for fold k's
    model, `all` for fold all's model or for an ensemble (its models saw the other folds' validation cases)."""
    return str(model_folds[0]) if len(model_folds) == 1 else "all"


@dataclass
class DatasetFolders:
    """A dataset's nnU-Net folders and one configuration's preprocessed data folder."""

    name: str  # DatasetXXX_Name
    raw: Path
    preprocessed: Path  # nnUNet_preprocessed/DatasetXXX_Name
    plans_identifier: str
    configuration: str
    data_identifier: str

    @property
    def dataset_id(self) -> int:
        return dataset_number(self.name)

    @property
    def plans_file(self) -> Path:
        return self.preprocessed / f"{self.plans_identifier}.json"

    @property
    def data_folder(self) -> Path:
        return self.preprocessed / self.data_identifier

    @property
    def unlabeled_images(self) -> Path:
        return self.raw / UNLABELED_IMAGES

    @property
    def unlabeled_data(self) -> Path:
        return unlabeled_folder(self.data_folder)

    def pseudo_labels_for(self, fold: str) -> Path:
        """The pseudo labels training fold `fold` of these plans reads."""
        return pseudo_label_folder(self.data_folder, self.plans_identifier, fold)

    def dataset_json(self) -> dict:
        return load_json(str(self.preprocessed / "dataset.json"))

    def plans(self) -> dict:
        return load_json(str(self.plans_file))


def case_spacing(plans_manager, configuration_manager, properties: dict) -> list[float]:
    """Voxel spacing (z, y, x) of a preprocessed case; 2d configurations keep the original slice distance."""
    spacing = list(configuration_manager.spacing)
    if len(spacing) == 2:
        spacing = [properties["spacing"][plans_manager.transpose_forward[0]], *spacing]
    return spacing


def _env_folder(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        raise NnsamError(f"environment variable {variable} is not set; export it as for nnU-Net "
                         f"(see nnU-Net's documentation/set_environment_variables.md)")
    return Path(value)


def dataset_folders(dataset: str, configuration: str, plans_identifier: str = "nnUNetPlans") -> DatasetFolders:
    """Resolve `-d/-c/-p` to folders; errors say which nnU-Net command is missing."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    raw_root = _env_folder("nnUNet_raw")
    preprocessed_root = _env_folder("nnUNet_preprocessed")
    if not re.fullmatch(r"\d+|Dataset\d{3}_\S+", dataset):
        raise NnsamError(f"-d {dataset} is neither a dataset id (e.g. 42) nor a dataset name "
                         f"(e.g. Dataset042_Liver)")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise NnsamError(f"dataset {dataset} not found in nnUNet_raw={raw_root} or nnUNet_preprocessed="
                         f"{preprocessed_root}; check -d and the environment variables") from None
    preprocessed = preprocessed_root / name
    plans_file = preprocessed / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise NnsamError(f"{plans_file} not found; run nnUNetv2_plan_and_preprocess -d {dataset_number(name)} first "
                         f"(or check -p)")
    plans = load_json(str(plans_file))
    configurations = plans.get("configurations", {})
    if configuration not in configurations:
        raise NnsamError(f"configuration {configuration!r} is not in {plans_file}; available: "
                         f"{', '.join(sorted(configurations))}")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    return DatasetFolders(name=name, raw=raw_root / name, preprocessed=preprocessed,
                          plans_identifier=plans_identifier, configuration=configuration,
                          data_identifier=data_identifier)


def open_unlabeled_dataset(preprocessed_data_folder: str | os.PathLike, command_hint: str) -> nnUNetDatasetBlosc2:
    """The preprocessed unlabelled cases; a clear error naming `command_hint` when there are none."""
    folder = unlabeled_folder(preprocessed_data_folder)
    cases = finished_cases(folder)
    if not cases:
        raise NnsamError(f"no preprocessed unlabelled cases in {folder}; run {command_hint}")
    return nnUNetDatasetBlosc2(str(folder), cases)


def made_by(labels: Path) -> dict | None:
    """The initial model recorded in a pseudo-label set's refine_report.json (None: made from the truth);
    an NnsamError when the set has no report."""
    report = labels / "refine_report.json"
    if not report.is_file():
        raise NnsamError(f"{report} not found: the pseudo labels do not say which model made them; rerun "
                         f"nnsam_refine -d")
    return load_json(str(report)).get("initial_model")


def check_made_for_fold(labels: Path, fold: str, command_hint: str) -> None:
    """Refuse pseudo labels for training fold `fold` that a model of other folds made: such a model trained on
    this fold's validation cases, and cross-validation would be optimistic (fold `all` has no validation)."""
    model = made_by(labels)
    if model is None or str(fold) == "all":
        return
    folds = [str(f) for f in model["folds"]]
    if folds != [str(fold)]:
        raise NnsamError(f"the pseudo labels in {labels} come from fold(s) {', '.join(folds)}, not fold {fold} "
                         f"alone: that model saw fold {fold}'s validation cases (leakage); run {command_hint}")


def pseudo_label_model_checkpoint(labels: Path, fold: str | int) -> Path:
    """The checkpoint of the nnU-Net whose predictions the pseudo labels in `labels` refine, for a trainer that
    starts from it. It must be one model of the same fold: a model of another fold, or an ensemble, has seen this
    fold's validation cases."""
    return pseudo_label_model(labels, fold)[1]


def pseudo_label_model(labels: Path, fold: str | int) -> tuple[str, Path]:
    """The trainer name and checkpoint of the one model of this fold that made the pseudo labels in `labels` (see
    `pseudo_label_model_checkpoint`)."""
    model = made_by(labels)
    if not model:
        raise NnsamError(f"the pseudo labels in {labels} were not made by a trained model (see its "
                         f"refine_report.json)")
    if [str(f) for f in model["folds"]] != [str(fold)]:
        raise NnsamError(f"the pseudo labels in {labels} come from fold(s) {', '.join(map(str, model['folds']))}, "
                         f"not fold {fold}: starting from that model would leak its training cases into this fold's "
                         f"validation; make them with nnsam_refine -d ... -f {fold}")
    checkpoint = Path(model["folder"]) / f"fold_{fold}" / model["checkpoint"]
    if not checkpoint.is_file():
        raise NnsamError(f"{checkpoint} (the model that made the pseudo labels in {labels}) no longer exists")
    return model["trainer"], checkpoint
