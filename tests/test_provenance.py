"""Stale work is never trusted: source records of preprocessed cases, pseudo labels per plans and fold."""

from __future__ import annotations

import copy
import json
import os

import pytest

from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.datasets import check_made_for_fold, pseudo_label_folder, pseudo_label_sets, training_fold
from nnunet_sam.nnunet.provenance import file_fingerprint, preprocessing_hash, same_file, same_source, why_stale

PLANS = {"plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
         "foreground_intensity_properties_per_channel": {"0": {"mean": 10.0, "std": 2.0}},
         "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "spacing": [3.0, 1.0, 1.0],
                                           "normalization_schemes": ["CTNormalization"], "patch_size": [32, 48, 48],
                                           "preprocessor_name": "DefaultPreprocessor", "architecture": {}}}}


def test_a_touched_file_is_the_same_file_a_changed_one_is_not(tmp_path):
    path = tmp_path / "case_0000.nii.gz"
    path.write_bytes(b"scan")
    record = file_fingerprint(path)
    os.utime(path, ns=(1, 1))  # copied back, touched: same bytes
    assert same_file(record, path)
    path.write_bytes(b"scam")  # same size, other bytes
    assert not same_file(record, path)
    assert not same_file(file_fingerprint(path, content=False), tmp_path / "missing.nii.gz")


def test_preprocessing_hash_follows_what_the_preprocessor_does_only():
    base = preprocessing_hash(PLANS, "3d_fullres")
    other_network = copy.deepcopy(PLANS)  # a ResEnc preset: another patch size and network, same preprocessing
    other_network["configurations"]["3d_fullres"].update(patch_size=[64, 64, 64], architecture={"n_stages": 7})
    assert preprocessing_hash(other_network, "3d_fullres") == base
    for change in ({"spacing": [2.0, 1.0, 1.0]}, {"normalization_schemes": ["ZScoreNormalization"]}):
        replanned = copy.deepcopy(PLANS)
        replanned["configurations"]["3d_fullres"].update(change)
        assert preprocessing_hash(replanned, "3d_fullres") != base
    statistics = copy.deepcopy(PLANS)
    statistics["foreground_intensity_properties_per_channel"]["0"]["mean"] = 11.0
    assert preprocessing_hash(statistics, "3d_fullres") != base


def test_why_stale_names_the_changed_file_or_the_plans(tmp_path):
    images = [tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"]
    for path in images:
        path.write_bytes(path.name.encode())
    record = {"images": [file_fingerprint(p) for p in images], "preprocessing": "h1"}
    assert why_stale(record, images, "h1") is None
    assert why_stale(record, images, "h2") == "the plans' preprocessing changed since"
    assert why_stale(record, images[:1], "h1") == "its number of channel files changed"
    assert why_stale(None, images, "h1").startswith("it has no source record")
    images[1].write_bytes(b"other")
    assert why_stale(record, images, "h1") == "a_0001.nii.gz changed since"
    assert not same_source(record, {"images": [file_fingerprint(p) for p in images], "preprocessing": "h1"})
    assert same_source(record, copy.deepcopy(record)) and same_source(None, None) and not same_source(record, None)


def test_each_plans_and_training_fold_has_its_own_pseudo_label_set(tmp_path):
    data = tmp_path / "nnUNetPlans_3d_fullres"
    folders = {pseudo_label_folder(data, plans, fold) for plans in ("nnUNetPlans", "nnUNetResEncUNetMPlans")
               for fold in ("0", "1", "all")}
    assert len(folders) == 6
    for folder in folders:
        folder.mkdir(parents=True)
    assert set(pseudo_label_sets(data)) == folders
    assert training_fold(("3",)) == "3" and training_fold(("all",)) == "all"
    assert training_fold(("0", "1", "2", "3", "4")) == "all"  # an ensemble saw every fold's validation cases


@pytest.mark.parametrize("made_by, fold, leaks", [
    (["0"], "0", False), (["0"], "1", True), (["0", "1"], "0", True), (["0", "1"], "all", False),
    (["all"], "0", True), (["all"], "all", False), (None, "0", False),  # None: the truth (a benchmark's ceiling)
])
def test_trainers_refuse_pseudo_labels_made_by_a_model_that_saw_their_validation_cases(tmp_path, made_by, fold,
                                                                                       leaks):
    model = None if made_by is None else {"trainer": "nnUNetTrainer", "folds": made_by}
    (tmp_path / "refine_report.json").write_text(json.dumps({"initial_model": model}))
    if leaks:
        with pytest.raises(NnsamError, match=f"not fold {fold} alone: that model saw fold {fold}'s validation "
                                             f"cases \\(leakage\\); run nnsam_refine -d 1 -f {fold}$"):
            check_made_for_fold(tmp_path, fold, f"nnsam_refine -d 1 -f {fold}")
    else:
        check_made_for_fold(tmp_path, fold, "unused")
    (tmp_path / "refine_report.json").unlink()
    with pytest.raises(NnsamError, match="do not say which model made them"):
        check_made_for_fold(tmp_path, fold, "unused")
