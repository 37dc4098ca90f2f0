"""SAM's inference precision: float16 autocast on a GPU by default (not bfloat16), full precision on the CPU, and
a float16 overflow re-encoded in full precision rather than passed on as inf."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_sam.errors import SettingError
from nnunet_sam.sam import load_sam


def test_precision_names_the_autocast_dtype():
    model = load_sam("litemedsam", device="cpu")
    assert model.precision == "auto" and model.amp_dtype is None  # the CPU computes in full precision
    for name, dtype in {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}.items():
        model.precision = name
        assert model.amp_dtype is dtype
    model.precision = "half"
    with pytest.raises(SettingError, match="precision half is not one of auto, bf16, fp16, fp32"):
        _ = model.amp_dtype


class _OverflowsUnderAutocast(nn.Module):
    """The real encoder, but inf wherever autocast is on (what a float16 overflow gives)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder(x)
        return torch.full_like(out, float("inf")) if torch.is_autocast_enabled("cpu") else out


def test_a_float16_overflow_is_encoded_again_in_full_precision(caplog):
    model = load_sam("litemedsam", device="cpu")
    images = np.random.default_rng(0).uniform(0, 1, (2, model.input_size, model.input_size, 3)).astype(np.float32)
    reference = model.encode(images)
    model.module.image_encoder = _OverflowsUnderAutocast(model.module.image_encoder)
    model.precision = "fp16"
    with caplog.at_level(logging.WARNING):
        embeddings = model.encode(images)
    assert torch.isfinite(embeddings).all()
    assert torch.allclose(embeddings, reference)
    assert "float16 overflowed on 2 image(s); encoding them in full precision" in caplog.text
    assert model.encoder_calls == 4  # counted once per image and call, not again for the second try
