"""Interrupted fine-tuning loses no epochs: the training state written after each epoch resumes to the very weights
an uninterrupted run ends with (library and `nnsam_finetune --continue` after SIGKILL), and a resume with other
settings is refused in one line."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import error_of, make_phantom
from test_finetune import SETTINGS, finetune_argv
from nnunet_sam.cli import finetune as finetune_cli
from nnunet_sam.errors import NnsamError
from nnunet_sam.sam import finetune
from nnunet_sam.sam.embedding_cache import EmbeddingCache
from nnunet_sam.sam.finetune import (DecoderFinetuner, FinetuneSettings, LabelledVolume, attach_class_prompts,
                                     read_training_state, save_finetuned, slice_examples, training_state_path)
from nnunet_sam.sam.models import load_sam
from nnunet_sam.utils.atomic import temporary_prefix

FINETUNE = FinetuneSettings(epochs=3, min_steps=0, class_prompts="learnt")  # prompts: their state resumes too


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """A fresh LiteMedSAM with untrained class prompts and two labelled phantom slices to train them on."""
    model = load_sam("litemedsam", device="cpu")  # not the shared fixture: this one's decoder changes
    cache = EmbeddingCache(tmp_path_factory.mktemp("embeddings"), model)
    phantom = make_phantom(shape=(4, 40, 40))
    volume = LabelledVolume("train", phantom.image, phantom.labels, phantom.spacing)
    examples = [e for e in slice_examples([volume], cache, SETTINGS) if len(e.labels) == 2][:2]
    attach_class_prompts(model, cache, examples, [1, 2])
    return SimpleNamespace(model=model, cache=cache, examples=examples)


@pytest.fixture
def finetuner(training):
    """A finetuner of the shared model with `FINETUNE`; the zero-shot decoder and prompts are put back after."""
    finetuner = DecoderFinetuner(training.model, training.cache, SETTINGS, FINETUNE)
    yield finetuner
    finetuner.restore()


def _weights(model) -> dict[str, torch.Tensor]:
    """Copies of what fine-tuning trains: the decoder's and the class prompts' tensors."""
    return {f"{part}.{key}": value.detach().clone() for part, module in
            (("decoder", model.module.mask_decoder), ("prompts", model.class_prompts))
            for key, value in module.state_dict().items()}


def _interrupt(monkeypatch, step: int) -> None:
    """Ctrl-C at the `step`-th optimiser step (1-based) of the next fit."""
    original, calls = DecoderFinetuner._batch_loss, iter(range(1, 1 << 30))

    def batch_loss(self, batch, rng):
        if next(calls) == step:
            raise KeyboardInterrupt
        return original(self, batch, rng)

    monkeypatch.setattr(DecoderFinetuner, "_batch_loss", batch_loss)


def test_an_interrupted_fit_resumes_to_the_uninterrupted_weights(training, finetuner, tmp_path, monkeypatch,
                                                                 caplog):
    monkeypatch.setattr(finetune, "_STATE_SAVE_SHARE", 1e9)  # the state after every epoch, however short
    examples = training.examples
    expected = finetuner.fit(examples, progress=False)
    expected_weights = _weights(training.model)
    finetuner.restore()
    checkpoint = tmp_path / "ft.pth"
    state = training_state_path(checkpoint)
    with monkeypatch.context() as patch:
        _interrupt(patch, len(examples) + 2)  # in the second epoch
        with pytest.raises(KeyboardInterrupt):
            finetuner.fit(examples, progress=False, state_path=state)
    assert read_training_state(state)["epochs_done"] == 1
    finetuner.restore()  # a new process starts from the zero-shot model
    with caplog.at_level(logging.INFO, logger=finetune.__name__):
        resumed = finetuner.fit(examples, progress=False, state_path=state, resume=True)
    assert "resuming at epoch 2 of 3" in caplog.text
    assert resumed.resumed_epochs == 1 and [r.loss for r in resumed.history] == [r.loss for r in expected.history]
    weights = _weights(training.model)
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[key], value) for key, value in expected_weights.items())  # bit for bit
    save_finetuned(training.model, checkpoint, {"context": "single"})
    assert [p.name for p in tmp_path.iterdir()] == ["ft.pth"]  # the state is gone, no temporary is left


def test_a_resume_of_another_training_is_refused_in_one_line(training, finetuner, tmp_path, caplog):
    state = training_state_path(tmp_path / "ft.pth")
    one_epoch = dataclasses.replace(FINETUNE, epochs=1)
    finetuner.settings = one_epoch
    finetuner.fit(training.examples[:1], progress=False, state_path=state)
    before = state.read_bytes()
    refusals = [(dataclasses.replace(one_epoch, seed=1), training.examples[:1], "other seed: 0 then, 1 now"),
                (dataclasses.replace(one_epoch, learning_rate=1e-3), training.examples[:1], "other learning_rate"),
                (one_epoch, training.examples, "other number of labelled training slices: 1 then, 2 now")]
    for settings, examples, expected in refusals:
        finetuner.settings = settings
        with pytest.raises(NnsamError) as refused:
            finetuner.fit(examples, progress=False, state_path=state, resume=True)
        message = str(refused.value)
        assert expected in message and "without resume to start over" in message and "\n" not in message
    assert state.read_bytes() == before  # a refused resume keeps the state
    finetuner.settings = dataclasses.replace(one_epoch, seed=1)
    with caplog.at_level(logging.INFO, logger=finetune.__name__):  # without resume: discarded, trained afresh
        finetuner.fit(training.examples[:1], progress=False, state_path=state)
    assert "discarding" in caplog.text
    assert json.loads(read_training_state(state)["fingerprint"])["settings"]["seed"] == 1
    state.write_bytes(b"a user's file")
    with pytest.raises(NnsamError, match="is not a training state written by nnsam_finetune"):
        finetuner.fit(training.examples[:1], progress=False, state_path=state)
    assert state.read_bytes() == b"a user's file"


def test_nnsam_finetune_never_discards_a_state_file_it_did_not_write(planned_dataset, tmp_path, capsys):
    state = training_state_path(tmp_path / "decoder.pth")
    state.write_bytes(b"a user's file")
    argv = finetune_argv(planned_dataset) + ["-o", str(tmp_path / "decoder.pth")]
    assert "is not a training state written by nnsam_finetune" in error_of(finetune_cli.main, argv, capsys)
    assert state.read_bytes() == b"a user's file"


def _decoder_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    return {key: value for key, value in state.items() if key.startswith("mask_decoder.")}


def test_a_killed_nnsam_finetune_continues_to_the_uninterrupted_decoder(planned_dataset, tmp_path):
    command = [str(Path(sys.executable).parent / "nnsam_finetune"), *finetune_argv(planned_dataset),
               "--no-refine-validation"]  # subprocesses all three: the same threads, so the same arithmetic
    reference, output = tmp_path / "reference" / "decoder.pth", tmp_path / "resumed" / "decoder.pth"
    subprocess.run(command + ["-o", str(reference)], check=True, env=planned_dataset.env, capture_output=True,
                   timeout=600)
    state = training_state_path(output)
    with open(tmp_path / "killed.log", "wb") as log:
        killed = subprocess.Popen(command + ["-o", str(output)], env=planned_dataset.env, stdout=log, stderr=log)
        try:
            while killed.poll() is None and not state.exists():  # written after the first epoch
                time.sleep(0.1)
        finally:
            killed.kill()  # SIGKILL: no handler runs
            killed.wait()
    assert killed.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert read_training_state(state)["epochs_done"] == 1 and not output.exists()
    left = state.with_name(temporary_prefix(state, killed.pid) + "x1y2z3w4.partial.pth")  # killed mid-write
    left.write_bytes(b"half a state")
    continued = subprocess.run(command + ["-o", str(output), "--continue"], check=True, env=planned_dataset.env,
                               capture_output=True, text=True, timeout=600)
    assert "resuming at epoch 2 of 2" in continued.stderr
    expected, weights = _decoder_weights(reference), _decoder_weights(output)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], v) for k, v in expected.items())
    report = json.loads((output.parent / "decoder_report.json").read_text())
    assert report["training"]["epochs_resumed"] == 1
    assert report["training"]["loss"] == json.loads((reference.parent / "decoder_report.json").read_text())[
        "training"]["loss"]
    assert sorted(p.name for p in output.parent.iterdir()) == ["decoder.pth", "decoder_report.json"]
