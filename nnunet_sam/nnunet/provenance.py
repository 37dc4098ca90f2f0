"""Where a preprocessed unlabelled case and its pseudo labels came from, so that stale work is never trusted.

A preprocessed unlabelled case's `.pkl` carries a *source record* (`SOURCE_KEY`): the fingerprint of each image
file it was made from and a hash of the plans' preprocessing (spacing, normalisation, resampling, transpose,
intensity statistics). The pseudo label's `.pkl` is written from those properties, so it carries the same record.
A case is stale when its image files or the preprocessing changed since; a pseudo label is stale when its record
differs from its preprocessed image's.

Files are compared by size and modification time, and by SHA-256 when those differ (a touched file is the same).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

SOURCE_KEY = "nnsam_source"
# the parts of a configuration that change what its preprocessor writes (not the network or the patch size:
# nnU-Net's ResEnc presets share one data identifier with nnUNetPlans and preprocess identically)
_PREPROCESSING_KEYS = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes",
                       "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                       "resampling_fn_seg_kwargs")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: Path, content: bool = True) -> dict:
    """Size and modification time of a file, and (`content`) the SHA-256 of its bytes."""
    stat = os.stat(path)
    record = {"name": Path(path).name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if content:
        record["sha256"] = sha256_of(path)
    return record


def same_file(record: dict, path: Path) -> bool:
    """Whether `path` still holds what `record` (a `file_fingerprint`) describes."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return False
    if record.get("name") != Path(path).name or record.get("bytes") != stat.st_size:
        return False
    if record.get("mtime_ns") == stat.st_mtime_ns:
        return True
    return "sha256" in record and record["sha256"] == sha256_of(path)


def preprocessing_hash(plans: dict, configuration: str) -> str:
    """A short hash of what the configuration's preprocessor does (same hash: same preprocessed arrays)."""
    manager = PlansManager(plans)
    resolved = manager.get_configuration(configuration).configuration
    wanted = {key: resolved.get(key) for key in _PREPROCESSING_KEYS}
    wanted["transpose_forward"] = plans.get("transpose_forward")
    wanted["intensity_properties"] = plans.get("foreground_intensity_properties_per_channel")
    text = json.dumps(wanted, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_record(images: list[Path], plans: dict, configuration: str) -> dict:
    """The record a preprocessed unlabelled case carries: its image files and the preprocessing."""
    return {"images": [file_fingerprint(p) for p in images], "preprocessing": preprocessing_hash(plans, configuration)}


def why_stale(record: dict | None, images: list[Path], preprocessing: str) -> str | None:
    """Why a case preprocessed with `record` is stale for these image files and preprocessing hash; None if not."""
    if record is None:
        return "it has no source record (preprocessed by an older version)"
    if record.get("preprocessing") != preprocessing:
        return "the plans' preprocessing changed since"
    fingerprints = record.get("images", [])
    if len(fingerprints) != len(images):
        return "its number of channel files changed"
    for fingerprint, path in zip(fingerprints, images):
        if not same_file(fingerprint, path):
            return f"{path.name} changed since"
    return None


def same_source(first: dict | None, second: dict | None) -> bool:
    """Whether two source records describe the same preprocessed arrays: the same preprocessing of image files
    with the same bytes (file times may differ: a file copied back is the same file)."""
    if first is None or second is None:
        return first is second

    def contents(record: dict) -> list:
        return [image.get("sha256") for image in record.get("images", [])]

    return first.get("preprocessing") == second.get("preprocessing") and contents(first) == contents(second)
