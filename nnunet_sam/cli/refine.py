"""nnsam_refine: refine masks with SAM. Dataset mode (-d) makes pseudo labels for a dataset's
unlabelled cases; files mode (-i -m -o) refines any folder of masks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from nnunet_sam.cli.common import (add_renamed_argument, add_sam_arguments, add_view_arguments, check_cache_folder,
                                   check_sam_arguments, run, view_settings)
from nnunet_sam.errors import NnsamError
from nnunet_sam.sam.embedding_cache import EmbeddingCache
from nnunet_sam.sam.models import SamModel, load_sam
from nnunet_sam.sam.prompts import KEEP_MODES
from nnunet_sam.sam.refine import BAND_MODES, BOX_MODES, PROMPT_SETS, RefineSettings, SamRefiner


def build_parser() -> argparse.ArgumentParser:
    defaults = RefineSettings()
    p = argparse.ArgumentParser(
        prog="nnsam_refine",
        description="Refine imperfect segmentation masks with SAM, slice by slice. Dataset mode: "
                    "nnsam_refine -d XXX -c CONFIG -f FOLD predicts the dataset's unlabelled cases "
                    "(nnUNet_raw/DatasetXXX/imagesUnlabeled/) with a trained nnU-Net, refines the predictions "
                    "and stores them as pseudo labels in nnUNet_preprocessed/DatasetXXX/<data_identifier>"
                    "_pseudolabels/, where nnUNetTrainerSAMPseudo reads them. Files mode: nnsam_refine -i "
                    "IMAGES -m MASKS -o OUT, with nnU-Net raw naming (images CASE_0000.nii.gz, one file per "
                    "channel; masks CASE.nii.gz).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ds = p.add_argument_group("dataset mode (-d)")
    ds.add_argument("-d", dest="dataset", default=None, help="dataset name or id, as for nnUNetv2_train")
    ds.add_argument("-c", dest="configuration", default="3d_fullres", help="configuration of the trained model")
    ds.add_argument("-f", dest="folds", nargs="+", default=None,
                    help="fold(s) of the trained model; several folds are ensembled (default: every fold "
                         "that has the checkpoint)")
    ds.add_argument("-tr", dest="trainer", default="nnUNetTrainer", help="trainer of the model (any, ours too)")
    ds.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    ds.add_argument("-chk", dest="checkpoint_name", default="checkpoint_final.pth", help="model checkpoint name")
    ds.add_argument("--disable_tta", action="store_true",
                    help="no mirroring test-time augmentation in the initial prediction (8x faster in 3D)")
    ds.add_argument("--export", type=Path, default=None,
                    help="also write the pseudo labels in the raw images' geometry to this folder, to look at")
    ds.add_argument("-np", type=int, default=1, help="processes for preprocessing unlabelled cases not yet done")
    ds.add_argument("--no-sam", dest="no_sam", action="store_true",
                    help="pseudo labels without SAM: the initial model's predictions as they are (plain "
                         "self-training, nnU-Net's train-predict-retrain; the control that shows what SAM adds)")
    ds.add_argument("--ignore-disagreement", dest="ignore_disagreement", action="store_true",
                    help="where the refined pseudo label differs from the initial model's prediction, write the "
                         "unsure label instead (the highest label + 1, nnU-Net's ignore-label value): the SAM-pseudo "
                         "trainers leave those voxels out of the loss, so they learn only where SAM and the model "
                         "agree")
    ds.add_argument("--min-case-agreement", dest="min_case_agreement", type=float, default=None, metavar="A",
                    help="train only on reliable pseudo labels (SAM Carries the Burden's selection, which used "
                         "0.85): a case whose SAM agreement (mean Dice over classes between the refined label and "
                         "the initial prediction) is below A gets no pseudo label; every case's agreement is in the "
                         "report")
    io = p.add_argument_group("files mode (-i -m -o)")
    io.add_argument("-i", dest="images", type=Path, default=None, help="folder of images (CASE_XXXX.ending)")
    io.add_argument("-m", dest="masks", type=Path, default=None,
                    help="folder of masks to refine (CASE.ending), e.g. predictions of a weak model")
    io.add_argument("-o", dest="output", type=Path, default=None,
                    help="output folder: refined masks (same geometry and pixel type), refine_report.json")
    io.add_argument("--probabilities", type=Path, default=None, metavar="DIR",
                    help="the softmax of the model that made the masks: CASE.npz as nnUNetv2_predict "
                         "--save_probabilities writes them (same folder as its masks is fine); turns on the "
                         "probability-guided refinement (--keep-confident, --fuse, --activation) that dataset "
                         "mode always uses")
    both = p.add_argument_group("both modes")
    both.add_argument("--gt", type=Path, default=None,
                      help="folder of ground-truth labels (CASE.ending; in dataset mode: of the unlabelled "
                           "cases, raw geometry): adds Dice before/after to the report")
    both.add_argument("--overlays", action="store_true",
                      help="write PNG pictures to OUT/overlays/ (dataset mode: to the pseudo-label folder)")
    add_sam_arguments(p)
    ref = p.add_argument_group("refinement")
    ref.add_argument("--prompts", default=defaults.prompts, choices=PROMPT_SETS,
                     help="box (LiteMedSAM is box-trained) or box+points (box, then positive/negative points "
                          "with the first stage's mask; for SAM models that use points well)")
    add_view_arguments(ref)
    ref.add_argument("--keep", default=defaults.keep, choices=KEEP_MODES,
                     help="connected components kept per class: largest (highest mean probability if known, and "
                          "those close to it), all; pieces: all (with --boxes slice each piece its own box)")
    ref.add_argument("--boxes", default=defaults.boxes, choices=BOX_MODES,
                     help="object: one box per object of a slice, each guarded on its own (pieces at most "
                          "--link-gap apart, or joined by the class's probability, are one object); slice: one box "
                          "around all of a class's pieces on a slice (the old rule: SAM returns one of two objects)")
    ref.add_argument("--link-gap", type=float, default=defaults.link_gap, metavar="MM",
                     help="--boxes object: pieces of a slice at most this many millimetres apart are one object")
    ref.add_argument("--max-gap", type=int, default=defaults.max_gap,
                     help="fill up to this many slices missing inside an object with interpolated boxes")
    ref.add_argument("--min-iou", type=float, default=defaults.min_sam_iou,
                     help="guard: keep the initial slice mask where SAM's IoU estimate is lower")
    ref.add_argument("--min-agreement", type=float, default=defaults.min_agreement,
                     help="guard: keep the initial slice mask where Dice(initial, SAM) is lower")
    ref.add_argument("--no-evidence", dest="evidence", action="store_false",
                     help="guard: accept SAM's slice mask even where its border fits the image worse "
                          "(lower inside/outside contrast) than the initial mask's")
    ref.add_argument("--keep-confident", dest="keep_confident", default=defaults.confident, metavar="P",
                     help="with the model's probabilities: keep its label wherever it is at least P sure of it (see "
                          "--band), so SAM cannot undo what the model is sure of; 'off': SAM's mask (after the guard) "
                          "everywhere")
    ref.add_argument("--band", default=defaults.band, choices=BAND_MODES,
                     help="--keep-confident's 'sure': class, the model's probability of its own foreground label "
                          "(SAM may grow a class where the model was sure of background); max, its highest "
                          "probability, background included (the old rule)")
    ref.add_argument("--fuse", action="store_true",
                     help="with the model's probabilities: instead of --keep-confident, label each pixel by the mean "
                          "of SAM's probability and the model's (measured worse; see benchmarks/RESULTS.md)")
    ref.add_argument("--activation", default=defaults.activation, metavar="T",
                     help="with the model's probabilities: give SAM a box where a class's probability reaches T on a "
                          "slice where the argmax misses it (gaps inside the class, or a class the argmax never "
                          "predicts: SAM-Mix's activation-map prompts); 'off': no such boxes")
    ref.add_argument("--recover-reach", type=int, default=defaults.recover_reach,
                     help="with a checkpoint whose class prompts nnsam_finetune trained (--context tile or --prompts "
                          "fewshot): look for a class on slices without initial mask inside its extent and up to "
                          "this many slices beyond its ends; -1 turns this off")
    run_group = p.add_argument_group("running")
    run_group.add_argument("--continue", dest="resume", action="store_true",
                           help="skip cases whose refined mask and report already exist")
    run_group.add_argument("--cache", type=Path, default=None, metavar="DIR",
                           help="keep the image embeddings in DIR and reuse them: a rerun with other refinement "
                                "options encodes only slices it has not seen (about 2 MiB per slice for "
                                "LiteMedSAM, stored as float16; nnsam_finetune's cache folder can be shared)")
    add_renamed_argument(run_group, "-num_parts", "--num_parts", dest="num_parts", type=int, default=1,
                         help="split the cases into this many parts")
    add_renamed_argument(run_group, "-part_id", "--part_id", dest="part_id", type=int, default=0,
                         help="which part this process does (0-based)")
    run_group.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _probability_or_off(text: str | float | None, flag: str) -> float | None:
    """A flag's probability in (0, 1], or 'off' (None); anything else is a one-line error naming the flag."""
    if text is None or isinstance(text, float):
        return text
    if text.lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        raise NnsamError(f"{flag} {text!r} is neither a probability in (0, 1] nor 'off'") from None
    if not 0.0 < value <= 1.0:
        raise NnsamError(f"{flag} {text} must be a probability in (0, 1] (e.g. 0.9) or 'off'")
    return value


def _check_guard_and_reach(args: argparse.Namespace) -> None:
    """One-line errors for the refinement's numeric flags out of range."""
    for flag, value in (("--min-iou", args.min_iou), ("--min-agreement", args.min_agreement)):
        if not 0.0 <= value <= 1.0:
            raise NnsamError(f"{flag} {value:g} must be in [0, 1] (0: the guard never keeps the initial slice mask)")
    if args.max_gap < 0:
        raise NnsamError(f"--max-gap {args.max_gap} must be at least 0 (0: no missing slices are filled)")
    if args.link_gap < 0:
        raise NnsamError(f"--link-gap {args.link_gap:g} must be at least 0 (0: only touching pieces are one object)")
    if args.recover_reach < -1:
        raise NnsamError(f"--recover-reach {args.recover_reach} must be -1 (off) or more")


def settings_from_args(args: argparse.Namespace) -> RefineSettings:
    _check_guard_and_reach(args)
    return RefineSettings(prompts=args.prompts, keep=args.keep, max_gap=args.max_gap, min_sam_iou=args.min_iou,
                          min_agreement=args.min_agreement, evidence=args.evidence, recover_reach=args.recover_reach,
                          boxes=args.boxes, link_gap=args.link_gap, band=args.band,
                          confident=_probability_or_off(args.keep_confident, "--keep-confident"), fuse=args.fuse,
                          activation=_probability_or_off(args.activation, "--activation"),
                          **view_settings(args))


def _refine_dataset(args: argparse.Namespace, settings: RefineSettings) -> None:
    from nnunet_sam.nnunet.predict import InitialModel, ModelChoice
    from nnunet_sam.nnunet.refine_dataset import (DatasetJob, plan_dataset_job, refine_dataset,
                                                  write_unrefined_pseudo_labels)
    from nnunet_sam.nnunet.splits import fold_name
    from nnunet_sam.sam.models import resolve_device

    if args.no_sam and (args.num_parts > 1 or args.resume):
        raise NnsamError("--no-sam writes every case in one run; leave out -num_parts and --continue")
    if args.no_sam and _sam_label_options(args):
        raise NnsamError(f"{_sam_label_options(args)[0]} compares SAM's label with the model's; with --no-sam there "
                         f"is no SAM label: leave one of them out")
    if args.min_case_agreement is not None and not 0.0 <= args.min_case_agreement <= 1.0:
        raise NnsamError(f"--min-case-agreement {args.min_case_agreement} must be a Dice in [0, 1], e.g. 0.85")
    if args.np < 1:
        raise NnsamError(f"-np {args.np}: the number of processes must be at least 1")
    from nnunet_sam.nnunet.datasets import dataset_folders
    from nnunet_sam.nnunet.sam_views import dataset_view_settings

    # the channel's modality (and a --ct-window for a channel that is not CT) checked before anything is written
    settings = dataset_view_settings(settings, dataset_folders(args.dataset, args.configuration, args.plans),
                                     args.channel)
    folds = tuple(fold_name(f) for f in args.folds) if args.folds else None  # a bad -f: before any model is sought
    choice = ModelChoice(trainer=args.trainer, folds=folds,
                         checkpoint=args.checkpoint_name, tta=not args.disable_tta)
    job = DatasetJob(dataset=args.dataset, configuration=args.configuration, plans=args.plans, model=choice,
                     channel=args.channel, export_dir=args.export, gt_dir=args.gt, overlays=args.overlays,
                     resume=args.resume, num_parts=args.num_parts, part_id=args.part_id, num_processes=args.np,
                     ignore_disagreement=args.ignore_disagreement,
                     min_case_agreement=args.min_case_agreement)
    plan = plan_dataset_job(job)
    device = resolve_device(args.device)
    initial = InitialModel(plan.model_folder, plan.model, device)
    if args.no_sam:
        write_unrefined_pseudo_labels(plan, initial)
        return
    model = load_sam(args.model_type, args.checkpoint, device, compile_encoder=args.compile)
    refine_dataset(plan, _refiner(model, settings, args.cache), initial)


def _sam_label_options(args: argparse.Namespace) -> list[str]:
    """The dataset-mode flags given that compare SAM's pseudo label with the initial model's prediction."""
    given = {"--ignore-disagreement": args.ignore_disagreement,
             "--min-case-agreement": args.min_case_agreement is not None}
    return [flag for flag, on in given.items() if on]


def _refine(args: argparse.Namespace) -> None:
    settings = settings_from_args(args)  # its one-line errors come before any work
    if args.num_parts < 1:
        raise NnsamError(f"-num_parts {args.num_parts} must be at least 1 (processes that share the cases)")
    check_sam_arguments(args)
    check_cache_folder(args.cache)
    files = [name for name in ("images", "masks", "output") if getattr(args, name) is not None]
    if args.dataset is not None:
        if files or args.probabilities is not None:
            raise NnsamError("use either -d (dataset mode) or -i/-m/-o/--probabilities (files mode), not both "
                             "(dataset mode computes the probabilities itself)")
        _refine_dataset(args, settings)
    elif args.no_sam:
        raise NnsamError("--no-sam is for dataset mode (-d): in files mode the masks are already what it would write")
    elif _sam_label_options(args):
        raise NnsamError(f"{_sam_label_options(args)[0]} is for dataset mode (-d): it needs the initial model's "
                         f"prediction")
    elif len(files) == 3:
        _refine_files(args, settings)
    else:
        raise NnsamError("give -d DATASET (pseudo labels for imagesUnlabeled/) or all of -i IMAGES -m MASKS "
                         "-o OUT (files mode); see nnsam_refine --help")


def _refine_files(args: argparse.Namespace, settings: RefineSettings) -> None:
    from nnunet_sam.nnunet.refine_files import FilesJob, plan_files_job, refine_folder

    job = FilesJob(images_dir=args.images, masks_dir=args.masks, out_dir=args.output, gt_dir=args.gt,
                   channel=args.channel, resume=args.resume, num_parts=args.num_parts,
                   part_id=args.part_id, overlays=args.overlays, probabilities_dir=args.probabilities)
    plan = plan_files_job(job)
    model = load_sam(args.model_type, args.checkpoint, args.device, compile_encoder=args.compile)
    refine_folder(plan, _refiner(model, settings, args.cache))


def _refiner(model: SamModel, settings: RefineSettings, cache: Path | None) -> SamRefiner:
    """The refiner, reading and filling the embedding cache in `cache` where one is given."""
    if cache is None:
        return SamRefiner(model, settings)
    return SamRefiner(model, settings, cache=EmbeddingCache(cache, model))


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser(), _refine, argv, "finished cases are kept: rerun the same command with --continue")


if __name__ == "__main__":
    main()
