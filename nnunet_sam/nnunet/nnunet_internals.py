"""Every private nnU-Net (and batchgenerators) attribute or calling convention nnunet-sam relies on, in one place.

nnU-Net's public entry points (PlansManager, nnUNetPredictor, DefaultPreprocessor.run_case_save, the trainer's
documented hooks) are used where they are needed; what is listed here is not part of any promise, so a new
nnU-Net release may change it without notice. Each function was checked against `CHECKED_NNUNET` and says
what it stands for. Outside that range `check_nnunet_version` refuses to run (one line, with the fix), unless
`NNSAM_UNCHECKED_NNUNET=1` is set, in which case it warns once and goes on.
"""

from __future__ import annotations

import io
import logging
import os
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Sequence

import numpy as np

from nnunet_sam.errors import NnsamError

logger = logging.getLogger(__name__)

CHECKED_NNUNET = ((2, 8), (2, 9))  # nnunetv2 >= 2.8, < 2.9 (pyproject.toml asks for the same range)
UNCHECKED_VARIABLE = "NNSAM_UNCHECKED_NNUNET"


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


@lru_cache(maxsize=None)
def check_nnunet_version() -> str:
    """The installed nnunetv2 version; an NnsamError when it is outside `CHECKED_NNUNET` (see the module doc)."""
    try:
        installed = version("nnunetv2")
    except PackageNotFoundError:
        raise NnsamError("nnunetv2 is not installed; pip install 'nnunetv2>=2.8,<2.9'") from None
    low, high = CHECKED_NNUNET
    if low <= _release(installed) < high:
        return installed
    checked = f"nnunetv2>={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
    if os.environ.get(UNCHECKED_VARIABLE) == "1":
        logger.warning("nnunetv2 %s is installed; nnunet-sam was checked with %s (%s=1: going on)", installed,
                       checked, UNCHECKED_VARIABLE)
        return installed
    raise NnsamError(f"nnunetv2 {installed} is installed, but nnunet-sam relies on nnU-Net internals checked with "
                     f"{checked} only; pip install '{checked}' (or set {UNCHECKED_VARIABLE}=1 to try anyway)")


def _required(owner: Any, name: str) -> Any:
    """`owner.name`, or an NnsamError saying which nnU-Net internal is gone."""
    check_nnunet_version()
    try:
        return getattr(owner, name)
    except AttributeError:
        where = getattr(owner, "__name__", type(owner).__name__)  # a class or module by name, else its type
        raise NnsamError(f"{where}.{name} is missing from the installed nnunetv2 {version('nnunetv2')}: nnunet-sam "
                         f"needs nnunetv2>=2.8,<2.9") from None


# --- preprocessed case files ------------------------------------------------------------------------------

def sample_foreground_locations(seg: np.ndarray, keys: list) -> dict:
    """The `class_locations` nnU-Net's preprocessor stores for foreground oversampling (its private static
    `DefaultPreprocessor._sample_foreground_locations`, default seed), for a (1, Z, Y, X) label map."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    return _required(DefaultPreprocessor, "_sample_foreground_locations")(seg, keys)


def save_segmentation(seg: np.ndarray, base: str, patch_size: Sequence[int]) -> None:
    """Write `base`_seg.b2nd as nnU-Net writes a preprocessed label map (`nnUNetDatasetBlosc2.save_seg` with
    the chunking `comp_blosc2_params` chooses for the configuration's patch size)."""
    from nnunetv2.training.dataloading import nnunet_dataset

    blocks, chunks = _required(nnunet_dataset, "comp_blosc2_params")(seg.shape, tuple(patch_size), seg.itemsize)
    save_seg = _required(nnunet_dataset.nnUNetDatasetBlosc2, "save_seg")  # it appends ".b2nd" only
    save_seg(seg, f"{base}_seg", chunks_seg=chunks, blocks_seg=blocks)


def open_b2nd(path: str, dataset: Any = None):
    """A .b2nd file opened read-only as nnU-Net's Blosc2 dataset opens its cases (one decompression thread,
    memory-mapped where `dataset`'s private `mmap_kwargs` say so; not memory-mapped without a dataset)."""
    import blosc2

    mmap_kwargs = {} if dataset is None else _required(dataset, "mmap_kwargs")
    return blosc2.open(urlpath=path, mode="r", dparams={"nthreads": 1}, **mmap_kwargs)


# --- the trainer ------------------------------------------------------------------------------------------

def initial_patch_size(trainer: Any) -> Sequence[int]:
    """The patch size the data loader crops before spatial augmentation: element 2 of the trainer's
    `configure_rotation_dummyDA_mirroring_and_inital_patch_size()` (nnU-Net's spelling)."""
    return _required(trainer, "configure_rotation_dummyDA_mirroring_and_inital_patch_size")()[2]


def checkpoint_bytes(save_checkpoint: Callable[[Any], None]) -> bytes:
    """What nnU-Net's `save_checkpoint(filename)` writes, caught in memory: it builds the checkpoint dict and
    passes `filename` straight to `torch.save`, which accepts a file object. Empty where nnU-Net saves nothing
    (not rank 0, or checkpointing disabled)."""
    check_nnunet_version()
    buffer = io.BytesIO()
    save_checkpoint(buffer)
    return buffer.getvalue()


# --- batchgenerators' augmenters (nnU-Net's data-loading stack) ---------------------------------------------

def augmenter_data_loader(augmenter: Any) -> Any:
    """The data loader inside one of nnU-Net's augmenters (`.generator` of batchgenerators' multi-threaded
    augmenters and `SingleThreadedAugmenter`; `.data_loader` of older single-threaded ones)."""
    check_nnunet_version()
    for name in ("generator", "data_loader"):
        if hasattr(augmenter, name):
            return getattr(augmenter, name)
    raise NnsamError(f"{type(augmenter).__name__} has neither .generator nor .data_loader: nnunet-sam needs "
                     f"nnunetv2>=2.8,<2.9 and its batchgenerators")


def stop_augmenter(augmenter: Any) -> None:
    """Stop a multi-threaded augmenter's worker processes (its private `_finish`, which nnU-Net's own
    `on_train_end` calls for the trainer's two streams)."""
    _required(augmenter, "_finish")()


# --- preprocessing ----------------------------------------------------------------------------------------

def raw_intensity_preprocessor(configuration_manager: Any) -> Any:
    """The configuration's preprocessor with its normalisation step left out (the private `_normalize` hook of
    nnU-Net's `DefaultPreprocessor`, which `run_case` calls between cropping and resampling): its `run_case`
    returns the image's own intensities, transposed, cropped and resampled as the preprocessed tensor is."""
    preprocessor_class = configuration_manager.preprocessor_class
    _required(preprocessor_class, "_normalize")

    class RawIntensityPreprocessor(preprocessor_class):
        def _normalize(self, data, seg, configuration_manager, foreground_intensity_properties_per_channel):
            return data

    return RawIntensityPreprocessor(verbose=False)
