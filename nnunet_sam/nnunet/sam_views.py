"""What SAM is shown in dataset mode: the image's own intensities (HU for CT) on nnU-Net's preprocessed grid.

nnU-Net's preprocessed tensor is normalised for the network (CT clipped to the labelled foreground's 0.5-99.5 %
HU range and z-scored; MR z-scored on its nonzero voxels, the background at the tissue's mean), which is not what
LiteMedSAM was trained on. A *view volume* is the same case run through the dataset's own preprocessor once more
without normalisation (`raw_intensity_preprocessor`): transposed, cropped and resampled exactly as the tensor, so
its voxels line up with the prediction, but in the image's units. `sam/views.py` then windows CT or scales MR on
its nonzero voxels.

View volumes are cached in `nnUNet_preprocessed/DatasetXXX/<data_identifier>_sam_views/CASE.npz` (labelled and
unlabelled cases alike), written atomically with the source record of the preprocessed cases (image files'
fingerprints and the plans' preprocessing hash): a view whose images or plans changed is made again, never used.
The window is applied when SAM's input is built, so changing `--ct-window` needs no new view volume.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.datasets import DatasetFolders
from nnunet_sam.nnunet.nnunet_internals import raw_intensity_preprocessor
from nnunet_sam.nnunet.provenance import preprocessing_hash, source_record, why_stale
from nnunet_sam.sam.refine import RefineSettings
from nnunet_sam.utils.atomic import atomic_path, remove_dead_temporaries

logger = logging.getLogger(__name__)

VIEWS_SUFFIX = "_sam_views"
CT_SCHEME = "CTNormalization"


def views_folder(folders: DatasetFolders) -> Path:
    """Where a configuration's view volumes are cached (beside its preprocessed data)."""
    return folders.preprocessed / (folders.data_identifier + VIEWS_SUFFIX)


def dataset_modality(plans_manager: PlansManager, configuration: str, channel: int, requested: str) -> str:
    """The modality SAM is shown for `channel`: `requested`, or for "auto" CT where the plans normalise the channel
    as CT (nnU-Net's `channel_names` "CT"), else MR."""
    if requested != "auto":
        return requested
    scheme = plans_manager.get_configuration(configuration).normalization_schemes[channel]
    return "CT" if scheme == CT_SCHEME else "MR"


def dataset_view_settings(settings: RefineSettings, folders: DatasetFolders, channel: int) -> RefineSettings:
    """The settings with the channel's modality resolved; a `ct_window` for a channel that is not CT is a one-line
    error (it would be ignored)."""
    plans_manager = PlansManager(folders.plans())
    schemes = plans_manager.get_configuration(folders.configuration).normalization_schemes
    if not 0 <= channel < len(schemes):
        raise NnsamError(f"--channel {channel} does not exist: {folders.name} has {len(schemes)} channel(s)")
    scheme = schemes[channel]
    modality = dataset_modality(plans_manager, folders.configuration, channel, settings.modality)
    if settings.ct_window is not None and modality != "CT":
        raise NnsamError(f"--ct-window is in HU, but channel {channel} of {folders.name} is not CT ({scheme}); leave "
                         f"--ct-window out, or pass --modality CT if the channel holds HU")
    return replace(settings, modality=modality)


class ViewVolumes:
    """The view volumes of one configuration's cases, made on first use and cached (see the module's docstring)."""

    def __init__(self, folders: DatasetFolders) -> None:
        self.folders = folders
        self.folder = views_folder(folders)
        self.plans = folders.plans()
        self.plans_manager = PlansManager(self.plans)
        self.configuration_manager = self.plans_manager.get_configuration(folders.configuration)
        self.dataset_json = folders.dataset_json()
        self.preprocessing = preprocessing_hash(self.plans, folders.configuration)
        self.made = 0  # view volumes made (not read from the cache) by this object

    def path(self, case_id: str) -> Path:
        return self.folder / f"{case_id}.npz"

    def volume(self, case_id: str, images: list[Path], shape: tuple[int, ...]) -> np.ndarray:
        """The case's raw intensities (C, Z, Y, X) on the preprocessed grid of `shape` (its tensor's, checked)."""
        cached = self._read(case_id, images)
        if cached is None:
            cached = self._make(case_id, images)
        if cached.shape != tuple(shape):
            raise NnsamError(f"{case_id}: its view volume has shape {cached.shape} but its preprocessed image "
                             f"{tuple(shape)}; delete {self.path(case_id)} and rerun (the plans' preprocessor does "
                             f"not reproduce its own output)")
        return cached

    def stale(self, case_id: str, images: list[Path]) -> str | None:
        """Why the cached view of a case cannot be used (None: it can, or there is none yet)."""
        path = self.path(case_id)
        if not path.is_file():
            return None
        try:
            with np.load(path) as stored:
                record = json.loads(str(stored["source"]))
                stored["image"].shape
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            return f"it cannot be read ({type(exc).__name__})"
        return why_stale(record, images, self.preprocessing)

    def _read(self, case_id: str, images: list[Path]) -> np.ndarray | None:
        reason = self.stale(case_id, images)
        if not self.path(case_id).is_file():
            return None
        if reason is not None:
            logger.warning("the SAM view of %s in %s is stale (%s): making it again", case_id, self.folder, reason)
            return None
        with np.load(self.path(case_id)) as stored:
            return np.asarray(stored["image"], dtype=np.float32)

    def _make(self, case_id: str, images: list[Path]) -> np.ndarray:
        """Run the plans' preprocessor without normalisation and cache the result (atomically)."""
        record = source_record(images, self.plans, self.folders.configuration)  # before reading the images
        preprocessor = raw_intensity_preprocessor(self.configuration_manager)
        data, _, _ = preprocessor.run_case([str(p) for p in images], None, self.plans_manager,
                                           self.configuration_manager, self.dataset_json)
        data = np.asarray(data, dtype=np.float32)
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(self.folder)
        with atomic_path(self.path(case_id)) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, image=data, source=np.array(json.dumps(record)))
        self.made += 1
        return data
