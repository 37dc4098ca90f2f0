"""benchmarks/gpu_check.py: the prepared GPU check stops at the first failing stage with its reason, writes its own
section only, and its CPU subset (`--device cpu --quick`) runs end to end here so that it cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402  (benchmarks/gpu_check.py)

PREVIOUS = "# Benchmark results\n\n## Trainer speed (benchmarks/train_speed.py)\n\nkept as it was\n"


def _plan() -> gpu_check.Plan:
    return gpu_check.Plan.make(torch.device("cpu"), quick=True)


def test_the_first_failing_stage_stops_the_check_and_is_written(tmp_path, monkeypatch):
    ran, results = [], tmp_path / "RESULTS.md"

    def passes(name):
        def stage(plan, report):
            ran.append(name)
            report.parts.append(f"### {name}\n\nfine")
        return stage

    def fails(plan, report):
        ran.append("tests")
        during = results.read_text()  # what a run killed here at its time limit leaves
        assert "**stopped in stage tests**" in during and "### environment\n\nfine" in during
        raise gpu_check.StageFailed("pytest -m gpu: 1 failed, 6 passed")

    monkeypatch.setattr(gpu_check, "STAGES", [("environment", passes("environment")), ("tests", fails),
                                              ("refinement speed", passes("refinement speed"))])
    results.write_text(PREVIOUS)
    _, failure = gpu_check.run_check(_plan(), results)
    assert ran == ["environment", "tests"]
    assert failure == "stage tests failed: pytest -m gpu: 1 failed, 6 passed"
    text = results.read_text()
    assert "kept as it was" in text  # other sections untouched
    assert "## GPU check, CPU subset" in text and "**FAILED**: stage tests failed" in text
    assert "### environment" in text and "### refinement speed" not in text


def test_a_crashing_stage_is_a_failure_with_its_exception(tmp_path, monkeypatch):
    def crashes(plan, report):
        raise KeyError("batch_size")

    monkeypatch.setattr(gpu_check, "STAGES", [("trainer speed", crashes)])
    _, failure = gpu_check.run_check(_plan(), tmp_path / "RESULTS.md")
    assert failure == "stage trainer speed failed: KeyError: 'batch_size'"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_the_gpu_check_says_so_at_once(tmp_path, capsys):
    assert gpu_check.main(["--device", "cuda", "--quick", "--results", str(tmp_path / "R.md")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("gpu_check: stage environment failed: no CUDA GPU is visible (torch.cuda.is_available() is "
                       "False); on a machine without one run --device cpu --quick")
    assert "## GPU check (benchmarks/gpu_check.py)" in (tmp_path / "R.md").read_text()


def test_the_full_check_on_the_cpu_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--device", "cpu"])
    assert exc.value.code == 2
    assert "--device cpu runs only the --quick subset" in capsys.readouterr().err


def test_pytest_summary_is_the_last_summary_line():
    output = "....\n=========== short test summary info ===========\nFAILED tests/test_gpu.py::x\n" \
             "1 failed, 3 passed, 3 deselected in 87.33s (0:01:27)\n"
    assert gpu_check.pytest_summary(output) == "1 failed, 3 passed, 3 deselected in 87.33s (0:01:27)"
    assert gpu_check.pytest_summary("===== 7 passed in 12.00s =====\n") == "7 passed in 12.00s"
    assert gpu_check.pytest_summary("collected nothing") == "no pytest summary"


@pytest.mark.slow
def test_the_cpu_subset_runs_every_stage(tmp_path):
    """What the suite runs of the GPU check: each stage on the CPU, small (about 3.5 minutes on 2 cores)."""
    results = tmp_path / "RESULTS.md"
    results.write_text(PREVIOUS)
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--results", str(results)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"gpu_check: every stage passed; results in {results}"
    text = results.read_text()
    assert "kept as it was" in text and "## GPU check (benchmarks" not in text
    section = text.split("## GPU check, CPU subset", 1)[1]
    assert "every stage passed" in section
    assert "pytest -m gpu tests/test_gpu.py` (-k 'refinement or embeddings or SAMPseudoMeanTeacher'): 3 passed" \
        in section
    assert "| fp32 | 1 | no |" in section and "| fp32 | 4 | no |" in section
    assert "| engine, batch size 4 |" in section and "| naive loop" in section
    for trainer in ("nnUNetTrainer", "nnUNetTrainerSAMPseudo", "nnUNetTrainerMeanTeacher",
                    "nnUNetTrainerSAMPseudoMeanTeacher"):
        assert f"| {trainer} |" in section
    assert "### Demo\n\nNot run with --quick" in section


@pytest.mark.slow
def test_a_trainer_process_that_fails_stops_the_speed_measurement_with_its_error(tmp_path):
    """No dataset: each trainer process fails while it sets up; the parent says which and why instead of waiting."""
    import train_speed  # benchmarks/train_speed.py
    from helpers.trainer_data import environment

    folders = {name: str(tmp_path) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    with environment(folders), pytest.raises(RuntimeError, match=r"^trainer process failed: nnUNetTrainer: \w+"):
        train_speed.measure("cpu", warmup=0, iterations=1)
