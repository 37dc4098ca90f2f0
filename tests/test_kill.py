"""kill -9 tests: the installed console scripts run as real subprocesses, are killed with SIGKILL at a random
point of their work (`random.Random(seed)` picks the delay after a sign of progress), then resumed. Checked:
the resumed outputs equal those of an uninterrupted run, no temporary file (TEMP_PREFIX) remains, and nothing
half-written is visible as finished (a case whose `.pkl`, the part written last, exists has readable parts).

Every command runs in its own process group and the whole group is killed (as a batch system or a dying node
ends a job: nnU-Net's data-augmentation and export workers go with it). The dataset-mode commands work on
copies of the session's planned dataset (shutil.copytree keeps the file times that the source records of the
preprocessed cases compare), never on the dataset the other test files use.

SAM runs with `--context tile --grid 3` (nine slices per encoder call): the test is about killing and resuming,
which takes the same code path in every context, and the encoder costs several seconds per call on a shared
2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CONFIG, PlannedDataset, degrade, make_phantom, write_nifti
from nnunet_sam.nnunet.report import CASES_FOLDER, REPORT_NAME
from nnunet_sam.utils.atomic import TEMP_PREFIX, finished_files

BIN = Path(sys.executable).parent  # the venv's console scripts
SEEDS = (0, 1)
SAM_FAST = ("--context", "tile", "--grid", "3")
DATA_ID = f"nnUNetPlans_{CONFIG}"
BASELINE = f"nnUNetTrainerShort__nnUNetPlans__{CONFIG}"
PSEUDO_TRAINER = "nnUNetTrainerSAMPseudoShort"
SHORT_EPOCHS = 2  # conftest writes the short trainers with write_short_trainers(epochs=2)
UNLABELLED_SLICES = 8  # z-slices kept of each unlabelled scan of the copies
EXTRA_UNLABELLED = 8  # more cases for the preprocessing kills (25-100 ms each here), so that a kill lands mid-work
RUN_TIMEOUT = 900.0  # seconds; a hung command fails its test instead of the session
POLL = 0.001  # seconds between looks for a sign of progress
FILES_SHAPE = (8, 48, 48)  # files-mode phantoms: 8 slices


# --- datasets: copies of the session's planned dataset -------------------------------------------------

@dataclass
class DatasetCopy:
    """One copy of the planned dataset: nnUNet_raw, nnUNet_preprocessed and nnUNet_results under `root`."""

    root: Path
    name: str
    dataset_id: int
    env: dict

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed" / self.name

    @property
    def unlabeled(self) -> Path:
        return self.preprocessed / f"{DATA_ID}_unlabeled"

    @property
    def pseudo_labels(self) -> Path:
        return self.preprocessed / f"{DATA_ID}_pseudolabels" / "nnUNetPlans" / "fold_0"

    def fold(self, trainer: str) -> Path:
        return self.root / "results" / self.name / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"


def _copy_dataset(raw: Path, preprocessed: Path, baseline: Path, name: str, dataset_id: int, env: dict,
                  dest: Path, ignore: Callable | None = None) -> DatasetCopy:
    """Copy a dataset's raw and preprocessed folders (without what `ignore` names) and the baseline's results,
    file times kept, to `dest`."""
    shutil.copytree(raw, dest / "raw" / name)
    shutil.copytree(preprocessed, dest / "preprocessed" / name, ignore=ignore)
    shutil.copytree(baseline, dest / "results" / name / BASELINE, ignore=shutil.ignore_patterns("checkpoint_best.pth"))
    paths = {f"nnUNet_{folder}": str(dest / folder) for folder in ("raw", "preprocessed", "results")}
    return DatasetCopy(dest, name, dataset_id, {**env, **paths})


def copy_of(source: DatasetCopy, dest: Path) -> DatasetCopy:
    """A copy of a copy, everything it holds included."""
    baseline = source.root / "results" / source.name / BASELINE
    return _copy_dataset(source.root / "raw" / source.name, source.preprocessed, baseline, source.name,
                         source.dataset_id, source.env, dest)


# --- processes ---------------------------------------------------------------------------------------

def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start a console script of the venv in a process group of its own, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([str(BIN / command[0]), *command[1:]], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group we started `process` in (it and the workers it started), and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def tail(log: Path, size: int = 3000) -> str:
    """The end of a command's output, for assertion messages."""
    return log.read_text(errors="replace")[-size:]


def finish(process: subprocess.Popen, log: Path) -> None:
    """Wait for `process` to end by itself (no worker left behind); it must succeed."""
    try:
        status = process.wait(timeout=RUN_TIMEOUT)
    finally:
        kill_group(process)
    assert status == 0, f"{process.args} exited with status {status}:\n{tail(log)}"


def run_to_end(command: list[str], env: dict, log: Path) -> None:
    """Run `command` uninterrupted; it must succeed."""
    finish(start(command, env, log), log)


def run_at_once(commands: list[list[str]], env: dict, logs_in: Path) -> None:
    """Start `commands` together (logs run0.log, run1.log ... in `logs_in`); each must succeed."""
    logs = [logs_in / f"run{index}.log" for index in range(len(commands))]
    processes = [start(command, env, log) for command, log in zip(commands, logs)]
    for process, log in zip(processes, logs):
        finish(process, log)


def files_under(folder: Path) -> list[str]:
    """The files under `folder`, relative, sorted (none if it does not exist)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


@dataclass
class Kill:
    """Where a kill landed: the delay after the sign of progress, and the files of the watched folder then."""

    seed: int
    delay: float
    existed: list[str]

    def __str__(self) -> str:
        return f"seed {self.seed}: killed {self.delay:.3f} s after work began; the watched folder held {self.existed}"


def kill_during(command: list[str], env: dict, log: Path, began: Callable[[], bool], seed: int, longest: float,
                watched: Path) -> Kill:
    """Run `command`, wait for `began()` (polling), sleep a random delay in [0, `longest`] s (`seed`), SIGKILL
    its process group. The command must still have been running: each seed interrupts its work."""
    delay = random.Random(seed).uniform(0.0, longest)
    process = start(command, env, log)
    deadline = time.monotonic() + RUN_TIMEOUT
    while not began():
        assert process.poll() is None, f"{command[0]} ended ({process.returncode}) before its work began:\n{tail(log)}"
        assert time.monotonic() < deadline, f"{command[0]} showed no progress in {RUN_TIMEOUT} s:\n{tail(log)}"
        time.sleep(POLL)
    time.sleep(delay)
    running = process.poll() is None
    kill_group(process)
    kill = Kill(seed, delay, files_under(watched))
    print(kill)  # shown with the test's output (pytest -rP, or on failure)
    assert running, f"{command[0]} had finished before the kill, nothing was interrupted ({kill})"
    return kill


# --- what is checked ---------------------------------------------------------------------------------

def temporaries(root: Path) -> list[str]:
    """Files and folders under a temporary name (pathlib's rglob sees names starting with a dot; a folder that
    does not exist holds none)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(TEMP_PREFIX + "*"))


def half_written(folder: Path, parts: tuple[str, ...]) -> list[str]:
    """The cases of `folder` that look finished (their `.pkl`, written last, exists) with a part that is missing
    or cannot be read."""
    problems = []
    for pkl in folder.glob("*.pkl"):
        if pkl.name.startswith(TEMP_PREFIX):
            continue
        for part in parts:
            path = folder / (pkl.name[:-4] + part)
            try:
                blosc2.open(str(path), mode="r")[:]
            except Exception as exc:  # any failure to read is what this check looks for
                problems.append(f"{path.name}: {type(exc).__name__}: {exc}")
    return problems


def assert_nothing_half_written(folder: Path, parts: tuple[str, ...], when: object) -> None:
    """No case of `folder` looks finished with a part missing or unreadable (`when`: for the message)."""
    problems = half_written(folder, parts)
    assert not problems, f"half-written cases look finished: {problems} ({when})"


def normalized_json(path: Path, root: Path) -> object:
    """A JSON report with `root` written as <root> and the run times ("seconds") left out: what differs between
    two runs of the same deterministic computation in different folders."""
    def drop_seconds(value: object) -> object:
        if isinstance(value, dict):
            return {k: drop_seconds(v) for k, v in value.items() if k != "seconds"}
        if isinstance(value, list):
            return [drop_seconds(v) for v in value]
        return value

    return drop_seconds(json.loads(path.read_text().replace(str(root), "<root>")))


def differences(actual: Path, reference: Path, actual_root: Path, reference_root: Path) -> list[str]:
    """What differs between two output folders. The refinement and nnU-Net's preprocessing are deterministic on
    CPU, so: the same file names; `.b2nd` arrays equal once decoded (blosc2 compresses with 2 threads and its
    bytes differ between runs of equal arrays); JSON reports equal but for paths and run times; every other file
    (`.pkl`, `.nii.gz`) byte-identical."""
    names = files_under(actual)
    if names != files_under(reference):
        return [f"files {names} != {files_under(reference)}"]
    found = []
    for name in names:
        mine, theirs = actual / name, reference / name
        if name.endswith(".b2nd"):
            a, b = blosc2.open(str(mine), mode="r")[:], blosc2.open(str(theirs), mode="r")[:]
            same = a.dtype == b.dtype and np.array_equal(a, b)
        elif name.endswith(".json"):
            same = normalized_json(mine, actual_root) == normalized_json(theirs, reference_root)
        else:
            same = mine.read_bytes() == theirs.read_bytes()
        if not same:
            found.append(name)
    return found


def assert_resumed_like_reference(actual: Path, reference: Path, actual_root: Path, reference_root: Path,
                                  kill: Kill) -> None:
    """No temporary file under `actual_root`, and the outputs in `actual` equal the reference's."""
    left = temporaries(actual_root)
    assert not left, f"temporary files remain after the resumed run: {left} ({kill})"
    differing = differences(actual, reference, actual_root, reference_root)
    assert not differing, f"resumed outputs differ from an uninterrupted run's: {differing} ({kill})"


# --- fixtures: the uninterrupted references, once per module -----------------------------------------

@pytest.fixture(scope="module")
def pristine(planned_dataset: PlannedDataset, baseline: Path, tmp_path_factory: pytest.TempPathFactory) -> DatasetCopy:
    """The planned dataset with its baseline, copied once before this module changes anything; without the
    unlabelled and pseudo-label folders that other test files may have made in it. Its unlabelled scans are cut
    to their middle UNLABELLED_SLICES slices (SAM decodes each slice once per class, seconds per call here)."""
    made_elsewhere = shutil.ignore_patterns(f"{DATA_ID}_unlabeled", f"{DATA_ID}_pseudolabels")
    copy = _copy_dataset(planned_dataset.raw, planned_dataset.preprocessed, baseline.parent, planned_dataset.name,
                         planned_dataset.dataset_id, planned_dataset.env, tmp_path_factory.mktemp("pristine"),
                         made_elsewhere)
    for path in (copy.root / "raw" / copy.name / "imagesUnlabeled").glob("*.nii.gz"):
        image = sitk.ReadImage(str(path))
        first = (image.GetSize()[2] - UNLABELLED_SLICES) // 2
        sitk.WriteImage(image[:, :, first:first + UNLABELLED_SLICES], str(path), True)
    return copy


@pytest.fixture(scope="module")
def more_unlabelled(pristine: DatasetCopy, tmp_path_factory: pytest.TempPathFactory) -> DatasetCopy:
    """The pristine copy with EXTRA_UNLABELLED more unlabelled cases (copies of its scans under new names)."""
    copy = copy_of(pristine, tmp_path_factory.mktemp("more_unlabelled"))
    images = copy.root / "raw" / copy.name / "imagesUnlabeled"
    scans = sorted(images.glob("*_0000.nii.gz"))
    for index in range(EXTRA_UNLABELLED):
        shutil.copy2(scans[index % len(scans)], images / f"extra_{index:03d}_0000.nii.gz")
    return copy


def preprocess_command(copy: DatasetCopy) -> list[str]:
    return ["nnsam_preprocess_unlabeled", "-d", str(copy.dataset_id)]


def refine_dataset_command(copy: DatasetCopy) -> list[str]:
    return ["nnsam_refine", "-d", str(copy.dataset_id), "-c", CONFIG, "-f", "0", "-tr", "nnUNetTrainerShort",
            "--disable_tta", "-device", "cpu", *SAM_FAST]


@pytest.fixture(scope="module")
def preprocessed_reference(more_unlabelled: DatasetCopy, tmp_path_factory: pytest.TempPathFactory) -> DatasetCopy:
    """nnsam_preprocess_unlabeled run once, uninterrupted."""
    copy = copy_of(more_unlabelled, tmp_path_factory.mktemp("preprocessed_reference"))
    run_to_end(preprocess_command(copy), copy.env, copy.root / "preprocess.log")
    return copy


@pytest.fixture(scope="module")
def refined_reference(pristine: DatasetCopy, tmp_path_factory: pytest.TempPathFactory) -> DatasetCopy:
    """nnsam_refine -d run once, uninterrupted (it preprocesses the unlabelled cases first)."""
    copy = copy_of(pristine, tmp_path_factory.mktemp("refined_reference"))
    run_to_end(refine_dataset_command(copy), copy.env, copy.root / "refine.log")
    return copy


@dataclass
class FilesJob:
    """Files-mode input folders and the environment to run in."""

    root: Path
    env: dict

    def command(self, out: Path, *extra: str) -> list[str]:
        return ["nnsam_refine", "-i", str(self.root / "images"), "-m", str(self.root / "masks"), "-o", str(out),
                "-device", "cpu", *SAM_FAST, *extra]


@pytest.fixture(scope="module")
def files_job(tmp_path_factory: pytest.TempPathFactory) -> FilesJob:
    """Three tiny phantom cases (8 slices) with degraded masks, in nnU-Net raw naming."""
    root = tmp_path_factory.mktemp("files")
    for index in range(3):
        phantom = make_phantom(shape=FILES_SHAPE, seed=index)
        write_nifti(phantom.image, root / "images" / f"case{index}_0000.nii.gz")
        write_nifti(degrade(phantom.labels), root / "masks" / f"case{index}.nii.gz", dtype=np.int16)
    return FilesJob(root, {**os.environ, "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "2"})


@pytest.fixture(scope="module")
def files_reference(files_job: FilesJob) -> Path:
    """nnsam_refine -i -m -o run once, uninterrupted; returns its output folder."""
    out = files_job.root / "reference"
    run_to_end(files_job.command(out), files_job.env, files_job.root / "reference.log")
    return out


def seconds_per_case(report_folder: Path) -> float:
    """The mean time an uninterrupted run took per case (its case reports' "seconds"): scales the kill delays
    to this machine's speed."""
    reports = [json.loads(p.read_text()) for p in (report_folder / CASES_FOLDER).glob("*.json")]
    assert reports, f"no case reports in {report_folder}"
    return float(np.mean([r["seconds"] for r in reports]))


# --- the tests -----------------------------------------------------------------------------------------

UNLABELED_PARTS = (".b2nd", "_seg.b2nd")  # the parts of a preprocessed case besides its .pkl
PSEUDO_PARTS = ("_seg.b2nd",)  # of a pseudo label (its image is the preprocessed case's)


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_preprocess_unlabeled_resumes_to_the_same_cases(more_unlabelled: DatasetCopy,
                                                               preprocessed_reference: DatasetCopy, tmp_path: Path,
                                                               seed: int) -> None:
    """Killed within its first 0.1 s of preprocessing (after the first temporary file appears); the same command
    again finishes the rest."""
    work = copy_of(more_unlabelled, tmp_path / "dataset")
    log = tmp_path / "preprocess.log"

    def began() -> bool:
        return work.unlabeled.is_dir() and any(p.name.startswith(TEMP_PREFIX) for p in work.unlabeled.iterdir())

    kill = kill_during(preprocess_command(work), work.env, log, began, seed, 0.1, work.unlabeled)
    assert_nothing_half_written(work.unlabeled, UNLABELED_PARTS, kill)
    run_to_end(preprocess_command(work), work.env, log)
    assert_nothing_half_written(work.unlabeled, UNLABELED_PARTS, kill)
    assert_resumed_like_reference(work.unlabeled, preprocessed_reference.unlabeled, work.root,
                                  preprocessed_reference.root, kill)


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_refine_dataset_resumes_with_continue(pristine: DatasetCopy, refined_reference: DatasetCopy,
                                                     tmp_path: Path, seed: int) -> None:
    """Killed 0 to 1.5 cases' time after refinement began (the pseudo-label folder appears once both models are
    loaded); resumed with --continue. Pseudo labels, case reports and refine_report.json equal the uninterrupted
    run's, and so do the preprocessed unlabelled cases that the command made first."""
    work = copy_of(pristine, tmp_path / "dataset")
    log, command = tmp_path / "refine.log", refine_dataset_command(work)
    kill = kill_during(command, work.env, log, work.pseudo_labels.is_dir, seed,
                       1.5 * seconds_per_case(refined_reference.pseudo_labels), work.pseudo_labels)
    assert_nothing_half_written(work.pseudo_labels, PSEUDO_PARTS, kill)
    assert_nothing_half_written(work.unlabeled, UNLABELED_PARTS, kill)
    run_to_end(command + ["--continue"], work.env, log)
    assert_nothing_half_written(work.pseudo_labels, PSEUDO_PARTS, kill)
    assert_resumed_like_reference(work.pseudo_labels, refined_reference.pseudo_labels, work.root,
                                  refined_reference.root, kill)
    assert not differences(work.unlabeled, refined_reference.unlabeled, work.root, refined_reference.root)


def _kill_and_resume_files(files_job: FilesJob, files_reference: Path, out: Path, began: Callable[[], bool],
                           seed: int, longest: float) -> None:
    """Kill files mode after `began()` and a random delay, resume with --continue, compare with the reference:
    masks byte-identical, reports equal but for paths and times, no temporary files."""
    log = out.parent / "refine.log"
    kill = kill_during(files_job.command(out), files_job.env, log, began, seed, longest, out)
    for mask in finished_files(out, "*.nii.gz"):  # what looks finished is complete (masks are written atomically)
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(mask))).shape == FILES_SHAPE, f"{mask.name} ({kill})"
    run_to_end(files_job.command(out, "--continue"), files_job.env, log)
    assert_resumed_like_reference(out, files_reference, out, files_reference, kill)


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_refine_files_resumes_with_continue(files_job: FilesJob, files_reference: Path, tmp_path: Path,
                                                   seed: int) -> None:
    """Killed 0 to 2 cases' time after the first case began (the case-report folder is made just before it)."""
    out = tmp_path / "out"
    _kill_and_resume_files(files_job, files_reference, out, (out / CASES_FOLDER).is_dir, seed,
                           2.0 * seconds_per_case(files_reference))


def test_refine_files_killed_while_writing_resumes_without_temporaries(files_job: FilesJob, files_reference: Path,
                                                                       tmp_path: Path) -> None:
    """Killed the moment the first temporary file of an output appears (mid-write: a random delay almost never
    lands in those milliseconds); the resumed run must not leave it behind."""
    out = tmp_path / "out"
    _kill_and_resume_files(files_job, files_reference, out, lambda: bool(temporaries(out)), 0, 0.0)


def _training_log(checkpoint: Path) -> dict:
    """nnU-Net's per-epoch log in a checkpoint (loading it also shows it is complete)."""
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]


@pytest.mark.parametrize("seed, longest", [(seed, 1.0) for seed in SEEDS] + [(0, 0.0)],
                         ids=[f"seed{seed}" for seed in SEEDS] + ["mid-write"])
def test_killed_training_resumes_with_c(refined_reference: DatasetCopy, tmp_path: Path, seed: int,
                                        longest: float) -> None:
    """nnUNetv2_train with the SAM-pseudo trainer, killed 0 to `longest` s after its first checkpoint write began
    (end of epoch 0: checkpoint_latest.pth, then checkpoint_best.pth, then epoch 1; `longest` 0: in the middle of
    writing checkpoint_latest.pth), resumed with --c: it finishes.

    Training is not deterministic (multi-threaded data augmentation, random patches), so the weights of a
    resumed and an uninterrupted training cannot be compared. Compared instead: every checkpoint the kill left
    loads (they are written atomically); the final checkpoint is at the short trainer's last epoch; its log keeps
    the epochs of the checkpoint nnU-Net resumed from (their start times: continued, not restarted)."""
    work = copy_of(refined_reference, tmp_path / "dataset")
    fold, log = work.fold(PSEUDO_TRAINER), tmp_path / "train.log"
    command = ["nnUNetv2_train", str(work.dataset_id), CONFIG, "0", "-tr", PSEUDO_TRAINER, "-device", "cpu"]
    kill = kill_during(command, work.env, log, lambda: bool(temporaries(fold)), seed, longest, fold)
    logs = {p.name: _training_log(p) for p in fold.glob("checkpoint_*.pth")}
    # what nnU-Net's --c resumes from (run_training.maybe_load_checkpoint): final, else latest, else best
    resumed_from = next((name for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
                         if name in logs), None)
    done = logs[resumed_from]["epoch_start_timestamps"] if resumed_from else []  # none: --c starts anew
    run_to_end(command + ["--c"], work.env, log)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["trainer_name"] == PSEUDO_TRAINER and final["current_epoch"] == SHORT_EPOCHS, kill
    epochs = final["logging"]["epoch_start_timestamps"]
    assert len(epochs) == SHORT_EPOCHS and epochs[:len(done)] == done, f"resumed from {resumed_from}? ({kill})"
    assert np.isfinite(final["logging"]["train_losses"]).all(), kill
    assert (fold / "validation" / "summary.json").is_file() and not (fold / "checkpoint_latest.pth").exists(), kill
    assert not temporaries(work.root), f"temporary files remain: {temporaries(work.root)} ({kill})"


def test_two_refine_files_parts_at_once_share_one_output_folder(files_job: FilesJob, files_reference: Path,
                                                                tmp_path: Path) -> None:
    """`--num_parts 2 --part_id 0/1` started together on one -o: both finish; every case's mask and case report
    is there, refine_report.json aggregates all cases; outputs equal a single run's; no temporary files."""
    out = tmp_path / "out"
    run_at_once([files_job.command(out, "--num_parts", "2", "--part_id", str(part)) for part in (0, 1)],
                files_job.env, tmp_path)
    report = json.loads((out / REPORT_NAME).read_text())
    assert [c["case"] for c in report["cases"]] == ["case0", "case1", "case2"]
    assert not differences(out, files_reference, out, files_reference)
    assert not temporaries(out)


def test_two_preprocess_unlabeled_at_once_on_one_dataset(more_unlabelled: DatasetCopy,
                                                         preprocessed_reference: DatasetCopy, tmp_path: Path) -> None:
    """Two nnsam_preprocess_unlabeled started together on one dataset: both exit 0; every case is complete and
    equals a single run's; no temporary files."""
    work = copy_of(more_unlabelled, tmp_path / "dataset")
    run_at_once([preprocess_command(work)] * 2, work.env, tmp_path)
    assert_nothing_half_written(work.unlabeled, UNLABELED_PARTS, "two runs at once")
    assert not differences(work.unlabeled, preprocessed_reference.unlabeled, work.root, preprocessed_reference.root)
    assert not temporaries(work.root)
