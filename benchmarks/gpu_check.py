"""Every GPU path checked and GPU speed measured, in one command, for the few minutes a GPU is lent:

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--results FILE]

Stages, in order; the first one that fails stops the check with its reason (exit status 1):
1. environment: the card, its driver, CUDA and torch;
2. tests: `pytest -m gpu` (tests/test_gpu.py: refinement, embedding cache, fine-tuning and every trainer with AMP
   and torch.compile, each against the CPU);
3. refinement speed: LiteMedSAM's encoder in slices per second at batch sizes 1, 8, 32, 64, bf16 and fp16
   autocast, with and without torch.compile, with peak GPU memory; then the whole refinement engine at batch sizes
   8 and 64 against the naive loop (encode the slice for every box) on the same volume;
4. trainer speed: seconds per iteration of our trainers against nnUNetTrainer (benchmarks/train_speed.py);
5. demo: `nnsam_demo --quick -device cuda` end to end.

It writes the section "GPU check" of benchmarks/RESULTS.md (or --results FILE). `--quick` (about 3 minutes on an
H100) measures fewer settings and skips the demo. `--device cpu --quick` runs a small subset on the CPU, which the
test suite runs (tests/test_gpu_check.py) so that this script cannot rot; it writes the section "GPU check, CPU
subset", never the GPU's. On the lent GPU machine, whose Python lacks nnU-Net and our other dependencies,
benchmarks/gpu_device.sh installs them from wheels carried along and runs this script (README.md, *GPU check*).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from refine_speed import initial_mask, naive_loop, timed  # benchmarks/refine_speed.py
from results import RESULTS, machine_description, markdown_table, update_results_section  # benchmarks/results.py

logger = logging.getLogger("gpu_check")
REPO = Path(__file__).resolve().parent.parent
ENCODER_TARGET = 1000.0  # slices per second on an H100-class card (the encoder is ~75 GFLOPs per slice)
TRAINER_TARGETS = {"nnUNetTrainerSAMPseudo": 1.1, "nnUNetTrainerMeanTeacher": 1.3}  # on a GPU, vs nnUNetTrainer
QUICK_TESTS_ON_CPU = "refinement or embeddings or SAMPseudoMeanTeacher"  # the CPU subset of tests/test_gpu.py
QUICK_TESTS_ON_GPU = "not trainer or SAMPseudoMeanTeacher"  # --quick on a GPU: SAM's tests and one trainer (both streams)


class StageFailed(Exception):
    """A stage found a fault: the check stops with this message."""


@dataclass
class Plan:
    """What the stages measure for a device and --quick."""

    device: torch.device
    quick: bool
    batch_sizes: tuple[int, ...]
    precisions: tuple[str, ...]
    compile_batch_sizes: tuple[int, ...]  # encoder batch sizes also measured with torch.compile
    encoder_slices: int  # slices encoded per measurement (at least one batch)
    engine_shape: tuple[int, int, int]  # the refinement engine's volume
    engine_batch_sizes: tuple[int, ...]
    trainer_shape: tuple[int, int, int]
    trainer_iterations: tuple[int, int]  # warm-up, measured
    tests: str | None  # pytest -k expression (None: every gpu test)
    demo: bool
    stage_timeout: int  # seconds for a subprocess stage

    @classmethod
    def make(cls, device: torch.device, quick: bool) -> "Plan":
        if device.type == "cuda":
            return cls(device, quick, batch_sizes=(1, 64) if quick else (1, 8, 32, 64),
                       precisions=("fp16",) if quick else ("fp16", "bf16"), compile_batch_sizes=(64,) if quick
                       else (1, 8, 32, 64), encoder_slices=512, engine_shape=(64, 256, 256), engine_batch_sizes=(8, 64),
                       trainer_shape=(64, 128, 128), trainer_iterations=(3, 10 if quick else 20),
                       tests=QUICK_TESTS_ON_GPU if quick else None, demo=not quick, stage_timeout=420)
        if not quick:
            raise StageFailed("--device cpu runs only the --quick subset (the full check is for a GPU)")
        return cls(device, quick, batch_sizes=(1, 4), precisions=("fp32",), compile_batch_sizes=(), encoder_slices=4,
                   engine_shape=(6, 96, 96), engine_batch_sizes=(1, 4), trainer_shape=(16, 32, 32),
                   trainer_iterations=(1, 2), tests=QUICK_TESTS_ON_CPU, demo=False, stage_timeout=600)


@dataclass
class Report:
    """Each stage's text and targets, in order, as the RESULTS section shows them."""

    parts: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


# --- 1. environment --------------------------------------------------------------------------------------------

def driver_version() -> str:
    """The NVIDIA driver as nvidia-smi reports it, or why it cannot say."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown (nvidia-smi: {type(exc).__name__})"


def environment_stage(plan: Plan, report: Report) -> None:
    lines = [f"- {machine_description('cpu')}, Python {sys.version.split()[0]}"]
    if plan.device.type == "cuda":
        if not torch.cuda.is_available():
            raise StageFailed("no CUDA GPU is visible (torch.cuda.is_available() is False); on a machine without "
                              "one run --device cpu --quick")
        props = torch.cuda.get_device_properties(plan.device)
        lines.append(f"- card: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, compute capability "
                     f"{props.major}.{props.minor}, {props.multi_processor_count} multiprocessors")
        lines.append(f"- driver {driver_version()}, CUDA {torch.version.cuda}, cuDNN "
                     f"{torch.backends.cudnn.version()}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        lines.append("- no GPU: this is the CPU subset that keeps the script working")
    report.parts.append("### Environment\n\n" + "\n".join(lines))


# --- 2. tests --------------------------------------------------------------------------------------------------

def tests_stage(plan: Plan, report: Report) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rfE", "-p", "no:cacheprovider",
               str(REPO / "tests" / "test_gpu.py")]
    if plan.tests:
        command += ["-k", plan.tests]
    # PYTHONSAFEPATH: the installed nnunet_sam, not the source folder in the working directory (whose trainers live
    # in the top-level trainers/ folder: a non-editable install, as on the GPU machine, maps them into the package)
    env = {**os.environ, "NNSAM_CHECK_DEVICE": str(plan.device), "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=plan.stage_timeout)
    except subprocess.TimeoutExpired:
        raise StageFailed(f"pytest -m gpu ran past {plan.stage_timeout} s") from None
    summary = pytest_summary(done.stdout)
    if done.returncode != 0:
        failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        raise StageFailed(f"pytest -m gpu: {summary}; " + ("; ".join(failed[:4]) or done.stdout[-800:]))
    if "passed" not in summary or "skipped" in summary:
        raise StageFailed(f"pytest -m gpu ran nothing on {plan.device}: {summary}")
    selection = f" (-k '{plan.tests}')" if plan.tests else ""
    report.parts.append(f"### Tests\n\n`NNSAM_CHECK_DEVICE={plan.device} pytest -m gpu tests/test_gpu.py`"
                        f"{selection}: {summary}.")


def pytest_summary(output: str) -> str:
    """pytest's last line, e.g. '7 passed in 12.3s'."""
    lines = [line.strip("= ") for line in output.splitlines() if re.match(r"^=*\s*\d+ (passed|failed|error)", line)
             or re.match(r"^=+ .*(passed|failed|skipped|error).* =+$", line)]
    return lines[-1] if lines else "no pytest summary"


# --- 3. refinement speed ---------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def encoder_throughput(model, inputs: np.ndarray, batch_size: int, slices: int) -> tuple[float, float | None]:
    """Slices per second of the encoder at `batch_size` (after a warm-up call) and peak GPU memory in MiB."""
    batch = np.resize(inputs, (batch_size, *inputs.shape[1:]))
    model.encode(batch)  # warm-up (and compilation)
    model.encode(batch)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    calls = max(1, slices // batch_size)
    synchronize(model.device)
    started = time.perf_counter()
    for _ in range(calls):
        model.encode(batch)
    synchronize(model.device)
    return calls * batch_size / (time.perf_counter() - started), peak_memory_mib(model.device)


def rate_text(rate: float) -> str:
    """A rate with 3 significant digits (0.612, 61.2, 612)."""
    return f"{rate:.3g}" if rate < 1000 else f"{rate:.0f}"


def refinement_stage(plan: Plan, report: Report) -> None:
    from nnunet_sam.demo.synthetic import synthetic_ct_case
    from nnunet_sam.sam import RefineSettings, SamRefiner, load_sam
    from nnunet_sam.sam.views import VolumeViews

    case = synthetic_ct_case(shape=plan.engine_shape, n_organs=3, seed=7)
    model = load_sam("litemedsam", device=plan.device)
    views = VolumeViews.prepare(case.image, case.spacing, model.input_size)
    inputs = views.model_inputs(list(range(case.image.shape[0])))
    rows = []
    for compiled in (False, True):
        sizes = plan.compile_batch_sizes if compiled else plan.batch_sizes
        if not sizes:
            continue
        measured = load_sam("litemedsam", device=plan.device, compile_encoder=True) if compiled else model
        for precision in plan.precisions:
            measured.precision = precision
            for batch_size in sizes:
                rate, memory = encoder_throughput(measured, inputs, batch_size, max(plan.encoder_slices, batch_size))
                rows.append([precision, str(batch_size), "yes" if compiled else "no", rate_text(rate),
                             "-" if memory is None else f"{memory:.0f}"])
                logger.info("encoder %s batch %d compile %s: %.1f slices/s", precision, batch_size, compiled, rate)
    model.precision = "auto"  # the engine below runs as nnsam_refine does
    best = max(float(r[3]) for r in rows)  # rate_text keeps 3 significant digits
    encoder = markdown_table(["autocast", "batch size", "torch.compile", "slices / s", "peak GPU MiB"], rows)

    mask = initial_mask(case.labels)
    naive_seconds, slices = timed(lambda: naive_loop(model, case.image, mask, case.spacing))
    engine_rows = [["naive loop (encode per box, one by one)", f"{naive_seconds:.2f}", rate_text(slices / naive_seconds),
                    "1.00x"]]
    for batch_size in plan.engine_batch_sizes:
        refiner = SamRefiner(model, RefineSettings(batch_size=batch_size))
        seconds, result = timed(lambda: refiner.refine(case.image, mask, case.spacing))
        engine_rows.append([f"engine, batch size {batch_size}", f"{seconds:.2f}",
                            rate_text(result.slices_encoded / seconds), f"{naive_seconds / seconds:.2f}x"])
    engine = markdown_table(["method", "seconds", "slices / s", "speed-up vs naive"], engine_rows)
    if plan.device.type == "cuda":
        report.targets.append(f"- encoder >= {ENCODER_TARGET:.0f} slices/s on an H100-class card: best {best:.0f} -> "
                              f"{'PASS' if best >= ENCODER_TARGET else 'FAIL'}")
    report.parts.append(
        f"### Refinement speed\n\nLiteMedSAM's image encoder on real model inputs (synthetic CT `synthetic_ct_case`, "
        f"seed 7, shape {plan.engine_shape}), {plan.encoder_slices} slices per measurement after two warm-up "
        f"calls; torch.compile as `nnsam_refine --compile` does it (automatic dynamic shapes: after the first "
        f"batch size one graph serves the others):\n\n{encoder}\n\nThe whole refinement (`SamRefiner`, default settings, autocast 'auto') of that "
        f"volume, 3 classes, initial mask = truth grown by one pixel, {slices} slices with foreground:\n\n{engine}")


# --- 4. trainer speed ------------------------------------------------------------------------------------------

def trainer_stage(plan: Plan, report: Report) -> None:
    import train_speed  # benchmarks/train_speed.py

    sys.path.insert(0, str(REPO / "tests"))
    from helpers.trainer_data import environment, prepare_dataset

    warmup, iterations = plan.trainer_iterations
    workers = "1" if plan.device.type == "cpu" else "4"
    with tempfile.TemporaryDirectory(prefix="nnsam-gpu-check-") as tmp, \
            environment({"nnUNet_n_proc_DA": workers, "nnUNet_def_n_proc": "2"}):
        root = Path(tmp)
        prepare_dataset(root, root / "ext_trainers", shape=plan.trainer_shape)
        rows = train_speed.measure(str(plan.device), warmup, iterations)
    targets = train_speed.target_lines(rows, TRAINER_TARGETS) if plan.device.type == "cuda" else []
    report.targets += targets
    compiled = "torch.compile on (nnU-Net's default on CUDA)" if plan.device.type == "cuda" else "no torch.compile"
    report.parts.append(
        f"### Trainer speed\n\nSeconds per iteration (fetch the batch + `train_step`), {iterations} iterations after "
        f"{warmup} warm-up iterations (each process's own, side by side: the first compiles on CUDA), interleaved "
        f"across the four trainer processes; synthetic volumes "
        f"{plan.trainer_shape}, 3d_fullres, batch size {rows[0]['batch_size']}, AMP on CUDA, {compiled}, "
        f"nnUNet_n_proc_DA={workers}:\n\n{train_speed.table(rows)}")


# --- 5. demo ---------------------------------------------------------------------------------------------------

def demo_stage(plan: Plan, report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="nnsam-gpu-demo-") as tmp:
        out = Path(tmp) / "demo"
        command = [sys.executable, "-m", "nnunet_sam.cli.demo", "--quick", "-device", str(plan.device), "-o", str(out)]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=plan.stage_timeout)
        except subprocess.TimeoutExpired:
            raise StageFailed(f"nnsam_demo --quick ran past {plan.stage_timeout} s") from None
        minutes = (time.perf_counter() - started) / 60
        if done.returncode != 0:
            raise StageFailed(f"nnsam_demo --quick -device {plan.device} exited {done.returncode}: "
                              f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        text = (out / "report.md").read_text()
    body = text.split("\n", 1)[1].replace("\n## ", "\n#### ")
    report.parts.append(f"### Demo\n\n`nnsam_demo --quick -device {plan.device}`: **{minutes:.1f} min** end to end."
                        f"\n{body}")


# --- the check -------------------------------------------------------------------------------------------------

STAGES: list[tuple[str, Callable[[Plan, Report], None]]] = [
    ("environment", environment_stage), ("tests", tests_stage), ("refinement speed", refinement_stage),
    ("trainer speed", trainer_stage), ("demo", demo_stage)]


def section_title(device: torch.device) -> str:
    return "GPU check (benchmarks/gpu_check.py)" if device.type == "cuda" else \
        "GPU check, CPU subset (benchmarks/gpu_check.py --device cpu --quick)"


def write_section(plan: Plan, report: Report, status: str, started: float, results: Path) -> None:
    """The section as it stands: written after every stage, so that a run killed at its time limit still leaves
    the stages it finished and says where it stopped."""
    total = (time.perf_counter() - started) / 60
    times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report.seconds.items())
    quick = " --quick" if plan.quick else ""
    body = "\n\n".join([
        f"Command: `python benchmarks/gpu_check.py --device {plan.device.type}{quick}`: {status}. "
        f"Total {total:.1f} min ({times or 'no stage finished'}).",
        *report.parts,
        "### Targets\n\n" + ("\n".join(report.targets) if report.targets else "None measured on this device.")])
    update_results_section(section_title(plan.device), body, results)


def run_check(plan: Plan, results: Path) -> tuple[Report, str | None]:
    """The stages in order until one fails. Returns the report and the failure (None: every stage passed)."""
    report, failure = Report(), None
    started = time.perf_counter()
    for name, stage in STAGES:
        if name == "demo" and not plan.demo:
            report.parts.append("### Demo\n\nNot run with --quick (on the CPU: tests/test_demo.py runs the demo).")
            continue
        write_section(plan, report, f"**stopped in stage {name}** (killed at its time limit, or still running)",
                      started, results)
        logger.info("stage %s ...", name)
        stage_started = time.perf_counter()
        try:
            stage(plan, report)
        except StageFailed as exc:
            failure = f"stage {name} failed: {exc}"
        except Exception as exc:  # a crash is a failed stage too: say where
            logger.exception("stage %s crashed", name)
            failure = f"stage {name} failed: {type(exc).__name__}: {exc}"
        report.seconds[name] = time.perf_counter() - stage_started
        logger.info("stage %s: %s in %.0f s", name, "FAILED" if failure else "done", report.seconds[name])
        if failure:
            break
    write_section(plan, report, f"**FAILED**: {failure}" if failure else "every stage passed", started, results)
    return report, failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer settings, no demo (about 3 minutes on an H100); on the CPU, a small subset")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the Markdown file whose 'GPU check' section is written (default: benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device} is not a device; use cuda, cuda:N or cpu")
    try:
        plan = Plan.make(device, args.quick)
    except StageFailed as exc:
        parser.error(str(exc))
    report, failure = run_check(plan, args.results)
    print("\n".join(report.targets))
    if failure:
        print(f"gpu_check: {failure}", file=sys.stderr)
        return 1
    print(f"gpu_check: every stage passed; results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
