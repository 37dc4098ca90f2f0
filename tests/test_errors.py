"""Our errors under programs that are not ours (nnUNetv2_train running our trainers)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = "from nnunet_sam.errors import NnsamError, one_line_errors_at_top_level\n" \
          "one_line_errors_at_top_level()\n" \
          "print('some output first')\n" \
          "raise {error}"


@pytest.mark.parametrize("error, status, last_line", [
    ("NnsamError('no pseudo labels in /x/fold_1; run nnsam_refine -d 1 -f 1')", 2,
     "nnunet-sam: error: no pseudo labels in /x/fold_1; run nnsam_refine -d 1 -f 1"),
    ("ValueError('a bug')", 1, "ValueError: a bug"),  # anything else keeps its traceback
])
def test_an_uncaught_nnsam_error_is_one_line_and_exit_status_2(error, status, last_line):
    done = subprocess.run([sys.executable, "-c", PROGRAM.format(error=error)], capture_output=True, text=True)
    assert done.returncode == status
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == last_line
    assert (len(lines) == 1) == (status == 2)
    assert done.stdout == "some output first\n"  # flushed before exiting


def test_someone_elses_hook_is_kept():
    program = ("import sys\nsys.excepthook = lambda *a: print('theirs')\n"
               + PROGRAM.format(error="NnsamError('x')"))
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 1 and "theirs" in done.stdout
