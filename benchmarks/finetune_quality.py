"""Fine-tuned vs zero-shot LiteMedSAM on real labelled images, leave-one-out, and what fine-tuning costs.

Data: the five cases with manual tumour labels of `benchmarks/refine_quality.py` (brain MR x2, breast MR,
lung CT x2, from the sdist of `pyradiomics-bhklab==3.1.4`). For each held-out case, the mask decoder is
fine-tuned (`nnunet_sam.sam.finetune`, default settings) on the labelled slices of all other cases, then
measured on the held-out case against its truth:
- decoder: SAM's masks from the true boxes (no guard), zero-shot vs fine-tuned;
- refined: the engine's refinement (default settings, guard on) of degraded masks (seeds 0..N-1,
  `degrade_labels` as in refine_quality.py), zero-shot vs fine-tuned;
- control: the truth itself refined (a correct mask should stay correct);
- with class prompts (`--context tile` or `--prompts fewshot`): prompt-free Dice (the class prompts alone,
  no box, on the slices with the tumour and up to 3 slices beyond; on the held-out case, and on the
  training cases to show whether they could fit them) and *ends cut*: the truth with the
  first and last fifth of the tumour's slices removed (an initial model that stops too early), refined
  zero-shot (no class prompts, nothing to recover with) and fine-tuned (recovering slices).
`--pairs` trains each fold on the other case of the same anatomy only (brain1 <-> brain2, lung1 <-> lung2):
the few-label setting, where the labelled and unlabelled cases show the same organ.
Cost: seconds per epoch, model inputs encoded, size of the embedding cache (`benchmarks/.cache/embeddings/`).
Results are printed and written to a "Fine-tuning" section of `benchmarks/RESULTS.md` named after the
options, so runs with different options sit side by side.

`--dataset synthetic|brain` measures instead what the issue's target asks: a real nnU-Net's predictions of
unlabelled cases refined zero-shot and fine-tuned (on true boxes, and on boxes of imperfect masks), on
`ssl_gain.py`'s datasets and seeds (see `finetune_pseudo.py`).

Run: `.venv/bin/python benchmarks/finetune_quality.py` (see `--help`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from nnunet_sam.demo import degrade
from nnunet_sam.sam import RefineSettings, SamRefiner, load_sam
from nnunet_sam.sam.class_prompts import class_prompt_mode
from nnunet_sam.sam.embedding_cache import EmbeddingCache
from nnunet_sam.sam.views import CONTEXTS, slicing_axis
from nnunet_sam.sam.finetune import (DecoderFinetuner, FinetuneSettings, LabelledVolume, attach_class_prompts,
                                     class_prompt_dice, decoder_dice, slice_examples)

sys.dont_write_bytecode = True  # write nothing but the cache and RESULTS.md (no benchmarks/__pycache__)
from refine_quality import (CACHE, CASES, LABEL, PACKAGE, VERSION, Case, code_version, data_lines,  # noqa: E402
                            fetch_cases, machine_text, record_invocation, refine_once)
from results import RESULTS, markdown_table, update_results_section  # noqa: E402
from finetune_pseudo import DECODERS  # noqa: E402

logger = logging.getLogger("finetune_quality")

TITLE = "Fine-tuning (benchmarks/finetune_quality.py{options})"
EMBEDDINGS = CACHE / "embeddings"
PAIRS = {"brain1": "brain2", "brain2": "brain1", "lung1": "lung2", "lung2": "lung1"}
ENDS_CUT = 0.2  # fraction of the tumour's slices removed at each end for the "ends cut" initial mask


@dataclass
class Scores:
    """One held-out case under one decoder (zero-shot or fine-tuned)."""

    decoder: float
    refined: list[float] = field(default_factory=list)  # per degradation seed
    control: float = 0.0
    before: list[float] = field(default_factory=list)  # the degraded masks' own Dice, per seed
    prompt_free: float | None = None  # the class prompts alone (fine-tuned with class prompts only)
    ends: float | None = None  # the "ends cut" mask refined
    ends_before: float | None = None  # the "ends cut" mask's own Dice
    recovered: int = 0  # slices the class prompts recovered on the "ends cut" mask

    @property
    def refined_mean(self) -> float:
        return float(np.mean(self.refined))


@dataclass
class Fold:
    held_out: str
    train_slices: int
    dice_before: list[float]  # degraded masks vs truth, per seed
    zero_shot: Scores
    finetuned: Scores
    seconds_per_epoch: float
    fit_seconds: float
    loss_first: float
    loss_last: float
    prompt_free_train: float | None = None  # the class prompts on their own training slices (can they fit?)
    epochs_run: int = 0  # the epochs trained (--epochs, raised to reach min_steps on few slices)


def volume(case: Case) -> LabelledVolume:
    return LabelledVolume(case.name, case.image, case.truth, case.spacing)


def cut_ends(truth: np.ndarray, axis: int, fraction: float = ENDS_CUT) -> np.ndarray:
    """The truth without the first and last `fraction` of its slices along `axis` (at least one each)."""
    slices = np.flatnonzero(np.moveaxis(truth, axis, 0).any(axis=(1, 2)))
    count = max(1, int(round(fraction * len(slices))))
    out = np.moveaxis(truth.copy(), axis, 0)
    out[list(slices[:count]) + list(slices[-count:])] = 0
    return np.moveaxis(out, 0, axis)


def score(model, cache: EmbeddingCache, settings: RefineSettings, case: Case, seeds: Sequence[int],
          negatives: int) -> Scores:
    """Decoder Dice from true boxes, refinement Dice per degradation seed, the control, and with class
    prompts their own Dice; the "ends cut" mask is refined in every case (recovery needs class prompts)."""
    examples = slice_examples([volume(case)], cache, settings, negatives=negatives)
    decoder = decoder_dice(model, cache, examples, settings)[case.name][LABEL]
    prompt_free = None
    if model.class_prompts is not None:
        prompt_free = class_prompt_dice(model, cache, examples)[case.name][LABEL]
    refiner = SamRefiner(model, settings, cache)
    runs = [refine_once(refiner, case, degrade.degrade_labels(case.truth, seed=seed, body=None), seed)
            for seed in seeds]
    axis = settings.axis if settings.axis is not None else slicing_axis(case.spacing, case.image.shape)
    ends = refine_once(refiner, case, cut_ends(case.truth, axis), None)
    return Scores(decoder=decoder, refined=[r.dice_after for r in runs], before=[r.dice_before for r in runs],
                  control=refine_once(refiner, case, case.truth, None).dice_after, prompt_free=prompt_free,
                  ends=ends.dice_after, ends_before=ends.dice_before, recovered=ends.stats.slices_recovered)


def training_cases(cases: list[Case], held_out: Case, pairs: bool) -> list[Case]:
    """Every other case, or (pairs) the other case of the same anatomy."""
    if pairs:
        return [c for c in cases if c.name == PAIRS[held_out.name]]
    return [c for c in cases if c is not held_out]


def run_benchmark(cases: list[Case], seeds: Sequence[int], settings: FinetuneSettings, refine_settings: RefineSettings,
                  device: str, pairs: bool = False) -> tuple[list[Fold], EmbeddingCache]:
    model = load_sam("litemedsam", device=device)
    cache = EmbeddingCache(EMBEDDINGS, model)
    finetuner = DecoderFinetuner(model, cache, refine_settings, settings)
    negatives = settings.slices_beyond_foreground
    zero_shot = {case.name: score(model, cache, refine_settings, case, seeds, negatives) for case in cases}
    folds = []
    for held_out in cases:
        finetuner.restore()
        training = [volume(c) for c in training_cases(cases, held_out, pairs)]
        examples = slice_examples(training, cache, refine_settings, min_pixels=settings.min_pixels,
                                  negatives=negatives)
        if settings.class_prompts:
            attach_class_prompts(model, cache, examples, [LABEL], settings.class_prompts)
        started = time.perf_counter()
        result = finetuner.fit(examples)
        fit_seconds = time.perf_counter() - started
        fitted = None
        if settings.class_prompts:
            fitted = float(np.mean([per_case[LABEL] for per_case in class_prompt_dice(model, cache, examples).values()]))
        finetuned = score(model, cache, refine_settings, held_out, seeds, negatives)
        fold = Fold(held_out=held_out.name, train_slices=len(examples), dice_before=zero_shot[held_out.name].before,
                    zero_shot=zero_shot[held_out.name], finetuned=finetuned,
                    seconds_per_epoch=result.seconds_per_epoch, fit_seconds=fit_seconds,
                    loss_first=result.history[0].loss, loss_last=result.history[-1].loss, prompt_free_train=fitted,
                    epochs_run=len(result.history))
        logger.info("%s held out: decoder %.3f -> %.3f, refined %.3f -> %.3f, control %.3f -> %.3f, ends cut %.3f -> "
                    "%.3f (%.1f s/epoch)", held_out.name, fold.zero_shot.decoder, finetuned.decoder,
                    fold.zero_shot.refined_mean, finetuned.refined_mean, fold.zero_shot.control, finetuned.control,
                    fold.zero_shot.ends, finetuned.ends, fold.seconds_per_epoch)
        folds.append(fold)
    finetuner.restore()
    return folds, cache


# --- report -----------------------------------------------------------------------------------------

def fold_table(folds: list[Fold]) -> str:
    with_prompts = folds[0].finetuned.prompt_free is not None
    header = ["held-out case", "training slices", "decoder zero-shot", "decoder fine-tuned",
              *(["prompt-free on training slices", "prompt-free fine-tuned"] if with_prompts else []),
              "degraded (before)", "refined zero-shot", "refined fine-tuned", "control zero-shot",
              "control fine-tuned", "ends cut (before)", "ends cut zero-shot", "ends cut fine-tuned",
              *(["slices recovered"] if with_prompts else []), "loss first -> last epoch", "s / epoch"]

    def cells(f: Fold) -> list:
        return [f.zero_shot.decoder, f.finetuned.decoder,
                *([f.prompt_free_train, f.finetuned.prompt_free] if with_prompts else []),
                float(np.mean(f.dice_before)), f.zero_shot.refined_mean, f.finetuned.refined_mean,
                f.zero_shot.control, f.finetuned.control, f.zero_shot.ends_before, f.zero_shot.ends, f.finetuned.ends]

    rows = [[f.held_out, str(f.train_slices), *[f"{v:.3f}" for v in cells(f)],
             *([str(f.finetuned.recovered)] if with_prompts else []),
             f"{f.loss_first:.3f} -> {f.loss_last:.3f}", f"{f.seconds_per_epoch:.1f}"] for f in folds]
    means = np.mean([cells(f) for f in folds], axis=0)
    rows.append(["**mean**", "", *[f"**{v:.3f}**" for v in means],
                 *([str(sum(f.finetuned.recovered for f in folds))] if with_prompts else []), "",
                 f"{np.mean([f.seconds_per_epoch for f in folds]):.1f}"])
    return markdown_table(header, rows)


def cost_lines(folds: list[Fold], cache: EmbeddingCache, settings: FinetuneSettings) -> list[str]:
    encoded = cache.misses
    return [
        f"- Fine-tuning: {min(f.epochs_run for f in folds)}-{max(f.epochs_run for f in folds)} epochs per fold "
        f"(--epochs {settings.epochs}, at least {settings.min_steps} steps), "
        f"{np.mean([f.seconds_per_epoch for f in folds]):.1f} s "
        f"per epoch on average ({min(f.seconds_per_epoch for f in folds):.1f}-"
        f"{max(f.seconds_per_epoch for f in folds):.1f}), {np.mean([f.fit_seconds for f in folds]):.0f} s per fold; "
        f"about {np.mean([f.seconds_per_epoch / f.train_slices for f in folds]):.2f} s per labelled slice per epoch.",
        f"- Embedding cache: {encoded} model inputs encoded in this run, {cache.hits} reads served from the cache; "
        f"{cache.size_bytes() / 2**20:.1f} MB on disk for this model (float16, "
        f"{cache.size_bytes() / max(1, len(list(cache.folder.rglob('*.npy')))) / 2**20:.1f} MB per model input).",
    ]


def section(args: argparse.Namespace, device: str, version: str, cases: list[Case], folds: list[Fold],
            cache: EmbeddingCache, settings: FinetuneSettings, seconds: float) -> str:
    command = shlex.join([".venv/bin/python", "benchmarks/finetune_quality.py", *args.argv])
    wins = sum(f.finetuned.refined_mean > f.zero_shot.refined_mean for f in folds)
    parts = [
        f"Machine: {machine_text(torch.device(device))}. Total runtime: {seconds / 60:.1f} min. The CPU may be "
        f"shared with other work: the seconds are indicative only.", "",
        f"Command: `{command}`. Code: {version}.", "",
        f"Data: the cases with manual tumour labels from `{PACKAGE}=={VERSION}` (see the refinement-quality "
        f"section):", "",
        *data_lines(cases), "",
        ("Same-anatomy pairs: for each held-out case, LiteMedSAM's mask decoder is fine-tuned on the labelled "
         "slices of the other case of the same anatomy" if args.pairs else
         "Leave-one-out: for each held-out case, LiteMedSAM's mask decoder is fine-tuned on the labelled slices of "
         f"the other {len(cases) - 1} cases") + " (image encoder and prompt encoder frozen, embeddings cached), then "
        "measured on the held-out case. *decoder*: SAM's masks from the true boxes (no guard). *refined*: the engine's default "
        f"refinement (guard on) of `degrade_labels(truth, seed, body=None)` masks, mean over seeds "
        f"{list(args.seed_list)}. *control*: the true label refined (should stay at 1.0). *ends cut*: the true "
        f"label without the first and last {ENDS_CUT:.0%} of its slices, refined. Views: `--context "
        f"{args.context}`" + (f" (grid {args.grid})" if args.context == "tile" else "") + ". *prompt-free*: the "
        "class prompts alone (no box), over the tumour's slices and 3 beyond each end, of the held-out case and "
        "(*on training slices*) of the cases they were trained on.", "",
        f"Fine-tuning settings: {', '.join(f'{k}={v!r}' for k, v in asdict(settings).items())}.", "",
        fold_table(folds), "",
        f"Fine-tuned refinement beat zero-shot on {wins} of {len(folds)} held-out cases.", "",
        "Cost:", "",
        *cost_lines(folds, cache, settings), "",
    ]
    return "\n".join(parts)


# --- command line -----------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = FinetuneSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4, metavar="N",
                        help="degrade every held-out case with seeds 0..N-1 (default 4)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help=f"fine-tuning epochs per fold (raised to at least {defaults.min_steps} optimiser steps)")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="AdamW learning rate")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda or auto")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None, metavar="CASE",
                        help=f"cases (default all: {' '.join(CASES)}; with --pairs: {' '.join(PAIRS)}); each is "
                             f"held out once")
    parser.add_argument("--pairs", action="store_true",
                        help="train each fold on the other case of the same anatomy only (brain1 <-> brain2, "
                             "lung1 <-> lung2)")
    parser.add_argument("--context", default="single", choices=CONTEXTS, help="views shown to SAM")
    parser.add_argument("--grid", type=int, default=RefineSettings().grid, help="--context tile: slices per side")
    parser.add_argument("--prompts", default="box", choices=("box", "fewshot"),
                        help="fewshot: also train few-shot class prompts (tile always trains learnt ones)")
    parser.add_argument("--dataset", choices=("synthetic", "brain"), default=None,
                        help="refine a real nnU-Net's predictions of ssl_gain.py's unlabelled cases instead of "
                             "degraded tumours (needs ssl_gain.py's baseline arm; see finetune_pseudo.py)")
    parser.add_argument("--decoders", nargs="+", default=None, metavar="NAME", choices=list(DECODERS)[1:],
                        help="--dataset: the fine-tuned decoders to compare with zero-shot (default all: "
                             "'fine-tuned, true boxes' 'fine-tuned, weak boxes')")
    parser.add_argument("--nnunet-seeds", type=int, default=3, metavar="N",
                        help="--dataset: ssl_gain.py's seeds 0..N-1 (default 3)")
    parser.add_argument("--no-write", action="store_true",
                        help=f"print only; do not update {RESULTS.relative_to(RESULTS.parent.parent)}")
    args = parser.parse_args(argv)
    if args.dataset and (args.pairs or args.cases or args.context != "single" or args.prompts != "box"):
        parser.error("--dataset measures the default views and box prompts on ssl_gain.py's cases: drop --pairs, "
                     "--cases, --context and --prompts")
    args.cases = args.cases or list(PAIRS if args.pairs else CASES)
    if args.seeds < 1 or args.epochs < 1 or len(args.cases) < 2:
        parser.error("--seeds and --epochs must be at least 1, and leave-one-out needs at least 2 cases")
    if args.nnunet_seeds < 1:
        parser.error("--nnunet-seeds must be at least 1")
    if args.pairs and any(PAIRS.get(name) not in args.cases for name in args.cases):
        parser.error(f"--pairs needs both cases of each pair: choose from {' '.join(PAIRS)}")
    return record_invocation(args, argv)


def main_dataset(args: argparse.Namespace, version: str, started: float) -> int:
    """--dataset: zero-shot vs fine-tuned refinement of a real nnU-Net's predictions (finetune_pseudo.py)."""
    from finetune_pseudo import TARGET_GAIN, run_dataset, seed_table, summary_table, verdict
    from ssl_data import DATASETS

    results = run_dataset(args.dataset, range(args.nnunet_seeds), args.epochs, args.device,
                          args.decoders or tuple(DECODERS))
    names = {str(i): name for i, name in enumerate(DATASETS[args.dataset][1], start=1)}
    seconds = time.perf_counter() - started
    table, seeds, lines = summary_table(results, names), seed_table(results), verdict(results)
    print("\n" + table + "\n\n" + seeds + "\n\n" + "\n".join(lines) + f"\n\nTotal runtime {seconds / 60:.1f} min")
    if not args.no_write:
        command = shlex.join([".venv/bin/python", "benchmarks/finetune_quality.py", *args.argv])
        text = "\n".join([
            f"Machine: {machine_text(torch.device(args.device))}. Total runtime: {seconds / 60:.1f} min.", "",
            f"Command: `{command}`. Code: {version}.", "",
            f"Data: `benchmarks/ssl_gain.py`'s {args.dataset} dataset, seeds 0-{args.nnunet_seeds - 1} (2 labelled 2D "
            "cases each; the baseline nnU-Net trained on them predicts the unlabelled cases). Decoders: zero-shot "
            f"LiteMedSAM; `nnsam_finetune` ({args.epochs} epochs, at least {FinetuneSettings().min_steps} optimiser "
            f"steps: {FinetuneSettings(epochs=args.epochs).epochs_for(2)} epochs on 2 slices) on the labelled cases "
            "with true boxes only (`--weak-prompts 0`) and with the default weak boxes (half the boxes around imperfect masks, "
            "`nnunet_sam/sam/weak_prompts.py`). Engines: *unguided* (`--keep-confident off --activation off`) and "
            "*guided* (the defaults, with the model's softmax). Dice of the pseudo labels against the unlabelled "
            "cases' true labels, per class, mean over cases, then over seeds; *cases won / lost*: unlabelled "
            "cases (all seeds) whose mean Dice the fine-tuned decoder raised / lowered against zero-shot.", "",
            table, "", seeds, "", f"Target (issue 13): fine-tuned >= zero-shot + {TARGET_GAIN:.2f}:", "", *lines, ""])
        update_results_section(TITLE.format(options=f" --dataset {args.dataset}"), text)
        logger.info("wrote %s", RESULTS)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    version = code_version()
    if args.dataset:
        return main_dataset(args, version, started)
    cases = fetch_cases(args.cases)
    settings = FinetuneSettings(epochs=args.epochs, learning_rate=args.lr,
                                class_prompts=class_prompt_mode(args.context, args.prompts))
    refine_settings = RefineSettings(context=args.context, grid=args.grid)
    folds, cache = run_benchmark(cases, args.seed_list, settings, refine_settings, args.device, args.pairs)
    seconds = time.perf_counter() - started
    print("\n" + fold_table(folds) + "\n\n" + "\n".join(cost_lines(folds, cache, settings))
          + f"\n\nTotal runtime {seconds / 60:.1f} min")
    if not args.no_write:
        options = "".join([" --pairs" if args.pairs else "", f" --context {args.context}" if args.context != "single" else "",
                           f" --grid {args.grid}" if args.context == "tile" and args.grid != 2 else "",
                           " --prompts fewshot" if args.prompts == "fewshot" else ""])
        update_results_section(TITLE.format(options=options),
                               section(args, args.device, version, cases, folds, cache, settings, seconds))
        logger.info("wrote %s", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
