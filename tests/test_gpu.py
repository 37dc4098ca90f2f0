"""The GPU paths against the CPU: refinement with mixed precision and batched encoder calls, the embedding cache
shared between devices, decoder fine-tuning, and each trainer with AMP and torch.compile through save, resume and
prediction.

Marked `gpu`: they need CUDA and skip without it. `benchmarks/gpu_check.py` runs them (`pytest -m gpu`); with
`NNSAM_CHECK_DEVICE=cpu` (what `gpu_check.py --device cpu --quick` sets, and what the suite runs through
tests/test_gpu_check.py) the same tests run on the CPU so that they cannot rot: the device under test is then the
CPU with batched encoder calls, compared with the CPU's one-slice-at-a-time reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CT_WINDOW, degrade, make_phantom
from helpers.trainer_data import CONFIGURATION, DATASET, LABELLED, environment, prepare_dataset
from nnunet_sam.sam import RefineSettings, SamRefiner, load_sam
from nnunet_sam.sam.embedding_cache import EmbeddingCache
from nnunet_sam.sam.prompts import dice

pytestmark = pytest.mark.gpu

DEVICE_VARIABLE = "NNSAM_CHECK_DEVICE"
# Stated tolerances of the device against the CPU (float16 autocast, the GPU default, moves LiteMedSAM's embeddings
# by ~0.7% and decoded masks by ~1% IoU in an emulation of CUDA's autocast; a boundary pixel can flip, a class
# cannot change; bfloat16, 11%, would not meet them, which is why it is not the default):
MIN_CLASS_DICE = 0.97  # refinement: per-class Dice between the device's and the CPU's pseudo label
MIN_DECODED_IOU = 0.95  # a cached device embedding decoded on the CPU vs the CPU's own embedding
MAX_PROBABILITY_GAP = 0.05  # nnU-Net prediction: largest softmax difference per voxel


@pytest.fixture(scope="module")
def device() -> torch.device:
    """The device under test: NNSAM_CHECK_DEVICE (default cuda); skips when that is CUDA and there is none."""
    device = torch.device(os.environ.get(DEVICE_VARIABLE, "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (benchmarks/gpu_check.py --device cpu runs these tests on the CPU)")
    return device


@pytest.fixture(scope="module")
def device_sam(device):
    return load_sam("litemedsam", device=device)


# --- SAM -----------------------------------------------------------------------------------------------------

def test_refinement_on_the_device_matches_the_cpu(device_sam, litemedsam):
    """Batched (8 slices per encoder call), mixed-precision refinement against the CPU's one slice per call."""
    phantom = make_phantom(seed=3)
    weak = degrade(phantom.labels)
    on_device = SamRefiner(device_sam, RefineSettings(ct_window=CT_WINDOW, batch_size=8))
    on_cpu = SamRefiner(litemedsam, RefineSettings(ct_window=CT_WINDOW, batch_size=1))
    device_sam.encoder_calls = 0
    result = on_device.refine(phantom.image, weak, phantom.spacing)
    reference = on_cpu.refine(phantom.image, weak, phantom.spacing)
    assert device_sam.encoder_calls == result.slices_encoded == reference.slices_encoded > 8
    for label in (1, 2):
        assert dice(result.mask == label, reference.mask == label) >= MIN_CLASS_DICE, label
        assert dice(result.mask == label, phantom.labels == label) > dice(weak == label, phantom.labels == label)
    assert result.mask.dtype == weak.dtype and result.mask.shape == weak.shape


def test_embeddings_cached_on_the_device_are_reused_on_the_cpu(device_sam, litemedsam, tmp_path):
    from nnunet_sam.sam.views import VolumeViews

    phantom = make_phantom(seed=4)
    views = VolumeViews.prepare(phantom.image, phantom.spacing, device_sam.input_size, "single", None, CT_WINDOW, 2)
    inputs = views.model_inputs(list(range(4, 12)))
    filled = EmbeddingCache(tmp_path, device_sam)
    keys = filled.ensure(inputs, batch_size=8)
    assert filled.misses == len(inputs)
    reused = EmbeddingCache(tmp_path, litemedsam)
    assert reused.folder == filled.folder  # the same encoder: the same cache, whatever the device
    calls = litemedsam.encoder_calls
    cached = reused.embeddings(inputs)
    assert (reused.hits, reused.misses, litemedsam.encoder_calls) == (len(inputs), 0, calls)
    own = litemedsam.encode(inputs)
    assert reused.load(keys).device.type == "cpu"
    box = np.array([[60.0, 60.0, 180.0, 170.0]])
    for index in range(len(inputs)):
        a = litemedsam.decode(cached[index:index + 1], box).low_res_logits > 0
        b = litemedsam.decode(own[index:index + 1], box).low_res_logits > 0
        iou = (a & b).sum().item() / max(1, (a | b).sum().item())
        assert iou >= MIN_DECODED_IOU, index


def test_decoder_finetuning_on_the_device_loads_on_the_cpu(device, tmp_path):
    from nnunet_sam.sam.finetune import (DecoderFinetuner, FinetuneSettings, LabelledVolume, save_finetuned,
                                         slice_examples, training_state_path)

    model = load_sam("litemedsam", device=device)  # its own: the decoder changes
    settings = RefineSettings(ct_window=CT_WINDOW)
    phantom = make_phantom(seed=5)
    cache = EmbeddingCache(tmp_path / "embeddings", model)
    examples = slice_examples([LabelledVolume("train", phantom.image, phantom.labels, phantom.spacing)], cache,
                              settings)
    before = {k: v.detach().cpu().clone() for k, v in model.module.mask_decoder.state_dict().items()}
    checkpoint = tmp_path / "finetuned.pth"
    finetuner = DecoderFinetuner(model, cache, settings, FinetuneSettings(epochs=2, min_steps=0))
    first = finetuner.fit(examples, progress=False, state_path=training_state_path(checkpoint))
    assert training_state_path(checkpoint).is_file()  # the state to resume from, with the device's RNG
    losses = [r.loss for r in first.history]
    assert len(losses) == 2 and all(np.isfinite(losses))
    after = model.module.mask_decoder.state_dict()
    assert any(not torch.equal(before[k], v.cpu()) for k, v in after.items())
    save_finetuned(model, checkpoint, {"data": "phantom", "context": "single"})
    on_cpu = load_sam("litemedsam", checkpoint, device="cpu")
    assert all(torch.equal(v.cpu(), on_cpu.module.mask_decoder.state_dict()[k]) for k, v in after.items())
    refined = SamRefiner(on_cpu, settings).refine(phantom.image[6:10], phantom.labels[6:10], phantom.spacing).mask
    assert dice(refined == 1, phantom.labels[6:10] == 1) > 0.8


# --- nnU-Net trainers -----------------------------------------------------------------------------------------

TRAINERS = ("nnUNetTrainerShort", "nnUNetTrainerSAMPseudoShort", "nnUNetTrainerMeanTeacherShort",
            "nnUNetTrainerSAMPseudoMeanTeacherShort")  # fold 0 each
EPOCHS = 2


@pytest.fixture(scope="module")
def trainer_data(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The trainers' tiny dataset (tests/helpers/trainer_data.py), 2 epochs x 2 iterations per training."""
    root = tmp_path_factory.mktemp("gpu_trainers")
    with environment({}):
        env = prepare_dataset(root, root / "ext_trainers", EPOCHS, 2)
    return root, {**env, "nnUNet_compile": "1"}


def _checkpoint(folder: Path) -> dict:
    return torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_with_amp_and_compile_saves_resumes_and_predicts(trainer_data, device, name):
    """nnUNetv2_train with nnUNet_compile=1 (AMP and torch.compile on CUDA; nnU-Net compiles nothing on the CPU),
    then `--c` for one more epoch, then the model predicts on the device as nnsam_refine's initial model does
    (perform_everything_on_device on CUDA) and on the CPU, within the stated tolerance."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_sam.nnunet.nnunet_internals import open_b2nd
    from nnunet_sam.nnunet.predict import InitialModel, ModelChoice
    from nnunet_sam.nnunet.semi_supervised import unwrap_model

    root, env = trainer_data
    with environment(env):
        trainer = get_trainer_from_args(DATASET, CONFIGURATION, 0, name, device=device)
        trainer.run_training()
        folder = Path(trainer.output_folder)
        compiled = unwrap_model(trainer.network) is not trainer.network
        assert compiled == (device.type == "cuda")
        assert (trainer.grad_scaler is not None) == (device.type == "cuda")
        first = _checkpoint(folder)
        assert first["current_epoch"] == EPOCHS
        assert not any(k.startswith("_orig_mod.") for k in first["network_weights"])

        resumed = get_trainer_from_args(DATASET, CONFIGURATION, 0, name, continue_training=True, device=device)
        resumed.num_epochs = EPOCHS + 1
        resumed.load_checkpoint(str(folder / "checkpoint_final.pth"))  # what --c does
        assert resumed.current_epoch == EPOCHS
        resumed.run_training()
        second = _checkpoint(folder)
        assert second["current_epoch"] == EPOCHS + 1
        assert np.all(np.isfinite(resumed.logger.get_value("train_losses", step=None)))

        case = root / "preprocessed" / DATASET / f"nnUNetPlans_{CONFIGURATION}" / f"{LABELLED[1]}.b2nd"
        data = open_b2nd(str(case))[:]
        choice = ModelChoice(trainer=name, folds=("0",), tta=False)
        labels, probabilities = InitialModel(folder.parent, choice, device).predict(data)
        with environment({"nnUNet_compile": "0"}):  # the predictor compiles on any device: not the CPU reference
            _, reference = InitialModel(folder.parent, choice, torch.device("cpu")).predict(data)
    assert labels.shape == data.shape[1:] and set(np.unique(labels)) <= {0, 1, 2}
    assert np.abs(probabilities - reference).max() <= MAX_PROBABILITY_GAP
