"""Atomic file writing: write to a temporary file in the target folder, then rename.

A temporary file is named after its target and its writer: ``TEMP_PREFIX + stem + "-" + pid + "-" + host + "-"
+ 8 random characters + endings`` (host: 6 hex digits of the machine's name; writers of nnU-Net's preprocessed
cases add ``_seg.b2nd``, ``.b2nd`` or ``.pkl`` to such a name). A later run removes the ones whose writer no
longer runs on this machine (`remove_dead_temporaries`); a running writer's, or another machine's, are left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TEMP_PREFIX = ".nnsam-tmp-"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMPORARY = re.compile(re.escape(TEMP_PREFIX) + r"(?P<stem>.*)-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-[a-z0-9_]{8}"
                        r"(?P<ending>(_seg)?(\.[^.]*)*)")  # _seg: nnU-Net's writers append "_seg.b2nd" to a base name
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the permissions that an ordinary open() would give the finished file


def temporary_prefix(target: str | os.PathLike, pid: int | None = None) -> str:
    """The start of the names of `target`'s temporary files written by process `pid` (default: this one)."""
    target = Path(target)
    ending = "".join(target.suffixes)
    stem = target.name[: len(target.name) - len(ending)]
    return f"{TEMP_PREFIX}{stem}-{os.getpid() if pid is None else pid}-{_HOST}-"


def process_running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the temporary files of `atomic_path` in `folder` (and its subfolders with `recursive`) whose
    writer no longer runs on this machine (a killed run's); returns them. Safe beside running writers of this
    or another machine."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for path in sorted((folder.rglob if recursive else folder.glob)(TEMP_PREFIX + "*")):
            match = _TEMPORARY.fullmatch(path.name)
            if match and match["host"] == _HOST and not process_running(int(match["pid"])) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` when the block succeeds.

    The temporary name keeps the target's file ending (``.nii.gz``, ``.png`` ...) so writers that
    pick their format from the ending still work. On error the temporary file is removed. The finished file
    has the permissions an ordinary write would give it (not mkstemp's owner-only ones).
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(target), suffix="".join(target.suffixes), dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
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
