"""Cross-validation splits for datasets with fewer labelled cases than nnU-Net's 5 folds need."""

from __future__ import annotations

import logging

from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunet_sam.nnunet.datasets import DatasetFolders

logger = logging.getLogger(__name__)

NNUNET_FOLDS = 5
SPLITS_FILE = "splits_final.json"


def ensure_few_label_splits(folders: DatasetFolders) -> None:
    """With 2-4 labelled cases and no splits_final.json, write a leave-one-out split (nnU-Net's own
    seeded generator with one fold per case), so folds 0..n-1 train; with 1 case only fold `all` can.

    An existing splits_final.json is never touched."""
    path = folders.preprocessed / SPLITS_FILE
    if path.is_file():
        return
    labelled = sorted(get_filenames_of_train_images_and_targets(str(folders.raw), folders.dataset_json()))
    if len(labelled) >= NNUNET_FOLDS:
        return  # nnU-Net's default 5-fold split works
    if len(labelled) < 2:
        logger.warning("%s has %d labelled case: train with fold 'all' (-f all); its 'validation' is then "
                       "the training case itself", folders.name, len(labelled))
        return
    save_json(generate_crossval_split(labelled, seed=12345, n_splits=len(labelled)), str(path))
    logger.warning("%s has %d labelled cases, fewer than nnU-Net's %d folds: wrote a leave-one-out split to "
                   "%s (folds 0-%d validate on one case each; -f all trains on all)", folders.name,
                   len(labelled), NNUNET_FOLDS, path, len(labelled) - 1)
