"""nnU-Net's preprocessed case files as our folders hold them (`_unlabeled`, `_pseudolabels/PLANS/fold_F`).

A case is `CASE.b2nd` (image, C x Z x Y x X float32), `CASE_seg.b2nd` (labels, int16, -1 outside the nonzero
mask) and `CASE.pkl` (properties, with `class_locations`). The `.pkl` is written last and removed first, so it
marks a finished case: a case without it is never read. Each writer writes its parts under its own temporary
base name (`temporary_base`: pid and machine in it, nnU-Net's writers append the parts' endings), so
`utils.atomic.remove_dead_temporaries` removes what a killed writer left and keeps a running writer's.
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path

from batchgenerators.utilities.file_and_folder_operations import load_pickle, write_pickle

from nnunet_sam.utils.atomic import temporary_prefix

IMAGE, SEGMENTATION, PROPERTIES = ".b2nd", "_seg.b2nd", ".pkl"
PARTS = (IMAGE, SEGMENTATION, PROPERTIES)  # in the order they are published: the .pkl last
_RANDOM = string.ascii_lowercase + string.digits


def part_path(folder: Path, case_id: str, part: str) -> Path:
    """The file of one part (`IMAGE`, `SEGMENTATION` or `PROPERTIES`) of a case."""
    return folder / f"{case_id}{part}"


def finished_cases(folder: Path) -> list[str]:
    """Case ids whose `.pkl` exists: it is written last, so it marks a finished case."""
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(PROPERTIES)] for p in folder.iterdir()
                  if p.name.endswith(PROPERTIES) and not p.name.startswith("."))


def remove_case(folder: Path, case_id: str) -> None:
    """Remove one case (image and/or segmentation) from `folder`, the .pkl first: a case without it is not
    finished, so no trainer reads what remains if this is interrupted."""
    for part in (PROPERTIES, IMAGE, SEGMENTATION):
        part_path(folder, case_id, part).unlink(missing_ok=True)


def temporary_base(folder: Path, case_id: str) -> Path:
    """A base name for this process's temporary parts of `case_id` in `folder` (append a part's ending)."""
    random = "".join(secrets.choice(_RANDOM) for _ in range(8))
    return folder / f"{temporary_prefix(folder / case_id)}{random}"


def publish_case(temporary: Path, folder: Path, case_id: str, parts: tuple[str, ...] = PARTS) -> None:
    """Rename the temporary parts written under base name `temporary` onto the case's files, the .pkl last; an
    earlier version's .pkl goes first, so the case is unfinished until the new one is in place."""
    part_path(folder, case_id, PROPERTIES).unlink(missing_ok=True)
    for part in parts:
        os.replace(f"{temporary}{part}", part_path(folder, case_id, part))


def read_properties(folder: Path, case_id: str) -> dict:
    """A finished case's properties (its `.pkl`)."""
    return load_pickle(str(part_path(folder, case_id, PROPERTIES)))


def write_properties(properties: dict, temporary: Path) -> None:
    """Write the properties part under the temporary base name `temporary`."""
    write_pickle(properties, f"{temporary}{PROPERTIES}")
