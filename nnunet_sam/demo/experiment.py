"""One nnU-Net dataset's semi-supervised runs in this process, with the stock commands' Python entry points:
plan and preprocess, train (`nnUNetv2_train`), pseudo labels (`nnsam_refine -d`, or unrefined ones for the
benchmark's controls), fine-tune SAM (`nnsam_finetune`), predict and evaluate held-out cases
(`nnUNetv2_predict`, nnU-Net's evaluation). Used by `nnsam_demo` and `benchmarks/ssl_gain.py`.

The nnU-Net environment variables must point at the experiment's folders before nnU-Net is imported
(`nnunet_environment`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnunet_sam.demo.nnunet_setup import cpu_sized_2d_network, plan_and_preprocess, spawn_pools_in_threads
from nnunet_sam.sam.refine import RefineSettings

__all__ = ["nnunet_environment", "Experiment", "validation_curve", "plateau_change"]

logger = logging.getLogger(__name__)


def nnunet_environment(root: Path, trainer_dirs: list[Path], device: torch.device) -> dict[str, str]:
    """The nnU-Net environment variables for an experiment under `root` (set them before importing nnU-Net)."""
    from nnunet_sam.cli.trainer_dir import trainer_dir

    env = {"nnUNet_raw": str(root / "nnUNet_raw"), "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
           "nnUNet_results": str(root / "nnUNet_results"),
           "nnUNet_extTrainer": os.pathsep.join([*map(str, trainer_dirs), str(trainer_dir())])}
    if device.type == "cpu":
        env["nnUNet_n_proc_DA"] = os.environ.get("nnUNet_n_proc_DA", "1")
    env["nnUNet_def_n_proc"] = os.environ.get("nnUNet_def_n_proc", "2")
    return env


def validation_curve(fold_folder: Path) -> dict[str, list[float]]:
    """nnU-Net's per-epoch validation pseudo-Dice (mean over classes, and its moving average) and training
    loss, from the fold's final checkpoint."""
    checkpoint = torch.load(fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logged = checkpoint["logging"]
    return {"mean_fg_dice": [float(v) for v in logged["mean_fg_dice"]],
            "ema_fg_dice": [float(v) for v in logged["ema_fg_dice"]],
            "train_losses": [float(v) for v in logged["train_losses"]]}


def plateau_change(curve: list[float]) -> float:
    """How much a per-epoch validation curve still rose at the end: the mean of its last quarter minus the mean
    of the quarter before (near 0: plateaued; averaging quarters evens out nnU-Net's noisy pseudo-Dice)."""
    quarter = max(1, len(curve) // 4)
    if len(curve) < 2 * quarter:
        return 0.0
    return float(np.mean(curve[-quarter:]) - np.mean(curve[-2 * quarter:-quarter]))


@dataclass
class Experiment:
    """Runs on one dataset, one configuration and one fold."""

    dataset_id: int
    configuration: str
    fold: str
    device: torch.device
    root: Path  # the folder nnUNet_raw/_preprocessed/_results point into

    @property
    def raw(self) -> Path:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        return self.root / "nnUNet_raw" / maybe_convert_to_dataset_name(self.dataset_id)

    def plan(self, cpu_sized: bool = False) -> None:
        """nnUNetv2_plan_and_preprocess -d ID -c CONFIGURATION; `cpu_sized`: with the narrower 2d U-Net of
        `cpu_sized_2d_network` (CPU runs)."""
        plan_and_preprocess(self.dataset_id, (self.configuration,), cpu_sized_2d_network if cpu_sized else None)

    def preprocess_unlabeled(self) -> int:
        """nnsam_preprocess_unlabeled -d ID -c CONFIGURATION --overwrite; returns the number of cases."""
        from nnunet_sam.nnunet.datasets import dataset_folders
        from nnunet_sam.nnunet.unlabeled import preprocess_unlabeled

        return len(preprocess_unlabeled(dataset_folders(str(self.dataset_id), self.configuration), overwrite=True))

    def fold_folder(self, trainer: str) -> Path:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        return Path(get_output_folder(self.dataset_id, trainer, "nnUNetPlans", self.configuration, self.fold))

    def train(self, trainer: str) -> Path:
        """nnUNetv2_train ID CONFIGURATION FOLD -tr TRAINER (with --c when a checkpoint is there); the fold folder."""
        from nnunetv2.run.run_training import run_training

        fold_dir = self.fold_folder(trainer)
        if (fold_dir / "checkpoint_final.pth").is_file():
            return fold_dir
        resume = (fold_dir / "checkpoint_latest.pth").is_file()
        with spawn_pools_in_threads():  # the final validation's export pools: no process start-up
            run_training(str(self.dataset_id), self.configuration, self.fold, trainer, continue_training=resume,
                         device=self.device)
        return fold_dir

    def _dataset_plan(self, initial_trainer: str, gt_dir: Path | None, overlays: bool = False, **pseudo_options):
        from nnunet_sam.nnunet.predict import ModelChoice
        from nnunet_sam.nnunet.refine_dataset import DatasetJob, plan_dataset_job

        job = DatasetJob(dataset=str(self.dataset_id), configuration=self.configuration,
                         model=ModelChoice(trainer=initial_trainer, folds=(self.fold,)), gt_dir=gt_dir,
                         overlays=overlays, **pseudo_options)
        return plan_dataset_job(job)

    def _initial_model(self, plan):
        from nnunet_sam.nnunet.predict import InitialModel

        return InitialModel(plan.model_folder, plan.model, self.device)

    def sam_pseudo_labels(self, initial_trainer: str, embeddings: Path, gt_dir: Path | None = None,
                          checkpoint: str | None = None, overlays: bool = False,
                          settings: RefineSettings | None = None, **pseudo_options) -> dict:
        """nnsam_refine -d ID -c CONFIGURATION -f FOLD -tr INITIAL [--checkpoint] [--gt]; the report (the initial
        prediction mirrored, as nnsam_refine and nnUNetv2_predict do by default).
        The slices' embeddings are cached in `embeddings`, so a second refinement only decodes. `settings`: the
        refinement's flags (default: nnsam_refine's defaults); `pseudo_options`: DatasetJob's ignore_disagreement,
        min_case_agreement."""
        from nnunet_sam.nnunet.refine_dataset import refine_dataset
        from nnunet_sam.sam import SamRefiner, load_sam
        from nnunet_sam.sam.embedding_cache import EmbeddingCache

        plan = self._dataset_plan(initial_trainer, gt_dir, overlays, **pseudo_options)
        model = load_sam("litemedsam", checkpoint, self.device)
        refiner = SamRefiner(model, settings, cache=EmbeddingCache(embeddings, model))
        return refine_dataset(plan, refiner, self._initial_model(plan))

    def unrefined_pseudo_labels(self, initial_trainer: str | None, gt_dir: Path | None = None,
                                cases: list[str] | None = None) -> int:
        """Pseudo labels without SAM: the initial model's predictions, or (`initial_trainer=None`) the truth; only
        for `cases` if given (the others get none)."""
        from nnunet_sam.nnunet.preprocessed_cases import remove_case
        from nnunet_sam.nnunet.refine_dataset import write_unrefined_pseudo_labels

        if initial_trainer is None:
            plan, initial = self._truth_plan(gt_dir), None
        else:
            plan = self._dataset_plan(initial_trainer, gt_dir)
            initial = self._initial_model(plan)
        written = write_unrefined_pseudo_labels(plan, initial)
        for case_id in set(written) - set(written if cases is None else cases):
            remove_case(plan.pseudo_labels, case_id)
        return len(written) if cases is None else len(cases)

    def _truth_plan(self, gt_dir: Path | None):
        from nnunet_sam.nnunet.datasets import dataset_folders
        from nnunet_sam.nnunet.predict import ModelChoice
        from nnunet_sam.nnunet.refine_dataset import DatasetJob, DatasetPlan
        from nnunet_sam.nnunet.unlabeled import find_unlabeled_cases

        folders = dataset_folders(str(self.dataset_id), self.configuration)
        job = DatasetJob(dataset=str(self.dataset_id), configuration=self.configuration, gt_dir=gt_dir)
        return DatasetPlan(job=job, folders=folders, model_folder=Path(), model=ModelChoice(folds=(self.fold,)),
                           unlabeled=find_unlabeled_cases(folders))

    def finetune_sam(self, epochs: int, embeddings: Path, evaluate_with: str | None = None,
                     output: Path | None = None, **settings) -> dict:
        """nnsam_finetune -d ID -c CONFIGURATION -f FOLD [-o OUTPUT]: LiteMedSAM's decoder fine-tuned on the fold's
        labelled training cases; the report (with the checkpoint's path). `settings`: other `FinetuneSettings`
        fields (e.g. weak_prompts)."""
        from nnunet_sam.nnunet.finetune_dataset import FinetuneJob, finetune_dataset, plan_finetune_job
        from nnunet_sam.nnunet.predict import ModelChoice
        from nnunet_sam.sam import RefineSettings, load_sam
        from nnunet_sam.sam.finetune import FinetuneSettings

        choice = None if evaluate_with is None else ModelChoice(trainer=evaluate_with, tta=False)
        job = FinetuneJob(dataset=str(self.dataset_id), configuration=self.configuration, fold=self.fold,
                          output=output, evaluate_with=choice, cache_dir=embeddings)
        plan = plan_finetune_job(job, "litemedsam", "single")
        return finetune_dataset(plan, load_sam("litemedsam", None, self.device), RefineSettings(),
                                FinetuneSettings(epochs=epochs, **settings))

    def evaluate(self, trainer: str, images: Path, labels: Path, out: Path, n_classes: int) -> dict:
        """Predict `images` with the trained fold (nnUNetv2_predict's predictor, mirroring as by default) into
        `out` and compute Dice against `labels` (nnU-Net's evaluation): per class and the mean."""
        from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        out.mkdir(parents=True, exist_ok=True)
        predictor = nnUNetPredictor(use_mirroring=True, perform_everything_on_device=self.device.type == "cuda",
                                    device=self.device, verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(self.fold_folder(trainer).parent),
                                                       (self.fold if self.fold == "all" else int(self.fold),))
        predictor.predict_from_files_sequential(str(images), str(out))
        with spawn_pools_in_threads():
            metrics = compute_metrics_on_folder(str(labels), str(out), str(out / "summary.json"), SimpleITKIO(),
                                                ".nii.gz", list(range(1, n_classes + 1)), num_processes=1)
        return {"dice": {str(k): _finite(v["Dice"]) for k, v in metrics["mean"].items()},
                "mean_dice": _finite(metrics["foreground_mean"]["Dice"])}

    def archive(self, trainer: str, target: Path) -> Path:
        """Move a trained fold's folder to `target` (so another arm can train the same trainer class)."""
        source = self.fold_folder(trainer)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
        return target


def _finite(value: float) -> float:
    """nnU-Net's evaluation gives NaN Dice for a class absent from truth and prediction: count it as 1."""
    return 1.0 if np.isnan(value) else float(value)
