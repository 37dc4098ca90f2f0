"""Refinement quality on real labelled images: Dice of degraded masks before and after LiteMedSAM.

Data: the five cases with manual tumour labels shipped in the sdist of `pyradiomics-bhklab==3.1.4`
(brain MR x2, breast MR, lung CT x2), fetched once into `benchmarks/.cache/`. Each label is degraded
with `nnunet_sam.demo.degrade.degrade_labels` (a few seeds per case) and refined with the engine's
default settings; a control run refines the true label itself (a correct mask must not get worse).
Each run is refined in several arms: without probabilities (files mode's default), and with a probability
map whose argmax is the initial mask (`degrade.soft_probabilities`: a model unsure near its own borders) used
as a confidence band (the default) or fused with SAM's. Slices are encoded once (embedding cache).
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
from nnunet_sam.sam.embedding_cache import EmbeddingCache
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
EMBEDDINGS = CACHE / "embeddings"  # shared with finetune_quality.py (same model inputs)
MEAN_GAIN_TARGET = 0.08
MIN_CASE_GAIN = 0.0  # no case worse on average
MIN_CONTROL_DICE = 0.98
# arm -> (RefineSettings changes, with the probability map); the first is files mode's default
ARMS = {"no probabilities": ({}, False), "band": ({}, True), "band, any SAM": ({"sure_sam": False}, True),
        "fuse": ({"fuse": True}, True)}


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

    arm: str
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

def refine_once(refiner: SamRefiner, case: Case, initial: np.ndarray, seed: int | None,
                arm: str = "no probabilities", probabilities: np.ndarray | None = None) -> Run:
    """Refine `initial` on the case's image and score it against the truth."""
    settings = refiner.settings
    axis = settings.axis if settings.axis is not None else slicing_axis(case.spacing, initial.shape)
    cleaned = clean_mask(initial == LABEL, None if probabilities is None else probabilities[LABEL],
                         keep=settings.keep, axis=axis, max_gap=settings.max_gap)
    start = time.perf_counter()
    result = refiner.refine(case.image, initial, case.spacing, probabilities=probabilities)
    seconds = time.perf_counter() - start
    truth = case.truth == LABEL
    return Run(arm=arm, case=case.name, seed=seed, dice_before=dice(initial == LABEL, truth),
               dice_cleaned=dice(cleaned, truth), dice_after=dice(result.mask == LABEL, truth),
               volume_ratio=float((result.mask == LABEL).sum() / max(1, truth.sum())),
               stats=result.classes[LABEL], slices_encoded=result.slices_encoded, seconds=seconds)


def make_refiner(model: SamModel, case: Case, ct_window: tuple[float, float] | None, arm: str,
                 cache: EmbeddingCache | None = None) -> SamRefiner:
    """Default settings with the arm's changes; the CT window (if any) only for CT cases."""
    changes, _ = ARMS[arm]
    settings = RefineSettings(ct_window=ct_window if case.modality == "CT" else None, **changes)
    return SamRefiner(model, settings, cache=cache)


def run_benchmark(model: SamModel, cases: list[Case], seeds: Sequence[int], ct_window: tuple[float, float] | None,
                  arms: Sequence[str], cache: EmbeddingCache | None = None) -> tuple[list[Run], list[Run]]:
    """Degraded runs (every case x seed x arm) and control runs (every case x arm, truth as the initial mask).
    The probability map of a run is made from its initial mask with the run's seed (0 for the control)."""
    jobs = [(case, seed) for case in cases for seed in seeds] + [(case, None) for case in cases]
    degraded, control = [], []
    for case, seed in tqdm(jobs, desc="refine", unit="case x seed"):
        initial = case.truth if seed is None else degrade.degrade_labels(case.truth, seed=seed, body=None)
        probabilities = degrade.soft_probabilities(initial, seed=seed or 0, n_classes=LABEL + 1, spacing=case.spacing)
        for arm in arms:
            run = refine_once(make_refiner(model, case, ct_window, arm, cache), case, initial, seed, arm,
                              probabilities if ARMS[arm][1] else None)
            logger.info("%s seed %s, %s: Dice %.3f -> %.3f (%.1f s, %d slices encoded)", run.case,
                        "truth" if seed is None else seed, arm, run.dice_before, run.dice_after, run.seconds,
                        run.slices_encoded)
            (control if seed is None else degraded).append(run)
    return degraded, control


# --- summary ----------------------------------------------------------------------------------------

@dataclass
class Summary:
    """One arm's degraded runs and controls, reduced to the numbers its targets judge."""

    arm: str
    mean_before: float
    mean_cleaned: float
    mean_after: float
    mean_gain: float
    case_gain: dict[str, float]  # mean gain over seeds per case
    case_after: dict[str, float]  # mean Dice after over seeds per case
    control: dict[str, float]  # Dice after of the true label per case
    slices_from_probabilities: int
    voxels_overruled: int

    @property
    def worst_case(self) -> tuple[str, float]:
        return min(self.case_gain.items(), key=lambda item: item[1])

    @property
    def worst_control(self) -> tuple[str, float]:
        return min(self.control.items(), key=lambda item: item[1])

    def verdicts(self) -> list[tuple[str, bool]]:
        worst_name, worst_gain = self.worst_case
        control_name, control_dice = self.worst_control
        return [
            (f"{self.arm}: mean Dice gain {self.mean_gain:+.3f} >= +{MEAN_GAIN_TARGET:.2f}",
             self.mean_gain >= MEAN_GAIN_TARGET),
            (f"{self.arm}: worst case mean gain {worst_gain:+.3f} ({worst_name}) >= {MIN_CASE_GAIN:+.2f}",
             worst_gain >= MIN_CASE_GAIN),
            (f"{self.arm}: control, lowest Dice after {control_dice:.3f} ({control_name}) >= {MIN_CONTROL_DICE:.2f}",
             control_dice >= MIN_CONTROL_DICE),
        ]


def summarize(arm: str, runs: list[Run], control: list[Run]) -> Summary:
    runs = [r for r in runs if r.arm == arm]
    by_case: dict[str, list[Run]] = {}
    for run in runs:
        by_case.setdefault(run.case, []).append(run)
    both = runs + [r for r in control if r.arm == arm]
    return Summary(arm=arm, mean_before=float(np.mean([r.dice_before for r in runs])),
                   mean_cleaned=float(np.mean([r.dice_cleaned for r in runs])),
                   mean_after=float(np.mean([r.dice_after for r in runs])),
                   mean_gain=float(np.mean([r.gain for r in runs])),
                   case_gain={name: float(np.mean([r.gain for r in group])) for name, group in by_case.items()},
                   case_after={name: float(np.mean([r.dice_after for r in group])) for name, group in by_case.items()},
                   control={r.case: r.dice_after for r in control if r.arm == arm},
                   slices_from_probabilities=sum(r.stats.slices_from_probabilities for r in both),
                   voxels_overruled=sum(r.stats.voxels_overruled or 0 for r in both))


def _iou(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run_table(runs: list[Run], summary: Summary | None = None) -> str:
    """Markdown table of runs; with `summary` a closing mean row."""
    header = ["case", "seed", "Dice before", "Dice cleaned (no SAM)", "Dice after", "gain",
              "volume after / truth", "refined", "kept", "filled", "from probabilities", "voxels overruled",
              "mean SAM IoU", "slices encoded", "seconds"]
    rows = [[r.case, "truth" if r.seed is None else str(r.seed), f"{r.dice_before:.3f}",
             f"{r.dice_cleaned:.3f}", f"{r.dice_after:.3f}", f"{r.gain:+.3f}", f"{r.volume_ratio:.2f}",
             str(r.stats.slices_refined), str(r.stats.slices_kept), str(r.stats.slices_filled),
             str(r.stats.slices_from_probabilities), "-" if r.stats.voxels_overruled is None
             else str(r.stats.voxels_overruled), _iou(r.stats.mean_sam_iou), str(r.slices_encoded),
             f"{r.seconds:.1f}"] for r in runs]
    if summary is not None:
        rows.append(["**mean**", "", f"{summary.mean_before:.3f}", f"{summary.mean_cleaned:.3f}",
                     f"{summary.mean_after:.3f}", f"**{summary.mean_gain:+.3f}**"] + [""] * 8
                    + [f"{sum(r.seconds for r in runs):.0f} (total)"])
    return markdown_table(header, rows)


def arms_table(summaries: list[Summary]) -> str:
    """The arms side by side."""
    header = ["arm", "mean Dice before", "mean Dice after", "mean gain", "worst case mean gain",
              "control mean", "control lowest", "slices from probabilities", "voxels overruled"]
    rows = [[s.arm, f"{s.mean_before:.3f}", f"{s.mean_after:.3f}", f"**{s.mean_gain:+.3f}**",
             f"{s.worst_case[1]:+.3f} ({s.worst_case[0]})", f"{np.mean(list(s.control.values())):.3f}",
             f"**{s.worst_control[1]:.3f}** ({s.worst_control[0]})", str(s.slices_from_probabilities),
             str(s.voxels_overruled)] for s in summaries]
    return markdown_table(header, rows)


def case_table(summaries: list[Summary], runs: list[Run]) -> str:
    """Per case: mean Dice before and, per arm, after (over seeds; the unit of the no-loss target), and the
    control."""
    first = summaries[0]
    rows = []
    for name in first.case_gain:
        group = [r for r in runs if r.case == name and r.arm == first.arm]
        rows.append([name, str(len(group)), f"{np.mean([r.dice_before for r in group]):.3f}"]
                    + [f"{s.case_after[name]:.3f} ({s.case_gain[name]:+.3f})" for s in summaries]
                    + [f"{s.control[name]:.3f}" for s in summaries])
    header = (["case", "seeds", "mean Dice before"] + [f"after: {s.arm} (gain)" for s in summaries]
              + [f"control: {s.arm}" for s in summaries])
    return markdown_table(header, rows)


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


def probability_paragraph() -> str:
    """How the probability maps are made, from `degrade.soft_probabilities`'s docstring."""
    return " ".join((degrade.soft_probabilities.__doc__ or "").split())


def section(args: argparse.Namespace, device: torch.device, version: str, cases: list[Case], runs: list[Run],
            control: list[Run], summaries: list[Summary], seconds: float) -> str:
    """The body of the RESULTS.md section (the shared helper adds the heading and the date)."""
    window = (f"`ct_window={tuple(args.ct_window)}` on the CT cases" if args.ct_window
              else "the engine's default view (modality auto: CT in the -160 240 HU window, MR between the "
                   "0.5 and 99.5 percentiles of its nonzero voxels)")
    command = shlex.join([".venv/bin/python", "benchmarks/refine_quality.py", *args.argv])
    arms = "; ".join(f"*{arm}*: " + (", ".join(f"{k}={v!r}" for k, v in ARMS[arm][0].items()) or "defaults")
                     + (", with the probability map" if ARMS[arm][1] else ", no probability map")
                     for arm in args.arms)
    parts = [
        f"Machine: {machine_text(device)}. "
        f"Total runtime: {seconds / 60:.1f} min. The CPU may be shared with other work: the seconds are "
        f"indicative only.", "",
        f"Command: `{command}`. Code: {version}.", "",
        f"Data: cases with manual tumour labels from the sdist of `{PACKAGE}=={VERSION}` "
        f"(`data/*_{{image,label}}.nrrd`), fetched into `benchmarks/.cache/`:", "",
        *data_lines(cases), "",
        f"Initial masks: `degrade_labels(truth, seed, body=None)` with seeds {list(args.seed_list)}. "
        f"{degradation_paragraph()}", "",
        f"Probability maps (arms with probabilities): `soft_probabilities(initial, seed, spacing=case spacing)` (seed 0 for the "
        f"control). {probability_paragraph()} They are built from the initial mask alone, never from the truth: "
        f"a degraded mask's map is confident about its own errors away from their borders.", "",
        f"Refinement: `SamRefiner(load_sam('litemedsam'), RefineSettings(...))`, the defaults "
        f"({settings_text(RefineSettings())}), {window}, embeddings cached (float16) so that every slice is "
        f"encoded once for all arms. Arms: {arms}. \"Dice cleaned\" is the engine's cleaning step alone (no SAM). "
        f"refined / kept / filled / from probabilities / voxels overruled / mean SAM IoU are "
        f"`result.classes[1]`; \"voxels overruled\": voxels where SAM's label differed and the band kept the "
        f"model's label.", "",
        "### The arms side by side", "",
        arms_table(summaries), "",
        "Per case (degraded: mean over seeds; control: the true label refined, should stay 1.0):", "",
        case_table(summaries, runs), "",
        "Targets (issue 13: mean gain >= +0.08, no case worse on average, control >= 0.98 on every case):", "",
        *verdict_lines([v for s in summaries for v in s.verdicts()]), "",
    ]
    for summary in summaries:
        parts += [f"<details><summary>Every run, arm <i>{summary.arm}</i></summary>", "",
                  run_table([r for r in runs if r.arm == summary.arm], summary), "",
                  run_table([r for r in control if r.arm == summary.arm]), "", "</details>", ""]
    return "\n".join(parts)


# --- command line -----------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8, metavar="N",
                        help="degrade every case with seeds 0..N-1, one refinement per arm each (default 8), plus "
                             "one control run per case and arm")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), metavar="ARM",
                        help=f"arms to run (default all: {', '.join(ARMS)})")
    parser.add_argument("--device", default="cpu",
                        help="torch device for LiteMedSAM: cpu (default), cuda, cuda:1 or auto")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"subset of the cases to run (default all: {' '.join(CASES)})")
    parser.add_argument("--ct-window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="CT intensity window (HU) for the CT cases (lung1, lung2), e.g. -1000 400 (a lung "
                             "window); default none: the engine's default (-160 240, the abdomen's soft-tissue "
                             "window)")
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
    runs, control = run_benchmark(model, cases, args.seed_list, window, args.arms, EmbeddingCache(EMBEDDINGS, model))
    summaries = [summarize(arm, runs, control) for arm in args.arms]
    seconds = time.perf_counter() - start
    print("\nThe arms side by side\n" + arms_table(summaries))
    print("\nPer case\n" + case_table(summaries, runs))
    verdicts = [v for summary in summaries for v in summary.verdicts()]
    print("\n" + "\n".join(verdict_lines(verdicts)) + f"\n\nTotal runtime {seconds / 60:.1f} min")
    if not args.no_write:
        update_results_section(TITLE, section(args, model.device, version, cases, runs, control, summaries, seconds))
        logger.info("wrote %s", RESULTS)
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
