"""The semi-supervised benchmark's report: tables (printed and written to RESULTS.md) and the plot."""

from __future__ import annotations

import shlex

import numpy as np

from nnunet_sam.demo.experiment import plateau_change
from results import machine_description, markdown_table, update_results_section


def _by_arm(records: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        out.setdefault(r["arm"], {})[r["seed"]] = r
    return out


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def arm_table(records: list[dict], arms: list[str], classes: list[str]) -> str:
    """Per arm: mean ± sd of the test Dice over seeds, per class, the difference to the baseline, the seeds
    where it beats the baseline, the validation curve's last-quarter change, and the training time."""
    by_arm = _by_arm(records)
    baseline = {s: r["mean_dice"] for s, r in by_arm.get("baseline", {}).items()}
    rows = []
    for arm in arms:
        runs = by_arm.get(arm, {})
        if not runs:
            continue
        seeds = sorted(runs)
        means = [runs[s]["mean_dice"] for s in seeds]
        diffs = [runs[s]["mean_dice"] - baseline[s] for s in seeds if s in baseline]
        wins = sum(d > 0 for d in diffs)
        per_class = [_mean_sd([runs[s]["dice"][str(k + 1)] for s in seeds]) for k in range(len(classes))]
        plateau = np.mean([plateau_change(runs[s]["curve"]["mean_fg_dice"]) for s in seeds])
        minutes = np.mean([runs[s]["train_seconds"] for s in seeds]) / 60
        rows.append([arm, _mean_sd(means), *per_class,
                     "-" if arm == "baseline" else f"{np.mean(diffs):+.3f}",
                     "-" if arm == "baseline" else f"{wins}/{len(diffs)}", f"{plateau:+.3f}",
                     f"{minutes:.1f}", str(len(seeds))])
    return markdown_table(["arm", "mean test Dice", *classes, "vs baseline", "seeds above baseline",
                           "val. Dice change, last quarter", "train min", "seeds"], rows)


def pseudo_table(records: list[dict], classes: list[str], arms: list[str]) -> str:
    """Per class: Dice of the pseudo labels against the unlabelled cases' truth, before SAM (the baseline's
    predictions = the raw pseudo labels) and after each arm's SAM refinement (mean over seeds), arms in order."""
    by_arm = _by_arm(records)
    refined = {arm: [r for r in by_arm.get(arm, {}).values() if "pseudo_dice_after" in r] for arm in arms
               if arm != "SAM pseudo + MT"}  # the same pseudo labels as SAM pseudo
    refined = {arm: rows for arm, rows in refined.items() if rows}
    if not refined:
        return "(no SAM arm run)"
    before = refined.get("SAM pseudo") or next(iter(refined.values()))  # refined from the baseline's predictions

    def mean(rows: list[dict], key: str, label: str) -> str:
        values = [r[key][label] for r in rows if r[key].get(label) is not None]
        return f"{np.mean(values):.3f}" if values else "-"

    rows = []
    for k, name in enumerate(classes):
        label = str(k + 1)
        rows.append([name, mean(before, "pseudo_dice_before", label),
                     *[mean(arm_rows, "pseudo_dice_after", label) for arm_rows in refined.values()]])
    rows.append(["mean", *[f"{np.mean([float(c) for c in col if c != '-']):.3f}"
                           if any(c != "-" for c in col) else "-" for col in zip(*[r[1:] for r in rows])]])
    return markdown_table(["class", "before SAM (raw pseudo)", *[f"after SAM: {arm}" for arm in refined]], rows)


def selection_line(records: list[dict]) -> str:
    """The case-level selection (arm *SAM pseudo, selected cases*): how many unlabelled cases it kept and how
    good their pseudo labels are, beside the same arm's pseudo labels of every case."""
    rows = [r for r in _by_arm(records).get("SAM pseudo, selected cases", {}).values() if "selected_fraction" in r]
    if not rows:
        return ""

    def mean_dice(key: str) -> float:
        return float(np.mean([np.mean([v for v in r[key].values() if v is not None]) for r in rows]))

    return (f"Case-level selection (SAM agreement >= 0.85): {np.mean([r['selected_fraction'] for r in rows]):.0%} "
            f"of the unlabelled cases kept (mean over {len(rows)} seed(s)); their pseudo labels' mean Dice "
            f"{mean_dice('pseudo_dice_selected'):.3f} against {mean_dice('pseudo_dice_after'):.3f} over every case.")


TARGETS = (  # (arm, reference arm, target of the mean paired difference): issues 12 and 29
    ("SAM pseudo", "baseline", 0.05), ("SAM pseudo", "raw pseudo", 0.02), ("SAM pseudo", "Mean Teacher", 0.0),
    ("Mean Teacher", "baseline", 0.02), ("SAM pseudo + MT", "SAM pseudo", 0.01),
    ("oracle", "oracle, pooled", -0.02),  # our two streams waste no labels against nnU-Net's one set
)


def verdict(records: list[dict]) -> str:
    """The issues' targets, each checked on the mean paired difference over the seeds both arms finished, with the
    seeds where the arm is above its reference."""
    by_arm = _by_arm(records)
    checks = []
    for arm, other, target in TARGETS:
        seeds = sorted(set(by_arm.get(arm, {})) & set(by_arm.get(other, {})))
        if not seeds:
            continue
        diffs = [by_arm[arm][s]["mean_dice"] - by_arm[other][s]["mean_dice"] for s in seeds]
        difference = float(np.mean(diffs))
        checks.append(f"{arm} - {other} {difference:+.3f}, above in {sum(d > 0 for d in diffs)}/{len(seeds)} seeds "
                      f"({'met' if difference >= target else 'not met'}, target {target:+.2f})")
    return "Targets: " + ("; ".join(checks) if checks else "not measured (no pair of arms finished)") + "."


def training_noise(records: list[dict]) -> str:
    """The baseline trained twice per seed (arm *baseline, repeat*): the differences, and the standard deviation of
    one training's test Dice they imply (RMS difference / sqrt 2)."""
    by_arm = _by_arm(records)
    base, repeat = by_arm.get("baseline", {}), by_arm.get("baseline, repeat", {})
    seeds = sorted(set(base) & set(repeat))
    if not seeds:
        return ""
    diffs = [repeat[s]["mean_dice"] - base[s]["mean_dice"] for s in seeds]
    sd = float(np.sqrt(np.mean(np.square(diffs)) / 2))
    return (f"Training noise: the baseline trained again with another training seed on the same cases differs by "
            f"{', '.join(f'{d:+.3f}' for d in diffs)} (seeds {', '.join(map(str, seeds))}): one training's test Dice "
            f"varies by about ±{sd:.3f}, a paired difference of two arms by ±{sd * np.sqrt(2):.3f}, its mean over "
            f"{len(seeds)} seeds by ±{sd * np.sqrt(2 / len(seeds)):.3f}.")


def plot(results: dict[str, list[dict]], arms: list[str], path) -> None:
    """Per dataset: test Dice per arm (bar: mean; points: seeds) and the validation curves (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d, r in results.items() if r]
    fig, axes = plt.subplots(len(datasets), 2, figsize=(16, 5 * len(datasets)), squeeze=False)
    palette = plt.get_cmap("tab20")

    def colours(i: int):  # one colour per arm, the same on every dataset
        return palette(arms.index(present[i]) % 20)

    for row, dataset in zip(axes, datasets):
        by_arm = _by_arm(results[dataset])
        present = [a for a in arms if a in by_arm]
        for i, arm in enumerate(present):
            values = [r["mean_dice"] for r in by_arm[arm].values()]
            row[0].bar(i, np.mean(values), color=colours(i), alpha=0.5)
            row[0].scatter(np.full(len(values), i), values, color=colours(i), edgecolor="black", zorder=3)
            curves = [r["curve"]["mean_fg_dice"] for r in by_arm[arm].values()]
            length = min(len(c) for c in curves)
            mean_curve = np.mean([c[:length] for c in curves], axis=0)
            window = min(5, length)  # nnU-Net's per-epoch pseudo-Dice is noisy: a 5-epoch moving average
            smooth = np.convolve(mean_curve, np.ones(window) / window, mode="valid")
            row[1].plot(np.arange(window, length + 1), smooth, label=arm, color=colours(i))
        row[0].set_xticks(range(len(present)), present, rotation=40, ha="right", fontsize=7)
        row[0].set_ylabel("mean test Dice")
        row[0].set_title(f"{dataset}: test Dice per arm (points: seeds)")
        row[1].set_xlabel("epoch")
        row[1].set_ylabel("validation pseudo-Dice (5-epoch moving average)")
        row[1].set_title(f"{dataset}: validation curves (mean over seeds)")
        row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(args, results: dict[str, list[dict]], minutes: float, title: str, plot_path, classes_of: dict,
           order: list[str], schedules: dict[str, tuple[int, int]]) -> str:
    """Print the tables (every arm with results, in `order`); unless --no-results, write them with the plot into
    RESULTS.md."""
    found = {r["arm"] for records in results.values() for r in records}
    arms = [a for a in order if a in found]
    lines = [f"Command: `.venv/bin/python benchmarks/ssl_gain.py {shlex.join(args.argv)}`. Machine: "
             f"{machine_description('cpu')}; the two datasets ran in parallel worker processes, one torch thread "
             f"each. This run's wall-clock: {minutes:.1f} min (arms finished in an earlier run of the same work folder "
             f"are not redone: their time is in *train min*).", "",
             f"Every arm: nnU-Net `2d` ({'the planned U-Net' if args.full_network else 'the CPU-sized U-Net: 16 to 128 features instead of 32 to 512, same stages, patch and batch'}), "
             f"fold 0 (2 labelled training cases, 4 labelled validation cases), "
             f"the dataset's schedule (its heading: epochs x iterations) from scratch, {args.val_iterations} validation "
             f"batches per epoch; up to {args.seeds} seeds (the *seeds* column: how many each arm finished; a seed draws the labelled, validation, unlabelled and test "
             f"cases and seeds the training). Test Dice: nnU-Net's evaluation of the predicted test cases, mean "
             f"± sd over seeds. *val. Dice change*: nnU-Net's per-epoch validation pseudo-Dice, mean of the last quarter "
             f"of the epochs minus the mean of the quarter before (near 0: plateaued).", ""]
    for dataset, records in results.items():
        if not records:
            continue
        classes = classes_of[dataset]
        epochs, iterations = schedules[dataset]
        noise = training_noise(records)
        lines += [f"### {dataset} ({epochs} epochs x {iterations} iterations)", "", arm_table(records, arms, classes), "", verdict(records), "",
                  *([noise, ""] if noise else []),
                  "Pseudo labels of the unlabelled cases (Dice against their truth, mean over cases and seeds):", "",
                  pseudo_table(records, classes, arms), ""]
        selection = selection_line(records)
        lines += [selection, ""] if selection else []
    text = "\n".join(lines)
    print(text)
    if not args.no_results:
        plot(results, arms, plot_path)
        text += f"\n![semi-supervised gain]({plot_path.name})\n"
        update_results_section(title, text)
    return text
