"""Refinement quality on real labelled images: Dice of degraded masks before and after LiteMedSAM.

Data: the five cases with manual tumour labels shipped in the sdist of `pyradiomics-bhklab==3.1.4`
(brain MR x2, breast MR, lung CT x2), fetched once into `benchmarks/.cache/`. Each label is degraded
with `nnunet_sam.demo.degrade.degrade_labels` (a few seeds per case) and refined with the engine's
default settings; a control run refines the true label itself (a correct mask must not get worse).
Results are printed and written to the "Refinement quality" section of `benchmarks/RESULTS.md`.

Run: `.venv/bin/python benchmarks/refine_quality.py` (see `--help`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from nnunet_sam.demo import degrade
from nnunet_sam.sam import RefineSettings, SamRefiner, load_sam
from nnunet_sam.sam.models import SamModel
from nnunet_sam.sam.prompts import clean_mask, dice
from nnunet_sam.sam.refine import ClassStats
from nnunet_sam.sam.views import slicing_axis

sys.dont_write_bytecode = True  # write nothing but the cache and RESULTS.md (no benchmarks/__pycache__)
from results import RESULTS, machine_description, markdown_table, update_results_section  # noqa: E402 benchmarks/results.py

logger = logging.getLogger("refine_quality")

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
DATA = CACHE / "pyradiomics"
TITLE = "Refinement quality (benchmarks/refine_quality.py)"
PACKAGE, VERSION = "pyradiomics-bhklab", "3.1.4"
SDIST = CACHE / f"pyradiomics_bhklab-{VERSION}.tar.gz"
MEMBER_DIR = f"pyradiomics_bhklab-{VERSION}/data"
CASES = {"brain1": "MR", "brain2": "MR", "breast1": "MR", "lung1": "CT", "lung2": "CT"}
LABEL = 1
MEAN_GAIN_TARGET = 0.05
MAX_CASE_LOSS = 0.02


@dataclass
class Case:
    """One real case: image and binary truth as (z, y, x) arrays, spacing in (z, y, x) order."""

    name: str
    modality: str
    image: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, float, float]
    note: str = ""


@dataclass
class Run:
    """One refinement of one case from one initial mask (`seed` None: the control, truth as mask)."""

    case: str
    seed: int | None
    dice_before: float
    dice_cleaned: float  # the engine's cleaning step alone (no SAM) vs truth
    dice_after: float
    volume_ratio: float  # refined volume / true volume (> 1: over-segmentation)
    stats: ClassStats
    slices_encoded: int
    seconds: float

    @property
    def gain(self) -> float:
        return self.dice_after - self.dice_before


# --- data -------------------------------------------------------------------------------------------

def _data_files(names: Sequence[str]) -> list[Path]:
    return [DATA / f"{name}_{kind}.nrrd" for name in names for kind in ("image", "label")]


def fetch_data(names: Sequence[str]) -> None:
    """Download the sdist (once) and extract the cases' .nrrd files into `benchmarks/.cache/pyradiomics/`.

    Only the package itself is forced to the sdist (`--no-binary PACKAGE`): pip prepares its metadata,
    and `--no-binary :all:` would also force its build requirements (numpy...) to build from source."""
    if all(path.is_file() for path in _data_files(names)):
        return
    if not SDIST.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--no-binary",
                   PACKAGE, "-d", str(CACHE), f"{PACKAGE}=={VERSION}"]
        logger.info("downloading %s==%s: %s", PACKAGE, VERSION, shlex.join(command))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    DATA.mkdir(parents=True, exist_ok=True)
    with tarfile.open(SDIST) as archive:
        for path in _data_files(names):
            source = archive.extractfile(f"{MEMBER_DIR}/{path.name}")
            tmp = path.with_suffix(".part")
            tmp.write_bytes(source.read())
            tmp.replace(path)
    logger.info("extracted %d files into %s", 2 * len(names), DATA)


def fetch_cases(names: Sequence[str]) -> list[Case]:
    """The named cases, fetched into the cache first if needed."""
    fetch_data(names)
    return [load_case(name) for name in names]


def record_invocation(args: argparse.Namespace, argv: Sequence[str] | None) -> argparse.Namespace:
    """Add the seed list (0..--seeds-1) and the command-line arguments (for the report) to `args`."""
    args.seed_list = list(range(args.seeds))
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _read(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(float(s) for s in image.GetSpacing()[::-1])


def load_case(name: str) -> Case:
    """Read one case; the label is binarised (> 0) if it holds values other than {0, 1}."""
    image, spacing = _read(DATA / f"{name}_image.nrrd")
    label, label_spacing = _read(DATA / f"{name}_label.nrrd")
    if image.shape != label.shape or not np.allclose(spacing, label_spacing, rtol=1e-3):
        raise ValueError(f"{name}: image {image.shape} {spacing} and label {label.shape} {label_spacing} differ")
    values = sorted(int(v) for v in np.unique(label))
    note = ""
    if not set(values) <= {0, 1}:
        note = f"label values {values} binarised (> 0)"
        logger.warning("%s: %s", name, note)
    truth = (label > 0).astype(np.uint8)
    return Case(name, CASES[name], image.astype(np.float32), truth, spacing, note)


# --- refinement -------------------------------------------------------------------------------------

def refine_once(refiner: SamRefiner, case: Case, initial: np.ndarray, seed: int | None) -> Run:
    """Refine `initial` on the case's image and score it against the truth."""
    settings = refiner.settings
    axis = settings.axis if settings.axis is not None else slicing_axis(case.spacing, initial.shape)
    cleaned = clean_mask(initial == LABEL, keep=settings.keep, axis=axis, max_gap=settings.max_gap)
    start = time.perf_counter()
    result = refiner.refine(case.image, initial, case.spacing)
    seconds = time.perf_counter() - start
    truth = case.truth == LABEL
    return Run(case=case.name, seed=seed, dice_before=dice(initial == LABEL, truth),
               dice_cleaned=dice(cleaned, truth), dice_after=dice(result.mask == LABEL, truth),
               volume_ratio=float((result.mask == LABEL).sum() / max(1, truth.sum())),
               stats=result.classes[LABEL], slices_encoded=result.slices_encoded, seconds=seconds)


def make_refiner(model: SamModel, case: Case, ct_window: tuple[float, float] | None) -> SamRefiner:
    """Default settings; the CT window (if any) only for CT cases."""
    return SamRefiner(model, RefineSettings(ct_window=ct_window if case.modality == "CT" else None))


def run_benchmark(model: SamModel, cases: list[Case], seeds: Sequence[int],
                  ct_window: tuple[float, float] | None) -> tuple[list[Run], list[Run]]:
    """Degraded runs (every case x seed) and control runs (every case, truth as the initial mask)."""
    jobs = [(case, seed) for case in cases for seed in seeds] + [(case, None) for case in cases]
    degraded, control = [], []
    for case, seed in tqdm(jobs, desc="refine", unit="run"):
        initial = case.truth if seed is None else degrade.degrade_labels(case.truth, seed=seed, body=None)
        run = refine_once(make_refiner(model, case, ct_window), case, initial, seed)
        logger.info("%s seed %s: Dice %.3f -> %.3f (%.1f s, %d slices encoded)", run.case,
                    "truth" if seed is None else seed, run.dice_before, run.dice_after, run.seconds,
                    run.slices_encoded)
        (control if seed is None else degraded).append(run)
    return degraded, control


# --- summary ----------------------------------------------------------------------------------------

@dataclass
class Summary:
    mean_before: float
    mean_cleaned: float
    mean_after: float
    mean_gain: float
    case_gain: dict[str, float]  # mean gain over seeds per case

    @property
    def worst_case(self) -> tuple[str, float]:
        return min(self.case_gain.items(), key=lambda item: item[1])

    def verdicts(self) -> list[tuple[str, bool]]:
        worst_name, worst_gain = self.worst_case
        return [
            (f"mean Dice gain {self.mean_gain:+.3f} >= +{MEAN_GAIN_TARGET:.2f}",
             self.mean_gain >= MEAN_GAIN_TARGET),
            (f"worst case mean gain {worst_gain:+.3f} ({worst_name}) >= -{MAX_CASE_LOSS:.2f}",
             worst_gain >= -MAX_CASE_LOSS),
        ]


def summarize(runs: list[Run]) -> Summary:
    by_case: dict[str, list[Run]] = {}
    for run in runs:
        by_case.setdefault(run.case, []).append(run)
    return Summary(mean_before=float(np.mean([r.dice_before for r in runs])),
                   mean_cleaned=float(np.mean([r.dice_cleaned for r in runs])),
                   mean_after=float(np.mean([r.dice_after for r in runs])),
                   mean_gain=float(np.mean([r.gain for r in runs])),
                   case_gain={name: float(np.mean([r.gain for r in group])) for name, group in by_case.items()})


def _iou(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run_table(runs: list[Run], summary: Summary | None = None) -> str:
    """Markdown table of runs; with `summary` a closing mean row."""
    header = ["case", "seed", "Dice before", "Dice cleaned (no SAM)", "Dice after", "gain",
              "volume after / truth", "refined", "kept", "filled", "mean SAM IoU",
              "slices encoded", "seconds"]
    rows = [[r.case, "truth" if r.seed is None else str(r.seed), f"{r.dice_before:.3f}",
             f"{r.dice_cleaned:.3f}", f"{r.dice_after:.3f}", f"{r.gain:+.3f}", f"{r.volume_ratio:.2f}",
             str(r.stats.slices_refined), str(r.stats.slices_kept), str(r.stats.slices_filled),
             _iou(r.stats.mean_sam_iou), str(r.slices_encoded), f"{r.seconds:.1f}"] for r in runs]
    if summary is not None:
        rows.append(["**mean**", "", f"{summary.mean_before:.3f}", f"{summary.mean_cleaned:.3f}",
                     f"{summary.mean_after:.3f}", f"**{summary.mean_gain:+.3f}**"] + [""] * 6
                    + [f"{sum(r.seconds for r in runs):.0f} (total)"])
    return markdown_table(header, rows)


def case_table(summary: Summary, runs: list[Run]) -> str:
    """Per-case means over seeds (the unit of the no-loss target)."""
    rows = []
    for name, gain in summary.case_gain.items():
        group = [r for r in runs if r.case == name]
        rows.append([name, str(len(group)), f"{np.mean([r.dice_before for r in group]):.3f}",
                     f"{np.mean([r.dice_after for r in group]):.3f}", f"{gain:+.3f}"])
    return markdown_table(["case", "seeds", "mean Dice before", "mean Dice after", "mean gain"], rows)


def control_verdict(control: list[Run]) -> tuple[str, bool]:
    """The control check: no correct (true) mask loses more than MAX_CASE_LOSS Dice."""
    worst = min(control, key=lambda r: r.dice_after)
    return (f"control: lowest Dice after {worst.dice_after:.3f} ({worst.case}) >= {1 - MAX_CASE_LOSS:.2f}",
            worst.dice_after >= 1 - MAX_CASE_LOSS)


def verdict_lines(verdicts: list[tuple[str, bool]]) -> list[str]:
    return [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in verdicts]


# --- report -----------------------------------------------------------------------------------------

def machine_text(device: torch.device) -> str:
    """The shared machine description plus torch's thread count."""
    return f"{machine_description(str(device))}, {torch.get_num_threads()} torch threads"


def code_version() -> str:
    """The git commit measured and the files of nnunet_sam/ that differ from it (read at start)."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=HERE.parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        status = git("status", "--porcelain", "--", "nnunet_sam")
        changed = [line.split(maxsplit=1)[1] for line in status.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def settings_text(settings: RefineSettings) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in asdict(settings).items())


def degradation_paragraph() -> str:
    """The degradation procedure, from `nnunet_sam.demo.degrade`'s docstring."""
    return " ".join((degrade.__doc__ or "").split())


def data_lines(cases: list[Case]) -> list[str]:
    lines = []
    for case in cases:
        spacing = "x".join(f"{s:.2f}" for s in case.spacing)
        slices = int(case.truth.any(axis=(1, 2)).sum())
        line = (f"- {case.name} ({case.modality}): {'x'.join(map(str, case.image.shape))} voxels (z, y, x) at "
                f"{spacing} mm; tumour {int(case.truth.sum())} voxels on {slices} slices")
        lines.append(line + (f"; {case.note}" if case.note else ""))
    return lines


def section(args: argparse.Namespace, device: torch.device, version: str, cases: list[Case], runs: list[Run],
            control: list[Run], summary: Summary, seconds: float) -> str:
    """The body of the RESULTS.md section (the shared helper adds the heading and the date)."""
    window = (f"`ct_window={tuple(args.ct_window)}` on the CT cases" if args.ct_window
              else "no CT window (intensities clipped to the volume's 0.5/99.5 percentiles)")
    command = shlex.join([".venv/bin/python", "benchmarks/refine_quality.py", *args.argv])
    parts = [
        f"Machine: {machine_text(device)}. "
        f"Total runtime: {seconds / 60:.1f} min. The CPU is shared with other work: the seconds are "
        f"indicative only.", "",
        f"Command: `{command}`. Code: {version}.", "",
        f"Data: cases with manual tumour labels from the sdist of `{PACKAGE}=={VERSION}` "
        f"(`data/*_{{image,label}}.nrrd`), fetched into `benchmarks/.cache/`:", "",
        *data_lines(cases), "",
        f"Initial masks: `degrade_labels(truth, seed, body=None)` with seeds {list(args.seed_list)}. "
        f"{degradation_paragraph()}", "",
        f"Refinement: `SamRefiner(load_sam('litemedsam'), RefineSettings())`, the defaults "
        f"({settings_text(RefineSettings())}), {window}. \"Dice cleaned\" is the engine's cleaning step "
        f"alone (largest object, gaps of up to `max_gap` slices bridged, holes filled; no SAM). refined / "
        f"kept / filled / mean SAM IoU are `result.classes[1]`; \"volume after / truth\" > 1 "
        f"means over-segmentation.", "",
        "### Degraded initial masks", "",
        run_table(runs, summary), "",
        "Per case, mean over seeds:", "",
        case_table(summary, runs), "",
        "Targets:", "",
        *verdict_lines(summary.verdicts()), "",
        "### Control: the true label as the initial mask", "",
        "A correct mask must not be made worse: Dice after should stay at 1.0 (\"Dice before\" is 1.0 "
        "by construction).", "",
        run_table(control), "",
        f"Control mean Dice after: {np.mean([r.dice_after for r in control]):.3f}; lowest "
        f"{min(r.dice_after for r in control):.3f} ({min(control, key=lambda r: r.dice_after).case}).", "",
        *verdict_lines([control_verdict(control)]), "",
    ]
    return "\n".join(parts)


# --- command line -----------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8, metavar="N",
                        help="degrade every case with seeds 0..N-1, one refinement each (default 8: about "
                             "6 min on 2 idle CPU cores, 17 on busy ones), plus one control run per case")
    parser.add_argument("--device", default="cpu",
                        help="torch device for LiteMedSAM: cpu (default), cuda, cuda:1 or auto")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"subset of the cases to run (default all: {' '.join(CASES)})")
    parser.add_argument("--ct-window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="CT intensity window (HU) for the CT cases (lung1, lung2), e.g. -1000 400; "
                             "default none: the engine's default percentile clipping, as for the MR cases")
    parser.add_argument("--no-write", action="store_true",
                        help=f"print only; do not update {RESULTS.relative_to(HERE.parent)}")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return record_invocation(args, argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    version = code_version()
    cases = fetch_cases(args.cases)
    model = load_sam("litemedsam", device=args.device)
    window = tuple(args.ct_window) if args.ct_window else None
    runs, control = run_benchmark(model, cases, args.seed_list, window)
    summary = summarize(runs)
    seconds = time.perf_counter() - start
    print("\nDegraded initial masks\n" + run_table(runs, summary))
    print("\nPer case, mean over seeds\n" + case_table(summary, runs))
    print("\nControl (true label as initial mask)\n" + run_table(control))
    print("\n" + "\n".join(verdict_lines(summary.verdicts() + [control_verdict(control)]))
          + f"\n\nTotal runtime {seconds / 60:.1f} min")
    if not args.no_write:
        update_results_section(TITLE, section(args, model.device, version, cases, runs, control, summary, seconds))
        logger.info("wrote %s", RESULTS)
    return 0 if all(ok for _, ok in summary.verdicts()) else 1


if __name__ == "__main__":
    sys.exit(main())
