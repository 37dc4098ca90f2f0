"""The demo's report: Markdown tables a person reads first, and the pictures beside it."""

from __future__ import annotations

from pathlib import Path

from nnunet_sam.demo.pipeline import BASELINE
from nnunet_sam.utils.atomic import atomic_path


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


def _setting(results: dict, device: str) -> list[str]:
    spec, schedule = results["dataset"]["spec"], results["dataset"]["schedule"]
    return [f"Synthetic CT-like dataset `{spec['name']}` (shape {tuple(spec['shape'])}): {spec['labelled']} "
            f"labelled training cases, {spec['unlabelled']} unlabelled cases, {spec['test']} test cases. "
            f"Device: {device}. Every model trains from scratch for {schedule['epochs']} epochs x "
            f"{schedule['iterations']} iterations (fold `all`); the baseline is SAM's initial model.", ""]


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
    header = ["model", "trainer", *organs, "mean"]
    rows = []
    for name, trainer in models.items():
        ev = results[f"evaluate {name}"]
        rows.append([name, f"`{trainer}`", *[_fmt(ev["dice"].get(str(i + 1))) for i in range(len(organs))],
                     _fmt(ev["mean_dice"])])
    lines += _table(header, rows)
    lines += ["", *_comparison(results, models), "## Time per stage", ""]
    lines += _table(["stage", "seconds"], [[name, f"{r['seconds']:.0f}"] for name, r in results.items()])
    total = sum(r["seconds"] for r in results.values())
    lines += ["", f"Total: {total / 60:.1f} min (stages done in earlier runs count with their own time).", "",
              "Pictures in `overlays/`: `pseudo_label_*.png` (image, baseline prediction, SAM-refined pseudo "
              "label, truth) and `test_*.png` (truth and each model's prediction).", ""]
    return "\n".join(lines)


def write_demo_report(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
