"""`nnsam_finetune -d XXX -c CONFIG -f FOLD`: fine-tune SAM's mask decoder on a fold's labelled training cases.

The fold's training cases (never its validation cases) are read from nnU-Net's preprocessed folder, so SAM
sees the same images refinement shows it. Their labelled slices are encoded once into an embedding cache
beside the preprocessed data (`nnUNet_preprocessed/DatasetXXX/nnsam_embeddings/`), reused across runs.
The fold's validation cases measure what fine-tuning bought: the decoder's Dice from true boxes and, when
the fold has a trained nnU-Net, the Dice of its refined predictions, zero-shot vs fine-tuned.

Outputs, in `nnUNet_results/DatasetXXX/nnsamFinetune__<plans>__<configuration>/fold_F/` unless `-o` says
otherwise: the checkpoint (`nnsam_refine --checkpoint` loads it like the base model) and
`<checkpoint name>_report.json` beside it. While it trains, `<checkpoint name>.partial.pth` beside it holds the
training state (`training_state_path`), from which an interrupted run goes on (`FinetuneJob.resume`, --continue).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
from tqdm import tqdm

from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.datasets import DatasetFolders, case_spacing, dataset_folders
from nnunet_sam.nnunet.predict import InitialModel, ModelChoice, resolve_model
from nnunet_sam.nnunet.splits import fold_cases, fold_name
from nnunet_sam.sam import (DecoderFinetuner, EmbeddingCache, FinetuneSettings, LabelledVolume, RefineSettings,
                            SamModel, SamRefiner, attach_class_prompts, class_prompt_dice, decoder_dice,
                            read_checkpoint, save_finetuned, slice_examples, view_record)
from nnunet_sam.sam.finetune import read_training_state, training_fingerprint, training_state_path
from nnunet_sam.sam.prompts import evaluation_dice
from nnunet_sam.nnunet.sam_views import ViewVolumes, dataset_view_settings
from nnunet_sam.utils.atomic import write_json_atomic
from nnunet_sam.utils.output_folders import remove_killed_writes

logger = logging.getLogger(__name__)

RESULTS_TRAINER = "nnsamFinetune"  # the results folder is named like nnU-Net's: TRAINER__PLANS__CONFIGURATION
EMBEDDINGS_FOLDER = "nnsam_embeddings"


@dataclass
class FinetuneJob:
    """What `nnsam_finetune` was asked to do."""

    dataset: str
    configuration: str = "3d_fullres"
    fold: str = "0"
    plans: str = "nnUNetPlans"
    channel: int = 0
    output: Path | None = None  # the checkpoint; None: in nnUNet_results (see the module's docstring)
    evaluate_with: ModelChoice | None = field(default_factory=ModelChoice)  # nnU-Net whose validation
    # predictions are refined zero-shot and fine-tuned (its fold is `fold`); None: decoder Dice only
    cache_dir: Path | None = None  # None: nnUNet_preprocessed/DatasetXXX/nnsam_embeddings
    resume: bool = False  # go on from an interrupted run's training state (else it is discarded)


@dataclass
class FinetunePlan:
    """A checked job: folders and cases resolved before anything slow is loaded."""

    job: FinetuneJob
    folders: DatasetFolders
    train: list[str]
    validation: list[str]
    output: Path
    initial_model: tuple[Path, ModelChoice] | None  # the fold's trained nnU-Net, if any

    @property
    def cache_dir(self) -> Path:
        return self.job.cache_dir or self.folders.preprocessed / EMBEDDINGS_FOLDER


def default_output(folders: DatasetFolders, fold: str, sam: str, views: str) -> Path:
    """nnUNet_results/DatasetXXX/nnsamFinetune__PLANS__CONFIG/fold_F/SAM_VIEWS.pth (VIEWS: context, prompts)."""
    folder = Path(get_output_folder(folders.name, RESULTS_TRAINER, folders.plans_identifier, folders.configuration,
                                    fold if fold == "all" else int(fold)))
    return folder / f"{sam}_{views}.pth"


def report_path(checkpoint: Path) -> Path:
    """The report written beside a checkpoint: CHECKPOINT_STEM_report.json (one per checkpoint)."""
    return checkpoint.with_name(f"{checkpoint.stem}_report.json")


def check_not_base(output: Path, base_checkpoint: Path | None) -> None:
    """Refuse an output that is the base checkpoint (told before that checkpoint is read)."""
    if base_checkpoint is not None and output.resolve() == base_checkpoint.resolve():
        raise NnsamError(f"-o {output} is the base --checkpoint; write the fine-tuned one to another file")


def check_output(output: Path, base_checkpoint: Path | None) -> None:
    """Refuse outputs that would overwrite something not written by nnsam_finetune (the base weights, user files)."""
    if output.suffix != ".pth":
        raise NnsamError(f"-o {output} should name a .pth file (the fine-tuned checkpoint)")
    check_not_base(output, base_checkpoint)
    if output.exists():
        try:
            _, record = read_checkpoint(output, "any")
        except NnsamError:
            record = None
        if record is None:
            raise NnsamError(f"-o {output} exists and was not written by nnsam_finetune; choose another file")
    if training_state_path(output).exists():  # refuses a file there that nnsam_finetune did not write
        read_training_state(training_state_path(output))


def plan_finetune_job(job: FinetuneJob, sam: str, views: str, base_checkpoint: Path | None = None) -> FinetunePlan:
    """Resolve folders, the fold's cases and the output (named after `sam` and `views`, e.g. "tile_fewshot");
    find the fold's trained nnU-Net (optional)."""
    folders = dataset_folders(job.dataset, job.configuration, job.plans)
    fold = fold_name(job.fold)
    n_channels = len(folders.dataset_json()["channel_names"])
    if not 0 <= job.channel < n_channels:
        raise NnsamError(f"--channel {job.channel} does not exist: {folders.name} has {n_channels} channel(s)")
    output = job.output or default_output(folders, fold, sam, views)
    check_output(output, base_checkpoint)  # before fold_cases, which may write splits_final.json
    train, validation = fold_cases(folders, fold)
    if fold == "all":
        logger.warning("fold all: every labelled case trains the decoder; there are no validation cases to "
                       "compare zero-shot and fine-tuned SAM on (use a numbered fold for that)")
    initial = None
    if job.evaluate_with is not None and validation:
        choice = ModelChoice(job.evaluate_with.trainer, (fold,), job.evaluate_with.checkpoint, job.evaluate_with.tta)
        try:
            initial = resolve_model(folders, choice)
        except NnsamError as exc:
            logger.warning("validation without refinement of nnU-Net predictions (%s); the decoder's Dice from "
                           "true boxes is still reported", exc)
    return FinetunePlan(job=job, folders=folders, train=train, validation=validation, output=output,
                        initial_model=initial)


class _PreprocessedCases:
    """Labelled preprocessed cases of one configuration, read with nnU-Net's dataset class."""

    def __init__(self, folders: DatasetFolders, identifiers: list[str], channel: int, raw_views: bool = True) -> None:
        """raw_views: SAM is shown the image's own intensities (`ViewVolumes`), else nnU-Net's tensor (the old
        views, modality "range")."""
        self.views = ViewVolumes(folders) if raw_views else None
        self.image_files = {case: [Path(f) for f in entry["images"]] for case, entry in
                            get_filenames_of_train_images_and_targets(str(folders.raw), folders.dataset_json()).items()}
        self.plans_manager = PlansManager(folders.plans())
        self.configuration_manager = self.plans_manager.get_configuration(folders.configuration)
        self.label_manager = self.plans_manager.get_label_manager(folders.dataset_json())
        if self.label_manager.has_regions:
            raise NnsamError(f"{folders.name} uses regions; SAM fine-tuning needs label maps")
        folder = str(folders.data_folder)
        self.dataset = infer_dataset_class(folder)(folder, identifiers)
        self.channel = channel

    @property
    def labels(self) -> list[int]:
        return [int(v) for v in self.label_manager.foreground_labels]

    def data(self, identifier: str) -> tuple[np.ndarray, LabelledVolume]:
        """The case's preprocessed data (C, Z, Y, X) and its labelled volume (chosen channel, labels >= 0)."""
        data, seg, _, properties = self.dataset.load_case(identifier)
        data = np.asarray(data[:])
        labels = np.asarray(seg[0])
        ignore = None
        if self.label_manager.has_ignore_label:  # unlabelled pixels: neither foreground nor background
            ignore = labels == self.label_manager.ignore_label
            labels = np.where(ignore, 0, labels)
        spacing = case_spacing(self.plans_manager, self.configuration_manager, properties)
        image = data if self.views is None else self.views.volume(identifier, self.image_files[identifier], data.shape)
        volume = LabelledVolume(identifier, image[self.channel], np.maximum(labels, 0).astype(np.int16), spacing,
                                ignore=ignore if ignore is not None and ignore.any() else None)
        return data, volume


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


class _Validation:
    """Zero-shot and fine-tuned Dice on the fold's validation cases."""

    def __init__(self, plan: FinetunePlan, cases: _PreprocessedCases, model: SamModel, cache: EmbeddingCache,
                 settings: RefineSettings, min_pixels: int, negatives: int = 0) -> None:
        self.model, self.cache, self.settings = model, cache, settings
        self.labels = cases.labels
        self.volumes, self.initial = [], {}
        predictor = None
        if plan.initial_model is not None:
            predictor = InitialModel(*plan.initial_model, model.device)
        for identifier in tqdm(plan.validation, desc="validation cases", unit="case", disable=not plan.validation):
            data, volume = cases.data(identifier)
            self.volumes.append(volume)
            if predictor is not None:
                self.initial[identifier] = predictor.predict(data)
        self.examples = slice_examples(self.volumes, cache, settings, self.labels, min_pixels, negatives)

    def measure(self) -> dict[str, dict[int, dict[str, float]]]:
        """Per case and class: `decoder` Dice from true boxes, `prompt_free` Dice of the class prompts (if the
        model has them); with a trained nnU-Net also `refined` Dice."""
        rows: dict[str, dict[int, dict[str, float]]] = {}
        measures = {"decoder": decoder_dice(self.model, self.cache, self.examples, self.settings)}
        if self.model.class_prompts is not None:
            measures["prompt_free"] = class_prompt_dice(self.model, self.cache, self.examples)
        for measure, per_case in measures.items():
            for case, per_class in per_case.items():
                for label, value in per_class.items():
                    rows.setdefault(case, {}).setdefault(label, {})[measure] = value
        refiner = SamRefiner(self.model, self.settings, self.cache)
        for volume in self.volumes:
            if volume.name not in self.initial:
                continue
            initial, probabilities = self.initial[volume.name]
            refined = refiner.refine(volume.image, initial, volume.spacing, probabilities, self.labels).mask
            valid = np.ones(volume.labels.shape, dtype=bool) if volume.ignore is None else ~volume.ignore
            for label in self.labels:
                row = rows.setdefault(volume.name, {}).setdefault(label, {})
                truth = (volume.labels == label) & valid
                row["initial"] = evaluation_dice(truth, (initial == label) & valid)
                row["refined"] = evaluation_dice(truth, (refined == label) & valid)
        return rows


def _combine(zero_shot: dict, finetuned: dict) -> tuple[list[dict], dict]:
    """Per case/class rows with both models' Dice, and the means per measure."""
    rows = []
    for case in sorted(zero_shot):
        for label in sorted(zero_shot[case]):
            before, after = zero_shot[case][label], finetuned[case][label]
            row = {"case": case, "label": label, "decoder_zero_shot": before.get("decoder"),
                   "decoder_finetuned": after.get("decoder"), "prompt_free_finetuned": after.get("prompt_free")}
            if "refined" in before:
                row.update(initial=before["initial"], refined_zero_shot=before["refined"],
                           refined_finetuned=after["refined"])
            rows.append(row)
    means = {key: _mean([r[key] for r in rows if r.get(key) is not None]) for key in _MEASURES}
    return rows, means


_MEASURES = ("decoder_zero_shot", "decoder_finetuned", "prompt_free_finetuned", "initial", "refined_zero_shot",
             "refined_finetuned")


def validation_table(rows: list[dict], means: dict, names: dict[int, str]) -> str:
    """A plain-text table of the validation rows and their means (what the log prints)."""
    header = ["case", "class", "decoder zero-shot", "decoder fine-tuned", "prompt-free fine-tuned", "nnU-Net",
              "refined zero-shot", "refined fine-tuned"]
    lines = [header] + [[r["case"], names.get(r["label"], str(r["label"]))]
                        + ["-" if r.get(k) is None else f"{r[k]:.3f}" for k in _MEASURES] for r in rows]
    lines.append(["mean", ""] + ["-" if means.get(k) is None else f"{means[k]:.3f}" for k in _MEASURES])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines)


def finetune_dataset(plan: FinetunePlan, model: SamModel, refine_settings: RefineSettings,
                     settings: FinetuneSettings) -> dict:
    """Fine-tune `model`'s decoder on the fold's training cases, validate, write checkpoint and report."""
    folders = plan.folders
    state_path = training_state_path(plan.output)
    remove_killed_writes(plan.output.parent)  # that folder only: -o may name a file in a user's big folder
    if model.class_prompts is not None:  # a base checkpoint's prompts: replaced (or dropped), never re-trained
        logger.info("the class prompts of %s are %s", model.checkpoint,
                    "trained afresh" if settings.class_prompts else "dropped (train them with --context tile or "
                                                                    "--prompts fewshot)")
        model.class_prompts = None
    cache = EmbeddingCache(plan.cache_dir, model)
    refine_settings = dataset_view_settings(refine_settings, folders, plan.job.channel)  # the channel's modality
    cases = _PreprocessedCases(folders, plan.train + plan.validation, plan.job.channel,
                               raw_views=refine_settings.modality != "range")
    volumes = [cases.data(identifier)[1] for identifier in plan.train]
    negatives = settings.slices_beyond_foreground
    examples = slice_examples(volumes, cache, refine_settings, cases.labels, settings.min_pixels, negatives,
                              progress=True)
    logger.info("%d labelled slices (%d class masks) from %d training case(s); embeddings in %s (%d model inputs "
                "encoded now, %d from earlier runs)", len(examples), sum(len(e.labels) for e in examples),
                len(volumes), cache.folder, cache.misses, cache.hits)
    if plan.job.resume and state_path.exists():  # refuse another training's state before validation's slow work
        read_training_state(state_path, training_fingerprint(model, refine_settings, settings, examples))
    validation = (_Validation(plan, cases, model, cache, refine_settings, settings.min_pixels, negatives)
                  if plan.validation else None)
    zero_shot = validation.measure() if validation else {}
    if settings.class_prompts:
        attach_class_prompts(model, cache, examples, cases.labels, settings.class_prompts)
    finetuner = DecoderFinetuner(model, cache, refine_settings, settings)
    result = finetuner.fit(examples, state_path=state_path, resume=plan.job.resume)
    finetuned = validation.measure() if validation else {}
    rows, means = _combine(zero_shot, finetuned)
    label_names = {int(v): k for k, v in folders.dataset_json()["labels"].items() if isinstance(v, int)}
    record = {
        **view_record(refine_settings),
        "data": f"{folders.name} {folders.configuration} fold {plan.job.fold}",
        "train_cases": plan.train,
        "labels": {str(label): label_names.get(label, str(label)) for label in cases.labels},
        "settings": asdict(settings),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    report = {
        "dataset": folders.name, "configuration": folders.configuration, "fold": plan.job.fold,
        "channel": plan.job.channel, "checkpoint": str(plan.output),
        "sam": {"model": model.name, "base_checkpoint": model.checkpoint, "device": str(model.device)},
        "refine_settings": asdict(refine_settings), "settings": asdict(settings),
        "train_cases": plan.train, "validation_cases": plan.validation,
        "initial_model": None if plan.initial_model is None else plan.initial_model[1].to_dict(plan.initial_model[0]),
        "training": {"slices": result.slices, "masks": result.masks, "epochs": len(result.history),
                     "epochs_resumed": result.resumed_epochs, "seconds_per_epoch": round(result.seconds_per_epoch, 3),
                     "loss": [round(r.loss, 5) for r in result.history]},
        "cache": {"folder": str(cache.folder), "encoded": cache.misses, "reused": cache.hits,
                  "megabytes": round(cache.size_bytes() / 2**20, 2)},
        "validation": {"rows": rows, "means": means},
    }
    write_json_atomic(report, report_path(plan.output))
    save_finetuned(model, plan.output, record)  # last, as it removes the training state: a kill before it loses nothing
    logger.info("fine-tuned decoder written to %s (%.2f s per epoch)", plan.output, result.seconds_per_epoch)
    if rows:
        logger.info("validation Dice, zero-shot vs fine-tuned:\n%s", validation_table(rows, means, label_names))
    return report
