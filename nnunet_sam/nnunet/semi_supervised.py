"""Semi-supervised nnU-Net training: a second data stream, a weighted loss and a Mean Teacher.

`SemiSupervisedTrainer` is an `nnUNetTrainer` whose batches are nnU-Net's own labelled batch (the planned
batch size, foreground oversampling and batch Dice exactly as nnUNetTrainer has them) plus `extra_batch_size`
samples on top from a second stream, built with nnU-Net's own data loader and training augmentation:

- ``extra_stream = "pseudo"``: pseudo-labelled cases (`nnsam_refine -d`), supervised with
  ``pseudo_loss_weight``; voxels with the unsure label (`nnsam_refine --ignore-disagreement`) carry no loss;
- ``extra_stream = "unlabeled"``: preprocessed unlabelled cases (`nnsam_preprocess_unlabeled`),
  used only by the Mean Teacher consistency.

With ``consistency_weight > 0`` an EMA teacher sees the extra cases and the student's probabilities are pulled
towards the teacher's (MSE, sigmoid ramp-up). With ``teacher_view = "augmented"`` the teacher sees its own view
of each patch: the same spatial transform, intensity augmentation drawn independently and a mirroring of its own,
undone on its output (`teacher_views`); ``"clean"`` leaves its intensity augmentation out; with ``"student"`` it
sees the student's tensor plus clamped noise.
The teacher is what validation uses and what the checkpoint's ``network_weights`` holds (what
`nnUNetv2_predict` loads); the student is saved as ``student_weights`` so ``--c`` resumes exactly.

The trainers in the top-level `trainers/` folder (installed as `nnunet_sam.trainers`) are tiny subclasses that
set the class attributes. This module lives outside that folder because nnU-Net imports every module there as a
top-level module. nnU-Net's private attributes are reached through `nnunet_internals` only.
"""

from __future__ import annotations

import copy
import io
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
import torch.nn.functional as F
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch import nn

from nnunet_sam.errors import NnsamError, one_line_errors_at_top_level
from nnunet_sam.nnunet.datasets import (open_unlabeled_dataset, pseudo_label_folder, pseudo_label_model,
                                        pseudo_label_model_checkpoint)
from nnunet_sam.nnunet.nnunet_internals import (augmenter_data_loader, check_nnunet_version, checkpoint_bytes,
                                                initial_patch_size, stop_augmenter)
from nnunet_sam.nnunet.partwise_forward import Outputs, concat_outputs, network_in_parts
from nnunet_sam.nnunet.pseudolabels import open_pseudo_label_dataset, unsure_label
from nnunet_sam.nnunet.teacher_views import TwoViewTransform, mirrored_forward, random_flip_axes, split_views
from nnunet_sam.utils.atomic import atomic_path
from nnunet_sam.utils.output_folders import remove_killed_writes

EXTRA_STREAMS = ("pseudo", "unlabeled")
TEACHER_VIEWS = ("augmented", "clean", "student")


# ---------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------

def rampup_weight(weight: float, epoch_progress: float, rampup_epochs: float) -> float:
    """`weight`·exp(-5(1-t)²) with t = epoch_progress / rampup_epochs clipped to [0, 1] (Laine & Aila)."""
    if rampup_epochs <= 0:
        return weight
    t = min(max(epoch_progress / rampup_epochs, 0.0), 1.0)
    return weight * math.exp(-5.0 * (1.0 - t) ** 2)


def ema_alpha(global_step: int, decay: float) -> float:
    """EMA decay of step `global_step` (0-based): min(1 - 1/(step+1), decay); step 0 copies the student."""
    return min(1.0 - 1.0 / (global_step + 1), decay)


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """teacher ← alpha·teacher + (1-alpha)·student for parameters; buffers are copied."""
    teacher_params = [p for p in teacher.parameters()]
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def teacher_noise(data: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """`data` plus Gaussian noise N(0, std) clamped to ±clip."""
    if std <= 0:
        return data
    return data + torch.clamp(torch.randn_like(data) * std, -clip, clip)


def slice_outputs(outputs: Outputs, part: slice) -> Outputs:
    """The samples `part` of a batch tensor, or of every tensor of a deep-supervision list."""
    if isinstance(outputs, (list, tuple)):
        return [o[part] for o in outputs]
    return outputs[part]


def concat_batches(labelled: dict, extra: dict) -> dict:
    """One nnU-Net batch (`data`, `target`, `keys`): the labelled samples first, then the extra ones."""
    return {"data": torch.cat((labelled["data"], extra["data"])),
            "target": concat_outputs(labelled["target"], extra["target"]),
            "keys": [*labelled["keys"], *extra["keys"]]}


class PooledDataset:
    """Two nnU-Net datasets as one (`pooled_sampling`): their identifiers together, each case loaded by the
    dataset that holds it."""

    def __init__(self, first, second) -> None:
        self.parts = {identifier: part for part in (first, second) for identifier in part.identifiers}
        self.identifiers = [*first.identifiers, *second.identifiers]
        if len(self.parts) < len(self.identifiers):
            raise ValueError(f"cases in both datasets: {sorted(set(first.identifiers) & set(second.identifiers))}")

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, identifier: str):
        return self.parts[identifier].load_case(identifier)


def highest_resolution(outputs: Outputs) -> torch.Tensor:
    """The full-resolution output: the first of a deep-supervision list."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def probabilities_fn(has_regions: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits (B, C, ...) -> probabilities: sigmoid for regions, softmax over classes otherwise.

    (nnU-Net's `LabelManager.apply_inference_nonlin` cannot be used: it runs under no_grad and takes
    unbatched (C, ...) logits.)"""
    return torch.sigmoid if has_regions else (lambda logits: torch.softmax(logits, 1))


def unwrap_model(network: nn.Module) -> nn.Module:
    """The plain module behind DDP (`.module`) and torch.compile (`._orig_mod`)."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the (unwrapped) student in eval mode."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------

@dataclass
class StepContext:
    """What the loss needs to know about the merged batch of one training step."""

    n_labelled: int
    teacher_probabilities: torch.Tensor | None = None
    consistency_weight: float = 0.0
    extra_weight: float | None = None  # this step's weight of the extra samples' loss (None: the loss's own)


class SemiSupervisedLoss(nn.Module):
    """nnU-Net's loss on the labelled part + `extra_weight`·loss on the extra part + the weighted MSE
    between the student's probabilities on the extra part and the teacher's.

    Without a step context (validation) it is nnU-Net's plain loss."""

    def __init__(self, supervised: Callable, probabilities: Callable[[torch.Tensor], torch.Tensor],
                 extra_weight: float, extra_supervised: Callable | None = None) -> None:
        super().__init__()
        self.supervised = supervised
        self.extra_supervised = extra_supervised or supervised  # the loss on pseudo labels (may ignore a label)
        self.probabilities = probabilities
        self.extra_weight = extra_weight
        self.step: StepContext | None = None

    def forward(self, output: Outputs, target: Outputs) -> torch.Tensor:
        if self.step is None:
            return self.supervised(output, target)
        labelled, extra = slice(0, self.step.n_labelled), slice(self.step.n_labelled, None)
        loss = 0.0  # a pooled batch (n_labelled 0) is all "extra": labelled cases carry no unsure label
        if self.step.n_labelled > 0:
            loss = self.supervised(slice_outputs(output, labelled), slice_outputs(target, labelled))
        extra_weight = self.extra_weight if self.step.extra_weight is None else self.step.extra_weight
        if extra_weight > 0:
            loss = loss + extra_weight * self.extra_supervised(slice_outputs(output, extra),
                                                               slice_outputs(target, extra))
        if self.step.teacher_probabilities is not None and self.step.consistency_weight > 0:
            student = self.probabilities(highest_resolution(output)[extra].float())
            loss = loss + self.step.consistency_weight * F.mse_loss(student, self.step.teacher_probabilities)
        return loss


# ---------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------

class SemiSupervisedTrainer(nnUNetTrainer):
    """nnU-Net training on labelled cases plus a second stream of pseudo-labelled or unlabelled cases,
    optionally with a Mean Teacher. Subclasses set the class attributes below."""

    extra_stream: str = "pseudo"  # "pseudo" (nnsam_refine -d) or "unlabeled" (nnsam_preprocess_unlabeled)
    extra_batch_size: int | None = None  # extra samples per step on top of the planned batch (None: as many as
    # the planned batch): a step costs about (planned + extra) / planned of nnUNetTrainer's
    pseudo_loss_weight: float = 0.5  # weight of the supervised loss on pseudo labels
    pseudo_rampup_fraction: float = 0.0  # of num_epochs: the pseudo-label weight's sigmoid ramp-up (0: none)
    pooled_sampling: bool = False  # labelled and pseudo-labelled cases as one set, nnU-Net's planned batch drawn
    # from it with nnU-Net's loss on every sample (SCtB's way; weight 1, no extra samples); pseudo stream only
    consistency_weight: float = 0.0  # Mean Teacher consistency weight; 0: no teacher
    ema_decay: float = 0.99
    consistency_rampup_fraction: float = 0.4  # of num_epochs
    teacher_view: str = "augmented"  # "augmented": its own intensity augmentation and mirroring of the patch;
    # "clean": the patch's spatial transform only, with its own mirroring; "student": the student's augmented
    # tensor plus the clamped noise below
    teacher_noise_std: float = 0.1  # teacher_view "student" only
    teacher_noise_clip: float = 0.2
    warm_start: bool = False  # start from every weight of the model that made the pseudo labels (same fold;
    # nnU-Net's -pretrained_weights would reset the segmentation heads), with a fresh learning-rate schedule
    pseudo_labels_from: str | None = None  # a later round: the trainer whose model of this fold must have made
    # the pseudo labels (None: any model)
    forward_in_parts: bool = True  # on the CPU, the labelled batch and the extra samples through the network one
    # after the other (the same outputs and gradients, a smaller working set: faster there; `partwise_forward`)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if self.extra_stream not in EXTRA_STREAMS:
            raise ValueError(f"{type(self).__name__}.extra_stream must be one of {EXTRA_STREAMS}, "
                             f"not {self.extra_stream!r}")
        if self.pooled_sampling and (self.extra_stream != "pseudo" or self.consistency_weight > 0):
            raise ValueError(f"{type(self).__name__}.pooled_sampling needs extra_stream 'pseudo' and no teacher")
        if self.teacher_view not in TEACHER_VIEWS:
            raise ValueError(f"{type(self).__name__}.teacher_view must be one of {TEACHER_VIEWS}, "
                             f"not {self.teacher_view!r}")
        super().__init__(plans, configuration, fold, dataset_json, device)
        one_line_errors_at_top_level()
        check_nnunet_version()  # nnUNetv2_train: our setup errors are one line and exit status 2
        self.teacher: nn.Module | None = None
        self.teacher_mirror_axes: tuple[int, ...] = ()  # the training mirroring (two views: "augmented", "clean")
        self.extra_dataset = None
        self.dataloader_extra = None
        self._iteration = 0  # within the epoch
        self._student_backup: dict[str, torch.Tensor] | None = None

    # --- set-up ------------------------------------------------------------------------------------

    @property
    def extra_loss_weight(self) -> float:
        """Weight of the supervised loss on the extra samples: unlabelled cases are never supervised."""
        return self.pseudo_loss_weight if self.extra_stream == "pseudo" else 0.0

    def initialize(self) -> None:
        super().initialize()
        self.loss = SemiSupervisedLoss(self.loss, probabilities_fn(self.label_manager.has_regions),
                                       self.extra_loss_weight, self._loss_ignoring_unsure())
        if self.consistency_weight > 0:
            self.teacher = make_teacher(unwrap_model(self.network))

    def _loss_ignoring_unsure(self):
        """nnU-Net's loss, built by nnU-Net with the pseudo labels' unsure label (`unsure_label`: `nnsam_refine
        --ignore-disagreement`) as its ignore label, for the pseudo-labelled part of the batch; None where the
        plain loss already ignores it (a dataset with an ignore label) or where regions are trained."""
        if self.extra_stream != "pseudo" or self.label_manager.has_regions or self.label_manager.has_ignore_label:
            return None
        labels = {**self.dataset_json["labels"], "ignore": unsure_label(self.label_manager)}
        planned = self.label_manager
        self.label_manager = self.plans_manager.get_label_manager({**self.dataset_json, "labels": labels})
        try:
            return self._build_loss()
        finally:
            self.label_manager = planned

    def open_extra_dataset(self):
        """The extra stream's cases; NnsamError naming the command that makes them when there are none."""
        dataset, configuration = self.plans_manager.dataset_name, self.configuration_name
        if self.plans_manager.plans_name != "nnUNetPlans":
            configuration += f" -p {self.plans_manager.plans_name}"
        if self.extra_stream == "pseudo":
            return open_pseudo_label_dataset(self.preprocessed_dataset_folder, self.pseudo_label_folder,
                                             f"nnsam_refine -d {dataset} -c {configuration} -f {self.fold}")
        return open_unlabeled_dataset(self.preprocessed_dataset_folder,
                                      f"nnsam_preprocess_unlabeled -d {dataset} -c {configuration}")

    @property
    def pseudo_label_folder(self) -> Path:
        """The pseudo labels made for this fold and these plans (`nnsam_refine -d ... -f FOLD`)."""
        return pseudo_label_folder(self.preprocessed_dataset_folder, self.plans_manager.plans_name, self.fold)

    def on_train_start(self) -> None:
        if self.is_cascaded:  # the extra cases have no previous-stage segmentations
            raise NnsamError(f"{type(self).__name__} does not support cascade configurations "
                             f"({self.configuration_name}); use 3d_fullres, 3d_lowres or 2d")
        self.extra_dataset = self.open_extra_dataset()  # fail before any data loader or training starts
        remove_killed_writes(Path(self.output_folder))  # a checkpoint half-written by a killed run
        if self.pseudo_labels_from is not None:
            self.check_pseudo_label_round()
        if self.warm_start and self.current_epoch == 0:
            self.load_initial_model_weights()
        super().on_train_start()
        if self.teacher is not None and self.current_epoch == 0:
            # a fresh start (possibly from -pretrained_weights): the teacher starts as the student
            self.teacher.load_state_dict(unwrap_model(self.network).state_dict())
        teacher = f", teacher view {self.teacher_view}" if self.teacher is not None else ""
        if self.pooled_sampling:
            self.print_to_log_file(f"{len(self.extra_dataset.identifiers)} pseudo cases pooled with the labelled "
                                   f"training cases; per batch {self.batch_size} drawn from both")
            return
        self.print_to_log_file(f"{len(self.extra_dataset.identifiers)} {self.extra_stream} cases; per batch "
                               f"{self.batch_size} labelled + {self.n_extra} {self.extra_stream}; loss weight of the "
                               f"{self.extra_stream} samples {self.extra_loss_weight}; consistency weight "
                               f"{self.consistency_weight}{teacher}")

    def check_pseudo_label_round(self) -> None:
        """A later round trains only on pseudo labels refined from the previous round's model of the same fold."""
        trainer, checkpoint = pseudo_label_model(self.pseudo_label_folder, self.fold)
        if trainer != self.pseudo_labels_from:
            raise NnsamError(
                f"{type(self).__name__} trains on pseudo labels made from a {self.pseudo_labels_from} model, but "
                f"these come from {trainer} ({checkpoint}); first run nnsam_refine -d "
                f"{self.plans_manager.dataset_name} -c {self.configuration_name} -f {self.fold} "
                f"-tr {self.pseudo_labels_from}")
        self.print_to_log_file(f"pseudo labels refined from the previous round's model {checkpoint}")

    def load_initial_model_weights(self) -> None:
        """Every weight of the nnU-Net that made the pseudo labels (`warm_start`)."""
        if self.extra_stream != "pseudo":
            raise NnsamError(f"{type(self).__name__}.warm_start needs pseudo labels (extra_stream 'pseudo')")
        path = pseudo_label_model_checkpoint(self.pseudo_label_folder, self.fold)
        weights = torch.load(path, map_location=self.device, weights_only=False)["network_weights"]
        weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}
        unwrap_model(self.network).load_state_dict(weights)
        self.print_to_log_file(f"warm start: every weight from {path}")

    @property
    def n_extra(self) -> int:
        """Extra samples per step (`extra_batch_size`, default the planned batch size)."""
        return self.batch_size if self.extra_batch_size is None else self.extra_batch_size

    @property
    def two_views(self) -> bool:
        """Whether the extra stream carries the teacher's own view (`teacher_views.TwoViewTransform`)."""
        return self.consistency_weight > 0 and self.teacher_view != "student"

    def get_tr_and_val_datasets(self):
        """nnU-Net's datasets; with `pooled_sampling` the training one holds the pseudo-labelled cases too."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.pooled_sampling:
            if self.extra_dataset is None:
                self.extra_dataset = self.open_extra_dataset()
            dataset_tr = PooledDataset(dataset_tr, self.extra_dataset)
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        """nnU-Net's labelled streams, untouched, plus the extra stream (none when pooled)."""
        if self.pooled_sampling:
            return super().get_dataloaders()
        if self.n_extra < 1:
            raise ValueError(f"{type(self).__name__}.extra_batch_size must be at least 1, not {self.n_extra}")
        dataloader_train, dataloader_val = super().get_dataloaders()
        self.dataloader_extra = self._extra_dataloader(dataloader_train, self.n_extra)
        return dataloader_train, dataloader_val

    def _extra_dataloader(self, dataloader_train, batch_size: int):
        """The extra cases through nnU-Net's data loader with the labelled stream's training transforms,
        in the same kind of augmenter."""
        if self.extra_dataset is None:
            self.extra_dataset = self.open_extra_dataset()
        labelled = augmenter_data_loader(dataloader_train)
        oversample = self.oversample_foreground_percent if self.extra_stream == "pseudo" else 0.0
        transforms = labelled.transforms
        if self.two_views:
            transforms = TwoViewTransform(transforms, teacher_intensity=self.teacher_view == "augmented")
            self.teacher_mirror_axes = transforms.mirror_axes
        loader = nnUNetDataLoader(self.extra_dataset, batch_size, initial_patch_size(self),
                                  self.configuration_manager.patch_size, self.label_manager,
                                  oversample_foreground_percent=oversample,  # nnU-Net's rule, as the labelled stream
                                  probabilistic_oversampling=self.probabilistic_oversampling, transforms=transforms)
        if isinstance(dataloader_train, SingleThreadedAugmenter):
            return SingleThreadedAugmenter(loader, None)
        # workers in proportion to the share of the batch this stream carries
        processes = max(1, round(get_allowed_n_proc_DA() * batch_size / (batch_size + labelled.batch_size)))
        return NonDetMultiThreadedAugmenter(loader, None, num_processes=processes, num_cached=max(6, processes // 2),
                                            seeds=None, pin_memory=self.device.type == "cuda", wait_time=0.002)

    def on_train_end(self) -> None:
        super().on_train_end()
        if isinstance(self.dataloader_extra, NonDetMultiThreadedAugmenter):
            stop_augmenter(self.dataloader_extra)

    # --- training ----------------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self._iteration = 0
        super().on_train_epoch_start()

    def global_step(self) -> int:
        return self.current_epoch * self.num_iterations_per_epoch + self._iteration

    def epoch_progress(self) -> float:
        """Epochs done so far, with the fraction of the current one."""
        return self.current_epoch + self._iteration / self.num_iterations_per_epoch

    def current_consistency_weight(self) -> float:
        return rampup_weight(self.consistency_weight, self.epoch_progress(),
                             self.consistency_rampup_fraction * self.num_epochs)

    def current_extra_loss_weight(self) -> float:
        return rampup_weight(self.extra_loss_weight, self.epoch_progress(),
                             self.pseudo_rampup_fraction * self.num_epochs)

    @torch.no_grad()
    def teacher_probabilities(self, data: torch.Tensor) -> torch.Tensor:
        """The teacher's probabilities (full resolution, float32) on its view `data`: mirrored at random and
        flipped back (teacher_view "augmented"), or plus clamped noise ("student")."""
        def logits(x: torch.Tensor) -> torch.Tensor:
            return highest_resolution(self.teacher(x))

        with torch.autocast(self.device.type) if self.device.type == "cuda" else nullcontext():
            if self.two_views:
                output = mirrored_forward(logits, data, random_flip_axes(self.teacher_mirror_axes))
            else:
                output = logits(teacher_noise(data, self.teacher_noise_std, self.teacher_noise_clip))
        return probabilities_fn(self.label_manager.has_regions)(output.float())

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train step with this step's loss context, then the EMA update of the teacher."""
        if self.pooled_sampling:  # a batch of the pooled set, all of it through the loss that leaves `unsure` out
            merged, context = batch, StepContext(n_labelled=0, extra_weight=1.0)
        else:
            merged, context = self._with_extra_samples(batch)
        parts = self.forward_parts(context.n_labelled, merged["data"].shape[0])
        self.loss.step = context
        try:
            with network_in_parts(self, parts):
                result = super().train_step(merged)
        finally:
            self.loss.step = None
        if self.teacher is not None:
            update_ema(self.teacher, unwrap_model(self.network), ema_alpha(self.global_step(), self.ema_decay))
        self._iteration += 1
        return result

    def forward_parts(self, n_labelled: int, n_samples: int) -> list[int]:
        """The parts the network runs this step's batch in: [labelled, extra] (`forward_in_parts`), else whole."""
        if self.forward_in_parts and 0 < n_labelled < n_samples:
            return [n_labelled, n_samples - n_labelled]
        return [n_samples]

    def _with_extra_samples(self, batch: dict) -> tuple[dict, StepContext]:
        """The labelled batch followed by the extra stream's samples, on the device, and the step's loss context
        (with the teacher's probabilities on its view of the extra samples)."""
        extra = next(self.dataloader_extra)
        teacher_view = None
        if self.two_views:
            student_view, teacher_view = split_views(extra["data"])
            extra = {**extra, "data": student_view}
        n_labelled = batch["data"].shape[0]
        merged = concat_batches(batch, extra)
        merged["data"] = merged["data"].to(self.device, non_blocking=True)
        context = StepContext(n_labelled, extra_weight=self.current_extra_loss_weight())
        if self.teacher is not None:
            if teacher_view is None:
                teacher_view = merged["data"][n_labelled:]
            context.teacher_probabilities = self.teacher_probabilities(teacher_view.to(self.device, non_blocking=True))
            context.consistency_weight = self.current_consistency_weight()
        return merged, context

    # --- validation with the teacher -----------------------------------------------------------------

    def use_teacher_weights(self) -> None:
        """Put the teacher's weights into the student module (validation uses `self.network`)."""
        if self.teacher is not None and self._student_backup is None:
            student = unwrap_model(self.network)
            self._student_backup = clone_state(student)
            student.load_state_dict(self.teacher.state_dict())

    def restore_student_weights(self) -> None:
        """Undo `use_teacher_weights`."""
        if self._student_backup is not None:
            unwrap_model(self.network).load_state_dict(self._student_backup)
            self._student_backup = None

    def on_validation_epoch_start(self) -> None:
        self.use_teacher_weights()
        super().on_validation_epoch_start()

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        try:
            super().on_validation_epoch_end(val_outputs)
        finally:
            self.restore_student_weights()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.use_teacher_weights()
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.restore_student_weights()

    # --- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically; with a teacher, `network_weights` is the teacher and
        `student_weights` the student."""
        saved = checkpoint_bytes(super().save_checkpoint)
        if not saved:  # not rank 0, or checkpointing disabled
            return
        with atomic_path(filename) as tmp:
            if self.teacher is None:
                tmp.write_bytes(saved)
            else:
                torch.save(self._with_teacher_weights(saved), tmp)

    def _with_teacher_weights(self, saved: bytes) -> dict:
        """The checkpoint `saved` with the teacher as `network_weights` plus `student_weights`."""
        checkpoint = torch.load(io.BytesIO(saved), map_location="cpu", weights_only=False)
        checkpoint["student_weights"] = checkpoint["network_weights"]
        checkpoint["network_weights"] = self.teacher.state_dict()
        return checkpoint

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """nnU-Net's loading (pass a path: dict loading is broken in nnU-Net 2.8.1); with a teacher, the
        teacher gets `network_weights` and the student `student_weights`."""
        if isinstance(filename_or_checkpoint, os.PathLike):
            filename_or_checkpoint = os.fspath(filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)
        if self.teacher is None:
            return
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        self.teacher.load_state_dict(checkpoint["network_weights"])
        if "student_weights" in checkpoint:
            unwrap_model(self.network).load_state_dict(checkpoint["student_weights"])
