"""Prompt-free class prompts (CFR's tiled decoder, few-shot prototypes): they learn to find a class without a box,
refinement uses them to recover slices the initial mask misses, and they round-trip through the checkpoint."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import CONFIG, CT_WINDOW, make_phantom, write_nifti
from nnunet_sam.cli import finetune as finetune_cli
from nnunet_sam.cli import refine as refine_cli
from nnunet_sam.errors import NnsamError
from nnunet_sam.sam import RefineSettings, SamRefiner, load_sam
from nnunet_sam.sam.class_prompts import ClassPrompts, class_prototypes
from nnunet_sam.sam.embedding_cache import EmbeddingCache
from nnunet_sam.sam.finetune import (DecoderFinetuner, FinetuneSettings, LabelledVolume, attach_class_prompts,
                                     class_prompt_dice, save_finetuned, slice_examples)
from nnunet_sam.sam.prompts import SlicePrompt, dice
from nnunet_sam.sam.recovery import plan_recovery, stability_score
from nnunet_sam.sam.refine import PREPROCESSED_UNITS, view_intensities

TILES = RefineSettings(ct_window=CT_WINDOW, context="tile", grid=2)


def _without_end_slices(labels: np.ndarray, label: int, count: int) -> np.ndarray:
    """The truth with the first `count` slices of one class removed: an initial model that stops too early."""
    out = labels.copy()
    for index in np.flatnonzero((labels == label).any(axis=(1, 2)))[:count]:
        out[index][out[index] == label] = 0
    return out


@pytest.fixture(scope="module")
def fewshot(tmp_path_factory):
    """A fresh LiteMedSAM with few-shot class prompts trained (with its decoder) on tiles of one phantom."""
    model = load_sam("litemedsam", device="cpu")
    cache = EmbeddingCache(tmp_path_factory.mktemp("embeddings"), model)
    train, held_out = make_phantom(seed=0), make_phantom(shape=(16, 44, 52), seed=1)
    calls = model.encoder_calls
    examples = slice_examples([LabelledVolume("train", train.image, train.labels, train.spacing)], cache, TILES,
                              negatives=3)
    tiles_encoded = model.encoder_calls - calls
    held_out_examples = slice_examples([LabelledVolume("held_out", held_out.image, held_out.labels,
                                                       held_out.spacing)], cache, TILES, negatives=3)
    prompts = attach_class_prompts(model, cache, examples, [1, 2], "fewshot")
    untrained = class_prompt_dice(model, cache, held_out_examples)["held_out"]
    DecoderFinetuner(model, cache, TILES, FinetuneSettings(epochs=6, min_steps=0)).fit(examples, progress=False)
    trained = class_prompt_dice(model, cache, held_out_examples)["held_out"]
    return SimpleNamespace(model=model, cache=cache, examples=examples, tiles_encoded=tiles_encoded, prompts=prompts,
                           held_out=held_out, untrained=untrained, trained=trained)


def test_tiles_encode_four_slices_at_once_and_include_slices_without_foreground(fewshot):
    slices = sorted(e.index for e in fewshot.examples)
    assert fewshot.tiles_encoded == len({i // 4 for i in slices})  # one encoder call per 2 x 2 tile
    assert any(len(e.labels) == 0 for e in fewshot.examples)  # where a class ends, for the class prompts
    assert all(e.geometry.origin == ((e.index % 4) // 2 * 128, (e.index % 2) * 128) for e in fewshot.examples)


def test_fewshot_prompts_learn_to_segment_an_unseen_volume_without_boxes(fewshot):
    assert fewshot.prompts.mode == "fewshot" and fewshot.prompts.prototypes.shape == (3, 256)
    untrained, trained = np.mean(list(fewshot.untrained.values())), np.mean(list(fewshot.trained.values()))
    assert trained > 0.5 and trained > untrained + 0.25
    assert fewshot.prompts.tokens.requires_grad is False  # training ends with everything frozen


def test_refinement_recovers_end_slices_the_initial_mask_misses(fewshot):
    held_out = fewshot.held_out
    initial = _without_end_slices(held_out.labels, 1, 3)
    plain = SamRefiner(fewshot.model, RefineSettings(ct_window=CT_WINDOW, context="tile", recover_reach=-1)).refine(
        held_out.image, initial, held_out.spacing)  # no cache: every tile it needs is encoded
    recovered = SamRefiner(fewshot.model, TILES, fewshot.cache).refine(held_out.image, initial, held_out.spacing)
    assert plain.classes[1].slices_recovered == 0 and recovered.classes[1].slices_recovered >= 1
    truth = held_out.labels == 1
    assert dice(recovered.mask == 1, truth) > dice(plain.mask == 1, truth) + 0.02
    first, last = np.flatnonzero(truth.any(axis=(1, 2)))[[0, -1]]
    assert first >= 2 and last <= truth.shape[0] - 3
    assert not (recovered.mask[:first - 1] == 1).any() and not (recovered.mask[last + 2:] == 1).any()  # near only
    with_mask = np.flatnonzero(initial.any(axis=(1, 2)))
    assert plain.slices_encoded == len({i // 4 for i in with_mask})  # one encoder call per 2 x 2 tile


def test_class_prompts_round_trip_through_the_checkpoint(fewshot, tmp_path):
    path = save_finetuned(fewshot.model, tmp_path / "fewshot.pth", {"context": "tile", "grid": 2})
    loaded = load_sam("litemedsam", path, device="cpu")
    assert loaded.finetuned == {"sam": "litemedsam", "context": "tile", "grid": 2}  # no tensors in the record
    for name in ("tokens", "prototypes", "log_temperature"):
        assert torch.equal(getattr(loaded.class_prompts, name), getattr(fewshot.prompts, name))
    assert loaded.class_prompts.labels == [1, 2]
    initial = _without_end_slices(fewshot.held_out.labels, 1, 3)
    again = SamRefiner(loaded, TILES).refine(fewshot.held_out.image, initial, fewshot.held_out.spacing)
    first = SamRefiner(fewshot.model, TILES, fewshot.cache).refine(fewshot.held_out.image, initial,
                                                                   fewshot.held_out.spacing)
    assert again.classes[1].slices_recovered == first.classes[1].slices_recovered >= 1
    assert dice(again.mask == 1, first.mask == 1) > 0.99  # float16 cache vs fresh float32 embeddings


def test_nnsam_refine_recovers_slices_with_a_tile_checkpoint(fewshot, tmp_path):
    held_out = fewshot.held_out
    write_nifti(held_out.image, tmp_path / "images" / "case_0000.nii.gz", held_out.spacing)
    write_nifti(_without_end_slices(held_out.labels, 1, 3), tmp_path / "masks" / "case.nii.gz", held_out.spacing,
                dtype=np.uint8)
    checkpoint = save_finetuned(fewshot.model, tmp_path / "tile.pth", {"context": "tile", "grid": 2})
    argv = ["-i", str(tmp_path / "images"), "-m", str(tmp_path / "masks"), "--checkpoint", str(checkpoint),
            "--ct-window", *map(str, CT_WINDOW), "-device", "cpu", "--context", "tile"]
    refine_cli.main(argv + ["-o", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "refine_report.json").read_text())["summary"]
    assert summary["1"]["slices_recovered"] >= 1 and summary["2"]["slices_recovered"] == 0
    refine_cli.main(argv + ["-o", str(tmp_path / "off"), "--recover-reach", "-1"])
    assert json.loads((tmp_path / "off" / "refine_report.json").read_text())["summary"]["1"]["slices_recovered"] == 0


@pytest.mark.slow
def test_learnt_prompts_start_as_a_whole_image_box_train_and_round_trip(tmp_path):
    model = load_sam("litemedsam", device="cpu")
    cache = EmbeddingCache(tmp_path, model)
    phantom = make_phantom(seed=2)
    examples = slice_examples([LabelledVolume("p", phantom.image, phantom.labels, phantom.spacing)], cache,
                              RefineSettings(ct_window=CT_WINDOW), labels=[1, 2], negatives=1)[::3]
    prompts = attach_class_prompts(model, cache, examples, [1, 2], "learnt")
    assert prompts.mode == "learnt" and prompts.prototypes is None
    whole, _ = model.module.prompt_encoder(points=None, boxes=torch.tensor([[0.0, 0.0, 255.0, 255.0]]), masks=None)
    assert torch.allclose(prompts.tokens[1], whole[0])
    before = prompts.tokens.detach().clone()
    decoder = {k: v.clone() for k, v in model.module.mask_decoder.state_dict().items()}
    finetuner = DecoderFinetuner(model, cache, RefineSettings(ct_window=CT_WINDOW),
                                 FinetuneSettings(epochs=2, min_steps=0))
    result = finetuner.fit(examples, progress=False)
    assert result.history[-1].loss < result.history[0].loss
    assert not torch.equal(model.class_prompts.tokens, before)
    loaded = load_sam("litemedsam", save_finetuned(model, tmp_path / "learnt.pth", {"context": "single"}), device="cpu")
    assert loaded.class_prompts.mode == "learnt"
    assert torch.equal(loaded.class_prompts.tokens, model.class_prompts.tokens)
    finetuner.restore()  # the untrained prompts and the zero-shot decoder come back
    assert torch.equal(model.class_prompts.tokens, before)
    assert all(torch.equal(v, decoder[k]) for k, v in model.module.mask_decoder.state_dict().items())
    model.class_prompts = None  # slices without foreground teach nothing without class prompts
    with pytest.raises(NnsamError, match="no labelled slices"):
        finetuner.fit([e for e in examples if len(e.labels) == 0], progress=False)


def test_class_prompt_errors_are_one_line(fewshot, litemedsam):
    embedding = torch.zeros(1, 256, 64, 64)
    with pytest.raises(NnsamError, match="know labels \\[1, 2\\], not \\[3\\]"):
        fewshot.model.class_logits(embedding, [3])
    with pytest.raises(NnsamError, match="has no class prompts"):
        litemedsam.class_logits(embedding, [1])
    with pytest.raises(NnsamError, match="malformed class prompts"):
        ClassPrompts.from_checkpoint({"labels": [1]}, torch.device("cpu"))
    empty = [e for e in fewshot.examples if len(e.labels) == 0][:1]
    with pytest.raises(NnsamError, match="no labelled pixels of \\[1, 2\\]"):
        class_prototypes(fewshot.cache, empty, [1, 2])


def test_a_fine_tuned_checkpoint_is_checked_against_the_refinement_before_any_work(fewshot, caplog):
    model = copy.copy(fewshot.model)  # class prompts for labels 1 and 2
    trained = RefineSettings(context="tile", grid=2, modality="CT", ct_window=(-100.0, 200.0))
    model.finetuned = {"context": "tile", "grid": 2, "intensities": view_intensities(trained)}
    refiner = SamRefiner(model, trained)
    with caplog.at_level(logging.WARNING):
        refiner.check_finetuned_for([1, 2])
    assert "fine-tuned on views" not in caplog.text
    with pytest.raises(NnsamError, match=r"fine-tuned for labels \[1, 2\], not \[3\]; fine-tune them on this "
                                         r"dataset \(nnsam_finetune\) or pass another checkpoint$"):
        refiner.check_finetuned_for([1, 3])
    for changes in ({"ct_window": (-160.0, 240.0)}, {"modality": "MR"}):
        other = SamRefiner(model, replace(trained, **changes))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            other.check_finetuned_for([1])
        assert "fine-tuned on views with CT window -100..200 HU but refinement shows" in caplog.text
    # a checkpoint fine-tuned before SAM's views (on nnU-Net's normalised tensor) is told apart
    model.finetuned = {"context": "tile", "grid": 2, "ct_window": None, "ct_window_units": PREPROCESSED_UNITS}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        refiner.check_finetuned_for([1])
    assert "fine-tuned on views with nnU-Net's normalised intensities" in caplog.text


def test_recovery_plans_search_near_the_object_only():
    cleaned = np.zeros((12, 20, 20), dtype=bool)
    cleaned[3:6, 5:10, 5:10] = True
    cleaned[9, 5:10, 5:10] = True
    prompts = {i: SlicePrompt(label=1, box=np.array([5, 5, 9, 9])) for i in (3, 4, 5, 9)}
    prompts[6] = SlicePrompt(label=1, box=np.array([5, 5, 9, 9]), interpolated=True)
    plan = plan_recovery(1, prompts, cleaned, reach=2)
    assert sorted(plan.regions) == [1, 2, 7, 8, 10, 11]  # not the prompted or interpolated slices
    assert plan.regions[1].tolist() == [3, 3, 11, 11] and plan.min_pixels[1] == 4
    assert plan.connected({1, 2, 7, 10}) == {1, 2, 7, 10}
    assert plan.connected({1, 8, 11}) == {8}  # 1 and 11 do not touch the object's ends
    assert plan_recovery(1, prompts, cleaned, reach=-1) is None
    assert plan_recovery(1, {}, cleaned, reach=2) is None


# --- nnsam_finetune --context tile --prompts fewshot on an nnU-Net dataset ---------------------------------

def test_nnsam_finetune_tiles_with_fewshot_prompts(planned_dataset, baseline):
    argv = ["-d", str(planned_dataset.dataset_id), "-c", CONFIG, "-f", "0", "-tr", "nnUNetTrainerShort",
            "--disable_tta", "--epochs", "2", "--min-steps", "0", "-device", "cpu", "--context", "tile",
            "--prompts", "fewshot"]
    finetune_cli.main(argv)
    folder = planned_dataset.results / planned_dataset.name / f"nnsamFinetune__nnUNetPlans__{CONFIG}" / "fold_0"
    report = json.loads((folder / "litemedsam_tile_fewshot_report.json").read_text())
    assert report["settings"]["class_prompts"] == "fewshot" and report["refine_settings"]["context"] == "tile"
    assert report["validation"]["rows"]
    for row in report["validation"]["rows"]:
        assert row["prompt_free_finetuned"] is not None and row["refined_finetuned"] is not None
    loaded = load_sam("litemedsam", folder / "litemedsam_tile_fewshot.pth", device="cpu")
    assert loaded.class_prompts.mode == "fewshot" and loaded.class_prompts.labels == [1, 2]
    assert loaded.finetuned["context"] == "tile" and loaded.finetuned["grid"] == 2


def test_stability_score_prefers_sharp_masks():
    sharp = torch.full((10, 10), -8.0)
    sharp[2:6, 2:6] = 8.0
    assert stability_score(sharp) == 1.0
    blurred = sharp / 8 * 1.5  # the same mask with logits near 0: its area changes with the threshold
    blurred[2:6, 6:9] = 0.5
    assert stability_score(blurred) == pytest.approx(16 / 28)
    assert stability_score(torch.full((4, 4), -5.0)) == 0.0


@pytest.mark.slow
def test_a_dropped_recovered_slice_gives_other_classes_their_pixels_back(litemedsam, phantom, monkeypatch):
    labels = np.zeros(phantom.labels.shape, dtype=np.uint8)
    labels[2:13, 10:30, 10:24] = 2
    labels[6:13, 10:30, 24:38] = 1  # touching class 2 in-plane
    initial = labels.copy()
    initial[6:8][initial[6:8] == 1] = 0  # class 1 starts at slice 8 in the initial mask
    settings = RefineSettings(ct_window=CT_WINDOW, recover_reach=5)
    monkeypatch.setattr(litemedsam, "class_prompts", SimpleNamespace(labels=[1, 2]))

    def found_on_slice_4_only(self, embedding, plans, index, geometry):  # not next to slice 8: dropped later
        if index != 4 or not plans:
            return []
        return [(1, torch.full(geometry.slice_shape, 20.0))]

    monkeypatch.setattr(SamRefiner, "_recover_slice", found_on_slice_4_only)
    result = SamRefiner(litemedsam, settings).refine(phantom.image, initial, phantom.spacing)
    reference = SamRefiner(litemedsam, RefineSettings(ct_window=CT_WINDOW, recover_reach=-1)).refine(
        phantom.image, initial, phantom.spacing)
    assert result.classes[1].slices_recovered == 0 and not (result.mask[4] == 1).any()
    assert (reference.mask[4, 10:30, 18:24] == 2).any()  # class 2 inside class 1's search box on slice 4
    assert np.array_equal(result.mask, reference.mask)
