"""Where a command may write: a new folder, an empty one, or one it wrote before (its marker is inside).

User folders (imagesTr, labelsTr, a folder of someone's masks) hold no marker, so their files are never
replaced; a killed run's temporary files do not count as content.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nnunet_sam.errors import NnsamError
from nnunet_sam.utils.atomic import finished_files, remove_dead_temporaries

logger = logging.getLogger(__name__)


def check_output_folder(folder: Path, flag: str, marker: str) -> None:
    """One-line errors, before any work, if `folder` (given as `flag`) is a file, holds files that are not ours
    (no `marker` inside), or cannot be created or written."""
    if folder.exists() and not folder.is_dir():
        raise NnsamError(f"{flag} {folder} is a file, not a folder; name a new folder")
    if folder.is_dir():
        content = [p.name for p in finished_files(folder)]
        if content and not (folder / marker).exists():
            raise NnsamError(f"{flag} {folder} already holds files nnunet-sam did not write ({content[0]}"
                             f"{', ...' if len(content) > 1 else ''}); choose a new or empty folder (user files "
                             f"are never overwritten)")
        target = folder
    else:
        target = folder.parent
        if not target.is_dir():
            raise NnsamError(f"the parent of {flag} {folder} does not exist; create {target} first")
    if not os.access(target, os.W_OK | os.X_OK):
        raise NnsamError(f"{flag} {folder}: {target} is not writable; choose a folder you can write to")


def claim_output_folder(folder: Path, marker: str) -> None:
    """Create `folder` (if needed) and its marker folder, before the first output is written into it; remove
    what killed runs left half-written anywhere in it."""
    (folder / marker).mkdir(parents=True, exist_ok=True)
    remove_killed_writes(folder, recursive=True)


def remove_killed_writes(folder: Path, recursive: bool = False) -> None:
    """Remove the temporary files that runs killed while writing left in `folder` (see `atomic_path`)."""
    for path in remove_dead_temporaries(folder, recursive):
        logger.info("removed %s, left by a run killed while writing", path)
