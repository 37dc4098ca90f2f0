"""Fine-tuning SAM's mask decoder on cached embeddings: it helps on an unseen volume, the checkpoint round-trips
into refinement, and nnsam_finetune trains on a fold's training cases only and reuses its embeddings."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import CONFIG, CT_WINDOW, degrade, error_of, make_phantom, write_nifti
from nnunet_sam.cli import finetune as finetune_cli
from nnunet_sam.cli import refine as refine_cli
from nnunet_sam.errors import NnsamError
from nnunet_sam.sam import RefineSettings, SamRefiner, load_sam
from nnunet_sam.sam.embedding_cache import EmbeddingCache, encoder_fingerprint
from nnunet_sam.sam.finetune import (DecoderFinetuner, FinetuneSettings, LabelledVolume, decoder_dice,
                                     jittered_boxes, mask_losses, save_finetuned, slice_examples)
from nnunet_sam.sam.prompts import dice
from nnunet_sam.sam.views import TileLayout, view_geometry

SETTINGS = RefineSettings(ct_window=CT_WINDOW)


@dataclass
class Measured:
    decoder: float  # mean decoder Dice from true boxes on the held-out volume
    refined: float  # mean Dice of the refined degraded mask on the held-out volume
    mask: np.ndarray


def _measure(model, cache, examples, held_out) -> Measured:
    per_class = decoder_dice(model, cache, examples, SETTINGS)["held_out"]
    refined = SamRefiner(model, SETTINGS, cache).refine(held_out.image, degrade(held_out.labels), held_out.spacing).mask
    return Measured(decoder=float(np.mean(list(per_class.values()))),
                    refined=float(np.mean([dice(refined == k, held_out.labels == k) for k in (1, 2)])), mask=refined)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A fresh LiteMedSAM whose decoder was fine-tuned on one phantom, measured before and after on another
    phantom of other shape and noise."""
    model = load_sam("litemedsam", device="cpu")  # not the shared fixture: this one's decoder changes
    cache = EmbeddingCache(tmp_path_factory.mktemp("embeddings"), model)
    train, held_out = make_phantom(seed=0), make_phantom(shape=(16, 44, 52), seed=1)
    train_examples = slice_examples([LabelledVolume("train", train.image, train.labels, train.spacing)], cache,
                                    SETTINGS)
    held_out_examples = slice_examples([LabelledVolume("held_out", held_out.image, held_out.labels,
                                                       held_out.spacing)], cache, SETTINGS)
    zero_shot = _measure(model, cache, held_out_examples, held_out)
    calls = model.encoder_calls
    finetuner = DecoderFinetuner(model, cache, SETTINGS, FinetuneSettings(epochs=8, min_steps=0))
    result = finetuner.fit(train_examples, progress=False)
    measured = _measure(model, cache, held_out_examples, held_out)
    return SimpleNamespace(model=model, cache=cache, finetuner=finetuner, result=result, held_out=held_out,
                           train_examples=train_examples, zero_shot=zero_shot, finetuned=measured,
                           calls_after_zero_shot=calls, calls_at_end=model.encoder_calls)


def test_a_decoder_finetuned_on_one_volume_improves_refinement_on_another(finetuned):
    assert {e.case for e in finetuned.train_examples} == {"train"}
    losses = [r.loss for r in finetuned.result.history]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0]
    assert finetuned.finetuned.decoder > finetuned.zero_shot.decoder + 0.005
    assert finetuned.finetuned.refined > finetuned.zero_shot.refined + 0.01
    assert finetuned.calls_after_zero_shot == finetuned.calls_at_end  # training and re-measuring never encode


def test_restore_brings_back_the_zero_shot_decoder(finetuned, litemedsam):
    trained = finetuned.finetuner.decoder_state()
    try:
        finetuned.finetuner.restore()
        base = litemedsam.module.mask_decoder.state_dict()
        assert all(torch.equal(v, base[k]) for k, v in finetuned.model.module.mask_decoder.state_dict().items())
    finally:
        finetuned.model.module.mask_decoder.load_state_dict(trained)


def _same_labels(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest per-class Dice of two label maps (classes 1 and 2)."""
    return min(dice(a == k, b == k) for k in (1, 2))


def test_the_checkpoint_round_trips_into_refinement(finetuned, litemedsam, tmp_path, caplog):
    record = {"context": "single", "axis": None, "cases": [np.str_("phantom")]}  # numpy strings, as in nnU-Net's splits
    path = save_finetuned(finetuned.model, tmp_path / "ft.pth", record)
    loaded = load_sam("litemedsam", path, device="cpu")
    assert loaded.finetuned == {"sam": "litemedsam", "context": "single", "axis": None, "cases": ["phantom"]}
    trained = finetuned.model.module.mask_decoder.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.module.mask_decoder.state_dict().items())
    saved = torch.load(path, weights_only=True)["model"]
    base = torch.load(litemedsam.checkpoint, weights_only=True)
    assert set(saved) == set(base)
    assert all(torch.equal(v, base[k]) for k, v in saved.items() if not k.startswith("mask_decoder."))
    assert encoder_fingerprint(loaded) == encoder_fingerprint(litemedsam)  # the cached embeddings stay valid
    held_out = finetuned.held_out
    again = SamRefiner(loaded, SETTINGS).refine(held_out.image, degrade(held_out.labels), held_out.spacing).mask
    assert _same_labels(again, finetuned.finetuned.mask) > 0.99  # float16 cache vs fresh float32 embeddings

    with caplog.at_level(logging.WARNING):
        SamRefiner(loaded, RefineSettings(context="adjacent"))
    assert "fine-tuned on 'single' views" in caplog.text and "pass the same axis" not in caplog.text
    with caplog.at_level(logging.WARNING):
        SamRefiner(loaded, RefineSettings(axis=1))
    assert "fine-tuned on slices along the through-plane axis but refinement slices along axis 1" in caplog.text
    with pytest.raises(NnsamError, match="fine-tuned from litemedsam"):
        load_sam("vit_b", path, device="cpu")


def test_nnsam_refine_files_mode_loads_the_checkpoint(finetuned, tmp_path):
    held_out = finetuned.held_out
    write_nifti(held_out.image, tmp_path / "images" / "case_0000.nii.gz", held_out.spacing)
    write_nifti(degrade(held_out.labels), tmp_path / "masks" / "case.nii.gz", held_out.spacing, dtype=np.uint8)
    checkpoint = save_finetuned(finetuned.model, tmp_path / "ft.pth", {"context": "single"})
    refine_cli.main(["-i", str(tmp_path / "images"), "-m", str(tmp_path / "masks"), "-o", str(tmp_path / "out"),
                     "--checkpoint", str(checkpoint), "--ct-window", *map(str, CT_WINDOW), "-device", "cpu"])
    report = json.loads((tmp_path / "out" / "refine_report.json").read_text())
    assert report["sam"]["checkpoint"] == str(checkpoint)
    import SimpleITK as sitk

    refined = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz")))
    assert _same_labels(refined, finetuned.finetuned.mask) > 0.99


@pytest.mark.parametrize("tiled", [False, True])
def test_jittered_boxes_stay_inside_the_image_and_vary(tiled):
    geometry = view_geometry((40, 60), (1.0, 1.0), 256)
    if tiled:  # the slice in the last cell of a 2 x 2 tile
        geometry = TileLayout.for_slices((40, 60), (1.0, 1.0), 256, grid=2).cell_geometry(3)
    boxes = np.array([[10, 5, 30, 20], [0, 0, 59, 39]], dtype=float)
    rng = np.random.default_rng(0)
    draws = np.stack([jittered_boxes(boxes, geometry, 6.0, 0.1, rng) for _ in range(50)])
    x0, y0, x1, y1 = geometry.bounds
    assert (draws[..., [0, 2]] >= x0).all() and (draws[..., [0, 2]] <= x1).all()
    assert (draws[..., [1, 3]] >= y0).all() and (draws[..., [1, 3]] <= y1).all()
    assert (draws[..., 2] > draws[..., 0]).all() and (draws[..., 3] > draws[..., 1]).all()
    centre = geometry.boxes_to_input(boxes, 6.0)[0]
    size = centre[2:] - centre[:2]  # the jitter is a fraction of the box size in model-input pixels
    assert (np.abs(draws[:, 0] - centre) <= np.maximum(2.0, 0.1 * np.concatenate([size, size])) + 1e-6).all()
    assert draws[:, 0].std(axis=0).min() > 1.0


def test_mask_losses_reward_the_right_mask():
    truth = torch.zeros(1, 16, 16)
    truth[0, 4:10, 4:10] = 1
    good, iou_good = mask_losses(truth * 20 - 10, truth)
    bad, iou_bad = mask_losses(-(truth * 20 - 10), truth)
    assert good < 0.05 < bad and iou_good.item() == 1.0 and iou_bad.item() == 0.0
    ignored = torch.ones(16, 16, dtype=torch.bool)
    ignored[4:10, 4:10] = False  # only the truth's square is labelled: the wrong logits outside do not count
    wide = torch.full((1, 16, 16), 10.0)
    assert mask_losses(wide, truth, ~ignored)[0] < 0.05
    assert mask_losses(wide, truth)[0] > 0.3


# --- nnsam_finetune on an nnU-Net dataset ------------------------------------------------------------

def finetune_argv(planned_dataset) -> list[str]:
    """nnsam_finetune's arguments for fold 0 of the planned dataset: 2 epochs on CPU (no -o)."""
    return ["-d", str(planned_dataset.dataset_id), "-c", CONFIG, "-f", "0", "-tr", "nnUNetTrainerShort",
            "--disable_tta", "--epochs", "2", "--min-steps", "0", "-device", "cpu"]


@pytest.fixture(scope="module")
def finetune_run(planned_dataset, baseline, tmp_path_factory):
    output = tmp_path_factory.mktemp("finetune") / "decoder.pth"
    argv = finetune_argv(planned_dataset)
    finetune_cli.main(argv + ["-o", str(output)])
    report = json.loads((output.parent / "decoder_report.json").read_text())
    return SimpleNamespace(argv=argv, output=output, report=report)


def test_nnsam_finetune_trains_on_the_folds_training_cases_only(planned_dataset, finetune_run):
    splits = json.loads((planned_dataset.preprocessed / "splits_final.json").read_text())
    report = finetune_run.report
    assert report["train_cases"] == splits[0]["train"] and report["validation_cases"] == splits[0]["val"]
    assert not set(report["train_cases"]) & set(report["validation_cases"])
    rows = report["validation"]["rows"]
    assert {(r["case"], r["label"]) for r in rows} == {(splits[0]["val"][0], 1), (splits[0]["val"][0], 2)}
    for row in rows:  # the fine-tuned decoder learnt these organs: from true boxes it is near-perfect
        assert row["decoder_finetuned"] > 0.8
        assert row["refined_zero_shot"] is not None and row["refined_finetuned"] is not None
    assert len(report["training"]["loss"]) == 2 and report["training"]["seconds_per_epoch"] > 0
    loaded = load_sam("litemedsam", finetune_run.output, device="cpu")
    assert loaded.finetuned["train_cases"] == splits[0]["train"] and loaded.finetuned["context"] == "single"


def test_nnsam_finetune_reuses_cached_embeddings_across_runs(planned_dataset, finetune_run, tmp_path):
    first = finetune_run.report["cache"]
    assert first["encoded"] > 0 and first["megabytes"] > 0
    finetune_cli.main(finetune_run.argv + ["-o", str(tmp_path / "again.pth"), "--no-refine-validation"])
    second = json.loads((tmp_path / "again_report.json").read_text())
    assert second["cache"]["encoded"] == 0 and second["cache"]["reused"] > 0
    assert second["validation"]["rows"] and "refined_zero_shot" not in second["validation"]["rows"][0]


@pytest.mark.parametrize("extra, expected", [
    (["-f", "7"], "fold 7 is not in"),
    (["-f", "zero"], "-f zero is not a fold"),
    (["-o", "decoder.txt"], "should name a .pth file"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--weak-prompts", "1.5"], "--weak-prompts must be a fraction"),
    (["--min-steps", "-1"], "--min-steps must be at least 0, got -1"),
])
def test_nnsam_finetune_errors_name_the_fix(planned_dataset, capsys, extra, expected):
    argv = ["-d", str(planned_dataset.dataset_id), "-device", "cpu", *extra]
    assert expected in error_of(finetune_cli.main, argv, capsys)


def test_nnsam_finetune_never_overwrites_files_it_did_not_write(planned_dataset, finetune_run, tmp_path, capsys):
    user_file = tmp_path / "weights.pth"
    user_file.write_bytes(b"a user's file")
    argv = ["-d", str(planned_dataset.dataset_id), "-device", "cpu"]
    assert "was not written by nnsam_finetune" in error_of(finetune_cli.main, argv + ["-o", str(user_file)], capsys)
    assert user_file.read_bytes() == b"a user's file"
    message = error_of(finetune_cli.main, argv + ["-o", str(user_file), "--checkpoint", str(user_file)], capsys)
    assert "is the base --checkpoint" in message
