"""The semi-supervised benchmark's data: pools of labelled 2D cases (see `nnunet_sam.demo.slices`).

- ``brain``: real MR with manual labels. The Colin27 T1 brain (`ch2better.nii.gz`) and the AAL parcellation
  drawn on it (`aal.nii.gz`), from Debian's `mricron-data` package (fetched with `apt-get download` into
  benchmarks/.cache, never installed). The T1 is resampled onto the AAL grid's physical space at 2 mm in-plane
  and 1 mm between axial slices; every axial slice that shows a class is one case. Classes (left and right
  merged): the deep grey nuclei (caudate, putamen, pallidum, thalamus: AAL 71-78) and the cerebellum (91-116).
  With caudate, putamen and thalamus as classes of their own (100-200 pixels each at 2 mm), the CPU schedule
  did not train even the oracle (true labels for every unlabelled slice: caudate Dice 0.00, putamen 0.12
  after 2000 iterations); with the two classes the oracle reaches 0.73 (benchmarks/RESULTS.md).
  The T1 is skull-stripped (zero outside the brain) and the atlas reaches a little beyond it (e.g. 164 of the
  cerebellum's 1130 voxels on slice z047): those labels are set to background. Left in, they would make
  nnU-Net normalise the labelled cases differently from every other case: with `use_mask_for_norm` (chosen
  for images with a zero background) the z-score mask is `label >= 0` when a label is given (labelled voxels
  with intensity 0 included) and the nonzero region when not (unlabelled and test cases). On z047 that was a
  standard deviation of 22 against 12, and every model failed on the cases it had not been trained on.
- ``synthetic``: the demo's CT-like patients (`synthetic_slice_pool`, `PatientVariation` defaults, 64 x 64).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_sam.demo.slices import SliceCase, synthetic_slice_pool

CACHE = Path(__file__).resolve().parent / ".cache" / "mricron"
TEMPLATES = "usr/share/mricron/templates"
BRAIN_CLASSES = {"deep grey nuclei": tuple(range(71, 79)), "cerebellum": tuple(range(91, 117))}
BRAIN_SPACING = (1.0, 2.0, 2.0)  # (z, y, x) mm: a case every axial millimetre, 2 mm pixels
SYNTHETIC_CLASSES = ["liver", "kidney", "spleen"]
SYNTHETIC_SHAPE = (64, 64)
SYNTHETIC_CASES = 80


def fetch_mricron() -> Path:
    """The templates folder of Debian's mricron-data, downloaded and unpacked once into the cache."""
    templates = CACHE / "extracted" / TEMPLATES
    if (templates / "aal.nii.gz").is_file() and (templates / "ch2better.nii.gz").is_file():
        return templates
    download = CACHE / "deb"
    download.mkdir(parents=True, exist_ok=True)
    debs = sorted(download.glob("mricron-data_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", "mricron-data"], cwd=download, check=True)
        debs = sorted(download.glob("mricron-data_*.deb"))
    extracted = CACHE / "extracted"
    shutil.rmtree(extracted, ignore_errors=True)
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(extracted)], check=True)
    return templates


def brain_pool() -> list[SliceCase]:
    """Every axial slice of Colin27 that shows one of the classes, as a 2D case with its AAL labels."""
    templates = fetch_mricron()
    atlas = sitk.ReadImage(str(templates / "aal.nii.gz"))
    t1 = sitk.ReadImage(str(templates / "ch2better.nii.gz"))
    size = [int(round(n * s / t)) for n, s, t in zip(atlas.GetSize(), atlas.GetSpacing(), BRAIN_SPACING[::-1])]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(BRAIN_SPACING[::-1])
    grid.SetOrigin(atlas.GetOrigin())
    grid.SetDirection(atlas.GetDirection())
    image = sitk.GetArrayFromImage(sitk.Resample(t1, grid, sitk.Transform(), sitk.sitkLinear, 0.0))
    regions = sitk.GetArrayFromImage(sitk.Resample(atlas, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    labels = np.zeros(regions.shape, dtype=np.uint8)
    for index, ids in enumerate(BRAIN_CLASSES.values(), start=1):
        labels[np.isin(regions, ids)] = index
    labels[image <= 0] = 0  # atlas labels beyond the skull-stripped T1 (see the module docstring)
    return [SliceCase(f"colin_z{z:03d}", image[z].astype(np.float32), labels[z], BRAIN_SPACING[1:])
            for z in np.flatnonzero(labels.any(axis=(1, 2)))]


def synthetic_pool() -> list[SliceCase]:
    return synthetic_slice_pool(SYNTHETIC_CASES, n_organs=len(SYNTHETIC_CLASSES), shape=SYNTHETIC_SHAPE)


DATASETS = {
    # name: (pool builder, class names, channel name, nnU-Net dataset id, description)
    "brain": (brain_pool, list(BRAIN_CLASSES), "T1", 880,
              "Colin27 T1 axial slices with AAL labels (mricron-data); deep grey nuclei, cerebellum"),
    "synthetic": (synthetic_pool, SYNTHETIC_CLASSES, "CT", 881,
                  "synthetic CT-like patients (nnunet-sam demo generator, PatientVariation defaults)"),
}
