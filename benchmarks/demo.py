"""The demo's results and wall-clock time, written into benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/demo.py [-o DIR] [-device cpu|cuda|auto] [--quick]

Runs `nnsam_demo` (the same code) into DIR (default: a new temporary folder; an existing DIR resumes
after its last finished stage), prints its report and writes it, with the machine, into RESULTS.md
(section "nnsam_demo"). The time given is the sum of the stages' measured times (as in the report;
stages resumed from an earlier run count with the time they took then), plus this run's wall-clock.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from results import machine_description, update_results_section  # benchmarks/results.py

from nnunet_sam.demo.pipeline import run_demo
from nnunet_sam.sam.models import resolve_device

SECTION = "nnsam_demo (benchmarks/demo.py)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", dest="output", type=Path, help="demo folder (default: a new temporary one)")
    parser.add_argument("-device", default="auto", help="'auto', 'cpu' or 'cuda'")
    parser.add_argument("--quick", action="store_true", help="the --quick demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    output = args.output or Path(tempfile.mkdtemp(prefix="nnsam_demo_"))
    done_before = {p.stem for p in (output / "stages").glob("*.json")}
    started = time.perf_counter()
    _, results, text = run_demo(output, device, args.quick)
    wall = (time.perf_counter() - started) / 60
    stages = sum(r["seconds"] for r in results.values()) / 60
    print(text)
    body = text.split("\n", 1)[1].replace("\n## ", "\n### ")  # without its title; sub-headings one deeper
    heading = f"`nnsam_demo{' --quick' if args.quick else ''} -device {device.type}`"
    resumed = len(done_before)
    wall_text = f"this run's wall-clock {wall:.1f} min" + (f", {resumed} stages resumed from an earlier run"
                                                           if resumed else "")
    update_results_section(SECTION, f"{heading} on {machine_description(str(device))}: stages "
                                    f"**{stages:.1f} min** ({wall_text}).\n{body}")


if __name__ == "__main__":
    main()
