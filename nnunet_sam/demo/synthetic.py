"""Synthetic CT-like volumes with several organs: for the demo, the tests and the speed benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class SyntheticCase:
    image: np.ndarray  # (Z, Y, X) float32, Hounsfield-like units
    labels: np.ndarray  # (Z, Y, X) uint8, 0 background, 1..n organs
    spacing: tuple[float, float, float]  # (z, y, x) mm


def _smooth_blob(grid: list[np.ndarray], centre: np.ndarray, radii: np.ndarray,
                 rng: np.random.Generator, roughness: float) -> np.ndarray:
    """An ellipsoid whose surface is perturbed by low-frequency noise: organ-like, not a sphere."""
    distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    wobble = ndimage.gaussian_filter(rng.standard_normal(distance.shape), sigma=max(distance.shape) / 8)
    wobble /= np.abs(wobble).max() + 1e-8
    return distance + roughness * wobble < 1.0


def _organ_sites(size: np.ndarray, n_organs: int, anatomy_seed: int, rng: np.random.Generator
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per organ a centre and radii: the same anatomy (from `anatomy_seed`) with per-case variation."""
    anatomy = np.random.default_rng(anatomy_seed)
    offset = anatomy.uniform(0, 2 * np.pi)
    sites = []
    for organ in range(n_organs):
        angle = offset + 2 * np.pi * organ / n_organs
        nominal = size * np.array([0.5, 0.5 + 0.24 * np.sin(angle), 0.5 + 0.24 * np.cos(angle)])
        radii = size * anatomy.uniform([0.25, 0.12, 0.12], [0.35, 0.16, 0.16])
        sites.append((nominal + rng.normal(0, 0.03, 3) * size, radii * rng.uniform(0.85, 1.15, 3)))
    return sites


def synthetic_ct_case(shape: tuple[int, int, int] = (32, 96, 96), n_organs: int = 3, seed: int = 0,
                      spacing: tuple[float, float, float] = (3.0, 1.0, 1.0), noise: float = 20.0,
                      anatomy_seed: int | None = None) -> SyntheticCase:
    """A body-like ellipse of soft tissue with `n_organs` non-overlapping organs of distinct contrast,
    noise, a smooth bias field and partial-volume (blurred) borders.

    anatomy_seed: None gives every case its own organ contrasts and places; a number gives all cases
    of that seed the same anatomy (each organ's contrast and rough place), as in a real dataset."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    size = np.array(shape, dtype=np.float32)
    body = _smooth_blob(grid, size / 2, size * np.array([0.7, 0.45, 0.45]), rng, 0.1)
    image = np.where(body, 40.0, -1000.0).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    contrasts = np.array([-120.0, 180.0, 320.0, 250.0, -60.0, 140.0])
    if anatomy_seed is None:
        intensities = rng.permutation(contrasts)
    else:
        intensities = np.random.default_rng(anatomy_seed).permutation(contrasts)
        sites = _organ_sites(size, n_organs, anatomy_seed, rng)
    for organ in range(1, n_organs + 1):
        for attempt in range(50):
            if anatomy_seed is None:
                centre = size * rng.uniform([0.35, 0.3, 0.3], [0.65, 0.7, 0.7])
                radii = size * rng.uniform([0.15, 0.08, 0.08], [0.3, 0.16, 0.16])
            else:
                centre, radii = sites[organ - 1][0], sites[organ - 1][1] * 0.95 ** attempt
            blob = _smooth_blob(grid, centre, radii, rng, 0.3) & body
            if blob.sum() > 50 and not (labels[blob] > 0).any():
                break
        labels[blob & (labels == 0)] = organ
        image[labels == organ] = intensities[(organ - 1) % len(intensities)]
    image = ndimage.gaussian_filter(image, sigma=0.8)  # partial-volume borders
    bias = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 4)
    image += 30.0 * bias / (np.abs(bias).max() + 1e-8)
    image += rng.normal(0.0, noise, shape).astype(np.float32)
    return SyntheticCase(image=image.astype(np.float32), labels=labels, spacing=spacing)


@dataclass(frozen=True)
class PatientVariation:
    """How much one synthetic patient differs from another (fixed once for the demo and the benchmark;
    see `synthetic_ct_slice`). Two labelled cases cannot cover this range, as between real patients."""

    rotation_degrees: float = 15.0  # sd of the whole anatomy's rotation about the body's centre
    body_scale: tuple[float, float] = (0.85, 1.1)  # range of the body's size, per axis
    position: float = 0.05  # sd of each organ's shift from its usual place, as a fraction of the image
    organ_scale: tuple[float, float] = (0.7, 1.35)  # range of each organ's size, per axis
    roughness: tuple[float, float] = (0.15, 0.5)  # range of how irregular an organ's outline is
    contrast: float = 0.25  # sd of each organ's contrast to soft tissue, relative
    noise: tuple[float, float] = (10.0, 40.0)  # range of the noise's sd (HU)
    bias: tuple[float, float] = (10.0, 60.0)  # range of the smooth bias field's amplitude (HU)
    blur: tuple[float, float] = (0.5, 1.3)  # range of the partial-volume blur (pixels)


def synthetic_ct_slice(shape: tuple[int, int] = (96, 96), n_organs: int = 3, seed: int = 0, anatomy_seed: int = 0,
                       variation: PatientVariation = PatientVariation()) -> tuple[np.ndarray, np.ndarray]:
    """One axial CT-like slice (image float32 in HU-like units, labels uint8) of a synthetic patient.

    `anatomy_seed` fixes the anatomy every patient shares (each organ's usual place, size and contrast);
    `seed` draws this patient's deviation from it within `variation`: a rotated, resized body, organs shifted,
    resized and reshaped, their contrast changed, and its own noise, bias field and blur."""
    rng, anatomy = np.random.default_rng(seed), np.random.default_rng(anatomy_seed)
    v = variation
    size = np.array(shape, dtype=np.float32)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centre = size / 2 + rng.normal(0, 0.02, 2) * size
    body = _smooth_blob(grid, centre, size * np.array([0.40, 0.46]) * rng.uniform(*v.body_scale, 2), rng, 0.08)
    image = np.where(body, 40.0, -1000.0).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    contrasts = anatomy.permutation(np.array([-120.0, 180.0, 320.0, 250.0, -60.0, 140.0]))
    rotation = np.deg2rad(rng.normal(0, v.rotation_degrees))
    offset = anatomy.uniform(0, 2 * np.pi)
    for organ in range(1, n_organs + 1):
        angle = offset + 2 * np.pi * (organ - 1) / n_organs
        usual_radii = size * anatomy.uniform(0.09, 0.14, 2)
        ring = 0.2 * size * np.array([np.sin(angle + rotation), np.cos(angle + rotation)])
        place = centre + ring + rng.normal(0, v.position, 2) * size
        radii = usual_radii * rng.uniform(*v.organ_scale, 2)
        roughness = rng.uniform(*v.roughness)
        for attempt in range(50):
            blob = _smooth_blob(grid, place, radii * 0.93 ** attempt, rng, roughness) & body
            if blob.sum() > 30 and not (labels[blob] > 0).any():
                break
        labels[blob & (labels == 0)] = organ
        image[labels == organ] = 40.0 + (contrasts[organ - 1] - 40.0) * (1 + rng.normal(0, v.contrast))
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(*v.blur))
    bias = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 4)
    image += rng.uniform(*v.bias) * bias / (np.abs(bias).max() + 1e-8)
    image += rng.normal(0.0, rng.uniform(*v.noise), shape).astype(np.float32)
    return image.astype(np.float32), labels
