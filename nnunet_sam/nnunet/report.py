"""The refinement report: one JSON per case (written as each case finishes, so parallel parts and
resumed runs never clash) and `refine_report.json` aggregating them, plus a summary table."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from nnunet_sam.sam.prompts import evaluation_dice
from nnunet_sam.sam.refine import ClassStats, RefineResult
from nnunet_sam.utils.atomic import finished_files, write_json_atomic

logger = logging.getLogger(__name__)

REPORT_NAME = "refine_report.json"
CASES_FOLDER = "refine_report_cases"
CHANGE_WARNING_DICE = 0.7  # warn when the refined mask's Dice with the initial one is below this


def case_report_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / CASES_FOLDER / f"{case_id}.json"


def write_case_report(out_dir: Path, case_id: str, data: dict) -> None:
    path = case_report_path(out_dir, case_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(data, path)


def class_rows(case_id: str, result: RefineResult, initial: np.ndarray, truth: np.ndarray | None = None) -> dict:
    """Per class of one case: the engine's statistics, plus Dice before/after against `truth` if
    given, counted as nnU-Net's evaluation does (`evaluation_dice`: a class absent from both the truth and the mask
    is left out, None; a class the truth has but the mask lacks counts, at Dice 0). Warns when SAM changed a class
    a lot, so a person looks before training on it."""
    rows = {}
    classes = dict(result.classes)
    if truth is not None:
        for label in (int(v) for v in np.unique(truth) if v > 0 and int(v) not in classes):
            classes[label] = ClassStats(label=label, voxels_after=int((result.mask == label).sum()))
    for label, stats in sorted(classes.items()):
        row = stats.to_dict()
        if stats.dice_initial_refined is not None and stats.dice_initial_refined < CHANGE_WARNING_DICE:
            logger.warning("%s label %d: SAM changed the mask a lot (Dice %.2f with the initial mask); "
                           "look at it before training on it", case_id, label, stats.dice_initial_refined)
        if truth is not None:
            row["dice_before"] = evaluation_dice(truth == label, initial == label)  # None: absent from both
            row["dice_after"] = evaluation_dice(truth == label, result.mask == label)
        rows[str(label)] = row
    return rows


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(cases: list[dict]) -> dict[str, dict]:
    """Per class over all cases: totals of slice counts and means of Dice and SAM IoU."""
    by_label: dict[str, list[dict]] = {}
    for case in cases:
        for label, stats in case["classes"].items():
            by_label.setdefault(str(label), []).append(stats)
    summary = {}
    for label, rows in sorted(by_label.items(), key=lambda kv: int(kv[0])):
        summary[label] = {
            "cases": len(rows),
            "slices_refined": sum(r["slices_refined"] for r in rows),
            "slices_kept": sum(r["slices_kept"] for r in rows),
            "slices_filled": sum(r["slices_filled"] for r in rows),
            "slices_recovered": sum(r.get("slices_recovered", 0) for r in rows),
            "cases_empty": sum(r["voxels_after"] == 0 for r in rows),
            "mean_sam_iou": _mean([r["mean_sam_iou"] for r in rows]),
            "mean_dice_initial_refined": _mean([r["dice_initial_refined"] for r in rows]),
            "mean_dice_before": _mean([r.get("dice_before") for r in rows]),
            "mean_dice_after": _mean([r.get("dice_after") for r in rows]),
        }
    return summary


def warn_absent_classes(summary: dict[str, dict]) -> list[str]:
    """Warn about (and return) the labels that are empty in every pseudo label: the initial model never
    predicts them, so a model trained on these pseudo labels is taught that they are absent."""
    absent = [label for label, s in summary.items() if s["cases"] and s.get("cases_empty") == s["cases"]]
    for label in absent:
        logger.warning("label %s is empty in all %d pseudo labels: the initial model never predicts it, and "
                       "training on them teaches that it is absent; train the initial model longer or label "
                       "more cases", label, summary[label]["cases"])
    return absent


def write_report(out_dir: Path, header: dict) -> dict:
    """Aggregate every finished case of `out_dir` into refine_report.json (atomically) and return it. Parts
    of a split run (-num_parts) aggregate one at a time, so the last to finish writes every case."""
    folder = out_dir / CASES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        cases = [json.loads(p.read_text()) for p in finished_files(folder, "*.json")]
        report = {**header, "summary": summarize(cases), "cases": cases}
        write_json_atomic(report, out_dir / REPORT_NAME)
    return report


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (flock; where there is none, e.g. Windows, no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def summary_table(summary: dict[str, dict]) -> str:
    """A plain-text table of the summary, one row per class."""
    def fmt(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    header = (f"{'label':>5} {'cases':>5} {'refined':>7} {'kept':>5} {'filled':>6} {'recovered':>9} "
              f"{'SAM IoU':>7} {'Dice(init,ref)':>14} {'Dice before':>11} {'Dice after':>10}")
    lines = [header, "-" * len(header)]
    for label, s in summary.items():
        lines.append(f"{label:>5} {s['cases']:>5} {s['slices_refined']:>7} {s['slices_kept']:>5} "
                     f"{s['slices_filled']:>6} {s.get('slices_recovered', 0):>9} {fmt(s['mean_sam_iou']):>7} "
                     f"{fmt(s['mean_dice_initial_refined']):>14} {fmt(s['mean_dice_before']):>11} "
                     f"{fmt(s['mean_dice_after']):>10}")
    return "\n".join(lines)
