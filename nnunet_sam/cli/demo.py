"""nnsam_demo: the whole method on a synthetic CT-like dataset, in one command."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from nnunet_sam.cli.common import run
from nnunet_sam.utils.output_folders import check_output_folder, claim_output_folder

logger = logging.getLogger(__name__)

DEMO_MARKER = "stages"  # the folder where a demo run records its finished stages (Demo.stages)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnsam_demo",
        description="Generate a synthetic CT-like nnU-Net dataset (2 labelled cases, unlabelled cases, test "
                    "cases), then run the whole method with the stock commands' entry points: plan and "
                    "preprocess, a short baseline, nnsam_refine -d with LiteMedSAM, short SAM-pseudo and Mean "
                    "Teacher trainings, prediction and evaluation of the test cases. Writes DIR/report.md and "
                    "DIR/overlays/. Re-running into the same DIR resumes finished stages.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", dest="output", type=Path, default=Path("nnsam_demo"), help="output folder")
    p.add_argument("-device", default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda'")
    p.add_argument("--quick", action="store_true",
                   help="fewer cases and shorter training, no Mean Teacher: a few minutes on CPU")
    p.add_argument("--finetune", action="store_true",
                   help="also fine-tune LiteMedSAM's mask decoder on the labelled cases (nnsam_finetune -f all) and "
                        "refine the unlabelled cases again with it; the trainers then learn from these pseudo "
                        "labels, and the report compares zero-shot and fine-tuned pseudo labels (~4 min more on CPU)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _demo(args: argparse.Namespace) -> None:
    from nnunet_sam.demo.pipeline import run_demo
    from nnunet_sam.sam.models import resolve_device

    device = resolve_device(args.device)
    if args.output.exists():  # a file, or a folder of someone else's files (a demo run's holds stages/), is refused
        check_output_folder(args.output, "-o", DEMO_MARKER)
    claim_output_folder(args.output, DEMO_MARKER)  # before the first stage: a killed first run's folder stays ours
    demo, _, text = run_demo(args.output, device, args.quick, args.finetune)
    print(text)
    logger.info("report: %s", demo.out / "report.md")


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser(), _demo, argv, "finished stages are kept: rerun the same command to go on")


if __name__ == "__main__":
    main()
