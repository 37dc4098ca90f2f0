"""nnsam_check: list stale, orphan, leaking or half-written unlabelled cases and pseudo labels, with their fixes."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from nnunet_sam.cli.common import run

logger = logging.getLogger("nnsam_check")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnsam_check",
        description="Check a dataset's preprocessed unlabelled cases (<data_identifier>_unlabeled/) and every "
                    "pseudo-label set (<data_identifier>_pseudolabels/<plans>/fold_<F>/) without changing anything: "
                    "cases not preprocessed or preprocessed from image files or plans that changed since, pseudo "
                    "labels made from an older preprocessing, by a model trained again since or by a model that saw "
                    "the fold's validation cases, orphans, and what killed runs left behind. Prints each finding "
                    "with the command that fixes it; exit status 1 when there is any.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-d", dest="dataset", required=True, help="dataset name or id, as for nnUNetv2_train")
    parser.add_argument("-c", dest="configurations", nargs="+", default=["3d_fullres"],
                        help="configuration(s) to check")
    parser.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _check(args: argparse.Namespace) -> None:
    from nnunet_sam.nnunet.check import check_dataset, findings_table
    from nnunet_sam.nnunet.datasets import dataset_folders
    from nnunet_sam.nnunet.unlabeled import require_preprocessed

    checked = [dataset_folders(args.dataset, configuration, args.plans) for configuration in args.configurations]
    for folders in checked:  # every configuration before the first finding
        require_preprocessed(folders)
    findings = []
    for folders in checked:
        findings += check_dataset(folders)
    if findings:
        logger.warning("%d finding(s):\n%s", len(findings), findings_table(findings))
        sys.exit(1)
    logger.info("nothing stale, orphaned, leaking or half-written")


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser(), _check, argv, "nothing was changed")


if __name__ == "__main__":
    main()
