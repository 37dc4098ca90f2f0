"""The whole method on a synthetic dataset, with the stock commands' Python entry points (through
`nnunet_sam.demo.experiment`): plan and preprocess (nnU-Net's `2d` configuration), a baseline on the 2 labelled
cases, nnsam_preprocess_unlabeled, nnsam_refine -d with LiteMedSAM (with `finetune`: then nnsam_finetune on the
labelled cases and nnsam_refine -d again with the fine-tuned decoder, whose pseudo labels the trainers use),
SAM-pseudo (and Mean Teacher) trainings as long as the baseline's, prediction of held-out test cases,
evaluation, report.

The dataset: synthetic CT-like patients, one axial slice each (`synthetic_slice_pool`), split as the
semi-supervised benchmark splits it (`draw_split`): 2 labelled training cases, 4 labelled validation cases
(fold 0's; nnU-Net's validation curve), unlabelled cases and test cases. Every model trains long enough on
2 CPU cores for its validation Dice to plateau (benchmarks/ssl_gain.py measures the same setting over seeds).

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

import numpy as np
import torch

from nnunet_sam.demo.dataset import dataset_folder_name
from nnunet_sam.demo.experiment import Experiment, nnunet_environment, validation_curve
from nnunet_sam.demo.nnunet_setup import write_short_trainers
from nnunet_sam.demo.slices import (SPLIT_FOLD, UNLABELED_TRUTH, draw_split, split_file_content,
                                    synthetic_slice_pool, write_slice_dataset)
from nnunet_sam.errors import NnsamError
from nnunet_sam.utils.atomic import write_json_atomic

logger = logging.getLogger(__name__)

CONFIGURATION = "2d"
FOLD = SPLIT_FOLD  # 2 labelled cases train, 4 labelled validation cases validate
SUFFIX = "Demo"  # the demo's trainers are nnU-Net-style short variants: nnUNetTrainerDemo, ...
BASELINE = "baseline"
ORGAN_NAMES = ("liver", "kidney", "spleen")
TEST_PICTURES = 4  # test cases shown in the test overlay


@dataclass
class DemoDataSpec:
    """The demo's synthetic dataset: `cases` patients of one anatomy, split with `split_seed`."""

    dataset_id: int = 987
    name: str = "NnsamDemo"
    cases: int = 80
    shape: tuple[int, int] = (64, 64)
    organs: int = 3
    labelled: int = 2
    validation: int = 4
    split_seed: int = 0

    @property
    def folder_name(self) -> str:
        return dataset_folder_name(self.dataset_id, self.name)


@dataclass
class Schedule:
    epochs: int
    iterations: int  # per epoch
    val_iterations: int = 8  # validation batches per epoch


def schedule_for(device: torch.device, quick: bool) -> Schedule:
    """Training length of every model: long enough for the validation Dice to plateau (benchmarks/ssl_gain.py),
    within the time budget on 2 CPU cores; longer on a GPU."""
    if device.type == "cuda":
        return Schedule(20, 50) if quick else Schedule(50, 50)
    return Schedule(10, 25, 4) if quick else Schedule(40, 25)


def finetune_schedule(quick: bool) -> tuple[int, int | None]:
    """Epochs and minimum optimiser steps (None: nnsam_finetune's default) of the optional SAM decoder
    fine-tuning (--finetune) on the 2 labelled slices; --quick trains 10 epochs (20 steps) only."""
    return (10, 0) if quick else (30, None)


def dataset_spec(quick: bool) -> DemoDataSpec:
    return DemoDataSpec(cases=30 if quick else 80)


def trainers(quick: bool) -> dict[str, str]:
    """Model name in the report -> trainer class the demo trains (each from scratch, equally long)."""
    names = {BASELINE: f"nnUNetTrainer{SUFFIX}", "SAM pseudo": f"nnUNetTrainerSAMPseudo{SUFFIX}"}
    if not quick:
        names["Mean Teacher"] = f"nnUNetTrainerMeanTeacher{SUFFIX}"
    return names


class Demo:
    """The demo's stages in order; `run()` does those not finished yet."""

    def __init__(self, out: Path, device: torch.device, quick: bool = False,
                 spec: DemoDataSpec | None = None, schedule: Schedule | None = None,
                 finetune: bool = False) -> None:
        self.out, self.device, self.quick, self.finetune = out.resolve(), device, quick, finetune
        self.spec = spec or dataset_spec(quick)
        self.schedule = schedule or schedule_for(device, quick)
        self.raw = self.out / "nnUNet_raw" / self.spec.folder_name
        self.stages = self.out / "stages"
        self.experiment = Experiment(self.spec.dataset_id, CONFIGURATION, FOLD, device, self.out)

    def device_text(self) -> str:
        if self.device.type == "cuda":
            return f"GPU ({torch.cuda.get_device_name(self.device)})"
        return f"CPU ({torch.get_num_threads()} threads)"

    # --- stage bookkeeping ----------------------------------------------------------------------------

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
        spec = self.spec
        for folder in (self.raw, self.out / "nnUNet_preprocessed" / spec.folder_name):
            if folder.exists():
                shutil.rmtree(folder)  # a half-written dataset from an interrupted run
        pool = synthetic_slice_pool(spec.cases, spec.organs, spec.shape)
        split = draw_split(pool, spec.organs, spec.split_seed, spec.labelled, spec.validation)
        write_slice_dataset(self.out / "nnUNet_raw", spec.dataset_id, spec.name, pool, split,
                            list(ORGAN_NAMES[:spec.organs]), "CT", "synthetic CT-like patients (nnunet-sam demo)")
        splits = self.out / "nnUNet_preprocessed" / spec.folder_name / "splits_final.json"
        splits.parent.mkdir(parents=True)
        write_json_atomic(split_file_content(split), splits)
        write_short_trainers(self.out / "trainers", self.schedule.epochs, self.schedule.iterations, SUFFIX,
                             self.schedule.val_iterations)
        return {"spec": asdict(spec), "schedule": asdict(self.schedule), "finetune": self.finetune,
                "split": {part: len(ids) for part, ids in split.to_dict().items()}}

    def plan(self) -> dict:
        """nnUNetv2_plan_and_preprocess -d ID -c 2d; on CPU with the narrower 2d U-Net (`cpu_sized_2d_network`)."""
        cpu_sized = self.device.type == "cpu"
        self.experiment.plan(cpu_sized=cpu_sized)
        return {"cpu_sized_network": cpu_sized}

    def train(self, trainer: str) -> dict:
        """nnUNetv2_train ID 2d 0 -tr TRAINER (with --c after an interruption); the validation curve."""
        folder = self.experiment.train(trainer)
        return {"trainer": trainer, "folder": str(folder), "curve": validation_curve(folder)}

    def refine(self, checkpoint: str | None = None) -> dict:
        """nnsam_refine -d ID -c 2d -f 0 -tr <baseline> [--checkpoint fine-tuned SAM] --gt ... --overlays; the
        slices' embeddings are cached in DIR/embeddings, so a second refinement only decodes."""
        report = self.experiment.sam_pseudo_labels(trainers(self.quick)[BASELINE], self.out / "embeddings",
                                                   self.raw / UNLABELED_TRUTH, checkpoint, overlays=True)
        self._pseudo_label_picture("pseudo_labels.png" if checkpoint is None else "pseudo_labels_finetuned.png")
        return {"summary": report["summary"], "slices_encoded": sum(c["slices_encoded"] for c in report["cases"])}

    def _pseudo_label_picture(self, name: str) -> None:
        """One PNG of a few unlabelled cases: image, baseline prediction, SAM pseudo label, truth (the per-case
        pictures of nnsam_refine --overlays stay in the pseudo-label folder)."""
        from nnunet_sam.nnunet.datasets import dataset_folders

        folders = dataset_folders(str(self.spec.dataset_id), CONFIGURATION)
        folder = folders.pseudo_labels_for(self.experiment.fold) / "overlays"
        overlays = self.out / "overlays"
        overlays.mkdir(exist_ok=True)
        pictures = sorted(folder.glob("*.png"))[:TEST_PICTURES]
        for index, png in enumerate(pictures):
            shutil.copy(png, overlays / f"{name[:-4]}_{index}.png")

    def finetune_sam(self) -> dict:
        """nnsam_finetune -d ID -c 2d -f 0: LiteMedSAM's decoder fine-tuned on the 2 labelled cases."""
        epochs, min_steps = finetune_schedule(self.quick)
        report = self.experiment.finetune_sam(epochs, self.out / "embeddings",
                                              **({} if min_steps is None else {"min_steps": min_steps}))
        return {"checkpoint": report["checkpoint"], **report["training"]}  # with the epochs run

    def evaluate(self, trainer: str) -> dict:
        """Predict the test cases (nnUNetv2_predict's predictor) and compute Dice (nnU-Net's evaluation)."""
        result = self.experiment.evaluate(trainer, self.raw / "imagesTs", self.raw / "labelsTs",
                                          self.out / "predictions" / trainer, self.spec.organs)
        return {"trainer": trainer, **result}

    def test_overlays(self, models: dict[str, str]) -> dict:
        """One PNG of the first test cases: truth and every model's prediction, a column per case."""
        import SimpleITK as sitk

        from nnunet_sam.visualize import save_overlay

        def read(path: Path) -> np.ndarray:
            return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0]

        cases = sorted(p.name[: -len(".nii.gz")] for p in (self.raw / "labelsTs").glob("*.nii.gz"))[:TEST_PICTURES]
        image = np.stack([read(self.raw / "imagesTs" / f"{c}_0000.nii.gz") for c in cases])
        masks = {"truth": np.stack([read(self.raw / "labelsTs" / f"{c}.nii.gz") for c in cases])}
        for name, trainer in models.items():
            masks[name] = np.stack([read(self.out / "predictions" / trainer / f"{c}.nii.gz") for c in cases])
        path = self.out / "overlays" / "test_cases.png"
        path.parent.mkdir(exist_ok=True)
        save_overlay(path, image, masks, title=f"test cases {', '.join(cases)}", count=len(cases))
        return {"overlays": [path.name]}

    def curve_picture(self, results: dict, models: dict[str, str]) -> dict:
        """overlays/validation_curves.png: every model's validation curve."""
        from nnunet_sam.visualize import save_curves

        path = self.out / "overlays" / "validation_curves.png"
        save_curves(path, {name: results[f"train {name}"]["curve"]["mean_fg_dice"] for name in models},
                    "validation Dice per epoch", "nnU-Net's pseudo-Dice on the validation cases")
        return {"overlays": [path.name]}

    # --- the whole run --------------------------------------------------------------------------------

    def run(self) -> dict:
        """Do every stage not finished yet; return all stage results by name."""
        self.out.mkdir(parents=True, exist_ok=True)
        os.environ.update(nnunet_environment(self.out, [self.out / "trainers"], self.device))
        results = {"dataset": self._stage("dataset", self.make_dataset)}
        if results["dataset"].get("finetune", False) != self.finetune:
            raise NnsamError(f"{self.out} holds a demo run {'without' if self.finetune else 'with'} --finetune; "
                             f"use the same flags or another -o")
        results["plan"] = self._stage("plan", self.plan)
        results["unlabeled"] = self._stage("unlabeled", lambda: {"cases": self.experiment.preprocess_unlabeled()})
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
        results["curves"] = self._stage("curves", lambda: self.curve_picture(results, models))
        return results


def run_demo(out: Path, device: torch.device, quick: bool = False, finetune: bool = False) -> tuple[Demo, dict, str]:
    """Run (or resume) the demo in `out`, write `out/report.md`; return the demo, its results, the report."""
    from nnunet_sam.demo.report import demo_report, write_demo_report

    demo = Demo(out, device, quick=quick, finetune=finetune)
    results = demo.run()
    text = demo_report(results, trainers(quick), list(ORGAN_NAMES[:demo.spec.organs]), demo.device_text())
    write_demo_report(demo.out / "report.md", text)
    return demo, results, text
