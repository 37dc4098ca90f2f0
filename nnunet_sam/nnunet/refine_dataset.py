"""`nnsam_refine -d XXX -c CONFIG -f FOLDS`: pseudo labels for a dataset's unlabelled cases.

Everything happens in preprocessed space: the trained nnU-Net predicts each preprocessed unlabelled
case (softmax kept for component selection), the engine refines the prediction on the preprocessed
image, and the pseudo label is written where the trainers read it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm

from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.datasets import DatasetFolders, case_spacing, dataset_folders, pseudo_label_sets, training_fold
from nnunet_sam.nnunet.predict import InitialModel, ModelChoice, resolve_model
from nnunet_sam.nnunet.provenance import SOURCE_KEY, file_fingerprint, same_source
from nnunet_sam.nnunet.preprocessed_cases import finished_cases, remove_case
from nnunet_sam.nnunet.pseudolabels import (as_training_seg, export_to_raw, mark_disagreement, pseudo_label_source,
                                            sam_agreement, unsure_label, write_pseudo_label)
from nnunet_sam.nnunet.report import (REPORT_NAME, case_report_path, class_rows, summary_table, warn_absent_classes,
                                      write_case_report, write_report)
from nnunet_sam.nnunet.sam_views import ViewVolumes, dataset_view_settings
from nnunet_sam.nnunet.unlabeled import UnlabeledCase, find_unlabeled_cases, preprocess_unlabeled
from nnunet_sam.sam.refine import RefineSettings, SamRefiner
from nnunet_sam.sam.views import sam_intensities
from nnunet_sam.utils.atomic import TEMP_PREFIX, write_json_atomic
from nnunet_sam.utils.output_folders import check_output_folder, claim_output_folder, remove_killed_writes
from nnunet_sam.visualize import save_case_overlay, save_view_comparison

logger = logging.getLogger(__name__)

EXPORT_MARKER = ".nnsam_export"  # a folder inside an --export folder: its files are ours to replace


@dataclass
class DatasetJob:
    """What `nnsam_refine -d` was asked to do."""

    dataset: str
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    model: ModelChoice = field(default_factory=ModelChoice)
    channel: int = 0
    export_dir: Path | None = None  # --export: pseudo labels also in raw geometry
    gt_dir: Path | None = None  # --gt: true labels of the unlabelled cases (raw), for Dice before/after
    overlays: bool = False
    resume: bool = False
    num_parts: int = 1
    part_id: int = 0
    num_processes: int = 1  # for preprocessing unlabelled cases that are not done yet
    ignore_disagreement: bool = False  # --ignore-disagreement: unsure label where SAM's label and the model's differ
    min_case_agreement: float | None = None  # --min-case-agreement A: no pseudo label where SAM agreement < A

    @property
    def pseudo_options(self) -> dict:
        """The options that change a pseudo label once SAM has refined it (reports record them with the engine's
        settings; `--continue` redoes a case made with other ones)."""
        return {"ignore_disagreement": self.ignore_disagreement, "min_case_agreement": self.min_case_agreement}


@dataclass
class DatasetPlan:
    """A checked job: folders, model and cases resolved before anything slow is loaded."""

    job: DatasetJob
    folders: DatasetFolders
    model_folder: Path
    model: ModelChoice
    unlabeled: list[UnlabeledCase]  # every case of imagesUnlabeled/ (all parts)

    @property
    def cases(self) -> list[str]:
        return [c.case_id for c in self.unlabeled]

    @property
    def fold(self) -> str:
        """The training fold the pseudo labels are for (`training_fold`: an ensemble's are for fold all)."""
        return training_fold(self.model.folds)

    @property
    def pseudo_labels(self) -> Path:
        """Where this job's pseudo labels go: its plans' and training fold's set."""
        return self.folders.pseudo_labels_for(self.fold)

    @property
    def model_record(self) -> dict:
        """The initial model as reports record it (and `--continue` compares it), with its checkpoint files' size
        and time (a model trained again under the same name makes other pseudo labels)."""
        record = self.model.to_dict(self.model_folder)
        if self.model.folds:
            record["checkpoint_files"] = {
                fold: file_fingerprint(self.model_folder / f"fold_{fold}" / self.model.checkpoint, content=False)
                for fold in self.model.folds}
        return record


def plan_dataset_job(job: DatasetJob) -> DatasetPlan:
    """Resolve and check everything; preprocess unlabelled cases that are not done yet."""
    if job.num_parts < 1 or not 0 <= job.part_id < job.num_parts:
        raise NnsamError(f"-part_id must be in 0..{job.num_parts - 1} for -num_parts {job.num_parts}")
    folders = dataset_folders(job.dataset, job.configuration, job.plans)
    if PlansManager(folders.plans()).get_configuration(job.configuration).previous_stage_name is not None:
        raise NnsamError(f"{job.configuration} is a cascade stage; pseudo labels need a configuration without a "
                         f"previous stage (3d_fullres, 3d_lowres or 2d)")
    model_folder, model = resolve_model(folders, job.model)
    n_channels = len(folders.dataset_json()["channel_names"])
    if not 0 <= job.channel < n_channels:
        raise NnsamError(f"--channel {job.channel} does not exist: {folders.name} has {n_channels} channel(s)")
    unlabeled = find_unlabeled_cases(folders)
    cases = [c.case_id for c in unlabeled]
    if job.gt_dir is not None:
        ending = folders.dataset_json()["file_ending"]
        missing = [c for c in cases if not (job.gt_dir / f"{c}{ending}").is_file()]
        if missing:
            raise NnsamError(f"--gt {job.gt_dir} has no {missing[0]}{ending}; it needs one label file per "
                             f"unlabelled case")
    if job.export_dir is not None:
        check_output_folder(job.export_dir, "--export", EXPORT_MARKER)
    # this part's cases not preprocessed yet, or preprocessed from other image files or plans
    preprocess_unlabeled(folders, num_processes=job.num_processes, cases=unlabeled[job.part_id::job.num_parts])
    return DatasetPlan(job=job, folders=folders, model_folder=model_folder, model=model, unlabeled=unlabeled)


class _CaseRefiner:
    """Refines one preprocessed unlabelled case after another; holds the models and managers."""

    def __init__(self, plan: DatasetPlan, refiner: SamRefiner | None, initial: InitialModel | None) -> None:
        self.plan, self.refiner, self.initial = plan, refiner, initial
        folders = plan.folders
        self.dataset_json = folders.dataset_json()
        self.plans_manager = PlansManager(folders.plans())
        self.configuration_manager = self.plans_manager.get_configuration(folders.configuration)
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        self.images = nnUNetDatasetBlosc2(str(folders.unlabeled_data), list(plan.cases))
        self.views = ViewVolumes(folders)

    def image_files(self, case_id: str) -> list[Path]:
        return next(c.images for c in self.plan.unlabeled if c.case_id == case_id)

    def sam_image(self, case_id: str, data: np.ndarray) -> np.ndarray:
        """The channel SAM is shown, in the image's own intensities (its view volume); with modality "range"
        (the old rule) nnU-Net's normalised tensor."""
        channel = self.plan.job.channel
        if self.refiner.settings.modality == "range":
            return data[channel]
        return self.views.volume(case_id, self.image_files(case_id), data.shape)[channel]

    def truth(self, case_id: str) -> np.ndarray:
        """The case's true labels, preprocessed like the case itself (nnU-Net's preprocessor)."""
        job = self.plan.job
        image_files = [str(p) for p in self.image_files(case_id)]
        label_file = str(job.gt_dir / f"{case_id}{self.dataset_json['file_ending']}")
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        _, seg, _ = preprocessor.run_case(image_files, label_file, self.plans_manager, self.configuration_manager,
                                          self.dataset_json)
        return np.maximum(seg[0], 0)

    def write_unrefined(self, case_id: str, folder: Path) -> None:
        """The case's pseudo label without SAM: the initial model's prediction, or with no initial model
        the true label of --gt (preprocessed like the case: the ceiling a benchmark compares with)."""
        data, placeholder, _, properties = self.images.load_case(case_id)
        if self.initial is None:
            labels = self.truth(case_id)
        else:
            labels = self.initial.predict(np.asarray(data[:]))[0]
        write_pseudo_label(folder, case_id, as_training_seg(labels, placeholder[:]), properties, self.label_manager,
                           self.configuration_manager.patch_size)

    def __call__(self, case_id: str) -> dict:
        started = time.perf_counter()
        job = self.plan.job
        data, placeholder, _, properties = self.images.load_case(case_id)
        data = np.asarray(data[:])
        initial, probabilities = self.initial.predict(data)
        spacing = case_spacing(self.plans_manager, self.configuration_manager, properties)
        image = self.sam_image(case_id, data)
        result = self.refiner.refine(image, initial, spacing, probabilities=probabilities,
                                     labels=self.label_manager.foreground_labels, progress=True)
        labels = result.mask
        if job.ignore_disagreement:
            labels = mark_disagreement(labels, initial, unsure_label(self.label_manager))
        agreement = sam_agreement(result.mask, initial, self.label_manager.foreground_labels)
        selected = job.min_case_agreement is None or agreement >= job.min_case_agreement
        if selected:
            write_pseudo_label(self.plan.pseudo_labels, case_id, as_training_seg(labels, placeholder[:]), properties,
                               self.label_manager, self.configuration_manager.patch_size)
        else:  # never trained on (an earlier run's pseudo label of this case goes too)
            remove_case(self.plan.pseudo_labels, case_id)
        truth = self.truth(case_id) if job.gt_dir is not None else None
        report = {"case": case_id, "initial_model": self.plan.model_record, "pseudo_options": job.pseudo_options,
                  "settings": settings_record(self.refiner), "axis": result.axis, "intensities": result.intensities,
                  "slices_encoded": result.slices_encoded,
                  "sam_agreement": round(agreement, 4), "selected": selected, "source": properties.get(SOURCE_KEY),
                  "classes": class_rows(case_id, result, initial, truth)}
        if job.ignore_disagreement:
            report["unsure_fraction"] = round(float(np.mean(labels != result.mask)), 6)
        if job.export_dir is not None and selected:
            target = job.export_dir / f"{case_id}{self.dataset_json['file_ending']}"
            export_to_raw(result.mask, properties, self.plans_manager, self.configuration_manager,
                          self.dataset_json, target)
            report["export"] = str(target)
        if job.overlays:
            overlays = self.plan.pseudo_labels / "overlays"
            save_case_overlay(overlays / f"{case_id}.png", data[job.channel],
                              {"initial": initial, "refined": result.mask, "truth": truth}, result.axis)
            s = self.refiner.settings
            save_view_comparison(overlays / f"{case_id}_views.png",
                                 {"before: nnU-Net's tensor, all-voxel percentiles": sam_intensities(data[job.channel],
                                                                                                     "range"),
                                  f"SAM's view: {result.intensities}": sam_intensities(image, s.modality,
                                                                                       s.ct_window)},
                                 result.mask, result.axis)
        report["seconds"] = round(time.perf_counter() - started, 2)
        write_case_report(self.plan.pseudo_labels, case_id, report)
        return report


def settings_record(refiner: SamRefiner, settings: RefineSettings | None = None) -> dict:
    """The SAM model (its weights file's size and time too) and the engine's settings (`settings`, default the
    refiner's) as each case report records them (`--continue` compares them)."""
    checkpoint = refiner.model.checkpoint
    weights = None if checkpoint is None else file_fingerprint(Path(checkpoint), content=False)
    return {"sam": refiner.model.name, "checkpoint": checkpoint, "checkpoint_file": weights,
            **json.loads(json.dumps(asdict(refiner.settings if settings is None else settings)))}


def _case_done(plan: DatasetPlan, case_id: str, refiner: SamRefiner) -> bool:
    """Finished by a run with the same initial model, SAM, engine settings and pseudo-label options, from the same
    preprocessed image (a resumed re-run never mixes two models, two settings or old images). A case left out by
    --min-case-agreement is finished without a pseudo label."""
    report_file = case_report_path(plan.pseudo_labels, case_id)
    if not report_file.is_file():
        return False
    report = json.loads(report_file.read_text())
    settings = dataset_view_settings(refiner.settings, plan.folders, plan.job.channel)  # as the run records them
    if (report.get("initial_model") != plan.model_record or report.get("pseudo_options") != plan.job.pseudo_options
            or report.get("settings") != settings_record(refiner, settings)
            or not same_source(report.get("source"), pseudo_label_source(plan.folders.unlabeled_data, case_id))):
        return False
    return (plan.pseudo_labels / f"{case_id}.pkl").is_file() or report.get("selected") is False


def remove_orphans(plan: DatasetPlan) -> None:
    """Pseudo labels (of every plans identifier and fold) and preprocessed images of cases no longer in
    imagesUnlabeled/ would still be trained on: remove them (they are our outputs, never user files), saying so."""
    folders = plan.folders
    current = set(plan.cases)
    for folder in (*pseudo_label_sets(folders.data_folder), folders.unlabeled_data):
        for case_id in sorted(set(finished_cases(folder)) - current):
            logger.warning("%s is no longer in %s: removing its files from %s", case_id, folders.unlabeled_images,
                           folder)
            remove_case(folder, case_id)
            case_report_path(folder, case_id).unlink(missing_ok=True)


def refine_dataset(plan: DatasetPlan, refiner: SamRefiner, initial: InitialModel) -> dict:
    """Pseudo-label this part's unlabelled cases; return the aggregated report (all parts so far)."""
    job, folders = plan.job, plan.folders
    refiner.settings = dataset_view_settings(refiner.settings, folders, job.channel)  # the channel's modality
    refine_case = _CaseRefiner(plan, refiner, initial)
    refiner.check_finetuned_for(refine_case.label_manager.foreground_labels)  # before writing
    if job.model.tta and refiner.model.device.type == "cpu":
        logger.info("test-time mirroring multiplies the initial prediction's cost (8x in 3D); "
                    "--disable_tta skips it")
    plan.pseudo_labels.mkdir(parents=True, exist_ok=True)
    remove_killed_writes(plan.pseudo_labels, recursive=True)  # our folder: its cases, reports, overlays
    if job.export_dir is not None:
        claim_output_folder(job.export_dir, EXPORT_MARKER)
    mine = plan.cases[job.part_id::job.num_parts]
    remove_orphans(plan)
    todo = [c for c in mine if not (job.resume and _case_done(plan, c, refiner))]
    if len(todo) < len(mine):
        logger.info("--continue: %d of %d cases already done, skipped", len(mine) - len(todo), len(mine))
    for case_id in tqdm(todo, desc="unlabelled cases", unit="case"):
        report = refine_case(case_id)
        logger.info("%s: %d slices encoded in %.1f s, SAM agreement %.3f%s", case_id, report["slices_encoded"],
                    report["seconds"], report["sam_agreement"], "" if report["selected"] else " (left out)")
    header = {"mode": "dataset", "dataset": folders.name, "configuration": folders.configuration,
              "plans": folders.plans_identifier, "channel": job.channel,
              "initial_model": plan.model_record,
              "ground_truth": None if job.gt_dir is None else str(job.gt_dir),
              "sam": {"model": refiner.model.name, "checkpoint": refiner.model.checkpoint,
                      "device": str(refiner.model.device)},
              "settings": asdict(refiner.settings)}
    report = write_report(plan.pseudo_labels, header)
    logger.info("pseudo labels in %s (%d cases):\n%s", plan.pseudo_labels, len(report["cases"]),
                summary_table(report["summary"]))
    warn_absent_classes(report["summary"])
    left_out = [c["case"] for c in report["cases"] if c.get("selected") is False]
    if left_out:
        logger.warning("--min-case-agreement %s: %d of %d cases have no pseudo label (SAM agreement below it; see "
                       "sam_agreement in %s)", job.min_case_agreement, len(left_out), len(report["cases"]),
                       plan.pseudo_labels / REPORT_NAME)
    return report


def write_unrefined_pseudo_labels(plan: DatasetPlan, initial: InitialModel | None) -> list[str]:
    """Replace the pseudo labels of every unlabelled case by unrefined ones: the initial model's predictions
    (self-training without SAM, what isolates SAM's share), or with `initial=None` the true labels of
    `plan.job.gt_dir` (the ceiling). Returns the cases written."""
    folders = plan.folders
    if initial is None and plan.job.gt_dir is None:
        raise NnsamError("pseudo labels from the truth need --gt")
    # written beside the pseudo-label folder, then swapped in: a killed run never leaves a partial set (our
    # output folder, never user files; no SAM report of an earlier run may remain in it)
    staging = plan.pseudo_labels.with_name(TEMP_PREFIX + plan.pseudo_labels.name)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_case = _CaseRefiner(plan, None, initial)
    for case_id in tqdm(plan.cases, desc="unrefined pseudo labels", unit="case"):
        write_case.write_unrefined(case_id, staging)
    write_json_atomic({"mode": "dataset", "dataset": folders.name, "sam": None,
                       "source": "truth" if initial is None else "initial model",
                       "initial_model": None if initial is None else plan.model_record}, staging / REPORT_NAME)
    shutil.rmtree(plan.pseudo_labels, ignore_errors=True)
    staging.rename(plan.pseudo_labels)
    logger.info("pseudo labels without SAM (%s) in %s (%d cases)", "truth" if initial is None else "initial model",
                plan.pseudo_labels, len(plan.cases))
    return list(plan.cases)
