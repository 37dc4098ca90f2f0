"""2D few-label datasets (the demo's and the semi-supervised benchmark's): patients that differ, seeded splits
that show every class in the labelled cases, and nnU-Net's raw layout with a fold-0 split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_sam.demo.slices import (SliceCase, draw_split, split_file_content, synthetic_slice_pool,
                                    write_slice_dataset)
from nnunet_sam.demo.synthetic import PatientVariation, synthetic_ct_slice
from nnunet_sam.errors import NnsamError


def test_synthetic_patients_share_an_anatomy_but_differ():
    cases = [synthetic_ct_slice((64, 64), 3, seed=s, anatomy_seed=0) for s in range(6)]
    for image, labels in cases:
        assert image.shape == labels.shape == (64, 64) and image.dtype == np.float32
        assert set(np.unique(labels)) == {0, 1, 2, 3}
    centres = np.array([[np.argwhere(labels == k).mean(axis=0) for k in (1, 2, 3)] for _, labels in cases])
    areas = np.array([[(labels == k).sum() for k in (1, 2, 3)] for _, labels in cases])
    # each organ keeps its usual place (closer to its own mean place than to another organ's) ...
    usual = centres.mean(axis=0)
    for organ in range(3):
        own = np.linalg.norm(centres[:, organ] - usual[organ], axis=1)
        other = np.linalg.norm(centres[:, organ] - usual[(organ + 1) % 3], axis=1)
        assert (own < other).all()
    # ... but size and place vary from patient to patient
    assert (areas.max(axis=0) / areas.min(axis=0) > 1.3).all()
    assert centres.std(axis=0).max() > 1.5
    still = synthetic_ct_slice((64, 64), 3, seed=0, anatomy_seed=0, variation=PatientVariation(
        rotation_degrees=0, body_scale=(1, 1), position=0, organ_scale=(1, 1), contrast=0))
    assert still[1].sum() > 0


def _pool(n: int = 12) -> list[SliceCase]:
    pool = []
    for i in range(n):
        labels = np.zeros((8, 8), dtype=np.uint8)
        labels[1:3, 1:3] = 1 if i % 3 else 0  # class 1 in two of three cases
        labels[5:7, 5:7] = 2 if i % 4 == 0 else 0  # class 2 in cases 0, 4, 8
        pool.append(SliceCase(f"c{i:02d}", np.random.default_rng(i).normal(size=(8, 8)).astype(np.float32), labels))
    return pool


def test_split_is_seeded_disjoint_and_labels_every_class():
    pool = _pool()
    split = draw_split(pool, 2, seed=3, labelled=2, validation=2)
    parts = [split.labelled, split.validation, split.unlabelled, split.test]
    assert sum(map(len, parts)) == 12 and len(set().union(*map(set, parts))) == 12
    assert [len(p) for p in parts] == [2, 2, 4, 4]
    shown = set().union(*(set(np.unique(c.labels)) for c in pool if c.case_id in split.labelled))
    assert {1, 2} <= shown
    assert draw_split(pool, 2, seed=3, labelled=2, validation=2) == split
    assert any(draw_split(pool, 2, seed=s, labelled=2, validation=2).labelled != split.labelled for s in range(5))
    with pytest.raises(NnsamError, match="show all 3 classes together"):
        draw_split(pool, 3, seed=0)


def test_slice_dataset_has_nnunet_layout(tmp_path):
    pool = _pool()
    split = draw_split(pool, 2, seed=0, labelled=2, validation=2)
    folder = write_slice_dataset(tmp_path, 995, "Slices", pool, split, ["a", "b"], "T1", "test")
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "a": 1, "b": 2} and dataset_json["numTraining"] == 4
    assert sorted(p.name[:3] for p in (folder / "imagesTr").iterdir()) == sorted(split.labelled + split.validation)
    assert sorted(p.name[:3] for p in (folder / "imagesUnlabeled").iterdir()) == split.unlabelled
    assert sorted(p.name[:3] for p in (folder / "labelsUnlabeledTruth").iterdir()) == split.unlabelled
    assert sorted(p.name[:3] for p in (folder / "labelsTs").iterdir()) == split.test
    image = sitk.ReadImage(str(folder / "imagesTr" / f"{split.labelled[0]}_0000.nii.gz"))
    assert image.GetSize() == (8, 8, 1) and image.GetSpacing()[2] == 999.0
    by_id = {c.case_id: c for c in pool}
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTs" / f"{split.test[0]}.nii.gz")))
    assert np.array_equal(labels[0], by_id[split.test[0]].labels)
    assert split_file_content(split) == [{"train": split.labelled, "val": split.validation}]


def test_synthetic_pool_is_reproducible():
    first, again = synthetic_slice_pool(3, shape=(48, 48)), synthetic_slice_pool(3, shape=(48, 48))
    assert [c.case_id for c in first] == ["patient_000", "patient_001", "patient_002"]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert not np.array_equal(first[0].labels, first[1].labels)
