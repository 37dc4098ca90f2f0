"""The one exception type users see: a one-line message that names the file and the fix."""

from __future__ import annotations

import os
import sys


class NnsamError(Exception):
    """Bad input or setup. The message is a single line meant for the user."""


def one_line_errors_at_top_level() -> None:
    """In a program that is not ours (nnUNetv2_train running one of our trainers), an NnsamError nobody catches
    prints one line, `nnunet-sam: error: MESSAGE`, and exits with status 2, as our commands do; every other
    exception keeps Python's traceback. Installed only over Python's default hook (never over someone else's)."""
    if sys.excepthook is not sys.__excepthook__:
        return

    def hook(kind, value, traceback) -> None:
        if not issubclass(kind, NnsamError):
            sys.__excepthook__(kind, value, traceback)
            return
        sys.stdout.flush()
        sys.stderr.write(f"nnunet-sam: error: {value}\n")
        sys.stderr.flush()
        os._exit(2)  # an excepthook cannot choose the exit status otherwise (SystemExit is not raised from it)

    sys.excepthook = hook
