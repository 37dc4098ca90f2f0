"""`finetune_quality.py --dataset synthetic|brain`: does fine-tuning SAM's decoder help it refine a real nnU-Net's
predictions? (issue 13, item 4: fine-tuned >= zero-shot + 0.03 in refinement Dice.)

Data and models come from `benchmarks/ssl_gain.py`'s work folder (its *baseline* arm must have run for every
seed): per seed, 2 labelled 2D cases, the baseline nnU-Net trained on them (the initial model), and the
unlabelled cases with their true labels (`labelsUnlabeledTruth`). Per seed, the decoders
- *zero-shot*: LiteMedSAM as shipped;
- *fine-tuned, true boxes*: `nnsam_finetune` on the labelled cases with `--weak-prompts 0` (jittered true boxes
  only, as before weak prompts existed; the same number of steps);
- *fine-tuned, weak boxes*: `nnsam_finetune` with its defaults (half the boxes around imperfect masks,
  `nnunet_sam/sam/weak_prompts.py`);
each refine the baseline's predictions of the unlabelled cases (`nnsam_refine -d --gt`) with two engines:
*unguided* (`--keep-confident off --activation off`) and *guided* (the defaults, the model's softmax used).
Measured: the pseudo labels' Dice per class against the truth (mean over cases), and per case whether a
fine-tuned decoder beat zero-shot.

It writes the work folder's pseudo-label folder (ssl_gain.py re-makes it for each arm it runs) and the fine-tuned
checkpoints under `<work folder>/finetune_quality/`. The nnU-Net environment points at the work folder, so each
dataset runs in its own process.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

DECODERS = {"zero-shot": None, "fine-tuned, true boxes": {"weak_prompts": 0.0}, "fine-tuned, weak boxes": {}}
ENGINES = {"unguided": {"confident": None, "activation": None}, "guided (default)": {}}
TARGET_GAIN = 0.03  # the target: fine-tuned >= zero-shot + 0.03


@dataclass
class Refinement:
    """One decoder and engine on one seed's unlabelled cases."""

    seed: int
    decoder: str
    engine: str
    before: dict[str, float]  # class -> mean Dice of the initial model's predictions
    after: dict[str, float]  # class -> mean Dice of the refined pseudo labels
    per_case: dict[str, float] = field(default_factory=dict)  # case -> Dice after, mean over classes
    finetune_seconds: float | None = None

    @property
    def mean_before(self) -> float:
        return float(np.mean(list(self.before.values())))

    @property
    def mean_after(self) -> float:
        return float(np.mean(list(self.after.values())))


def _case_means(report: dict) -> dict[str, float]:
    """Per case: the refined pseudo label's Dice, mean over its classes."""
    out = {}
    for case in report["cases"]:
        values = [c["dice_after"] for c in case["classes"].values() if c.get("dice_after") is not None]
        if values:
            out[case["case"]] = float(np.mean(values))
    return out


def run_dataset(dataset: str, seeds: Sequence[int], epochs: int, device_name: str,
                decoders: Sequence[str] = tuple(DECODERS)) -> list[Refinement]:
    """The `decoders` (zero-shot always) with every engine on every seed of `dataset` (in this process: sets
    nnU-Net's environment)."""
    import torch

    import ssl_gain
    from nnunet_sam.demo.experiment import nnunet_environment

    device = torch.device(device_name)
    ssl_args = ssl_gain.parse_args(["--datasets", dataset])
    root = ssl_gain.dataset_root(ssl_args, dataset)
    os.environ.update(nnunet_environment(root, [root / "trainers"], device))
    from nnunet_sam.demo.slices import UNLABELED_TRUTH
    from nnunet_sam.sam import RefineSettings
    from nnunet_sam.utils.atomic import write_json_atomic

    results = []
    for seed in seeds:
        run = ssl_gain.SeedRun(ssl_args, dataset, seed, root, device)
        if not run.done("baseline"):
            raise SystemExit(f"{dataset} seed {seed} has no trained baseline in {root}; run first: "
                             f".venv/bin/python benchmarks/ssl_gain.py --datasets {dataset} --seeds "
                             f"{max(seeds) + 1} --arms baseline")
        run.restore_arm("baseline")
        experiment, embeddings = run.experiment, root / "embeddings"
        truth = experiment.raw / UNLABELED_TRUTH
        for decoder, options in DECODERS.items():
            if decoder != "zero-shot" and decoder not in decoders:
                continue
            checkpoint, seconds = None, None
            if options is not None:
                started = time.perf_counter()
                output = root / "finetune_quality" / f"seed{seed}" / (decoder.replace(", ", "_").replace(" ", "_")
                                                                      + ".pth")
                checkpoint = experiment.finetune_sam(epochs, embeddings, output=output, **options)["checkpoint"]
                seconds = time.perf_counter() - started
            for engine, settings in ENGINES.items():
                report = experiment.sam_pseudo_labels(run.baseline_trainer, embeddings, truth, checkpoint,
                                                      settings=RefineSettings(**settings))
                summary = report["summary"]
                results.append(Refinement(seed, decoder, engine,
                                          {k: s["mean_dice_before"] for k, s in summary.items()},
                                          {k: s["mean_dice_after"] for k, s in summary.items()},
                                          _case_means(report), seconds))
    record = root / "finetune_quality" / "results.json"  # every number of this run, for a later reading
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic([asdict(r) for r in results], record)
    return results


# --- report -----------------------------------------------------------------------------------------

def _decoders(results: list[Refinement]) -> list[str]:
    return [decoder for decoder in DECODERS if any(r.decoder == decoder for r in results)]


def _find(results: list[Refinement], seed: int, decoder: str, engine: str) -> Refinement:
    return next(r for r in results if (r.seed, r.decoder, r.engine) == (seed, decoder, engine))


def summary_table(results: list[Refinement], class_names: dict[str, str]) -> str:
    """The initial model's Dice per class, then per engine and decoder: Dice per class and mean (over seeds), the
    gain over zero-shot with its spread, and on how many seeds and cases the decoder beat zero-shot."""
    from results import markdown_table

    seeds = sorted({r.seed for r in results})
    classes = sorted({k for r in results for k in r.after}, key=int)
    header = ["engine", "decoder", *[class_names.get(k, k) for k in classes], "mean",
              "gain over zero-shot (mean, min-max over seeds)", "seeds won", "cases won / lost"]
    initial = [_find(results, s, "zero-shot", next(iter(ENGINES))) for s in seeds]
    rows = [["none", "the initial nnU-Net's labels",
             *[f"{np.mean([r.before[k] for r in initial]):.3f}" for k in classes], f"**{np.mean([r.mean_before for r in initial]):.3f}**", "-", "-", "-"]]
    for engine in ENGINES:
        for decoder in _decoders(results):
            runs = [_find(results, s, decoder, engine) for s in seeds]
            zero = [_find(results, s, "zero-shot", engine) for s in seeds]
            gains = [r.mean_after - z.mean_after for r, z in zip(runs, zero)]
            won = lost = 0
            for r, z in zip(runs, zero):
                won += sum(r.per_case[c] > z.per_case[c] + 1e-9 for c in r.per_case if c in z.per_case)
                lost += sum(r.per_case[c] < z.per_case[c] - 1e-9 for c in r.per_case if c in z.per_case)
            first = decoder == "zero-shot"
            rows.append([engine, decoder, *[f"{np.mean([r.after[k] for r in runs]):.3f}" for k in classes],
                         f"**{np.mean([r.mean_after for r in runs]):.3f}**",
                         "-" if first else f"{np.mean(gains):+.3f} ({min(gains):+.3f} to {max(gains):+.3f})",
                         "-" if first else f"{sum(g > 0 for g in gains)}/{len(gains)}",
                         "-" if first else f"{won} / {lost}"])
    return markdown_table(header, rows)


def seed_table(results: list[Refinement]) -> str:
    """Mean Dice after refinement per seed, decoder and engine."""
    from results import markdown_table

    seeds = sorted({r.seed for r in results})
    header = ["engine", "decoder", *[f"seed {s}" for s in seeds], "fine-tuning s"]
    rows = []
    for engine in ENGINES:
        for decoder in _decoders(results):
            runs = [_find(results, s, decoder, engine) for s in seeds]
            seconds = [r.finetune_seconds for r in runs if r.finetune_seconds is not None]
            rows.append([engine, decoder, *[f"{r.mean_after:.3f}" for r in runs],
                         f"{np.mean(seconds):.0f}" if seconds else "-"])
    return markdown_table(header, rows)


def verdict(results: list[Refinement]) -> list[str]:
    """The target per engine: fine-tuned (weak boxes) >= zero-shot + TARGET_GAIN, mean over seeds."""
    lines = []
    seeds = sorted({r.seed for r in results})
    for engine in ENGINES:
        for decoder in _decoders(results)[1:]:
            gain = np.mean([_find(results, s, decoder, engine).mean_after
                            - _find(results, s, "zero-shot", engine).mean_after for s in seeds])
            lines.append(f"- {engine}, {decoder}: {gain:+.3f} over zero-shot "
                         f"(target >= +{TARGET_GAIN:.2f}: {'PASS' if gain >= TARGET_GAIN else 'not met'})")
    return lines
