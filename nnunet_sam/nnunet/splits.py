"""Cross-validation splits for datasets with fewer labelled cases than nnU-Net's 5 folds need."""

from __future__ import annotations

import logging

from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.datasets import DatasetFolders
from nnunet_sam.utils.atomic import write_json_atomic

logger = logging.getLogger(__name__)

NNUNET_FOLDS = 5
SPLITS_FILE = "splits_final.json"


def fold_name(fold: str) -> str:
    """`-f` as nnU-Net names the fold's folder: "all" or the fold's number; a one-line error otherwise."""
    if fold == "all":
        return fold
    try:
        return str(int(fold))
    except ValueError:
        raise NnsamError(f"-f {fold} is not a fold; use a number (0, 1, ...) or all") from None


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
    write_json_atomic(generate_crossval_split(labelled, seed=12345, n_splits=len(labelled)), path)  # never half
    logger.warning("%s has %d labelled cases, fewer than nnU-Net's %d folds: wrote a leave-one-out split to "
                   "%s (folds 0-%d validate on one case each; -f all trains on all)", folders.name,
                   len(labelled), NNUNET_FOLDS, path, len(labelled) - 1)


def fold_cases(folders: DatasetFolders, fold: str) -> tuple[list[str], list[str]]:
    """The training and validation cases of a fold, as nnUNetTrainer.do_split finds them: fold `all` trains
    on every labelled case (no validation); other folds come from splits_final.json (a leave-one-out split is
    written first for 2-4 labelled cases; for 5 or more without the file, nnU-Net's seeded 5-fold split).
    Unlike do_split, a fold beyond the split file is an error, not a random 80:20 split."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = str(folders.data_folder)
    if not folders.data_folder.is_dir():
        raise NnsamError(f"{folders.data_folder} not found; run nnUNetv2_plan_and_preprocess -d "
                         f"{folders.dataset_id} -c {folders.configuration} first")
    identifiers = sorted(infer_dataset_class(folder).get_identifiers(folder))
    if fold == "all":
        return identifiers, []
    index = int(fold)
    ensure_few_label_splits(folders)
    path = folders.preprocessed / SPLITS_FILE
    if path.is_file():
        splits = load_json(str(path))
    elif len(identifiers) >= NNUNET_FOLDS:
        splits = generate_crossval_split(identifiers, seed=12345, n_splits=NNUNET_FOLDS)
    else:
        raise NnsamError(f"{folders.name} has {len(identifiers)} labelled case(s): only fold 'all' exists (-f all)")
    if not 0 <= index < len(splits):  # nnU-Net would train a random 80:20 split: we do not guess
        raise NnsamError(f"fold {fold} is not in {path} ({len(splits)} folds: 0-{len(splits) - 1}); pick another -f")
    train = [str(case) for case in splits[index]["train"]]  # nnU-Net's generator gives numpy strings
    validation = [str(case) for case in splits[index]["val"]]
    missing = sorted(set(train + validation) - set(identifiers))
    if missing:
        raise NnsamError(f"case {missing[0]} of {path} fold {fold} is not preprocessed in {folders.data_folder}; "
                         f"rerun nnUNetv2_plan_and_preprocess or fix the split")
    return train, validation
