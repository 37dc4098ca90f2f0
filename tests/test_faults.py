"""Faults a user meets in the first week: what a killed or concurrent run leaves behind is never read as work."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nnunet_sam.nnunet.report import CASES_FOLDER, REPORT_NAME, class_rows, write_case_report, write_report
from nnunet_sam.nnunet.unlabeled import remove_stale_temporaries
from nnunet_sam.sam.refine import ClassStats, RefineResult
from nnunet_sam.utils.atomic import TEMP_PREFIX, finished_files


def _case(case_id: str) -> dict:
    stats = {"label": 1, "voxels_before": 10, "voxels_after": 12, "slices_refined": 1, "slices_kept": 0,
             "slices_filled": 0, "slices_recovered": 0, "mean_sam_iou": 0.9, "dice_initial_refined": 0.9}
    return {"case": case_id, "classes": {"1": stats}}


def test_a_killed_writers_partial_case_report_is_not_aggregated(tmp_path):
    write_case_report(tmp_path, "case_a", _case("case_a"))
    partial = tmp_path / CASES_FOLDER / f"{TEMP_PREFIX}case_b-x1y2.json"  # a run killed while writing case_b
    partial.write_text('{"case": "case_b", "clas')
    report = write_report(tmp_path, {"mode": "files"})
    assert [case["case"] for case in report["cases"]] == ["case_a"]
    assert json.loads((tmp_path / REPORT_NAME).read_text())["summary"]["1"]["cases"] == 1


def test_finished_files_leave_out_temporaries_only(tmp_path):
    for name in ("b.json", "a.json", f"{TEMP_PREFIX}a-123.json", ".hidden.json", "c.txt"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in finished_files(tmp_path, "*.json")] == [".hidden.json", "a.json", "b.json"]


@pytest.mark.parametrize("module, body, argv, has_continue", [
    ("refine", "_refine", ["-d", "1"], True),
    ("finetune", "_finetune", ["-d", "1"], True),
    ("preprocess_unlabeled", "_body", ["-d", "1"], False),
    ("demo", "_demo", ["-o", "demo"], False),
])
def test_ctrl_c_names_only_flags_the_command_has(monkeypatch, capsys, module, body, argv, has_continue):
    cli = importlib.import_module(f"nnunet_sam.cli.{module}")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, body, interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 130
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "interrupted; " in message and ("--continue" in message) == has_continue
    assert ("--continue" in cli.build_parser().format_help()) == has_continue


def test_stale_temporaries_of_dead_writers_go_and_live_writers_keep_theirs(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead, alive = int(finished.stdout), os.getpid()
    names = {"fixed": f"{TEMP_PREFIX}c1.b2nd", "dead": f"{TEMP_PREFIX}c1.{dead}_seg.b2nd",
             "alive": f"{TEMP_PREFIX}c1.{alive}.pkl", "other case": f"{TEMP_PREFIX}c2.{dead}.pkl",
             "finished": "c1.pkl"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    remove_stale_temporaries(tmp_path, ["c1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["alive"], names["other case"], names["finished"]])


def test_a_class_the_mask_misses_but_the_truth_has_counts_in_the_dice(tmp_path):
    initial = np.zeros((2, 8, 8), dtype=np.int16)
    initial[:, 1:4, 1:4] = 1
    truth = initial.copy()
    truth[:, 5:7, 5:7] = 2  # the weak mask never found class 2
    result = RefineResult(mask=initial.copy(), classes={1: ClassStats(label=1, voxels_before=18, voxels_after=18)},
                          axis=0, slices_encoded=2)
    rows = class_rows("case", result, initial, truth)
    assert rows["2"]["dice_before"] == rows["2"]["dice_after"] == 0.0 and rows["2"]["voxels_before"] == 0
    write_case_report(tmp_path, "case", {"case": "case", "classes": rows})
    summary = write_report(tmp_path, {})["summary"]
    assert summary["2"]["mean_dice_after"] == 0.0 and summary["1"]["mean_dice_after"] == 1.0
