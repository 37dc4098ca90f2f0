"""Atomic file writing: write to a temporary file in the target folder, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TEMP_PREFIX = ".nnsam-tmp-"


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` when the block succeeds.

    The temporary name keeps the target's file ending (``.nii.gz``, ``.png`` ...) so writers that
    pick their format from the ending still work. On error the temporary file is removed.
    """
    target = Path(target)
    name = target.name
    ending = "".join(target.suffixes) if target.suffixes else ""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + name[: len(name) - len(ending)] + "-",
                               suffix=ending, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def finished_files(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """The files of `folder` matching `pattern`, sorted, without the temporary files of writes in progress or
    killed (pathlib's glob matches names starting with a dot, so ".nnsam-tmp-*" would match "*.json")."""
    return sorted(p for p in Path(folder).glob(pattern) if not p.name.startswith(TEMP_PREFIX))


def write_json_atomic(data: Any, target: str | os.PathLike) -> None:
    """Write `data` as indented JSON to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
