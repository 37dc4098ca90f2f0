"""`nnsam_refine -i IMAGES -m MASKS -o OUT`: refine a folder of masks in nnU-Net raw naming."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet.casefiles import (CaseFiles, LoadedCase, find_cases, load_case, load_probabilities,
                                         probability_file, write_mask_like)
from nnunet_sam.nnunet.report import (CASES_FOLDER, case_report_path, class_rows, summary_table, write_case_report,
                                      write_report)
from nnunet_sam.sam.refine import SamRefiner
from nnunet_sam.utils.output_folders import check_output_folder, claim_output_folder
from nnunet_sam.visualize import save_case_overlay

logger = logging.getLogger(__name__)


@dataclass
class FilesJob:
    """What to refine and where to write it."""

    images_dir: Path
    masks_dir: Path
    out_dir: Path
    gt_dir: Path | None = None
    channel: int = 0
    resume: bool = False  # --continue: skip cases whose output and report exist
    num_parts: int = 1
    part_id: int = 0
    overlays: bool = False
    probabilities_dir: Path | None = None  # --probabilities: CASE.npz of nnUNetv2_predict --save_probabilities


def _check_job(job: FilesJob) -> None:
    if job.num_parts < 1:
        raise NnsamError(f"-num_parts {job.num_parts} must be at least 1 (processes that share the cases)")
    if not 0 <= job.part_id < job.num_parts:
        raise NnsamError(f"-part_id must be in 0..{job.num_parts - 1} for -num_parts {job.num_parts}")
    out = job.out_dir.resolve()
    for name, folder in (("images", job.images_dir), ("masks", job.masks_dir), ("ground-truth", job.gt_dir),
                         ("probabilities", job.probabilities_dir)):
        if folder is not None and out == folder.resolve():
            raise NnsamError(f"output folder {job.out_dir} is the {name} folder; choose another -o "
                             f"(user files are never overwritten)")
    check_output_folder(job.out_dir, "-o", CASES_FOLDER)


def _case_done(job: FilesJob, case: CaseFiles, ending: str) -> bool:
    return (job.out_dir / f"{case.case_id}{ending}").is_file() and case_report_path(job.out_dir, case.case_id).is_file()


def _load_checked(job: FilesJob, case: CaseFiles, ending: str) -> tuple[LoadedCase, np.ndarray | None, Path | None]:
    """A case's arrays and its probabilities (with --probabilities) and their file, checked: one-line errors."""
    loaded = load_case(case, ending)
    if not 0 <= job.channel < loaded.image.shape[0]:
        raise NnsamError(f"--channel {job.channel} does not exist: {case.images[0]} has "
                         f"{loaded.image.shape[0]} channel(s) (use 0..{loaded.image.shape[0] - 1})")
    if job.probabilities_dir is None:
        return loaded, None, None
    probabilities_file = probability_file(job.probabilities_dir, case.case_id)
    return loaded, load_probabilities(probabilities_file, loaded.mask, case.mask), probabilities_file


def refine_case(job: FilesJob, case: CaseFiles, ending: str, refiner: SamRefiner) -> dict:
    """Refine one case, write its mask, per-case report and overlay; return the case's report."""
    started = time.perf_counter()
    loaded, probabilities, probabilities_file = _load_checked(job, case, ending)
    result = refiner.refine(loaded.image[job.channel], loaded.mask, loaded.properties["spacing"],
                            probabilities=probabilities, progress=True)
    output = job.out_dir / f"{case.case_id}{ending}"  # out_dir: claimed by refine_folder
    write_mask_like(result.mask, case.mask, output, ending, loaded.properties)
    classes = class_rows(case.case_id, result, loaded.mask, loaded.gt)
    report = {"case": case.case_id, "images": [str(p) for p in case.images], "mask": str(case.mask),
              "probabilities": None if probabilities_file is None else str(probabilities_file),
              "output": str(output), "axis": result.axis, "intensities": result.intensities,
              "slices_encoded": result.slices_encoded,
              "seconds": round(time.perf_counter() - started, 2), "classes": classes}
    write_case_report(job.out_dir, case.case_id, report)
    if job.overlays:
        save_case_overlay(job.out_dir / "overlays" / f"{case.case_id}.png", loaded.image[job.channel],
                          {"initial": loaded.mask, "refined": result.mask, "truth": loaded.gt}, result.axis)
    return report


@dataclass
class FilesPlan:
    """A checked job with its cases found: made before the (slow) model is loaded."""

    job: FilesJob
    cases: list[CaseFiles]
    ending: str
    todo: list[CaseFiles]  # this part's cases still to refine (--continue leaves out finished ones)


def plan_files_job(job: FilesJob) -> FilesPlan:
    """Check the job's folders and pair its files; bad input raises NnsamError before any work."""
    _check_job(job)
    cases, ending = find_cases(job.images_dir, job.masks_dir, job.gt_dir)
    if job.probabilities_dir is not None:
        if not job.probabilities_dir.is_dir():
            raise NnsamError(f"--probabilities {job.probabilities_dir} is not a folder; give the folder of "
                             f"nnUNetv2_predict --save_probabilities output")
        for case in cases:
            probability_file(job.probabilities_dir, case.case_id)
    mine = cases[job.part_id::job.num_parts]
    todo = [c for c in mine if not (job.resume and _case_done(job, c, ending))]
    for case in todo:  # each read once before SAM too (cheap next to refining it): a bad voxel, label, grid or
        _load_checked(job, case, ending)  # probability file in any case fails before any work, not hours into it
    return FilesPlan(job=job, cases=cases, ending=ending, todo=todo)


def refine_folder(plan: FilesPlan, refiner: SamRefiner) -> dict:
    """Refine every case of this part of the job; return the aggregated report (all parts so far)."""
    job, ending = plan.job, plan.ending
    mine = plan.cases[job.part_id::job.num_parts]
    if len(plan.todo) < len(mine):
        logger.info("--continue: %d of %d cases already done, skipped", len(mine) - len(plan.todo), len(mine))
    claim_output_folder(job.out_dir, CASES_FOLDER)  # before the first case: a killed run's folder stays ours
    for case in tqdm(plan.todo, desc="cases", unit="case"):
        report = refine_case(job, case, ending, refiner)
        logger.info("%s: SAM shown %s; %d slices encoded in %.1f s", case.case_id, report["intensities"],
                    report["slices_encoded"], report["seconds"])
    header = {"mode": "files", "images": str(job.images_dir), "masks": str(job.masks_dir),
              "probabilities": None if job.probabilities_dir is None else str(job.probabilities_dir),
              "ground_truth": None if job.gt_dir is None else str(job.gt_dir), "channel": job.channel,
              "sam": {"model": refiner.model.name, "checkpoint": refiner.model.checkpoint,
                      "device": str(refiner.model.device)},
              "settings": asdict(refiner.settings)}
    report = write_report(job.out_dir, header)
    logger.info("refinement summary (%d cases):\n%s", len(report["cases"]), summary_table(report["summary"]))
    return report
