"""Speed of the refinement engine against the naive loop of LiteMedSAM's own 3D inference script
(re-encode the slice for every box, one box at a time), on the same multi-class volume, in one run.

    .venv/bin/python benchmarks/refine_speed.py [--device cpu|cuda] [--no-compile]

Prints a table and writes it into benchmarks/RESULTS.md (section "Refinement speed").
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import torch
from scipy import ndimage

from nnunet_sam.demo.degrade import soft_probabilities
from nnunet_sam.demo.synthetic import synthetic_ct_case
from nnunet_sam.sam import SamRefiner, load_sam
from nnunet_sam.sam.embedding_cache import EmbeddingCache
from nnunet_sam.sam.models import SamModel
from nnunet_sam.sam.prompts import bounding_box
from nnunet_sam.sam.views import resize_view, sam_intensities, slice_view, view_geometry

from results import machine_description, markdown_table, update_results_section  # benchmarks/results.py

logger = logging.getLogger("refine_speed")
SECTION = "Refinement speed (benchmarks/refine_speed.py)"


def naive_loop(model: SamModel, image: np.ndarray, mask: np.ndarray, spacing) -> int:
    """LiteMedSAM's 3D script: for every slice and every class box, encode the slice, decode the box.
    Returns the number of slices with foreground."""
    volume = sam_intensities(image)
    geometry = view_geometry(mask.shape[1:], spacing[1:], model.input_size)
    slices = 0
    for index in range(mask.shape[0]):
        labels = [int(v) for v in np.unique(mask[index]) if v > 0]
        slices += bool(labels)
        for label in labels:
            view = resize_view(slice_view(volume, index), geometry)[None]
            embedding = model.encode(view)
            box = geometry.boxes_to_input(bounding_box(mask[index] == label)[None])
            logits = geometry.logits_to_slice(model.decode(embedding, box).low_res_logits)
            _ = (logits > 0).cpu().numpy()
    return slices


def initial_mask(labels: np.ndarray) -> np.ndarray:
    """Every class grown by one pixel in-plane: no blobs or gaps, so both methods see the same slices."""
    out = np.zeros_like(labels)
    for label in (int(v) for v in np.unique(labels) if v > 0):
        grown = ndimage.binary_dilation(labels == label, np.ones((1, 3, 3), dtype=bool))
        out[grown & (out == 0)] = label
    return out


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def probability_cost(model: SamModel, image: np.ndarray, mask: np.ndarray, spacing) -> dict:
    """The CPU cost of probability-guided refinement beside the encoder's: with every embedding cached, the same
    refinement with and without the probability map (best of two each); the encoder's time is the first (cache
    filling) run's minus a cached one's."""
    probabilities = soft_probabilities(mask, seed=0, n_classes=int(mask.max()) + 1, spacing=spacing)
    with tempfile.TemporaryDirectory() as folder:
        cache = EmbeddingCache(folder, model)
        filling, _ = timed(lambda: SamRefiner(model, cache=cache).refine(image, mask, spacing))
        plain = min(timed(lambda: SamRefiner(model, cache=cache).refine(image, mask, spacing))[0] for _ in range(2))
        guided = min(timed(lambda: SamRefiner(model, cache=cache).refine(image, mask, spacing,
                                                                         probabilities=probabilities))[0]
                     for _ in range(2))
    return {"encoder": filling - plain, "plain": plain, "guided": guided, "extra": guided - plain}


def run(device: str, compile_encoder: bool, shape: tuple[int, int, int]) -> tuple[list[dict], dict]:
    case = synthetic_ct_case(shape=shape, n_organs=3, seed=7)
    mask = initial_mask(case.labels)
    model = load_sam("litemedsam", device=device)
    rows = []
    middle = slice(shape[0] // 2 - 1, shape[0] // 2 + 2)  # three slices with foreground, for warm-ups
    SamRefiner(model).refine(case.image[middle], mask[middle], case.spacing)  # first-call allocations

    def measure(method: str, work) -> None:
        """Time `work` (returns the number of slices it covered) and count its encoder calls."""
        model.encoder_calls = 0
        seconds, slices = timed(work)
        rows.append({"method": method, "seconds": seconds, "slices": slices, "encoder_calls": model.encoder_calls})

    def engine() -> int:
        return SamRefiner(model).refine(case.image, mask, case.spacing).slices_encoded

    measure("naive loop (LiteMedSAM 3D script)", lambda: naive_loop(model, case.image, mask, case.spacing))
    measure("engine", engine)
    compile_seconds = None
    if compile_encoder:
        model.compile_encoder()
        compile_seconds, _ = timed(lambda: SamRefiner(model).refine(case.image[middle], mask[middle], case.spacing))
        measure("engine, --compile", engine)
    foreground_slices = int((mask > 0).any(axis=(1, 2)).sum())
    prompts = int(sum(len([v for v in np.unique(s) if v > 0]) for s in mask))
    info = {"shape": shape, "classes": 3, "foreground_slices": foreground_slices, "boxes": prompts,
            "device": str(model.device), "compile_seconds": compile_seconds,
            "probabilities": probability_cost(model, case.image, mask, case.spacing)}
    return rows, info


def table(rows: list[dict]) -> str:
    naive = rows[0]["seconds"]
    return markdown_table(
        ["method", "seconds", "slices", "encoder calls", "s per slice", "speed-up vs naive"],
        [[r["method"], f"{r['seconds']:.1f}", str(r["slices"]), str(r["encoder_calls"]),
          f"{r['seconds'] / r['slices']:.2f}", f"{naive / r['seconds']:.2f}x"] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--shape", type=int, nargs=3, default=(24, 160, 160), metavar=("Z", "Y", "X"),
                        help="synthetic volume shape")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows, info = run(args.device, not args.no_compile, tuple(args.shape))
    text = table(rows)
    print(text)
    engine = rows[1]
    targets = [f"- encoder calls == slices with foreground: {engine['encoder_calls']} vs "
               f"{info['foreground_slices']} -> {'PASS' if engine['encoder_calls'] == info['foreground_slices'] else 'FAIL'}"]
    best = min(r["seconds"] / r["slices"] for r in rows[1:])
    if info["device"] == "cpu":
        targets.append(f"- CPU <= 0.8 s per slice: best {best:.2f} s -> {'PASS' if best <= 0.8 else 'FAIL'}")
    cost = info["probabilities"]
    share = cost["extra"] / cost["encoder"]
    targets.append(f"- probability-guided refinement (band, activation boxes, piece choice by probability) costs "
                   f"{cost['extra']:+.2f} s beside the encoder's {cost['encoder']:.1f} s (embeddings cached: "
                   f"{cost['plain']:.2f} s without the probability map, {cost['guided']:.2f} s with it): "
                   f"{100 * share:.1f}% <= 5% -> {'PASS' if share <= 0.05 else 'FAIL'}")
    print("\n".join(targets))
    body = "\n".join([
        f"Machine: {machine_description(info['device'])}",
        f"Command: `.venv/bin/python benchmarks/refine_speed.py --device {args.device}`",
        f"Volume: synthetic CT-like (`synthetic_ct_case`, seed 7), shape {tuple(info['shape'])}, "
        f"{info['classes']} classes, initial mask = truth grown by one pixel in-plane: "
        f"{info['foreground_slices']} slices with foreground, {info['boxes']} boxes.",
        "",
        text,
        "",
        *targets,
        "" if info["compile_seconds"] is None else
        f"- one-off torch.compile cost (first call, 3 slices): {info['compile_seconds']:.1f} s",
    ])
    update_results_section(SECTION, body)


if __name__ == "__main__":
    main()
