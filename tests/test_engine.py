"""The refinement engine with the real LiteMedSAM weights on a small CT-like phantom."""

import numpy as np
import pytest
import torch

from conftest import degrade, make_phantom
from nnunet_sam.errors import NnsamError
from nnunet_sam.sam import RefineSettings, SamRefiner, load_sam
from nnunet_sam.sam.prompts import dice


def _dices(truth, mask, labels=(1, 2)):
    return {label: dice(truth == label, mask == label) for label in labels}


@pytest.fixture(scope="module")
def degraded_result(phantom, litemedsam):
    mask = degrade(phantom.labels)
    calls_before = litemedsam.encoder_calls
    result = SamRefiner(litemedsam).refine(phantom.image, mask, phantom.spacing)
    return mask, result, litemedsam.encoder_calls - calls_before


def test_a_degraded_mask_gets_measurably_closer_to_the_truth(phantom, degraded_result):
    mask, result, _ = degraded_result
    before, after = _dices(phantom.labels, mask), _dices(phantom.labels, result.mask)
    for label in (1, 2):
        assert after[label] > before[label] + 0.05, (label, before, after)
    assert not (result.mask[2:4, 40:44, 4:8] > 0).any(), "the false-positive blob must be removed"


def test_each_slice_is_encoded_once_and_classes_share_it(phantom, degraded_result):
    _, result, calls = degraded_result
    # two classes share most slices; the false positive's own slices are cleaned away, the missing
    # slice is filled: exactly the truth's foreground slices are encoded, each once
    assert calls == result.slices_encoded
    assert calls == int(((phantom.labels > 0).any(axis=(1, 2))).sum())


def test_a_missing_slice_is_filled_from_interpolated_boxes(phantom, degraded_result):
    mask, result, _ = degraded_result
    slices = np.flatnonzero((phantom.labels == 2).any(axis=(1, 2)))
    missing = slices[len(slices) // 2]
    assert not (mask[missing] == 2).any()
    assert result.classes[2].slices_filled == 1
    assert dice(phantom.labels[missing] == 2, result.mask[missing] == 2) > 0.6


@pytest.mark.slow
def test_a_correct_mask_is_not_made_worse(phantom, litemedsam):
    result = SamRefiner(litemedsam).refine(phantom.image, phantom.labels, phantom.spacing)
    for label, value in _dices(phantom.labels, result.mask).items():
        assert value >= 0.98, (label, value)


def test_report_counts_add_up(phantom, degraded_result):
    mask, result, _ = degraded_result
    for label, stats in result.classes.items():
        own_slices = int((mask == label).any(axis=(1, 2)).sum())
        assert stats.voxels_before == int((mask == label).sum())
        assert stats.voxels_after == int((result.mask == label).sum())
        assert stats.slices_refined + stats.slices_kept <= own_slices
        assert 0.0 < stats.mean_sam_iou <= 1.0


@pytest.mark.slow
def test_the_guard_keeps_the_initial_mask_where_sam_is_not_trusted(phantom, litemedsam):
    mask = degrade(phantom.labels)
    strict = SamRefiner(litemedsam, RefineSettings(min_sam_iou=0.999))
    result = strict.refine(phantom.image, mask, phantom.spacing)
    cleaned = mask.copy()
    cleaned[2:4, 40:44, 4:8] = 0  # only the cleaning acts: every slice keeps its initial mask
    assert np.array_equal(result.mask, cleaned)
    assert all(s.slices_refined == 0 and s.slices_kept > 0 for s in result.classes.values())


@pytest.mark.slow
def test_output_keeps_dtype_shape_and_never_overlaps(phantom, litemedsam):
    mask = degrade(phantom.labels).astype(np.int16)
    result = SamRefiner(litemedsam, RefineSettings(prompts="box+points", context="adjacent")).refine(
        phantom.image, mask, phantom.spacing)
    assert result.mask.dtype == np.int16 and result.mask.shape == mask.shape
    assert set(np.unique(result.mask)) <= {0, 1, 2}
    assert dice(phantom.labels > 0, result.mask > 0) > 0.6


@pytest.mark.slow
def test_slicing_along_another_axis_gives_slices_of_that_axis(phantom, litemedsam):
    transposed = SamRefiner(litemedsam).refine(np.moveaxis(phantom.image, 0, 2), np.moveaxis(phantom.labels, 0, 2),
                                               (1.0, 1.0, 3.0))
    assert transposed.axis == 2
    assert dice(np.moveaxis(phantom.labels, 0, 2) > 0, transposed.mask > 0) >= 0.98


def test_2d_images_work(litemedsam):
    p = make_phantom(shape=(16, 64, 64))
    image, labels = p.image[8:9], p.labels[8:9]
    weak = degrade(labels)
    result = SamRefiner(litemedsam).refine(image, weak, (999.0, 1.0, 1.0))
    assert result.axis == 0 and result.slices_encoded == 1
    assert dice(labels == 1, result.mask == 1) > dice(labels == 1, weak == 1)


@pytest.mark.slow
def test_probabilities_choose_the_component(phantom, litemedsam):
    mask = np.zeros_like(phantom.labels)
    mask[phantom.labels == 1] = 1
    mask[2:5, 38:46, 2:10] = 1  # a bigger-than-speck second component with low probability
    probs = np.zeros((3,) + mask.shape, dtype=np.float32)
    probs[1] = np.where(phantom.labels == 1, 0.9, 0.0) + np.where(mask.astype(bool) & (phantom.labels != 1), 0.3, 0)
    result = SamRefiner(litemedsam).refine(phantom.image, mask, phantom.spacing, probabilities=probs)
    assert not result.mask[2:5, 38:46, 2:10].any()


@pytest.mark.slow
def test_pieces_keeps_a_right_piece_that_is_smaller_than_a_wrong_one(litemedsam):
    """A class mask in two pieces: a small one on the right organ, a larger one on a neighbour (the model's
    identity error). keep="largest" keeps the wrong one; keep="pieces" refines each piece on its own, so the
    right organ comes out whole instead of being traded away."""
    from scipy import ndimage

    p = make_phantom(shape=(16, 64, 64))
    image, labels = p.image[8:9], p.labels[8:9]
    organ, neighbour = labels[0] == 1, labels[0] == 2
    mask = np.zeros_like(labels)
    mask[0][ndimage.binary_erosion(organ, iterations=2)] = 1
    mask[0][ndimage.binary_dilation(neighbour, iterations=2)] = 1
    assert (mask == 1)[0][neighbour].sum() > (mask == 1)[0][organ].sum()  # the wrong piece is the larger one
    near_organ = ndimage.binary_dilation(organ, iterations=4)[None]
    spacing = (999.0, 1.0, 1.0)

    largest = SamRefiner(litemedsam, RefineSettings(keep="largest")).refine(image, mask, spacing)
    pieces = SamRefiner(litemedsam, RefineSettings(keep="pieces")).refine(image, mask, spacing)
    assert not (largest.mask[near_organ] == 1).any()
    initial_on_organ = dice(labels == 1, (mask == 1) & near_organ)
    refined_on_organ = dice(labels == 1, (pieces.mask == 1) & near_organ)
    assert refined_on_organ > max(0.85, initial_on_organ + 0.03), (initial_on_organ, refined_on_organ)
    assert (pieces.mask[0][neighbour] == 1).mean() > 0.8  # the other piece is refined or kept, not dropped


def test_an_unknown_keep_mode_is_refused():
    with pytest.raises(ValueError, match="keep must be one of"):
        RefineSettings(keep="biggest")


def test_load_sam_errors_name_the_file(tmp_path):
    with pytest.raises(NnsamError, match="not found.*missing.pth"):
        load_sam("vit_b", tmp_path / "missing.pth", device="cpu")
    with pytest.raises(NnsamError, match="model_type vit_b needs checkpoint PATH"):
        load_sam("vit_b", None, device="cpu")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(NnsamError, match="cannot read SAM checkpoint .*corrupt.pth"):
        load_sam("litemedsam", corrupt, device="cpu")
    with pytest.raises(NnsamError, match="unknown SAM model type"):
        load_sam("vit_x", device="cpu")


def test_a_checkpoint_of_another_model_type_is_refused(tmp_path, litemedsam):
    wrong = tmp_path / "lite.pth"
    torch.save(litemedsam.module.state_dict(), wrong)
    with pytest.raises(NnsamError, match="does not fit model type vit_b"):
        load_sam("vit_b", wrong, device="cpu")


@pytest.mark.slow
def test_segment_anything_checkpoints_load_and_refine(tmp_path):
    """Meta's vit_b path end to end (1024 input, pixel normalisation, decoder broadcasting), with random
    weights saved as a checkpoint: only shapes and plumbing can be checked without the real file."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    checkpoint = tmp_path / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), checkpoint)
    model = load_sam("vit_b", checkpoint, device="cpu")
    assert model.input_size == 1024 and model.pixel_mean is not None
    p = make_phantom(shape=(16, 48, 48))
    refiner = SamRefiner(model, RefineSettings(prompts="box+points", min_sam_iou=-1e9, min_agreement=0.0,
                                               evidence=False))
    result = refiner.refine(p.image[8:9], p.labels[8:9], (999.0, 1.0, 1.0))
    assert result.mask.shape == (1, 48, 48) and model.encoder_calls == 1
    assert {int(k) for k in result.classes} == {1, 2}
    medsam = load_sam("medsam", checkpoint, device="cpu")
    assert medsam.pixel_mean is None and medsam.input_size == 1024


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_embeddings():
    model = load_sam("litemedsam", device="cpu")
    views = np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)
    eager = model.encode(views)
    model.compile_encoder()
    compiled = model.encode(views)
    assert model.encoder_calls == 2
    assert torch.allclose(eager, compiled, atol=1e-3), (eager - compiled).abs().max()


# --- probability-guided refinement (the initial model's softmax) --------------------------------------------

def _one_slice(shape=(16, 64, 64)):
    p = make_phantom(shape=shape)
    return p.image[8:9], p.labels[8:9]


@pytest.mark.slow
def test_a_correct_mask_with_its_probabilities_stays_correct(phantom, litemedsam):
    from nnunet_sam.demo.degrade import soft_probabilities

    probabilities = soft_probabilities(phantom.labels, seed=0, n_classes=3, spacing=phantom.spacing)
    result = SamRefiner(litemedsam).refine(phantom.image, phantom.labels, phantom.spacing, probabilities=probabilities)
    for label, value in _dices(phantom.labels, result.mask).items():
        assert value >= 0.99, (label, value)
    for stats in result.classes.values():
        assert stats.voxels_confident + stats.voxels_sam_decided == stats.voxels_after


@pytest.mark.slow
def test_where_the_model_is_sure_sam_changes_nothing(litemedsam):
    image, labels = _one_slice()
    weak = degrade(labels)
    sure = (np.arange(3)[:, None, None, None] == weak[None]).astype(np.float32)  # probability 1 for its labels
    loose = SamRefiner(litemedsam, RefineSettings(confident=None)).refine(image, weak, (999.0, 1.0, 1.0),
                                                                          probabilities=sure)
    assert not np.array_equal(loose.mask, weak)  # SAM alone does change this mask
    result = SamRefiner(litemedsam).refine(image, weak, (999.0, 1.0, 1.0), probabilities=sure)
    np.testing.assert_array_equal(result.mask, weak)
    for stats in result.classes.values():
        assert stats.voxels_sam_decided == 0 and stats.voxels_confident == stats.voxels_after
    assert sum(s.voxels_overruled for s in result.classes.values()) == int((loose.mask != weak).sum())


@pytest.mark.slow
def test_probabilities_keep_the_right_piece_when_the_larger_one_is_wrong(litemedsam):
    """The failure measured on real CT: a class mask in two pieces, the larger on a neighbouring organ. Size
    keeps the wrong piece; the model's probability mass keeps the right one, which SAM then refines."""
    from scipy import ndimage

    image, labels = _one_slice()
    organ, neighbour = labels[0] == 1, labels[0] == 2
    mask = np.zeros_like(labels)
    mask[0][ndimage.binary_erosion(organ, iterations=2)] = 1
    mask[0][ndimage.binary_dilation(neighbour, iterations=2)] = 1
    assert (mask == 1)[0][neighbour].sum() > (mask == 1)[0][organ].sum()
    probabilities = np.zeros((2, *mask.shape), dtype=np.float32)
    probabilities[1] = np.where(mask == 1, 0.6, 0.05)
    probabilities[1][0][ndimage.binary_erosion(organ, iterations=2)] = 0.95
    probabilities[0] = 1 - probabilities[1]
    spacing = (999.0, 1.0, 1.0)
    by_size = SamRefiner(litemedsam).refine(image, mask, spacing)
    by_evidence = SamRefiner(litemedsam).refine(image, mask, spacing, probabilities=probabilities)
    assert dice(organ, by_size.mask[0] == 1) < 0.2
    assert dice(organ, by_evidence.mask[0] == 1) > max(0.8, dice(organ, mask[0] == 1) + 0.2)
    assert not (by_evidence.mask[0][neighbour] == 1).any()


@pytest.mark.slow
def test_a_class_the_argmax_never_predicts_is_found_from_its_probability(litemedsam):
    """SAM-Mix's activation-map prompts with the model's softmax: class 2 never wins the argmax (0.4 against
    the background's 0.6 on the organ) but gets a box there, and SAM segments it."""
    image, labels = _one_slice()
    initial = np.where(labels == 1, 1, 0).astype(labels.dtype)
    probabilities = np.zeros((3, *labels.shape), dtype=np.float32)
    probabilities[1] = (labels == 1)
    probabilities[2] = np.where(labels == 2, 0.4, 0.0)
    probabilities[0] = 1 - probabilities[1] - probabilities[2]
    assert not (probabilities.argmax(axis=0) == 2).any()
    spacing = (999.0, 1.0, 1.0)
    found = SamRefiner(litemedsam).refine(image, initial, spacing, probabilities=probabilities)
    assert dice(labels == 2, found.mask == 2) > 0.8
    stats = found.classes[2]
    assert stats.voxels_before == 0 and stats.slices_from_probabilities == 1 and stats.found_by_probabilities
    assert stats.to_dict()["found_by_probabilities"] is True
    assert dice(labels == 1, found.mask == 1) > 0.95  # the other class is kept
    off = SamRefiner(litemedsam, RefineSettings(activation=None)).refine(image, initial, spacing,
                                                                         probabilities=probabilities)
    assert not (off.mask == 2).any() and not off.classes[2].found_by_probabilities


def test_fusion_gives_one_label_per_voxel(litemedsam):
    from nnunet_sam.demo.degrade import soft_probabilities

    image, labels = _one_slice()
    weak = degrade(labels).astype(np.int16)
    probabilities = soft_probabilities(weak, seed=1, n_classes=3)
    result = SamRefiner(litemedsam, RefineSettings(fuse=True)).refine(image, weak, (999.0, 1.0, 1.0),
                                                                      probabilities=probabilities)
    assert result.mask.dtype == np.int16 and set(np.unique(result.mask)) <= {0, 1, 2}
    assert dice(labels > 0, result.mask > 0) > dice(labels > 0, weak > 0)
    assert result.classes[1].voxels_confident is None  # the band's counts belong to the band


def test_probabilities_that_do_not_fit_the_mask_are_refused(phantom, litemedsam):
    refiner = SamRefiner(litemedsam)
    with pytest.raises(ValueError, match="do not match the mask"):
        refiner.refine(phantom.image, phantom.labels, phantom.spacing,
                       probabilities=np.zeros((3, 4, 48, 48), dtype=np.float32))
    with pytest.raises(ValueError, match="only 2 classes"):
        refiner.refine(phantom.image, phantom.labels, phantom.spacing,
                       probabilities=np.zeros((2, *phantom.labels.shape), dtype=np.float32))
