"""Faults a user meets in the first week: what a killed or concurrent run leaves behind is never read as work."""

from __future__ import annotations

import json

from nnunet_sam.nnunet.report import CASES_FOLDER, REPORT_NAME, write_case_report, write_report
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
