"""benchmarks/object_identity.py: the relabelling rules and the right-object breakdown that pseudo_quality reports
(toy slices, stand-in encoder and decoder, so that each rule's answer is known)."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import object_identity  # noqa: E402  (benchmarks/object_identity.py)

from nnunet_sam.sam.views import VolumeViews  # noqa: E402

SIZE = 32


class HalvesCache:
    """Embeddings whose channel 0 is 1 on the left half of the input and channel 1 on the right half."""

    def embeddings(self, images: np.ndarray) -> torch.Tensor:
        grid = torch.zeros(len(images), 2, 64, 64)
        grid[:, 0, :, :32] = 1.0
        grid[:, 1, :, 32:] = 1.0
        return grid


class EmptySam:
    input_size = 256

    def decode(self, embedding, boxes):
        class Decoded:
            low_res_logits = torch.full((len(boxes), 1, 64, 64), -10.0)
        return Decoded()


def views() -> VolumeViews:
    return VolumeViews.prepare(np.zeros((1, SIZE, SIZE), np.float32), (1.0, 1.0, 1.0), 256, modality="MR")


def test_foreground_pieces_take_their_majority_class_and_separate_pieces_stay():
    labels = np.zeros((1, SIZE, SIZE), np.uint8)
    labels[0, 4:12, 4:12] = 1
    labels[0, 4:12, 12:14] = 2  # touches the class-1 piece: one foreground piece, mostly 1
    labels[0, 20:24, 20:24] = 2  # apart: stays 2
    out = object_identity.relabel_foreground_pieces(labels, views())
    assert (out[0, 4:12, 4:14] == 1).all()
    assert (out[0, 20:24, 20:24] == 2).all()
    assert (out[labels == 0] == 0).all()


def test_prototypes_relabel_each_piece_by_its_nearest_embedding():
    labels = np.zeros((1, SIZE, SIZE), np.uint8)
    labels[0, 10:20, 2:10] = 2  # on the left half, where channel 0 lives
    labels[0, 10:20, 22:30] = 2  # on the right half
    prototypes = torch.eye(2)  # class 1 ~ channel 0, class 2 ~ channel 1
    out = object_identity.relabel_by_prototypes(labels, views(), HalvesCache(), prototypes, [1, 2])
    assert (out[0, 10:20, 2:10] == 1).all()
    assert (out[0, 10:20, 22:30] == 2).all()


def test_right_objects_are_judged_against_the_true_objects_they_touch():
    truth = np.zeros((1, SIZE, SIZE), np.uint8)
    truth[0, 4:14, 4:14] = 1  # one organ of class 1
    truth[0, 20:28, 20:28] = 2
    initial = np.zeros_like(truth)
    initial[0, 4:14, 4:8] = 1  # right, but the model gave most of the organ to class 2: split
    initial[0, 4:14, 8:14] = 2  # wrong (mostly class 1 in the truth): not a right object
    initial[0, 20:28, 20:28] = 2  # right and whole
    right = initial.copy()
    right[0, 4:14, 8:14] = 0  # the right objects only (what pseudo_quality's objects_by_truth gives)
    records = object_identity.right_objects(right, initial, truth, views(), EmptySam(), HalvesCache(), 0.0, [1, 2])
    assert len(records) == 2
    split, whole = sorted(records, key=lambda r: not r["split"])
    assert split["split"] and not whole["split"]
    assert split["pixels"] == 100 and whole["pixels"] == 64
    assert abs(split["model"] - 2 * 40 / 140) < 1e-6 and whole["model"] == 1.0
    assert split["SAM from its box"] == 0.0  # the stand-in decoder returns nothing
