"""The on-disk embedding cache: each view is encoded once across runs; a changed view or encoder is not
served a stale embedding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nnunet_sam.sam.embedding_cache import EmbeddingCache, encoder_fingerprint
from nnunet_sam.sam.views import resize_view, sam_intensities, slice_view, view_geometry


def _views(phantom, model, context: str) -> np.ndarray:
    volume = sam_intensities(phantom.image)
    geometry = view_geometry(volume.shape[1:], (1.0, 1.0), model.input_size)
    return np.stack([resize_view(slice_view(volume, index, context), geometry) for index in (6, 8)])


@pytest.mark.slow
def test_views_are_encoded_once_across_runs(tmp_path, phantom, litemedsam):
    views = _views(phantom, litemedsam, "single")
    calls = litemedsam.encoder_calls
    first = EmbeddingCache(tmp_path, litemedsam).embeddings(views)
    assert litemedsam.encoder_calls - calls == 2
    again = EmbeddingCache(tmp_path, litemedsam)  # a new run with the same model
    second = again.embeddings(views[::-1])
    assert litemedsam.encoder_calls - calls == 2 and (again.hits, again.misses) == (2, 0)
    assert torch.equal(second, first.flip(0))
    direct = litemedsam.encode(views)
    assert torch.allclose(first, direct, atol=2e-2 * float(direct.abs().max()))  # float16 storage
    assert again.size_bytes() == 2 * (first[0].numel() * 2 + 128)  # float16 .npy files

    adjacent = EmbeddingCache(tmp_path, litemedsam)
    adjacent.embeddings(_views(phantom, litemedsam, "adjacent"))  # other pixels: not the cached ones
    assert adjacent.misses == 2 and litemedsam.encoder_calls - calls == 6


def test_a_changed_encoder_gets_its_own_cache(tmp_path, litemedsam):
    changed = copy.copy(litemedsam)
    changed.module = copy.deepcopy(litemedsam.module)
    with torch.no_grad():
        next(changed.module.image_encoder.parameters()).add_(0.01)
    assert encoder_fingerprint(changed) != encoder_fingerprint(litemedsam)
    decoder_only = copy.copy(litemedsam)
    decoder_only.module = copy.deepcopy(litemedsam.module)
    with torch.no_grad():
        next(decoder_only.module.mask_decoder.parameters()).add_(0.01)
    assert encoder_fingerprint(decoder_only) == encoder_fingerprint(litemedsam)
    assert EmbeddingCache(tmp_path, changed).folder != EmbeddingCache(tmp_path, litemedsam).folder
