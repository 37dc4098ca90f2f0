"""The semi-supervised trainers: pure helpers, and real nnU-Net trainings on a tiny synthetic dataset.

The integration fixture (`tests/helpers/trainer_data.py`) plans and preprocesses a 2-labelled-case dataset with
nnU-Net's own Python entry points, fakes the `_unlabeled` and `_pseudolabels` folders from preprocessed labelled
cases under unlabelled case ids, and writes very short subclasses of our trainers into a temporary folder that
`nnUNet_extTrainer` points to, next to our trainers folder: exactly what a user does.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers.trainer_data import CONFIGURATION, DATASET, environment, fake_model_record, prepare_dataset
from nnunet_sam.demo.nnunet_setup import spawn_pools_in_threads
from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.semi_supervised import (SemiSupervisedLoss, StepContext, concat_batches, ema_alpha,
                                               probabilities_fn, rampup_weight, slice_outputs, teacher_noise,
                                               unwrap_model, update_ema)

SHORT = {"nnUNetTrainerSAMPseudo": "nnUNetTrainerSAMPseudoShort",
         "nnUNetTrainerMeanTeacher": "nnUNetTrainerMeanTeacherShort",
         "nnUNetTrainerSAMPseudoMeanTeacher": "nnUNetTrainerSAMPseudoMeanTeacherShort"}
EPOCHS, ITERATIONS = 1, 2  # per short training: the teacher differs from the student from step 2 on
FOLD = {"nnUNetTrainerSAMPseudoShort": "all", "nnUNetTrainerMeanTeacherShort": 0,
        "nnUNetTrainerSAMPseudoMeanTeacherShort": 0}


# ---------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------

def test_rampup_weight():
    assert rampup_weight(0.1, 0, 10) == pytest.approx(0.1 * math.exp(-5))
    assert rampup_weight(0.1, 5, 10) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert rampup_weight(0.1, 10, 10) == pytest.approx(0.1)
    assert rampup_weight(0.1, 25, 10) == pytest.approx(0.1)
    assert rampup_weight(0.1, 3, 0) == pytest.approx(0.1)
    values = [rampup_weight(1.0, e, 10) for e in range(11)]
    assert values == sorted(values)


def test_ema_alpha():
    assert ema_alpha(0, 0.99) == 0.0
    assert ema_alpha(1, 0.99) == pytest.approx(0.5)
    assert ema_alpha(9, 0.99) == pytest.approx(0.9)
    assert ema_alpha(10_000, 0.99) == pytest.approx(0.99)


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))


def test_update_ema_blends_parameters_and_copies_buffers():
    torch.manual_seed(0)
    teacher, student = _small_net(), _small_net()
    student[1].running_mean.fill_(3.0)
    before_t = [p.detach().clone() for p in teacher.parameters()]
    before_s = [p.detach().clone() for p in student.parameters()]
    update_ema(teacher, student, 0.9)
    for t, t0, s0 in zip(teacher.parameters(), before_t, before_s):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s0)
    torch.testing.assert_close(teacher[1].running_mean, torch.full((2,), 3.0))
    update_ema(teacher, student, ema_alpha(0, 0.99))  # the first step copies the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)


def test_teacher_noise_is_clamped():
    torch.manual_seed(0)
    data = torch.zeros(4, 1, 8, 8, 8)
    noisy = teacher_noise(data, 1.0, 0.2)
    assert noisy.abs().max() <= 0.2 + 1e-6 and noisy.std() > 0.1
    assert teacher_noise(data, 0.0, 0.2) is data


def test_slicing_and_concatenating_deep_supervision_batches():
    a = {"data": torch.zeros(1, 1, 4, 4, 4), "target": [torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 2, 2, 2)],
         "keys": ["lab"]}
    b = {"data": torch.ones(2, 1, 4, 4, 4), "target": [torch.ones(2, 1, 4, 4, 4), torch.ones(2, 1, 2, 2, 2)],
         "keys": ["x", "y"]}
    merged = concat_batches(a, b)
    assert merged["keys"] == ["lab", "x", "y"] and merged["data"].shape[0] == 3
    assert [t.shape[0] for t in merged["target"]] == [3, 3]
    extra = slice_outputs(merged["target"], slice(1, None))
    assert [t.shape for t in extra] == [(2, 1, 4, 4, 4), (2, 1, 2, 2, 2)] and all(t.min() == 1 for t in extra)
    assert slice_outputs(merged["data"], slice(0, 1)).max() == 0


class _RecordingLoss:
    """A supervised loss that returns the mean of the target's first element and records batch sizes."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, output, target):
        self.batch_sizes.append(output[0].shape[0])
        return target[0].float().mean() + 0.0 * output[0].sum()


def _outputs(batch: int) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, 4, 4, 4, requires_grad=True), torch.randn(batch, 3, 2, 2, 2)]


def test_loss_without_step_is_the_plain_loss():
    supervised = _RecordingLoss()
    loss = SemiSupervisedLoss(supervised, probabilities_fn(False), extra_weight=0.5)
    target = [torch.full((3, 1, 4, 4, 4), 2.0), torch.full((3, 1, 2, 2, 2), 2.0)]
    assert loss(_outputs(3), target).item() == pytest.approx(2.0)
    assert supervised.batch_sizes == [3]


def test_loss_weights_labelled_pseudo_and_consistency_parts():
    supervised = _RecordingLoss()
    loss = SemiSupervisedLoss(supervised, probabilities_fn(False), extra_weight=0.5)
    target = [torch.cat((torch.full((1, 1, 4, 4, 4), 1.0), torch.full((2, 1, 4, 4, 4), 3.0))),
              torch.zeros(3, 1, 2, 2, 2)]
    output = _outputs(3)
    teacher = torch.softmax(torch.randn(2, 3, 4, 4, 4), 1)
    loss.step = StepContext(n_labelled=1, teacher_probabilities=teacher, consistency_weight=0.1)
    value = loss(output, target)
    consistency = torch.mean((torch.softmax(output[0][1:], 1) - teacher) ** 2)
    assert value.item() == pytest.approx(1.0 + 0.5 * 3.0 + 0.1 * consistency.item(), rel=1e-5)
    assert supervised.batch_sizes == [1, 2]
    value.backward()  # the consistency term trains the student on the extra samples only
    assert output[0].grad[1:].abs().sum() > 0 and output[0].grad[:1].abs().sum() == 0


def test_loss_never_supervises_unlabelled_cases():
    supervised = _RecordingLoss()
    loss = SemiSupervisedLoss(supervised, probabilities_fn(False), extra_weight=0.0)
    loss.step = StepContext(n_labelled=2, teacher_probabilities=torch.full((1, 3, 4, 4, 4), 1 / 3),
                            consistency_weight=0.1)
    loss(_outputs(3), [torch.zeros(3, 1, 4, 4, 4), torch.zeros(3, 1, 2, 2, 2)])
    assert supervised.batch_sizes == [2]


def test_step_weight_of_the_extra_part_and_a_pooled_batch():
    """The step's own extra weight (a ramped pseudo-label weight) replaces the loss's; a pooled batch
    (n_labelled 0) is all extra samples, with the loss that leaves the unsure label out."""
    supervised, extra_supervised = _RecordingLoss(), _RecordingLoss()
    loss = SemiSupervisedLoss(supervised, probabilities_fn(False), extra_weight=0.5, extra_supervised=extra_supervised)
    target = [torch.cat((torch.full((1, 1, 4, 4, 4), 1.0), torch.full((2, 1, 4, 4, 4), 3.0))),
              torch.zeros(3, 1, 2, 2, 2)]
    loss.step = StepContext(n_labelled=1, extra_weight=0.1)
    assert loss(_outputs(3), target).item() == pytest.approx(1.0 + 0.1 * 3.0)
    loss.step = StepContext(n_labelled=0, extra_weight=1.0)
    assert loss(_outputs(3), target).item() == pytest.approx((1.0 + 2 * 3.0) / 3)
    assert supervised.batch_sizes == [1] and extra_supervised.batch_sizes == [2, 3]


def test_probabilities_are_per_sample():
    logits = torch.randn(2, 3, 4, 4, 4)
    torch.testing.assert_close(probabilities_fn(False)(logits).sum(1), torch.ones(2, 4, 4, 4))
    torch.testing.assert_close(probabilities_fn(True)(logits), torch.sigmoid(logits))


def test_unwrap_compiled_model():
    net = _small_net()
    assert unwrap_model(torch.compile(net)) is net and unwrap_model(net) is net


@pytest.mark.parametrize("name", SHORT)
def test_nnunet_finds_our_trainers(name, monkeypatch, capsys):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_sam.cli.trainer_dir import main
    from nnunet_sam.nnunet.semi_supervised import SemiSupervisedTrainer

    main()  # nnsam_trainer_dir
    folder = capsys.readouterr().out.strip()
    assert Path(folder).is_absolute() and (Path(folder) / f"{name}.py").is_file()
    monkeypatch.setenv("nnUNet_extTrainer", folder)
    trainer_class = recursive_find_trainer_class_by_name(name)
    assert trainer_class.__name__ == name and issubclass(trainer_class, SemiSupervisedTrainer)


def test_an_old_trainers_folder_left_in_the_package_is_named_with_the_fix(monkeypatch, capsys, tmp_path):
    """The trainers moved from nnunet_sam/trainers/ to trainers/: an old folder without __init__.py (only
    __pycache__ left) would shadow them as an empty namespace package."""
    import nnunet_sam.trainers

    from nnunet_sam.cli.trainer_dir import main

    monkeypatch.setattr(nnunet_sam.trainers, "__file__", None)
    monkeypatch.setattr(nnunet_sam.trainers, "__path__", [str(tmp_path / "trainers")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and capsys.readouterr().err == (
        f"nnsam_trainer_dir: error: {tmp_path / 'trainers'} is left over from an older nnunet-sam (the trainers now "
        f"live in the top-level trainers/ folder); remove it: rm -r {tmp_path / 'trainers'}\n")


# ---------------------------------------------------------------------------------------------------
# Integration: real nnU-Net planning, preprocessing and trainings
# ---------------------------------------------------------------------------------------------------

def make_trainer(name: str, fold, continue_training: bool = False):
    """What nnUNetv2_train does before training: find the trainer class through nnUNet_extTrainer."""
    from nnunetv2.run.run_training import get_trainer_from_args

    return get_trainer_from_args(DATASET, CONFIGURATION, fold, name, continue_training=continue_training,
                                 device=torch.device("cpu"))


@pytest.fixture(scope="session")
def nnunet_data(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The prepared dataset's root and nnU-Net environment variables (set only while they are needed:
    other test modules have nnU-Net datasets of their own)."""
    root = tmp_path_factory.mktemp("nnunet_trainers")
    start = time.perf_counter()
    with environment({}):
        env = prepare_dataset(root, root / "ext_trainers", EPOCHS, ITERATIONS)
    print(f"\nsynthetic dataset, planning and preprocessing: {time.perf_counter() - start:.1f} s")
    return root, env


@pytest.fixture
def nnunet_env(nnunet_data, monkeypatch) -> Path:
    """nnU-Net's environment variables point at the prepared dataset during the test."""
    root, env = nnunet_data
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return root


@pytest.fixture(scope="session")
def trained(nnunet_data):
    """Each short trainer trained once, as nnUNetv2_train does."""
    trainers = {}
    with environment(nnunet_data[1]):
        for name in SHORT.values():
            trainer = make_trainer(name, FOLD[name])
            trainer.run_training()
            trainers[name] = trainer
    return trainers


def _checkpoint(trainer, name="checkpoint_final.pth") -> dict:
    return torch.load(os.path.join(trainer.output_folder, name), map_location="cpu", weights_only=False)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.mark.parametrize("name", SHORT.values())
def test_trainer_trains_and_saves(nnunet_env, trained, name):
    trainer = trained[name]
    checkpoint = _checkpoint(trainer)
    assert checkpoint["trainer_name"] == name and checkpoint["current_epoch"] == EPOCHS
    assert {"network_weights", "optimizer_state", "logging", "init_args",
            "inference_allowed_mirroring_axes"} <= checkpoint.keys()
    assert not os.path.exists(os.path.join(trainer.output_folder, "checkpoint_latest.pth"))
    assert not [p for p in os.listdir(trainer.output_folder) if p.startswith(".nnsam-tmp")]
    losses = trainer.logger.get_value("train_losses", step=None)
    assert len(losses) == EPOCHS and all(np.isfinite(losses))


@pytest.mark.parametrize("name", ["nnUNetTrainerMeanTeacherShort", "nnUNetTrainerSAMPseudoMeanTeacherShort"])
def test_mean_teacher_checkpoint_holds_teacher_and_student(nnunet_env, trained, name):
    trainer = trained[name]
    checkpoint = _checkpoint(trainer)
    assert _same(checkpoint["network_weights"], trainer.teacher.state_dict())
    assert _same(checkpoint["student_weights"], unwrap_model(trainer.network).state_dict())
    assert not _same(checkpoint["network_weights"], checkpoint["student_weights"])


def test_pseudo_trainer_has_no_teacher(nnunet_env, trained):
    trainer = trained["nnUNetTrainerSAMPseudoShort"]
    assert trainer.teacher is None and "student_weights" not in _checkpoint(trainer)


@pytest.mark.parametrize("name", ["nnUNetTrainerSAMPseudoShort", "nnUNetTrainerSAMPseudoMeanTeacherShort"])
def test_pseudo_cases_only_train(nnunet_env, trained, name):
    trainer = trained[name]
    pseudo = {"syntheticctUn_000", "syntheticctUn_001"}
    tr_keys, val_keys = trainer.do_split()
    assert not pseudo & set(val_keys) and not pseudo & set(tr_keys)
    assert not pseudo & set(trainer.dataloader_val.generator._data.identifiers)
    assert set(trainer.dataloader_extra.generator._data.identifiers) == pseudo
    if trainer.fold == 0:
        assert val_keys == ["syntheticctTr_001"]


def test_pseudo_label_loss_ignores_the_unsure_label(nnunet_env, trained):
    """Voxels with the unsure label (nnsam_refine --ignore-disagreement) carry no pseudo-label loss; the same
    voxels as a class do, and the labelled part's loss is nnU-Net's own."""
    from nnunet_sam.nnunet.pseudolabels import unsure_label

    trainer = trained["nnUNetTrainerSAMPseudoShort"]
    unsure = unsure_label(trainer.label_manager)
    assert unsure == max(trainer.label_manager.all_labels) + 1 and not trainer.label_manager.has_ignore_label
    network = unwrap_model(trainer.network)
    with torch.no_grad():
        outputs = network(torch.randn(1, 1, *trainer.configuration_manager.patch_size))
    targets = [torch.zeros(1, 1, *o.shape[2:]) for o in outputs]
    for t in targets:
        t[..., : t.shape[-1] // 2] = unsure  # half of every scale unsure

    def gradient(loss_fn, target):
        logits = [o.clone().requires_grad_(True) for o in outputs]
        loss_fn(logits, target).backward()
        return logits[0].grad[..., : logits[0].shape[-1] // 2], logits[0].grad[..., logits[0].shape[-1] // 2:]

    ignored, kept = gradient(trainer.loss.extra_supervised, targets)
    assert ignored.abs().sum() == 0 and kept.abs().sum() > 0
    as_class = [torch.where(t == unsure, torch.ones_like(t), t) for t in targets]  # label 1 there instead
    assert gradient(trainer.loss.extra_supervised, as_class)[0].abs().sum() > 0
    assert trainer.loss.supervised is not trainer.loss.extra_supervised


def _first_batch(loader, seed: int) -> dict:
    np.random.seed(seed)
    torch.manual_seed(seed)
    return next(loader)


def test_labelled_batch_is_nnunets_and_the_extra_samples_come_on_top(nnunet_env, trained, monkeypatch):
    """Our trainer's labelled batch is what nnUNetTrainer draws with the same seed (batch size, foreground
    oversampling, augmentation); the extra stream adds the planned batch size of samples, each with the teacher's
    own view as extra channels; nnU-Net's loss sees the whole labelled batch."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # single-threaded augmenters: the draws follow the seed
    ours, theirs = make_trainer("nnUNetTrainerMeanTeacherShort", 0), make_trainer("nnUNetTrainer", 0)
    loaders = {}
    for trainer in (ours, theirs):
        trainer.initialize()
        loaders[trainer] = trainer.get_dataloaders()[0]
    assert ours.batch_size == theirs.batch_size == ours.n_extra
    mine, reference = _first_batch(loaders[ours], 7), _first_batch(loaders[theirs], 7)
    assert list(mine["keys"]) == list(reference["keys"])
    torch.testing.assert_close(mine["data"], reference["data"])
    for a, b in zip(mine["target"], reference["target"]):
        torch.testing.assert_close(a, b)
    extra = _first_batch(ours.dataloader_extra, 7)
    channels = mine["data"].shape[1]
    assert extra["data"].shape == (ours.n_extra, 2 * channels, *mine["data"].shape[2:])
    assert not torch.allclose(extra["data"][:, :channels], extra["data"][:, channels:])
    assert ours.teacher_mirror_axes == tuple(ours.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3])

    class Recording(nn.Module):  # nnU-Net's loss, recording the batch size it is given
        def __init__(self, loss):
            super().__init__()
            self.loss, self.seen = loss, []

        def forward(self, output, target):
            self.seen.append(output[0].shape[0])
            return self.loss(output, target)

    ours.loss.supervised = recording = Recording(ours.loss.supervised)
    ours.on_train_epoch_start()
    ours.train_step(mine)
    assert recording.seen == [ours.batch_size]


def test_pooled_sampling_draws_nnunets_batch_from_labelled_and_pseudo_cases(nnunet_env, trained, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = make_trainer("nnUNetTrainerSAMPseudoShort", 0)
    trainer.pooled_sampling = True
    trainer.initialize()
    loader = trainer.get_dataloaders()[0]
    tr_keys, _ = trainer.do_split()
    pseudo = {"syntheticctUn_000", "syntheticctUn_001"}
    from nnunet_sam.nnunet.nnunet_internals import augmenter_data_loader

    identifiers = augmenter_data_loader(loader)._data.identifiers
    assert set(identifiers) == set(tr_keys) | pseudo and trainer.dataloader_extra is None
    drawn = set()
    for seed in range(6):
        batch = _first_batch(loader, seed)
        assert batch["data"].shape[0] == trainer.batch_size
        drawn |= set(batch["keys"])
    assert drawn & pseudo and drawn & set(tr_keys)
    trainer.on_train_epoch_start()
    assert np.isfinite(trainer.train_step(batch)["loss"])
    with pytest.raises(ValueError, match="pooled_sampling needs extra_stream 'pseudo' and no teacher"):
        type("Pooled", (trainer.__class__,), {"pooled_sampling": True, "consistency_weight": 0.1})(
            trainer.plans_manager.plans, CONFIGURATION, 0, trainer.dataset_json, torch.device("cpu"))


def test_validation_uses_teacher_and_restores_student(nnunet_env, trained):
    trainer = trained["nnUNetTrainerMeanTeacherShort"]
    student = {k: v.clone() for k, v in unwrap_model(trainer.network).state_dict().items()}
    trainer.use_teacher_weights()
    assert _same(unwrap_model(trainer.network).state_dict(), trainer.teacher.state_dict())
    trainer.restore_student_weights()
    assert _same(unwrap_model(trainer.network).state_dict(), student)


def test_final_validation_with_teacher(nnunet_env, trained):
    trainer = trained["nnUNetTrainerMeanTeacherShort"]
    student = {k: v.clone() for k, v in unwrap_model(trainer.network).state_dict().items()}
    trainer.inference_allowed_mirroring_axes = None  # no test-time mirroring: 8x fewer forward passes
    with spawn_pools_in_threads():
        trainer.perform_actual_validation()
    assert os.path.isfile(os.path.join(trainer.output_folder, "validation", "summary.json"))
    assert os.path.isfile(os.path.join(trainer.output_folder, "validation", "syntheticctTr_001.nii.gz"))
    assert _same(unwrap_model(trainer.network).state_dict(), student)


@pytest.mark.parametrize("name, folder, command", [
    ("nnUNetTrainerSAMPseudoShort", "nnUNetPlans_3d_fullres_pseudolabels/nnUNetPlans/fold_0",
     f"nnsam_refine -d {DATASET} -c 3d_fullres -f 0"),
    ("nnUNetTrainerMeanTeacherShort", "nnUNetPlans_3d_fullres_unlabeled",
     f"nnsam_preprocess_unlabeled -d {DATASET} -c 3d_fullres"),
])
def test_missing_extra_cases_give_the_command(nnunet_env, trained, name, folder, command):
    path = nnunet_env / "preprocessed" / DATASET / folder
    hidden = path.with_name(path.name + "_hidden")
    path.rename(hidden)
    try:
        trainer = make_trainer(name, 0)
        with pytest.raises(NnsamError, match=re.escape(command) + "$") as error:
            trainer.on_train_start()
        assert str(path) in str(error.value)
        assert trainer.dataloader_train is None and not trainer.was_initialized
    finally:
        hidden.rename(path)


def test_mean_teacher_resumes_exactly(nnunet_env, trained):
    name = "nnUNetTrainerMeanTeacherShort"
    path = os.path.join(trained[name].output_folder, "checkpoint_final.pth")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    trainer = make_trainer(name, FOLD[name], continue_training=True)
    trainer.num_epochs += 1  # one more epoch than the finished training
    trainer.load_checkpoint(path)  # what --c does
    assert trainer.current_epoch == EPOCHS
    assert _same(unwrap_model(trainer.network).state_dict(), saved["student_weights"])
    assert _same(trainer.teacher.state_dict(), saved["network_weights"])
    trainer.run_training()
    resumed = _checkpoint(trainer)
    assert resumed["current_epoch"] == EPOCHS + 1
    assert not _same(resumed["network_weights"], saved["network_weights"])
    assert not _same(resumed["student_weights"], saved["student_weights"])


def test_predict_uses_the_teacher(nnunet_env, trained):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer = trained["nnUNetTrainerSAMPseudoMeanTeacherShort"]
    checkpoint = _checkpoint(trainer)
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(trainer.output_folder_base, use_folds=(0,))
    assert _same(predictor.network.state_dict(), checkpoint["network_weights"])
    assert not _same(predictor.network.state_dict(), checkpoint["student_weights"])
    image = nnunet_env / "raw" / DATASET / "imagesUnlabeled" / "syntheticctUn_000_0000.nii.gz"
    data, properties = SimpleITKIO().read_images([str(image)])
    segmentation = predictor.predict_single_npy_array(data, properties)
    assert segmentation.shape == data.shape[1:]
    assert set(np.unique(segmentation)) <= {0, 1, 2}


def test_round2_trainer_is_found_by_nnunet_and_wants_a_first_round_model():
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from nnunet_sam.cli.trainer_dir import trainer_dir

    found = recursive_find_python_class(str(trainer_dir()), "nnUNetTrainerSAMPseudoRound2", "nnunet_sam.trainers")
    assert found.pseudo_labels_from == "nnUNetTrainerSAMPseudo"


def test_warm_start_takes_every_weight_of_the_model_that_made_the_pseudo_labels(nnunet_env, trained):
    """`warm_start`: the pseudo-label model's weights, segmentation heads included (nnU-Net's
    -pretrained_weights would reset those); refused for a model of another fold (leakage); a later round's
    check of the trainer that made them."""
    import json

    from nnunet_sam.nnunet.datasets import pseudo_label_model_checkpoint

    source = trained["nnUNetTrainerSAMPseudoMeanTeacherShort"]  # fold 0, as if it had made the pseudo labels
    pseudo = nnunet_env / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres_pseudolabels" / "nnUNetPlans" / "fold_0"
    report = pseudo / "refine_report.json"
    fake_report = report.read_text()
    record = fake_model_record(["0"], source.__class__.__name__, str(Path(source.output_folder).parent))
    report.write_text(json.dumps({"initial_model": record}))
    try:
        trainer = make_trainer("nnUNetTrainerSAMPseudoShort", 0)
        trainer.initialize()
        trainer.load_initial_model_weights()
        assert _same(unwrap_model(trainer.network).state_dict(), _checkpoint(source)["network_weights"])
        with pytest.raises(NnsamError, match="not fold 1: starting from that model would leak"):
            pseudo_label_model_checkpoint(pseudo, 1)
        # a later round (nnUNetTrainerSAMPseudoRound2) checks which trainer's model made the pseudo labels
        trainer.pseudo_labels_from = source.__class__.__name__
        trainer.check_pseudo_label_round()
        trainer.pseudo_labels_from = "nnUNetTrainerSAMPseudo"
        with pytest.raises(NnsamError, match="come from nnUNetTrainerSAMPseudoMeanTeacherShort .* first run "
                                             "nnsam_refine -d Dataset990_SyntheticCT -c 3d_fullres -f 0 "
                                             "-tr nnUNetTrainerSAMPseudo$"):
            trainer.check_pseudo_label_round()
        report.write_text(json.dumps({"initial_model": None, "source": "truth"}))
        with pytest.raises(NnsamError, match="not made by a trained model"):
            trainer.load_initial_model_weights()
    finally:
        report.write_text(fake_report)
