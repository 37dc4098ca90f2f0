"""How a pseudo label is composed from SAM's mask and the initial model's prediction (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_sam.nnunet.pseudolabels import mark_disagreement, sam_agreement, unsure_label


def _labels(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int16).reshape(1, 1, -1)


def test_mark_disagreement_and_the_unsure_value():
    manager = LabelManager({"background": 0, "a": 1, "b": 2}, regions_class_order=None)
    assert unsure_label(manager) == 3 and isinstance(unsure_label(manager), int)
    with_ignore = LabelManager({"background": 0, "a": 1, "b": 2, "ignore": 3}, regions_class_order=None)
    assert unsure_label(with_ignore) == 3
    marked = mark_disagreement(_labels(0, 1, 2, 2), _labels(0, 1, 1, 0), unsure=3)
    np.testing.assert_array_equal(marked, _labels(0, 1, 3, 3))


def test_sam_agreement_is_the_mean_dice_over_the_classes_either_map_has():
    sam = _labels(1, 1, 0, 0, 0, 0)
    initial = _labels(1, 0, 0, 2, 2, 0)
    # class 1: Dice 2*1/(2+1) = 2/3; class 2: only in the model's map, Dice 0; class 3: in neither, left out
    assert sam_agreement(sam, initial, [1, 2, 3]) == pytest.approx((2 / 3 + 0) / 2)
    assert sam_agreement(initial, initial, [1, 2, 3]) == 1.0
    assert sam_agreement(_labels(0, 0), _labels(0, 0), [1, 2]) == 1.0  # nothing to disagree on


def test_cases_no_longer_unlabelled_lose_their_preprocessed_files_and_reports(tmp_path):
    from types import SimpleNamespace

    from nnunet_sam.nnunet.datasets import pseudo_label_folder, unlabeled_folder
    from nnunet_sam.nnunet.preprocessed_cases import finished_cases
    from nnunet_sam.nnunet.refine_dataset import remove_orphans
    from nnunet_sam.nnunet.report import case_report_path, write_case_report

    data_folder = tmp_path / "nnUNetPlans_2d"
    labels, images = pseudo_label_folder(data_folder, "nnUNetPlans", "all"), unlabeled_folder(data_folder)
    other_fold = pseudo_label_folder(data_folder, "nnUNetResEncUNetMPlans", "0")
    for case in ("kept", "gone"):
        for folder, parts in ((labels, (".pkl", "_seg.b2nd")), (other_fold, (".pkl",)), (images, (".pkl", ".b2nd"))):
            folder.mkdir(parents=True, exist_ok=True)
            for part in parts:
                (folder / f"{case}{part}").write_bytes(b"x")
        write_case_report(labels, case, {"case": case})
    folders = SimpleNamespace(data_folder=data_folder, unlabeled_data=images, unlabeled_images=tmp_path / "raw")
    remove_orphans(SimpleNamespace(folders=folders, cases=["kept"]))
    assert finished_cases(labels) == finished_cases(images) == finished_cases(other_fold) == ["kept"]
    assert sorted(p.name for p in labels.iterdir() if p.is_file()) == ["kept.pkl", "kept_seg.b2nd"]
    assert sorted(p.name for p in images.iterdir()) == ["kept.b2nd", "kept.pkl"]
    assert case_report_path(labels, "kept").is_file() and not case_report_path(labels, "gone").exists()


def test_rewriting_a_pseudo_label_never_pairs_the_new_label_with_the_old_pkl(tmp_path, monkeypatch):
    from nnunet_sam.nnunet import pseudolabels
    from nnunet_sam.nnunet.preprocessed_cases import finished_cases

    manager = LabelManager({"background": 0, "organ": 1}, regions_class_order=None)
    seg = np.zeros((1, 4, 8, 8), dtype=np.int16)
    seg[0, 1:3, 2:5, 2:5] = 1
    pseudolabels.write_pseudo_label(tmp_path, "case_a", seg, {"spacing": [1, 1, 1]}, manager, [4, 8, 8])
    assert finished_cases(tmp_path) == ["case_a"]
    real_replace = pseudolabels.os.replace

    def killed_before_the_pkl(source, target):
        if str(target).endswith(".pkl"):
            raise KeyboardInterrupt  # as if killed after the new label went in
        real_replace(source, target)

    monkeypatch.setattr(pseudolabels.os, "replace", killed_before_the_pkl)
    with pytest.raises(KeyboardInterrupt):
        pseudolabels.write_pseudo_label(tmp_path, "case_a", np.zeros_like(seg), {"spacing": [1, 1, 1]}, manager,
                                        [4, 8, 8])
    assert finished_cases(tmp_path) == []  # unfinished: redone by --continue, never trained on
