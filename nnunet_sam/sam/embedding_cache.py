"""Image embeddings computed once and kept on disk: fine-tuning SAM's mask decoder (the encoder frozen)
reads the same slices every epoch and every run, and encoding is the expensive part (about 1 s per slice
for LiteMedSAM on 2 CPU cores).

An embedding is stored under the fingerprint of the encoder (its weights and pixel normalisation) and the
hash of the exact model input (the view's pixels after context, windowing and resizing), so a changed
model, checkpoint or view never reuses a stale embedding. Embeddings are stored as float16 `.npy` files,
written atomically. The first write marks the folder (`CACHE_MARKER` inside) as a cache that nnunet-sam may
write into again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from nnunet_sam.sam.models import SamModel
from nnunet_sam.utils.atomic import atomic_path

CACHE_MARKER = ".nnsam_embeddings"  # a folder inside a cache folder: the commands' --cache may write there


def encoder_fingerprint(model: SamModel) -> str:
    """sha256 over the model's name, input size, pixel normalisation and image-encoder weights. A
    checkpoint whose decoder was fine-tuned keeps its encoder's fingerprint (and its cached embeddings)."""
    digest = hashlib.sha256()
    digest.update(repr((model.name, model.input_size, model.pixel_scale, model.pixel_mean,
                        model.pixel_std)).encode())
    for name, tensor in sorted(model.module.image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def view_key(image: np.ndarray) -> str:
    """sha256 of one model input (S, S, 3) as float32, with its shape."""
    pixels = np.ascontiguousarray(image, dtype=np.float32)
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()


class EmbeddingCache:
    """`embeddings(images)` returns the image embeddings, encoding only the images not cached yet."""

    def __init__(self, folder: str | Path, model: SamModel) -> None:
        self.model = model
        self.root = Path(folder)
        self.folder = self.root / f"{model.name}-{encoder_fingerprint(model)[:16]}"
        self._marked = False
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def embeddings(self, images: np.ndarray, batch_size: int = 1) -> torch.Tensor:
        """Embeddings (B, C, E, E) float32 on the model's device of images (B, S, S, 3) in [0, 1]."""
        return self.load(self.ensure(images, batch_size))

    def ensure(self, images: np.ndarray, batch_size: int = 1) -> list[str]:
        """Encode and store the images not cached yet (`batch_size` per encoder call); return every
        image's key for `load`."""
        keys = [view_key(image) for image in images]
        missing = [i for i, key in enumerate(keys) if not self.path(key).is_file()]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            encoded = self.model.encode(images[chunk]).cpu().numpy().astype(np.float16)
            for index, embedding in zip(chunk, encoded):
                self._store(keys[index], embedding)
        return keys

    def load(self, keys: list[str]) -> torch.Tensor:
        """The stored embeddings of `keys` (from `ensure`), (B, C, E, E) float32 on the model's device."""
        stacked = np.stack([np.load(self.path(key)) for key in keys]).astype(np.float32)
        return torch.from_numpy(stacked).to(self.model.device)

    def _store(self, key: str, embedding: np.ndarray) -> None:
        if not self._marked:
            (self.root / CACHE_MARKER).mkdir(parents=True, exist_ok=True)
            self._marked = True
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            np.save(handle, embedding)

    def size_bytes(self) -> int:
        """Disk space used by this model's cached embeddings."""
        return sum(p.stat().st_size for p in self.folder.rglob("*.npy")) if self.folder.is_dir() else 0
