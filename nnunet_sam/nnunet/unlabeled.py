"""Preprocess `imagesUnlabeled/` with a dataset's plans, using nnU-Net's own preprocessor.

Each case is written under its writer's temporary name and renamed when complete, its `.pkl` last
(`preprocessed_cases`), so an interrupted run leaves no case that looks finished; finished cases are skipped on
the next run, and what a killed writer left is removed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
from tqdm import tqdm

from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.casefiles import file_ending_of
from nnunet_sam.nnunet.datasets import DatasetFolders
from nnunet_sam.nnunet.preprocessed_cases import (PROPERTIES, finished_cases, publish_case, read_properties,
                                                  temporary_base, write_properties)
from nnunet_sam.nnunet.provenance import SOURCE_KEY, preprocessing_hash, source_record, why_stale
from nnunet_sam.utils.output_folders import remove_killed_writes

logger = logging.getLogger(__name__)

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class UnlabeledCase:
    case_id: str
    images: list[Path]  # one file per channel, in channel order


def find_unlabeled_cases(folders: DatasetFolders) -> list[UnlabeledCase]:
    """The cases of `imagesUnlabeled/`, checked against dataset.json (channels, file ending) and
    against `imagesTr/` (a case id must not be both labelled and unlabelled)."""
    folder = folders.unlabeled_images
    if not folder.is_dir():
        raise NnsamError(f"{folder} does not exist; put the unlabelled scans there, named like imagesTr "
                         f"(CASE_0000{folders.dataset_json()['file_ending']})")
    dataset_json = folders.dataset_json()
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    by_case: dict[str, dict[int, Path]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if not path.name.endswith(ending):
            found = file_ending_of(path) or path.suffix or "no ending"
            raise NnsamError(f"{path}: file ending {found} differs from the dataset's {ending}; convert it "
                             f"or move it out of {folder.name}")
        match = _CHANNEL.match(path.name[: -len(ending)])
        if match is None:
            raise NnsamError(f"{path}: name must be CASE_XXXX{ending} (XXXX = 4-digit channel index)")
        by_case.setdefault(match["case"], {})[int(match["channel"])] = path
    if not by_case:
        raise NnsamError(f"{folder} holds no images ending in {ending}")
    labelled = set(get_filenames_of_train_images_and_targets(str(folders.raw), dataset_json))
    cases = []
    for case_id, channels in sorted(by_case.items()):
        if case_id in labelled:
            raise NnsamError(f"case {case_id} is in both imagesTr and {folder.name}; rename the unlabelled one")
        expected = list(range(n_channels))
        if sorted(channels) != expected:
            missing = [f"{case_id}_{c:04d}{ending}" for c in expected if c not in channels]
            extra = [channels[c].name for c in channels if c not in expected]
            what = f"is missing {', '.join(missing)}" if missing else f"has extra channel files {', '.join(extra)}"
            raise NnsamError(f"case {case_id} in {folder} {what}; dataset.json lists {n_channels} channel(s)")
        cases.append(UnlabeledCase(case_id, [channels[c] for c in expected]))
    return cases


def _no_class_locations(plans_manager: PlansManager, dataset_json: dict) -> dict:
    """nnU-Net's data loader reads `class_locations`: unlabelled cases have nothing to oversample. With an
    ignore label it also looks up the 'annotated' key, which must exist (empty: a random crop)."""
    label_manager = plans_manager.get_label_manager(dataset_json)
    if not label_manager.has_ignore_label:
        return {}
    return {tuple([-1] + label_manager.all_labels): np.zeros((0, 4), dtype=np.int64)}


def _preprocess_one(args: tuple) -> str:
    case, out_dir, plans, configuration, dataset_json = args
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    temp = temporary_base(out_dir, case.case_id)  # its own name: two runs never share one
    source = source_record(case.images, plans, configuration)  # before reading: a later change makes it stale
    preprocessor.run_case_save(str(temp), [str(p) for p in case.images], None, plans_manager,
                               configuration_manager, dataset_json)
    properties = load_pickle(f"{temp}{PROPERTIES}")
    properties["class_locations"] = _no_class_locations(plans_manager, dataset_json)
    properties[SOURCE_KEY] = source
    write_properties(properties, temp)
    publish_case(temp, out_dir, case.case_id)  # a stale case is unfinished until its new .pkl is in place
    return case.case_id


def stale_cases(folders: DatasetFolders, cases: list[UnlabeledCase], plans: dict | None = None) -> dict[str, str]:
    """The finished preprocessed cases among `cases` that no longer match their image files or the plans'
    preprocessing: case id -> why (they are preprocessed again; their pseudo labels are refused)."""
    plans = folders.plans() if plans is None else plans
    expected = preprocessing_hash(plans, folders.configuration)
    finished = set(finished_cases(folders.unlabeled_data))
    stale = {}
    for case in cases:
        if case.case_id in finished:
            properties = read_properties(folders.unlabeled_data, case.case_id)
            reason = why_stale(properties.get(SOURCE_KEY), case.images, expected)
            if reason is not None:
                stale[case.case_id] = reason
    return stale


def require_preprocessed(folders: DatasetFolders) -> None:
    """Refuse a configuration whose labelled cases nnU-Net has not preprocessed (plans, splits and the
    unlabelled cases' preprocessing all come from there)."""
    if not folders.data_folder.is_dir():
        raise NnsamError(f"-c {folders.configuration}: {folders.data_folder} not found; run nnUNetv2_preprocess -d "
                         f"{folders.dataset_id} -c {folders.configuration} -plans_name {folders.plans_identifier} "
                         f"first")


def preprocess_unlabeled(folders: DatasetFolders, num_processes: int = 1, overwrite: bool = False,
                         progress: bool = True, cases: list[UnlabeledCase] | None = None) -> list[str]:
    """Preprocess every unlabelled case (or those of `cases`, as `find_unlabeled_cases` gives them) not
    yet done (all with `overwrite`); return the ids processed."""
    if cases is None:
        cases = find_unlabeled_cases(folders)
    require_preprocessed(folders)
    out_dir = folders.unlabeled_data
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_killed_writes(out_dir)  # a running writer's (another part of a split run) are kept
    plans, dataset_json = folders.plans(), folders.dataset_json()
    stale = {} if overwrite else stale_cases(folders, cases, plans)
    for case_id, reason in stale.items():
        logger.warning("preprocessed unlabelled case %s is stale (%s): preprocessing it again", case_id, reason)
    done = set() if overwrite else set(finished_cases(out_dir)) - set(stale)
    todo = [c for c in cases if c.case_id not in done]
    logger.info("%d unlabelled case(s) in %s: %d to preprocess, %d already done -> %s", len(cases),
                folders.unlabeled_images, len(todo), len(cases) - len(todo), out_dir)
    jobs = [(c, out_dir, plans, folders.configuration, dataset_json) for c in todo]
    bar = dict(total=len(jobs), desc="preprocess unlabelled", unit="case", disable=not progress)
    if num_processes <= 1 or len(jobs) <= 1:
        return [_preprocess_one(job) for job in tqdm(jobs, **bar)]
    with get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        return list(tqdm(pool.imap_unordered(_preprocess_one, jobs), **bar))
