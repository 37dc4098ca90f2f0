"""The demo's report: Markdown tables a person reads first, and the pictures beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_sam.demo.experiment import plateau_change
from nnunet_sam.demo.pipeline import BASELINE
from nnunet_sam.utils.atomic import atomic_path


# How far to trust one run: the spread over seeds of the same setting, from benchmarks/ssl_gain.py (dataset
# "synthetic": this generator and schedule; a seed draws other case splits and seeds the training; this demo's
# split is seed 0's). Rewrite it when that benchmark is re-run.
SEED_SPREAD = [
    "How far to trust one run: `benchmarks/ssl_gain.py` trains these models on this generator with this schedule "
    "over 3 seeds (other labelled, unlabelled and test cases, other training seeds; this demo's split is seed "
    "0's). Mean test Dice ± sd over the seeds: baseline 0.650 ± 0.055, SAM pseudo 0.679 ± 0.024, Mean Teacher "
    "0.622 ± 0.084, oracle (true labels for the unlabelled cases) 0.751 ± 0.019. SAM pseudo minus baseline per "
    "seed: +0.082, -0.004, +0.010. The same model trained twice on the same cases can differ by 0.05 (see "
    "benchmarks/RESULTS.md, *Semi-supervised gain*): one run's difference of a few hundredths is noise.", ""]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


def _setting(results: dict, device: str) -> list[str]:
    spec, schedule, split = results["dataset"]["spec"], results["dataset"]["schedule"], results["dataset"]["split"]
    network = (", with the CPU-sized U-Net (16 to 128 features instead of 32 to 512)"
               if results["plan"].get("cpu_sized_network") else "")
    return [f"Synthetic CT-like dataset `{spec['name']}`: {spec['cases']} patients of one anatomy, one "
            f"{spec['shape'][0]}x{spec['shape'][1]} slice each, that differ in organ shape, size, position and "
            f"contrast: {split['labelled']} labelled training cases, {split['validation']} labelled validation "
            f"cases (nnU-Net's validation curve), {split['unlabelled']} unlabelled cases, {split['test']} test "
            f"cases. Device: {device}. Every model trains from scratch with nnU-Net's `2d` configuration for "
            f"{schedule['epochs']} epochs x {schedule['iterations']} iterations (fold 0){network}; the baseline "
            f"is SAM's initial model.", ""]


def _comparison(results: dict, models: dict[str, str]) -> list[str]:
    """One line per model: its mean test Dice minus the baseline's."""
    baseline = results[f"evaluate {BASELINE}"]["mean_dice"]
    return [f"- {name}: {results[f'evaluate {name}']['mean_dice'] - baseline:+.3f} mean test Dice vs {BASELINE}."
            for name in models if name != BASELINE] + [""]


def _pseudo_label_table(results: dict, organs: list[str]) -> list[str]:
    """Dice of the baseline's predictions and of SAM's pseudo labels (zero-shot, and fine-tuned if run)."""
    summary = results["refine"]["summary"]
    finetuned = results.get("refine fine-tuned", {}).get("summary")
    header = ["organ", "baseline prediction", "after SAM"]
    if finetuned is not None:
        header.append("after fine-tuned SAM")
    header += ["slices refined", "kept by guard", "filled"]
    used = finetuned or summary  # the pseudo labels the trainers learnt from
    rows = []
    for label, s in summary.items():
        row = [organs[int(label) - 1], _fmt(s["mean_dice_before"]), _fmt(s["mean_dice_after"])]
        if finetuned is not None:
            row.append(_fmt(finetuned[label]["mean_dice_after"]))
        rows.append(row + [str(used[label][key]) for key in ("slices_refined", "slices_kept", "slices_filled")])
    lines = _table(header, rows)
    if finetuned is not None:
        tuning = results["fine-tune SAM"]
        lines += ["", f"The decoder was fine-tuned on the {tuning['slices']} labelled slices of the training cases "
                      f"({tuning['epochs']} epochs, {tuning['seconds_per_epoch']:.1f} s each); the slice counts "
                      f"and the trainers' pseudo labels are the fine-tuned SAM's."]
    return lines


def demo_report(results: dict, models: dict[str, str], organs: list[str], device: str) -> str:
    """Markdown: setting, pseudo-label Dice before/after SAM, test Dice per model, time per stage."""
    lines = ["# nnunet-sam demo", "", *_setting(results, device),
             "## Pseudo labels of the unlabelled cases (Dice against their hidden truth)", ""]
    lines += _pseudo_label_table(results, organs)
    lines += ["", "## Test cases (Dice, nnU-Net's evaluation)", ""]
    header = ["model", "trainer", *organs, "mean", "validation Dice, last quarter", "change from the quarter before"]
    rows = []
    for name, trainer in models.items():
        ev = results[f"evaluate {name}"]
        curve = results[f"train {name}"]["curve"]["mean_fg_dice"]
        quarter = curve[-max(1, len(curve) // 4):]
        rows.append([name, f"`{trainer}`", *[_fmt(ev["dice"].get(str(i + 1))) for i in range(len(organs))],
                     _fmt(ev["mean_dice"]), _fmt(float(np.mean(quarter))), f"{plateau_change(curve):+.3f}"])
    lines += _table(header, rows)
    lines += ["", "Validation Dice: nnU-Net's per-epoch pseudo-Dice on the validation cases, averaged over the last "
                  "quarter of the epochs; a change near 0 from the quarter before means the training has plateaued "
                  "(curves: `overlays/validation_curves.png`).", "", *_comparison(results, models),
              *SEED_SPREAD, "## Time per stage", ""]
    lines += _table(["stage", "seconds"], [[name, f"{r['seconds']:.0f}"] for name, r in results.items()])
    total = sum(r["seconds"] for r in results.values())
    lines += ["", f"Total: {total / 60:.1f} min (stages done in earlier runs count with their own time).", "",
              "Pictures in `overlays/`: `pseudo_labels_*.png` (unlabelled cases: baseline prediction, SAM-refined "
              "pseudo label, truth), `test_cases.png` (truth and each model's prediction) and "
              "`validation_curves.png`.", ""]
    return "\n".join(lines)


def write_demo_report(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
