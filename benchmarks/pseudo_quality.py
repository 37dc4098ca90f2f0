"""Pseudo-label quality, the cheap loop: how much better than the initial model's labels are SAM's, and where is
information lost? No training: the baseline models of `benchmarks/ssl_gain.py` (nnU-Net on the 2 labelled cases of
each seed, `2d`) are reused from its work folder (trained there first if missing, about 3 min per seed and dataset).

Per dataset (ssl_gain's brain MR slices and synthetic CT-like slices) and seed, every unlabelled case is predicted
by the baseline (without and with test-time mirroring) and refined by LiteMedSAM in these arms:
- SAM as before: the engine's rules before issue 28 (nnU-Net's normalised tensor scaled by all-voxel percentiles,
  one box per class and slice, a 6-pixel margin of the model input, the band from the highest probability);
- each change of issue 28 on its own (views, a box per object, margin in mm, band from the class's probability,
  mirroring of the initial prediction);
- all changes together (the current defaults), and the band's threshold measured around its default;
- SAM's ceiling: SAM prompted from the true labels (no probabilities): how good SAM is on this data at all;
- the box ceiling: the truth inside the initial mask's boxes (one per object and slice, the default margin), the
  initial labels elsewhere: what a box-prompted refiner of this model's masks could reach;
- where the initial labels lose (per slice, each object of a class's initial mask is "right" when most of its
  pixels are that class in the truth): the identity ceiling (every object relabelled to its truth's majority
  class, its pixels unchanged: the loss from objects given the wrong class), the geometry ceiling (every right
  object replaced by the true objects it touches, wrong ones kept: the loss SAM could remove, since SAM cannot
  tell a wrong object from a right one), and SAM on the right objects (the defaults prompted from the right
  objects only, the wrong ones kept as they are: how much of the geometry ceiling SAM reaches), and SAM from the
  true right objects (SAM prompted from the true objects that the right ones touch, the wrong ones kept: the best a
  box-prompted SAM can do while the model's wrong objects stay);
- two rules that decide an object's class otherwise than the model (`benchmarks/object_identity.py`): relabelled by
  prototypes (nearest LiteMedSAM-embedding prototype of the fold's labelled cases) and relabelled by foreground
  pieces (every connected piece of the foreground takes its majority class);
- the right objects by kind: split (the model gave a tenth or more of the true object to another class) or not,
  with the Dice to the true object of the model's piece, of SAM from its box and of SAM from the true box.
Dice is nnU-Net's (`evaluation_dice`: a class absent from truth and label is left out), averaged per class over the
cases, then over the classes; per seed, and the mean and spread over seeds.

Run: `.venv/bin/python benchmarks/pseudo_quality.py` (see `--help`); results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results import machine_description, markdown_table, update_results_section  # noqa: E402

logger = logging.getLogger("pseudo_quality")
WORK = HERE / ".cache" / "pseudo_quality"
TITLE = "Pseudo-label quality (benchmarks/pseudo_quality.py)"
BEFORE = {"modality": "range", "boxes": "slice", "box_margin": 6.0, "box_margin_unit": "input", "band": "max"}
SCALES = (0.9, 1.0, 1.15, 1.3)  # the scale ensemble's box sizes (factors of the half-size)
# arm -> (RefineSettings changes, initial prediction mirrored)
ARMS = {
    "SAM as before": (BEFORE, False),
    "+ views": ({**BEFORE, "modality": "auto"}, False),
    "+ a box per object": ({**BEFORE, "boxes": "object"}, False),
    "+ margin 3 mm": ({**BEFORE, "box_margin": 3.0, "box_margin_unit": "mm"}, False),
    "+ band from the class": ({**BEFORE, "band": "class"}, False),
    "+ mirroring": (BEFORE, True),
    "all (defaults)": ({}, True),
    "all, band 0.8": ({"confident": 0.8}, True),
    "all, band 0.97": ({"confident": 0.97}, True),
    "all, no band": ({"confident": None}, True),
    "all, margin 1 mm": ({"box_margin": 1.0}, True),
    "all, margin 2 mm": ({"box_margin": 2.0}, True),
    "all, margin 5 mm": ({"box_margin": 5.0}, True),
    "all, no guard": ({"min_agreement": 0.0, "min_sam_iou": 0.0, "evidence": False}, True),
    "all, no guard, no band": ({"min_agreement": 0.0, "min_sam_iou": 0.0, "evidence": False, "confident": None}, True),
    "all, no evidence test": ({"evidence": False}, True),
    "all, box scales": ({"box_scales": SCALES}, True),
    "all, boxes redrawn": ({"box_rounds": 2}, True),
    "all, boxes redrawn x2": ({"box_rounds": 3}, True),
    "all, box scales, redrawn": ({"box_scales": SCALES, "box_rounds": 2}, True),
    "all, box scales, no guard, no band": ({"box_scales": SCALES, "min_agreement": 0.0, "min_sam_iou": 0.0,
                                            "evidence": False, "confident": None}, True),
}
INITIAL = {"initial": False, "initial, mirrored": True}
CEILINGS = ("box ceiling", "SAM ceiling", "identity ceiling", "geometry ceiling", "SAM on the right objects",
            "SAM from the true right objects", "relabelled by prototypes", "relabelled by foreground pieces")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["synthetic", "brain"], choices=["brain", "synthetic"])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (ssl_gain's splits and baselines)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM")
    p.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    p.add_argument("--report-only", action="store_true", help="refine nothing: report what the work folder holds")
    p.add_argument("--pictures", action="store_true",
                   help="only draw benchmarks/views_<dataset>.png: the old view beside SAM's view of seed 0's first "
                        "unlabelled cases (refines nothing)")
    p.add_argument("--worker", choices=["brain", "synthetic"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ssl_args(dataset: str, seeds: int) -> argparse.Namespace:
    import ssl_gain

    return ssl_gain.parse_args(["--datasets", dataset, "--seeds", str(seeds), "--arms", "baseline"])


def per_class_dice(truth: np.ndarray, labels: np.ndarray, classes: list[int]) -> dict[str, float | None]:
    from nnunet_sam.sam.prompts import evaluation_dice

    return {str(c): evaluation_dice(truth == c, labels == c) for c in classes}


def box_ceiling(initial: np.ndarray, truth: np.ndarray, classes: list[int], views, settings) -> np.ndarray:
    """The truth inside every box the default plan draws around the initial mask's objects, the initial labels
    elsewhere (slices along the views' axis)."""
    from nnunet_sam.sam.refine import box_margin_pixels
    from nnunet_sam.sam.refine_plan import Planner

    initial_s, truth_s = views.to_slices(initial), views.to_slices(truth)
    out = initial_s.copy()
    plan = Planner(settings).plan(initial_s, None, classes, [], views.geometry.spacing)
    geometry = views.geometry
    margin = box_margin_pixels(geometry, settings) / geometry.scale[0]  # in slice pixels
    for index, prompts in plan.prompts.items():
        for prompt in prompts:
            x0, y0, x1, y1 = prompt.box
            rows = slice(max(0, int(np.floor(y0 - margin))), int(np.ceil(y1 + margin)) + 1)
            cols = slice(max(0, int(np.floor(x0 - margin))), int(np.ceil(x1 + margin)) + 1)
            inside = out[index, rows, cols]
            true_here = truth_s[index, rows, cols]
            inside[(inside == prompt.label) | (true_here == prompt.label)] = 0
            inside[true_here == prompt.label] = prompt.label
    return views.from_slices(out)


def objects_by_truth(initial: np.ndarray, truth: np.ndarray, views) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each object of the initial labels (a connected piece of one class on a slice along the views' axis) judged
    by the truth's majority class under it: (right, wrong, relabelled), the objects whose majority is their own
    class, the others, and every object relabelled to its majority (the identity ceiling)."""
    from scipy import ndimage

    initial_s, truth_s = views.to_slices(initial), views.to_slices(truth)
    right, wrong, relabelled = np.zeros_like(initial_s), np.zeros_like(initial_s), initial_s.copy()
    for index in range(initial_s.shape[0]):
        for c in np.unique(initial_s[index][initial_s[index] > 0]):
            pieces, count = ndimage.label(initial_s[index] == c)
            for k in range(1, count + 1):
                piece = pieces == k
                majority = int(np.argmax(np.bincount(truth_s[index][piece].astype(np.int64))))
                (right if majority == c else wrong)[index][piece] = c
                relabelled[index][piece] = majority
    return views.from_slices(right), views.from_slices(wrong), views.from_slices(relabelled)


def geometry_ceiling(right: np.ndarray, wrong: np.ndarray, truth: np.ndarray, classes: list[int],
                     views) -> np.ndarray:
    """The wrong objects as they are, every right object replaced by the true objects of its class it touches."""
    from scipy import ndimage

    right_s, truth_s = views.to_slices(right), views.to_slices(truth)
    out = views.to_slices(wrong).copy()
    for index in range(right_s.shape[0]):
        for c in classes:
            true_pieces, _ = ndimage.label(truth_s[index] == c)
            touched = np.unique(true_pieces[(right_s[index] == c) & (true_pieces > 0)])
            out[index][np.isin(true_pieces, touched)] = c
    return views.from_slices(out)


def run_worker(args) -> None:
    """Every seed of one dataset in this process (nnU-Net's folders set before it is imported)."""
    import torch

    from nnunet_sam.demo.experiment import nnunet_environment

    sargs = ssl_args(args.worker, args.seeds)
    import ssl_gain

    root = ssl_gain.dataset_root(sargs, args.worker)
    device = torch.device("cpu")
    os.environ.update(nnunet_environment(root, [root / "trainers"], device))
    if args.pictures:
        draw_views(args, sargs, root, device)
        return
    out = WORK / f"{args.worker}.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    for seed in range(args.seeds):
        done = results.get(str(seed))
        if done is not None and set(args.arms) <= set(done["arms"]) and set(CEILINGS) <= set(done["rows"]):
            continue
        new = seed_results(args, sargs, root, seed, device, [] if done is None else done["arms"])
        if done is not None:  # the arms run before stay (same cases, same initial model)
            new["rows"] = {**done["rows"], **new["rows"]}
            new["arms"] = [*done["arms"], *(arm for arm in new["arms"] if arm not in done["arms"])]
        results[str(seed)] = new
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))


def seed_results(args, sargs, root: Path, seed: int, device, done_arms: list[str]) -> dict:
    import object_identity
    import ssl_gain

    from nnunet_sam.demo.slices import UNLABELED_TRUTH
    from nnunet_sam.nnunet.datasets import case_spacing
    from nnunet_sam.nnunet.predict import InitialModel
    from nnunet_sam.nnunet.refine_dataset import _CaseRefiner
    from nnunet_sam.nnunet.sam_views import ViewVolumes, dataset_view_settings
    from nnunet_sam.sam import RefineSettings, SamRefiner, load_sam
    from nnunet_sam.sam.embedding_cache import EmbeddingCache
    from nnunet_sam.sam.refine import box_margin_pixels
    from nnunet_sam.sam.views import VolumeViews

    run = ssl_gain.SeedRun(sargs, args.worker, seed, root, device)
    if not run.done("baseline"):  # ssl_gain trains it (its own process: nnU-Net's folders)
        subprocess.run([sys.executable, str(HERE / "ssl_gain.py"), "--datasets", args.worker, "--seeds",
                        str(seed + 1), "--arms", "baseline", "--no-results"], check=True)
    trainer = run.restore_arm("baseline")
    experiment = run.experiment
    plan = experiment._dataset_plan(trainer, experiment.raw / UNLABELED_TRUTH)
    cases = _CaseRefiner(plan, None, None)
    views = ViewVolumes(plan.folders)
    classes = [int(c) for c in cases.label_manager.foreground_labels]
    models = {tta: InitialModel(plan.model_folder, replace(plan.model, tta=tta), device) for tta in (False, True)}
    sam = load_sam("litemedsam", None, device)
    cache = EmbeddingCache(WORK / "embeddings", sam)
    settings = {name: dataset_view_settings(RefineSettings(**changes), plan.folders, 0)
                for name, (changes, _) in ARMS.items() if name in args.arms and name not in done_arms}
    defaults = dataset_view_settings(RefineSettings(), plan.folders, 0)
    labelled = json.loads((run.results / "split.json").read_text())["labelled"]  # the fold's labelled cases only
    prototypes = object_identity.labelled_prototypes(*object_identity.read_labelled(experiment.raw, labelled),
                                                     classes, sam, cache, defaults.modality)
    rows: dict[str, dict[str, dict]] = {}  # arm -> case -> class -> Dice
    objects: list[dict] = []  # the right objects of the mirrored initial labels (`object_identity.right_objects`)
    started = time.perf_counter()
    for case_id in plan.cases:
        data, _, _, properties = cases.images.load_case(case_id)
        data = np.asarray(data[:])
        truth = cases.truth(case_id)
        raw = views.volume(case_id, cases.image_files(case_id), data.shape)[0]
        spacing = case_spacing(cases.plans_manager, cases.configuration_manager, properties)
        predicted = {tta: model.predict(data) for tta, model in models.items()}
        for name, tta in INITIAL.items():
            rows.setdefault(name, {})[case_id] = per_class_dice(truth, predicted[tta][0], classes)
        for name, refine_settings in settings.items():
            initial, probabilities = predicted[ARMS[name][1]]
            image = data[0] if refine_settings.modality == "range" else raw
            result = SamRefiner(sam, refine_settings, cache).refine(image, initial, spacing, probabilities, classes)
            rows.setdefault(name, {})[case_id] = per_class_dice(truth, result.mask, classes)
        ceiling = SamRefiner(sam, replace(defaults, min_agreement=0.0, min_sam_iou=0.0, evidence=False), cache)
        rows.setdefault("SAM ceiling", {})[case_id] = per_class_dice(
            truth, ceiling.refine(raw, truth.astype(np.int16), spacing, None, classes).mask, classes)
        case_views = VolumeViews.prepare(raw, spacing, sam.input_size, modality=defaults.modality)
        initial, probabilities = predicted[True]
        rows.setdefault("box ceiling", {})[case_id] = per_class_dice(
            truth, box_ceiling(initial, truth, classes, case_views, defaults), classes)
        right, wrong, relabelled = objects_by_truth(initial, truth, case_views)
        rows.setdefault("identity ceiling", {})[case_id] = per_class_dice(truth, relabelled, classes)
        rows.setdefault("geometry ceiling", {})[case_id] = per_class_dice(
            truth, geometry_ceiling(right, wrong, truth, classes, case_views), classes)
        on_right = SamRefiner(sam, defaults, cache).refine(raw, right, spacing, probabilities, classes).mask
        rows.setdefault("SAM on the right objects", {})[case_id] = per_class_dice(
            truth, np.where(on_right > 0, on_right, wrong), classes)
        true_right = geometry_ceiling(right, np.zeros_like(wrong), truth, classes, case_views)
        from_true = ceiling.refine(raw, true_right, spacing, None, classes).mask
        rows.setdefault("SAM from the true right objects", {})[case_id] = per_class_dice(
            truth, np.where(from_true > 0, from_true, wrong), classes)
        rows.setdefault("relabelled by prototypes", {})[case_id] = per_class_dice(
            truth, object_identity.relabel_by_prototypes(initial, case_views, cache, prototypes, classes), classes)
        rows.setdefault("relabelled by foreground pieces", {})[case_id] = per_class_dice(
            truth, object_identity.relabel_foreground_pieces(initial, case_views), classes)
        objects += object_identity.right_objects(right, initial, truth, case_views, sam, cache,
                                                 box_margin_pixels(case_views.geometry, defaults), classes)
    logger.info("%s seed %d: %d cases in %.0f s", args.worker, seed, len(plan.cases), time.perf_counter() - started)
    return {"arms": list(settings), "classes": classes, "rows": rows, "intensities": defaults.modality,
            "right objects": objects}


def draw_views(args, sargs, root: Path, device, count: int = 3) -> None:
    """benchmarks/views_<dataset>.png: nnU-Net's tensor scaled the old way beside SAM's view, for the first
    `count` unlabelled cases of seed 0 (each a 2D slice), the truth's contours on both."""
    import ssl_gain

    from nnunet_sam.demo.slices import UNLABELED_TRUTH
    from nnunet_sam.nnunet.refine_dataset import _CaseRefiner
    from nnunet_sam.nnunet.sam_views import ViewVolumes, dataset_view_settings
    from nnunet_sam.sam import RefineSettings
    from nnunet_sam.sam.views import describe_intensities, sam_intensities
    from nnunet_sam.visualize import save_view_comparison

    run = ssl_gain.SeedRun(sargs, args.worker, 0, root, device)
    plan = run.experiment._dataset_plan(run.restore_arm("baseline"), run.experiment.raw / UNLABELED_TRUTH)
    cases, views = _CaseRefiner(plan, None, None), ViewVolumes(plan.folders)
    settings = dataset_view_settings(RefineSettings(), plan.folders, 0)
    old, new, truth = [], [], []
    for case_id in plan.cases[:count]:
        data = np.asarray(cases.images.load_case(case_id)[0][:])
        old.append(sam_intensities(data[0], "range")[0])
        new.append(sam_intensities(views.volume(case_id, cases.image_files(case_id), data.shape)[0],
                                   settings.modality, settings.ct_window)[0])
        truth.append(cases.truth(case_id)[0])
    shape = tuple(max(a.shape[i] for a in old) for i in range(2))

    def pad(a: np.ndarray) -> np.ndarray:  # the cases' slices differ in size (cropped to their nonzero region)
        return np.pad(a, [(0, shape[0] - a.shape[0]), (0, shape[1] - a.shape[1])])

    save_view_comparison(HERE / f"views_{args.worker}.png",
                         {"before: nnU-Net's tensor, all-voxel percentiles": np.stack([pad(a) for a in old]),
                          f"now: {describe_intensities(settings.modality, settings.ct_window)}":
                              np.stack([pad(a) for a in new])},
                         np.stack([pad(a) for a in truth]), 0, count=count)


def class_means(cases: dict[str, dict]) -> dict[str, float]:
    """Per class, the mean over the cases where it counts (nnU-Net's evaluation)."""
    classes = sorted({c for row in cases.values() for c in row}, key=int)
    return {c: float(np.mean(values)) if (values := [row[c] for row in cases.values() if row.get(c) is not None])
            else float("nan") for c in classes}


def case_means(cases: dict[str, dict]) -> dict[str, float]:
    return {case: float(np.mean([v for v in row.values() if v is not None])) for case, row in cases.items()
            if any(v is not None for v in row.values())}


def summarize(results: dict, arm: str, reference: str) -> dict:
    """Mean Dice over classes per seed, the seeds' mean and spread, the worst class's change against `reference`
    and the cases better / worse than `reference` (by 0.005 or more)."""
    per_seed, worst, better, worse = [], [], 0, 0
    for seed in results.values():
        if arm not in seed["rows"]:
            continue
        means, ref = class_means(seed["rows"][arm]), class_means(seed["rows"][reference])
        per_seed.append(float(np.nanmean(list(means.values()))))
        worst.append(min(means[c] - ref[c] for c in means))
        case, ref_case = case_means(seed["rows"][arm]), case_means(seed["rows"][reference])
        better += sum(case[k] > ref_case[k] + 0.005 for k in case)
        worse += sum(case[k] < ref_case[k] - 0.005 for k in case)
    return {"mean": float(np.mean(per_seed)), "sd": float(np.std(per_seed)), "seeds": per_seed,
            "worst_class_change": float(min(worst)), "better": better, "worse": worse}


def report(all_results: dict[str, dict], arms: list[str]) -> str:
    header = ["arm"] + [f"{d}: Dice (sd)" for d in all_results] + [f"{d}: vs initial" for d in all_results] \
        + [f"{d}: worst class" for d in all_results] + [f"{d}: cases +/-" for d in all_results]
    table_rows = []
    ceilings = [c for c in CEILINGS if all(c in seed["rows"] for r in all_results.values() for seed in r.values())]
    for arm in [*INITIAL, *arms, *ceilings]:
        stats = {d: summarize(r, arm, "initial") for d, r in all_results.items()}
        base = {d: summarize(r, "initial", "initial")["mean"] for d, r in all_results.items()}
        table_rows.append([arm] + [f"{s['mean']:.3f} ({s['sd']:.3f})" for s in stats.values()]
                          + [f"{stats[d]['mean'] - base[d]:+.3f}" for d in stats]
                          + [f"{s['worst_class_change']:+.3f}" for s in stats.values()]
                          + [f"{s['better']}/{s['worse']}" for s in stats.values()])
    per_class = []
    for dataset, results in all_results.items():
        for arm in ("initial", "initial, mirrored", "SAM as before", "all (defaults)", *ceilings):
            if any(arm not in seed["rows"] for seed in results.values()):
                continue
            means = [class_means(seed["rows"][arm]) for seed in results.values()]
            per_class.append([dataset, arm] + [" ".join(f"{m[c]:.3f}" for m in means) for c in means[0]])
    n_classes = max(len(r["0"]["classes"]) for r in all_results.values())
    return (markdown_table(header, table_rows) + "\n\nPer class (one value per seed):\n\n"
            + markdown_table(["dataset", "arm"] + [f"class {c}" for c in range(1, n_classes + 1)], per_class)
            + "\n\n" + objects_report(all_results))


def objects_report(all_results: dict[str, dict]) -> str:
    """The right objects of the mirrored initial labels, all seeds, by kind: how many, their true pixels, and the
    Dice to their true objects (pixel-weighted) of the model, of SAM from the model's box and from the true box."""
    measures = ("model", "SAM from its box", "SAM from the true box")
    table_rows = []
    for dataset, results in all_results.items():
        records = [r for seed in results.values() for r in seed.get("right objects", [])]
        kinds = {"all": records, "split (a tenth or more given to another class)": [r for r in records if r["split"]],
                 "not split": [r for r in records if not r["split"]]}
        for kind, chosen in kinds.items():
            if not chosen:
                continue
            weights = np.array([r["pixels"] for r in chosen], float)
            table_rows.append([dataset, kind, str(len(chosen)), str(int(weights.sum()))]
                              + [f"{np.average([r[m] for r in chosen], weights=weights):.3f}" for m in measures])
    return ("Right objects of the mirrored initial labels, all seeds: each a connected piece of class c on a slice "
            "whose truth is mostly c, against the true objects of c it touches (Dice weighted by their pixels; "
            "boxes with the default margin; `benchmarks/object_identity.right_objects`):\n\n"
            + markdown_table(["dataset", "objects", "count", "true pixels", *measures], table_rows))


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.worker:
        run_worker(args)
        return
    started = time.perf_counter()
    for dataset in [] if args.report_only else args.datasets:  # one process each: nnU-Net reads its folders at import
        command = [sys.executable, __file__, "--worker", dataset, "--seeds", str(args.seeds), "--arms", *args.arms]
        subprocess.run(command + (["--pictures"] if args.pictures else []), check=True)
    if args.pictures:
        return
    results = {d: json.loads((WORK / f"{d}.json").read_text()) for d in args.datasets}
    arms = [arm for arm in args.arms if all(arm in seed["rows"] for r in results.values() for seed in r.values())]
    body = report(results, arms)
    print(body)
    if not args.no_results:
        minutes = (time.perf_counter() - started) / 60
        update_results_section(TITLE, f"{__doc__.split('Run:')[0].strip()}\n\nMachine: {machine_description('cpu')}; "
                                      f"{minutes:.0f} min. Command: `.venv/bin/python benchmarks/pseudo_quality.py`. "
                               f"'vs initial': mean Dice minus the initial (unmirrored) model's; 'worst class': the "
                               f"lowest per-class change against it (seeds' minimum); 'cases +/-': cases better/worse "
                               f"by 0.005 or more, all seeds.\n\n{body}")


if __name__ == "__main__":
    main()
