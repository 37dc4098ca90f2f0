"""Initial predictions of unlabelled cases in preprocessed space, with nnU-Net's own predictor
(one fold or an ensemble of folds, any trainer, TTA as nnUNetv2_predict does it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.file_path_utilities import get_output_folder

from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.datasets import DatasetFolders
from nnunet_sam.nnunet.splits import fold_name

logger = logging.getLogger(__name__)


@dataclass
class ModelChoice:
    """Which trained nnU-Net model makes the initial predictions (nnUNetv2_predict's -tr -f -chk)."""

    trainer: str = "nnUNetTrainer"
    folds: tuple[str, ...] | None = None  # None: every fold that has the checkpoint
    checkpoint: str = "checkpoint_final.pth"
    tta: bool = True  # mirroring test-time augmentation, as nnUNetv2_predict does by default

    def to_dict(self, folder: Path) -> dict:
        return {"trainer": self.trainer, "folds": list(self.folds or ()), "checkpoint": self.checkpoint,
                "tta": self.tta, "folder": str(folder)}


def resolve_model(folders: DatasetFolders, choice: ModelChoice) -> tuple[Path, ModelChoice]:
    """The model folder and the folds to use; errors name the training command that is missing."""
    folder = Path(get_output_folder(folders.name, choice.trainer, folders.plans_identifier, folders.configuration))
    train = (f"nnUNetv2_train {folders.name} {folders.configuration} FOLD -tr {choice.trainer} "
             f"-p {folders.plans_identifier}")
    if not folder.is_dir():
        raise NnsamError(f"no trained model in {folder}; train one first: {train}")
    if choice.folds:
        folds = tuple(fold_name(f) for f in choice.folds)
        for fold in folds:
            if not (folder / f"fold_{fold}" / choice.checkpoint).is_file():
                raise NnsamError(f"{folder / f'fold_{fold}' / choice.checkpoint} not found; finish "
                                 f"{train.replace('FOLD', fold)}, or pick another -f/-chk")
    else:
        folds = tuple(str(f) for f in nnUNetPredictor.auto_detect_available_folds(str(folder), choice.checkpoint))
        if not folds:
            raise NnsamError(f"no fold in {folder} has {choice.checkpoint}; finish {train}, or pick -chk")
    return folder, ModelChoice(choice.trainer, folds, choice.checkpoint, choice.tta)


class InitialModel:
    """A trained nnU-Net that predicts preprocessed cases: labels and per-class probabilities."""

    def __init__(self, folder: Path, choice: ModelChoice, device: torch.device) -> None:
        self.folder, self.choice = folder, choice
        self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=choice.tta,
                                         perform_everything_on_device=device.type == "cuda", device=device,
                                         verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        folds = [f if f == "all" else int(f) for f in choice.folds]
        try:
            self.predictor.initialize_from_trained_model_folder(str(folder), folds, choice.checkpoint)
        except RuntimeError as exc:
            if "Could not find requested nnunet trainer" not in str(exc):
                raise
            raise NnsamError(f"trainer {choice.trainer} of {folder} is not importable; point nnUNet_extTrainer "
                             f"at the folder that defines it (ours: export nnUNet_extTrainer=$(nnsam_trainer_dir))"
                             ) from None
        self.label_manager = self.predictor.label_manager
        if self.label_manager.has_regions:
            raise NnsamError(f"{folder} was trained on regions; SAM refinement needs label maps "
                             f"(region-based datasets are not supported)")

    def predict(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels (Z, Y, X) int16 and probabilities (K, Z, Y, X) float32 of a preprocessed case (C, Z, Y, X)."""
        logits = self.predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.ascontiguousarray(data)))
        probabilities = self.label_manager.apply_inference_nonlin(logits.float())
        labels = self.label_manager.convert_probabilities_to_segmentation(probabilities)
        return np.asarray(labels, dtype=np.int16), probabilities.numpy().astype(np.float32, copy=False)
