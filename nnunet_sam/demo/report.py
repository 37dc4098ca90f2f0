"""The demo's report: Markdown tables a person reads first, and the pictures beside it."""

from __future__ import annotations

from pathlib import Path

from nnunet_sam.utils.atomic import atomic_path


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


def demo_report(results: dict, models: dict[str, str], organs: list[str]) -> str:
    """Markdown: pseudo-label Dice before/after SAM, test Dice per model, time per stage."""
    summary = results["refine"]["summary"]
    lines = ["# nnunet-sam demo", "",
             "## Pseudo labels of the unlabelled cases (Dice against their hidden truth)", ""]
    rows = [[organs[int(label) - 1], _fmt(s["mean_dice_before"]), _fmt(s["mean_dice_after"]),
             str(s["slices_refined"]), str(s["slices_kept"]), str(s["slices_filled"])]
            for label, s in summary.items()]
    lines += _table(["organ", "baseline prediction", "after SAM", "slices refined", "kept by guard", "filled"],
                    rows)
    lines += ["", "## Test cases (Dice, nnU-Net's evaluation)", ""]
    header = ["model", "trainer", *organs, "mean"]
    rows = []
    for name, trainer in models.items():
        ev = results[f"evaluate {name}"]
        rows.append([name, f"`{trainer}`", *[_fmt(ev["dice"].get(str(i + 1))) for i in range(len(organs))],
                     _fmt(ev["mean_dice"])])
    lines += _table(header, rows)
    lines += ["", "## Time per stage", ""]
    lines += _table(["stage", "seconds"], [[name, f"{r['seconds']:.0f}"] for name, r in results.items()])
    total = sum(r["seconds"] for r in results.values())
    lines += ["", f"Total: {total / 60:.1f} min (stages done in earlier runs count with their own time).", "",
              "Pictures: `overlays/` (image, baseline prediction, SAM-refined pseudo label, truth).", ""]
    return "\n".join(lines)


def write_demo_report(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
