"""nnsam_finetune: fine-tune SAM's mask decoder on a fold's labelled training cases (cached embeddings)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from nnunet_sam.cli.common import (add_sam_arguments, add_view_arguments, check_cache_folder, check_sam_arguments, run,
                                   view_settings)
from nnunet_sam.errors import NnsamError
from nnunet_sam.sam.class_prompts import class_prompt_mode
from nnunet_sam.sam.finetune import FinetuneSettings


def build_parser() -> argparse.ArgumentParser:
    defaults = FinetuneSettings()
    p = argparse.ArgumentParser(
        prog="nnsam_finetune",
        description="Fine-tune SAM's mask decoder on the labelled training cases of one fold (never its validation "
                    "cases), with the image encoder and prompt encoder frozen. The labelled slices are encoded once "
                    "into nnUNet_preprocessed/DatasetXXX/nnsam_embeddings/ and reused across runs. Validation "
                    "compares zero-shot and fine-tuned SAM on the fold's validation cases: the decoder's Dice from "
                    "true boxes and, when the fold has a trained nnU-Net (-tr), the Dice of its refined "
                    "predictions. With --context tile or --prompts fewshot it also trains prompt-free class "
                    "prompts, which nnsam_refine uses to find a class on slices the initial mask misses. The "
                    "checkpoint loads with nnsam_refine --checkpoint (use the same --context, --grid and "
                    "--ct-window there).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ds = p.add_argument_group("dataset")
    ds.add_argument("-d", dest="dataset", required=True, help="dataset name or id, as for nnUNetv2_train")
    ds.add_argument("-c", dest="configuration", default="3d_fullres", help="configuration whose preprocessed "
                    "images SAM learns from (use the one nnsam_refine -c will use)")
    ds.add_argument("-f", dest="fold", default="0",
                    help="fold: its training cases train the decoder, its validation cases measure it; 'all' "
                         "trains on every labelled case (no validation)")
    ds.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    ds.add_argument("-o", dest="output", type=Path, default=None,
                    help="checkpoint file to write (default: nnUNet_results/DatasetXXX/nnsamFinetune__PLANS__"
                         "CONFIG/fold_F/SAM_CONTEXT[_fewshot].pth, with ..._report.json beside it); an "
                         "existing file is replaced only if nnsam_finetune wrote it")
    ds.add_argument("--cache", type=Path, default=None,
                    help="embedding cache folder (default: nnUNet_preprocessed/DatasetXXX/nnsam_embeddings); a new "
                         "folder or one an nnsam command's cache wrote, never a folder of other files")
    add_sam_arguments(p, compile_flag=False)
    views = p.add_argument_group("views (pass the same to nnsam_refine)")
    add_view_arguments(views)
    views.add_argument("--prompts", default="box", choices=("box", "fewshot"),
                       help="box: the decoder learns from jittered boxes (true ones, and --weak-prompts of them "
                            "from imperfect masks). fewshot: in addition, class prompts "
                            "built from class prototypes (mean embeddings of the labelled pixels) learn to segment "
                            "each class without a box. --context tile always adds learnt prompt-free class prompts "
                            "(CFR). nnsam_refine uses class prompts to recover slices the initial mask misses")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=defaults.epochs,
                       help="passes over the labelled slices (more if that gives fewer than --min-steps steps)")
    train.add_argument("--min-steps", type=int, default=defaults.min_steps, metavar="N",
                       help="at least this many optimiser steps: with a few labelled slices, --epochs is raised to "
                            "reach it (0: exactly --epochs)")
    train.add_argument("--lr", dest="learning_rate", type=float, default=defaults.learning_rate,
                       help="AdamW learning rate (cosine decay to 0)")
    train.add_argument("--slices-per-step", type=int, default=defaults.slices_per_step,
                       help="slices (with all their classes) per optimiser step")
    train.add_argument("--box-jitter", type=float, default=defaults.box_jitter,
                       help="each box side moves at random by up to this fraction of the box size")
    train.add_argument("--weak-prompts", type=float, default=defaults.weak_prompts, metavar="F",
                       help="fraction of box prompts drawn around an imperfect version of the true mask (grown, "
                            "shrunk, part missing or spilt into a neighbour: the boxes a weak model's masks give "
                            "refinement) instead of the true mask; 0: true boxes only")
    train.add_argument("--seed", type=int, default=defaults.seed, help="random seed (box jitter, slice order)")
    train.add_argument("--continue", dest="resume", action="store_true",
                       help="go on from the training state an interrupted run left beside the checkpoint "
                            "(CHECKPOINT_NAME.partial.pth, written after the epochs); it must have been started with "
                            "the same options. Without --continue that state is discarded and training starts over")
    val = p.add_argument_group("validation (refining the fold's nnU-Net predictions)")
    val.add_argument("-tr", dest="trainer", default="nnUNetTrainer",
                     help="trainer of the fold's nnU-Net model whose validation predictions are refined")
    val.add_argument("-chk", dest="checkpoint_name", default="checkpoint_final.pth", help="its checkpoint name")
    val.add_argument("--disable_tta", action="store_true", help="no mirroring in its predictions (8x faster in 3D)")
    val.add_argument("--no-refine-validation", dest="refine_validation", action="store_false",
                     help="report only the decoder's Dice from true boxes; do not predict and refine")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _finetune(args: argparse.Namespace) -> None:
    from nnunet_sam.nnunet.finetune_dataset import FinetuneJob, check_not_base, finetune_dataset, plan_finetune_job
    from nnunet_sam.nnunet.predict import ModelChoice
    from nnunet_sam.nnunet.sam_views import dataset_view_settings
    from nnunet_sam.sam.models import load_sam
    from nnunet_sam.sam.refine import RefineSettings

    for flag, value, lowest in (("--epochs", args.epochs, 1), ("--slices-per-step", args.slices_per_step, 1),
                                ("--min-steps", args.min_steps, 0)):
        if value < lowest:
            raise NnsamError(f"{flag} must be at least {lowest}, got {value}")
    if args.learning_rate <= 0:
        raise NnsamError(f"--lr must be positive, got {args.learning_rate}")
    for flag, value in (("--weak-prompts", args.weak_prompts), ("--box-jitter", args.box_jitter)):
        if not 0.0 <= value <= 1.0:
            raise NnsamError(f"{flag} must be a fraction between 0 and 1, got {value}")
    views = view_settings(args)  # its one-line errors, and SAM's, come before planning (which may warn or write)
    if args.output is not None:  # before check_sam_arguments reads the base checkpoint (the rest of -o's checks
        check_not_base(args.output, args.checkpoint)  # come with planning)
    check_sam_arguments(args)
    check_cache_folder(args.cache)
    evaluate_with = None
    if args.refine_validation:
        evaluate_with = ModelChoice(trainer=args.trainer, checkpoint=args.checkpoint_name, tta=not args.disable_tta)
    job = FinetuneJob(dataset=args.dataset, configuration=args.configuration, fold=args.fold, plans=args.plans,
                      channel=args.channel, output=args.output, evaluate_with=evaluate_with, cache_dir=args.cache,
                      resume=args.resume)
    views_name = args.context + ("_fewshot" if args.prompts == "fewshot" else "")
    plan = plan_finetune_job(job, args.model_type, views_name, args.checkpoint)
    refine_settings = dataset_view_settings(RefineSettings(**views), plan.folders, args.channel)
    settings = FinetuneSettings(epochs=args.epochs, min_steps=args.min_steps, learning_rate=args.learning_rate,
                                slices_per_step=args.slices_per_step,
                                box_jitter=args.box_jitter, weak_prompts=args.weak_prompts, seed=args.seed,
                                class_prompts=class_prompt_mode(args.context, args.prompts))
    model = load_sam(args.model_type, args.checkpoint, args.device)
    finetune_dataset(plan, model, refine_settings, settings)


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser(), _finetune, argv, "the finished epochs and the cached embeddings are kept: rerun the same "
                                         "command with --continue")


if __name__ == "__main__":
    main()
