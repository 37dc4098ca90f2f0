"""Faults a user meets in the first week: what a killed or concurrent run leaves behind is never read as work."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from nnunet_sam.nnunet import report as report_module
from nnunet_sam.nnunet.report import CASES_FOLDER, REPORT_NAME, class_rows, write_case_report, write_report
from nnunet_sam.sam.refine import ClassStats, RefineResult
from nnunet_sam.utils.atomic import (TEMP_PREFIX, atomic_path, finished_files, remove_dead_temporaries,
                                     temporary_prefix)


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


def test_parts_aggregate_one_at_a_time_so_the_last_report_has_every_case(tmp_path):
    write_case_report(tmp_path, "case_a", _case("case_a"))
    with report_module._locked(tmp_path / CASES_FOLDER):  # another part is aggregating
        writer = threading.Thread(target=write_report, args=(tmp_path, {"mode": "files"}))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and not (tmp_path / REPORT_NAME).exists()
        write_case_report(tmp_path, "case_b", _case("case_b"))  # that part's last case, finished meanwhile
    writer.join(30)
    assert [case["case"] for case in json.loads((tmp_path / REPORT_NAME).read_text())["cases"]] == [
        "case_a", "case_b"]


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


def _dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    return int(finished.stdout)


def test_a_killed_case_writers_parts_go_and_a_running_writers_stay(tmp_path):
    """nnU-Net's case writers append `.b2nd`, `_seg.b2nd` and `.pkl` to a `temporary_base` name: the one
    clean-up (`remove_dead_temporaries`) removes a dead writer's parts of any case, keeps a running writer's."""
    from nnunet_sam.nnunet.preprocessed_cases import PARTS, temporary_base

    dead = _dead_pid()
    killed = [tmp_path / f"{temporary_prefix(tmp_path / case, dead)}k1ll3d00{part}" for case in ("c1", "c2")
              for part in PARTS]
    running = temporary_base(tmp_path, "c1")  # this process: a case being written
    kept = [tmp_path / f"{running.name}{part}" for part in PARTS] + [tmp_path / "c1.pkl"]
    for path in killed + kept:
        path.write_bytes(b"x")
    assert sorted(remove_dead_temporaries(tmp_path)) == sorted(killed)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


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


def test_a_killed_atomic_writes_temporaries_go_a_running_writers_and_other_files_stay(tmp_path):
    dead, target = _dead_pid(), tmp_path / "case_1.nii.gz"
    (tmp_path / "sub").mkdir()
    killed = [tmp_path / (temporary_prefix(target, dead) + "ab_cd123.nii.gz"),
              tmp_path / "sub" / (temporary_prefix(tmp_path / "sub" / "r.json", dead) + "zzzzzzzz.json")]
    kept = [tmp_path / (temporary_prefix(target) + "ab_cd123.nii.gz"),  # this process: a write in progress
            tmp_path / f"{TEMP_PREFIX}notes-{dead}.txt",  # not named as atomic_path names
            tmp_path / (temporary_prefix(target, dead)[:-7] + "ffffff-ab_cd123.nii.gz"),  # another machine's
            tmp_path / "case_1.nii.gz", tmp_path / f"{TEMP_PREFIX}c1.{dead}.pkl"]
    if kept[2].name == killed[0].name:  # this machine's tag happens to be ffffff
        kept.pop(2)
    for path in killed + kept:
        path.write_bytes(b"x")
    assert remove_dead_temporaries(tmp_path) == killed[:1]
    assert remove_dead_temporaries(tmp_path, recursive=True) == killed[1:]
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


def test_an_atomic_write_has_the_permissions_of_an_ordinary_one(tmp_path):
    ordinary, atomic = tmp_path / "ordinary.json", tmp_path / "atomic.json"
    ordinary.write_text("{}")
    with atomic_path(atomic) as tmp:
        assert tmp.name.startswith(temporary_prefix(atomic)) and tmp.name.endswith(".json")
        tmp.write_text("{}")
    assert atomic.stat().st_mode == ordinary.stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.json", "ordinary.json"]
