"""The whole method on a synthetic dataset, with the stock commands' Python entry points: plan and
preprocess, a short baseline, nnsam_preprocess_unlabeled, nnsam_refine -d with LiteMedSAM (with
`finetune`: then nnsam_finetune on the labelled cases and nnsam_refine -d again with the fine-tuned decoder,
whose pseudo labels the trainers use), short SAM-pseudo (and Mean Teacher) trainings, prediction of
held-out test cases, evaluation, report.

Each stage stores its result in `DIR/stages/<stage>.json` when it finishes; a re-run into the same
folder skips finished stages (an interrupted training continues from its latest checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from nnunet_sam.demo.dataset import SyntheticDatasetSpec, write_synthetic_dataset
from nnunet_sam.demo.nnunet_setup import plan_and_preprocess, spawn_pools_in_threads, write_short_trainers
from nnunet_sam.errors import NnsamError
from nnunet_sam.utils.atomic import write_json_atomic

logger = logging.getLogger(__name__)

CONFIGURATION = "3d_fullres"
FOLD = "all"  # 2 labelled cases: train on both; the held-out test cases measure the models
SUFFIX = "Demo"  # the demo's trainers are nnU-Net-style short variants: nnUNetTrainerDemo, ...
BASELINE = "baseline"


@dataclass
class Schedule:
    epochs: int
    iterations: int  # per epoch


def schedule_for(device: torch.device, quick: bool) -> Schedule:
    """Training length of every model: fits the time budget on 2 CPU cores; longer on a GPU."""
    if device.type == "cuda":
        return Schedule(20, 25) if quick else Schedule(50, 50)
    return Schedule(4, 10) if quick else Schedule(8, 10)


def finetune_epochs(device: torch.device, quick: bool) -> int:
    """Epochs of the optional SAM decoder fine-tuning (--finetune): about 3 min on 2 CPU cores."""
    if device.type == "cuda":
        return 30
    return 4 if quick else 8


def dataset_spec(quick: bool) -> SyntheticDatasetSpec:
    return SyntheticDatasetSpec(dataset_id=987, name="NnsamDemo", labelled=2, unlabelled=3 if quick else 6,
                                test=2 if quick else 3, organs=3, shape=(32, 48, 48), seed=12)


def trainers(quick: bool) -> dict[str, str]:
    """Model name in the report -> trainer class the demo trains (each from scratch, equally long)."""
    names = {BASELINE: f"nnUNetTrainer{SUFFIX}", "SAM pseudo": f"nnUNetTrainerSAMPseudo{SUFFIX}"}
    if not quick:
        names["Mean Teacher"] = f"nnUNetTrainerMeanTeacher{SUFFIX}"
    return names


class Demo:
    """The demo's stages in order; `run()` does those not finished yet."""

    def __init__(self, out: Path, device: torch.device, quick: bool = False,
                 spec: SyntheticDatasetSpec | None = None, schedule: Schedule | None = None,
                 finetune: bool = False) -> None:
        self.out, self.device, self.quick, self.finetune = out.resolve(), device, quick, finetune
        self.spec = spec or dataset_spec(quick)
        self.schedule = schedule or schedule_for(device, quick)
        self.raw = self.out / "nnUNet_raw" / self.spec.folder_name
        self.stages = self.out / "stages"

    def device_text(self) -> str:
        if self.device.type == "cuda":
            return f"GPU ({torch.cuda.get_device_name(self.device)})"
        return f"CPU ({torch.get_num_threads()} threads)"

    # --- stage bookkeeping ----------------------------------------------------------------------------

    def _set_environment(self) -> None:
        from nnunet_sam.cli.trainer_dir import trainer_dir

        os.environ.update({"nnUNet_raw": str(self.out / "nnUNet_raw"),
                           "nnUNet_preprocessed": str(self.out / "nnUNet_preprocessed"),
                           "nnUNet_results": str(self.out / "nnUNet_results"),
                           "nnUNet_extTrainer": os.pathsep.join([str(self.out / "trainers"), str(trainer_dir())])})
        if self.device.type == "cpu":
            os.environ.setdefault("nnUNet_n_proc_DA", "1")
        os.environ.setdefault("nnUNet_def_n_proc", "2")

    def _stage(self, name: str, work: Callable[[], dict]) -> dict:
        path = self.stages / f"{name}.json"
        if path.is_file():
            logger.info("stage %s: done before, skipped", name)
            return json.loads(path.read_text())
        logger.info("stage %s ...", name)
        started = time.perf_counter()
        result = {**work(), "seconds": round(time.perf_counter() - started, 1)}
        self.stages.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result, path)
        logger.info("stage %s done in %.0f s", name, result["seconds"])
        return result

    # --- stages ---------------------------------------------------------------------------------------

    def make_dataset(self) -> dict:
        if self.raw.exists():
            shutil.rmtree(self.raw)  # a half-written dataset from an interrupted run
        write_synthetic_dataset(self.out / "nnUNet_raw", self.spec)
        write_short_trainers(self.out / "trainers", self.schedule.epochs, self.schedule.iterations, SUFFIX)
        return {"spec": asdict(self.spec), "schedule": asdict(self.schedule), "finetune": self.finetune}

    def plan(self) -> dict:
        plan_and_preprocess(self.spec.dataset_id, (CONFIGURATION,))
        return {}

    def preprocess_unlabeled(self) -> dict:
        from nnunet_sam.nnunet.datasets import dataset_folders
        from nnunet_sam.nnunet.unlabeled import preprocess_unlabeled

        cases = preprocess_unlabeled(dataset_folders(str(self.spec.dataset_id), CONFIGURATION), overwrite=True)
        return {"cases": len(cases)}

    def fold_folder(self, trainer: str) -> Path:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        return Path(get_output_folder(self.spec.dataset_id, trainer, "nnUNetPlans", CONFIGURATION, FOLD))

    def train(self, trainer: str) -> dict:
        """nnUNetv2_train ID 3d_fullres all -tr TRAINER (with --c after an interruption)."""
        from nnunetv2.run.run_training import run_training

        fold_dir = self.fold_folder(trainer)
        resume = (fold_dir / "checkpoint_latest.pth").is_file()
        with spawn_pools_in_threads():  # the final validation's export pools: no process start-up
            run_training(str(self.spec.dataset_id), CONFIGURATION, FOLD, trainer, continue_training=resume,
                         device=self.device)
        return {"trainer": trainer, "folder": str(fold_dir)}

    def refine(self, checkpoint: str | None = None) -> dict:
        """nnsam_refine -d ID -c 3d_fullres -f all -tr <baseline> [--checkpoint fine-tuned SAM] --gt ...; the
        slices' embeddings are cached in DIR/embeddings, so a second refinement only decodes."""
        from nnunet_sam.nnunet.predict import InitialModel, ModelChoice
        from nnunet_sam.nnunet.refine_dataset import DatasetJob, plan_dataset_job, refine_dataset
        from nnunet_sam.sam import SamRefiner, load_sam
        from nnunet_sam.sam.embedding_cache import EmbeddingCache

        job = DatasetJob(dataset=str(self.spec.dataset_id), configuration=CONFIGURATION,
                         model=ModelChoice(trainer=trainers(self.quick)[BASELINE], folds=(FOLD,), tta=False),
                         gt_dir=self.raw / "labelsUnlabeledTruth", overlays=True)
        plan = plan_dataset_job(job)
        model = load_sam("litemedsam", checkpoint, self.device)
        report = refine_dataset(plan, SamRefiner(model, cache=EmbeddingCache(self.out / "embeddings", model)),
                                InitialModel(plan.model_folder, plan.model, self.device))
        overlays = self.out / "overlays"
        overlays.mkdir(exist_ok=True)
        prefix = "pseudo_label_" if checkpoint is None else "pseudo_label_finetuned_"
        for png in sorted((plan.folders.pseudo_labels / "overlays").glob("*.png")):
            shutil.copy(png, overlays / f"{prefix}{png.name}")
        return {"summary": report["summary"], "slices_encoded": sum(c["slices_encoded"] for c in report["cases"])}

    def finetune_sam(self) -> dict:
        """nnsam_finetune -d ID -c 3d_fullres -f all: LiteMedSAM's decoder fine-tuned on the labelled cases."""
        from nnunet_sam.nnunet.finetune_dataset import FinetuneJob, finetune_dataset, plan_finetune_job
        from nnunet_sam.sam import RefineSettings, load_sam
        from nnunet_sam.sam.finetune import FinetuneSettings

        job = FinetuneJob(dataset=str(self.spec.dataset_id), configuration=CONFIGURATION, fold=FOLD,
                          evaluate_with=None)
        plan = plan_finetune_job(job, "litemedsam", "single")
        settings = FinetuneSettings(epochs=finetune_epochs(self.device, self.quick))
        report = finetune_dataset(plan, load_sam("litemedsam", None, self.device), RefineSettings(), settings)
        return {"checkpoint": report["checkpoint"], "epochs": settings.epochs, **report["training"]}

    def evaluate(self, trainer: str) -> dict:
        """Predict the test cases (nnUNetv2_predict's predictor) and compute Dice (nnU-Net's evaluation)."""
        from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        predictions = self.out / "predictions" / trainer
        predictions.mkdir(parents=True, exist_ok=True)
        predictor = nnUNetPredictor(use_mirroring=True, perform_everything_on_device=self.device.type == "cuda",
                                    device=self.device, verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(
            get_output_folder(self.spec.dataset_id, trainer, "nnUNetPlans", CONFIGURATION), (FOLD,))
        predictor.predict_from_files_sequential(str(self.raw / "imagesTs"), str(predictions))
        labels = list(range(1, self.spec.organs + 1))
        with spawn_pools_in_threads():
            metrics = compute_metrics_on_folder(str(self.raw / "labelsTs"), str(predictions),
                                                str(predictions / "summary.json"), SimpleITKIO(), ".nii.gz",
                                                labels, num_processes=1)
        dice = {str(k): float(v["Dice"]) for k, v in metrics["mean"].items()}
        return {"trainer": trainer, "dice": dice, "mean_dice": float(metrics["foreground_mean"]["Dice"])}

    def test_overlays(self, models: dict[str, str]) -> dict:
        """One PNG per test case: the image with truth and every model's prediction, side by side."""
        import SimpleITK as sitk

        from nnunet_sam.visualize import save_case_overlay

        def read(path: Path):
            return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

        written = []
        for truth in sorted((self.raw / "labelsTs").glob("*.nii.gz")):
            case = truth.name[: -len(".nii.gz")]
            masks = {"truth": read(truth)}
            masks.update({name: read(self.out / "predictions" / trainer / truth.name)
                          for name, trainer in models.items()})
            path = self.out / "overlays" / f"test_{case}.png"
            save_case_overlay(path, read(self.raw / "imagesTs" / f"{case}_0000.nii.gz"), masks, axis=0,
                              title=f"test case {case}")
            written.append(path.name)
        return {"overlays": written}

    # --- the whole run --------------------------------------------------------------------------------

    def run(self) -> dict:
        """Do every stage not finished yet; return all stage results by name."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._set_environment()
        results = {"dataset": self._stage("dataset", self.make_dataset)}
        if results["dataset"].get("finetune", False) != self.finetune:
            raise NnsamError(f"{self.out} holds a demo run {'without' if self.finetune else 'with'} --finetune; "
                             f"use the same flags or another -o")
        results["plan"] = self._stage("plan", self.plan)
        results["unlabeled"] = self._stage("unlabeled", self.preprocess_unlabeled)
        models = trainers(self.quick)
        results["train baseline"] = self._stage("train_baseline", lambda: self.train(models[BASELINE]))
        results["refine"] = self._stage("refine", self.refine)
        if self.finetune:
            results["fine-tune SAM"] = self._stage("finetune", self.finetune_sam)
            checkpoint = results["fine-tune SAM"]["checkpoint"]
            results["refine fine-tuned"] = self._stage("refine_finetuned", lambda: self.refine(checkpoint))
        for name, trainer in models.items():
            if name != BASELINE:
                key = f"train_{trainer}"
                results[f"train {name}"] = self._stage(key, lambda t=trainer: self.train(t))
        for name, trainer in models.items():
            results[f"evaluate {name}"] = self._stage(f"evaluate_{trainer}", lambda t=trainer: self.evaluate(t))
        results["pictures"] = self._stage("test_overlays", lambda: self.test_overlays(models))
        return results


def run_demo(out: Path, device: torch.device, quick: bool = False, finetune: bool = False) -> tuple[Demo, dict, str]:
    """Run (or resume) the demo in `out`, write `out/report.md`; return the demo, its results, the report."""
    from nnunet_sam.demo.dataset import ORGAN_NAMES
    from nnunet_sam.demo.report import demo_report, write_demo_report

    demo = Demo(out, device, quick=quick, finetune=finetune)
    results = demo.run()
    text = demo_report(results, trainers(quick), list(ORGAN_NAMES[:demo.spec.organs]), demo.device_text())
    write_demo_report(demo.out / "report.md", text)
    return demo, results, text
