"""Fault figures: run the kill -9 and bad-input tests and write what they survived into benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/faults.py [--no-write]

Runs `tests/test_kill.py`, `tests/test_finetune_resume.py`, `tests/test_faults.py` and `tests/test_bad_input.py`
with pytest (JUnit XML), counts per test file and per command the runs that passed (a passed kill test means:
killed with SIGKILL, resumed, outputs equal to an uninterrupted run's, no temporary file left; a passed bad-input
row means: exit status 2, one line naming the file or flag and the fix, every user and output folder
byte-identical before and after), and prints and writes the table. Any failure is listed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine_description, markdown_table, update_results_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = {"tests/test_kill.py": "killed with SIGKILL and resumed (or run concurrently)",
              "tests/test_finetune_resume.py": "fine-tuning interrupted and resumed",
              "tests/test_faults.py": "killed-run leftovers, concurrency, Ctrl-C",
              "tests/test_bad_input.py": "bad input: exit 2, one line, nothing written"}


def run_tests(xml_path: Path) -> float:
    """pytest on the fault tests (the README's environment); returns the wall time."""
    env = {**os.environ, "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "2"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml_path}",
                    *TEST_FILES], cwd=ROOT, env=env, check=False)
    return time.perf_counter() - started


def outcomes(xml_path: Path) -> tuple[Counter, Counter, list[str]]:
    """Passed and tried test cases per test file, and the failed ones' names."""
    passed, tried, failed = Counter(), Counter(), []
    for case in ElementTree.parse(xml_path).iter("testcase"):
        source = case.get("classname", "").replace(".", "/") + ".py"
        if case.find("skipped") is not None:
            continue
        tried[source] += 1
        if case.find("failure") is None and case.find("error") is None:
            passed[source] += 1
        else:
            failed.append(f"{source}::{case.get('name')}")
    return passed, tried, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        xml_path = Path(folder) / "faults.xml"
        seconds = run_tests(xml_path)
        passed, tried, failed = outcomes(xml_path)
    rows = [[f"`{name}`", what, f"{passed[name]} / {tried[name]}"] for name, what in TEST_FILES.items()]
    table = markdown_table(["tests", "what each one does", "passed / run"], rows)
    lost = "none" if not failed else "see the failures below"
    body = (f"`.venv/bin/python benchmarks/faults.py` ({machine_description('cpu')}; {seconds / 60:.1f} min).\n\n"
            f"{table}\n\nBytes of user data or finished output lost or changed: {lost}.")
    if failed:
        body += "\n\nFailed:\n" + "\n".join(f"- `{name}`" for name in failed)
    print(body)
    if not args.no_write:
        update_results_section("Faults (benchmarks/faults.py)", body)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
