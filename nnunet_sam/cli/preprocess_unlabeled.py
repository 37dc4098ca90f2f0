"""nnsam_preprocess_unlabeled: preprocess imagesUnlabeled/ with a dataset's nnU-Net plans."""

from __future__ import annotations

import argparse
from typing import Sequence

from nnunet_sam.cli.common import run
from nnunet_sam.errors import NnsamError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnsam_preprocess_unlabeled",
        description="Preprocess the unlabelled scans in nnUNet_raw/DatasetXXX/imagesUnlabeled/ with the "
                    "dataset's plans (nnU-Net's own preprocessor) into nnUNet_preprocessed/DatasetXXX/"
                    "<data_identifier>_unlabeled/. Cases already done are skipped. With fewer than 5 "
                    "labelled cases and no splits_final.json, also writes a leave-one-out split.")
    parser.add_argument("-d", required=True, help="dataset name or id, as for nnUNetv2_train")
    parser.add_argument("-c", nargs="+", default=["3d_fullres"],
                        help="configuration(s) whose plans to use (default: 3d_fullres)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-np", type=int, default=1, help="number of processes (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="preprocess cases that are already done again")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _body(args: argparse.Namespace) -> None:
    from nnunet_sam.nnunet.datasets import dataset_folders
    from nnunet_sam.nnunet.splits import ensure_few_label_splits
    from nnunet_sam.nnunet.unlabeled import find_unlabeled_cases, preprocess_unlabeled, require_preprocessed

    if args.np < 1:
        raise NnsamError(f"-np {args.np}: the number of processes must be at least 1")
    checked = []
    for configuration in args.c:  # every configuration and case checked before anything is written
        folders = dataset_folders(args.d, configuration, args.p)
        cases = find_unlabeled_cases(folders)
        require_preprocessed(folders)
        checked.append((folders, cases))
    for folders, cases in checked:
        ensure_few_label_splits(folders)
        preprocess_unlabeled(folders, num_processes=args.np, overwrite=args.overwrite, cases=cases)


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser(), _body, argv, "finished cases are kept: rerun the same command to do the rest")


if __name__ == "__main__":
    main()
