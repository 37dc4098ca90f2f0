"""Cases in nnU-Net raw naming (CASE_0000.nii.gz images, CASE.nii.gz masks), read and written with
nnU-Net's own reader/writers, with checks that turn bad input into one-line errors."""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Type

import numpy as np
import SimpleITK as sitk
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES
from nnunetv2.utilities.utils import create_paths_fn

from nnunet_sam.errors import NnsamError
from nnunet_sam.utils.atomic import atomic_path, finished_files

logger = logging.getLogger(__name__)

MAX_LABEL = 255
_SITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl")


@dataclass
class CaseFiles:
    """One case: its image channel files, its mask, and optionally its ground-truth labels."""

    case_id: str
    images: list[Path]
    mask: Path
    gt: Path | None = None


@dataclass
class LoadedCase:
    image: np.ndarray  # (C, Z, Y, X) float32, nnU-Net layout (2D images: Z == 1)
    mask: np.ndarray  # (Z, Y, X) int16
    properties: dict  # nnU-Net reader properties of the mask (spacing in Z, Y, X order, geometry)
    gt: np.ndarray | None = None


def supported_file_endings() -> list[str]:
    """All file endings nnU-Net's reader/writers know, longest first (".nii.gz" before ".gz")."""
    endings = {e.lower() for io in LIST_OF_IO_CLASSES for e in io.supported_file_endings}
    return sorted(endings, key=len, reverse=True)


def file_ending_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((e for e in supported_file_endings() if name.endswith(e)), None)


def reader_for(ending: str) -> Type[BaseReaderWriter]:
    """nnU-Net's reader/writer class for a file ending (the first in nnU-Net's own order)."""
    for io_class in LIST_OF_IO_CLASSES:
        if ending in io_class.supported_file_endings:
            return io_class
    raise NnsamError(f"no nnU-Net reader for files ending in {ending}")


def _data_files(folder: Path) -> list[Path]:
    return [p for p in finished_files(folder) if p.is_file() and file_ending_of(p) is not None]


def _require_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise NnsamError(f"{what} folder not found: {folder} (check the path)")


def find_cases(images_dir: Path, masks_dir: Path, gt_dir: Path | None = None) -> tuple[list[CaseFiles], str]:
    """Pair every mask CASE{ending} with its images CASE_XXXX{ending}; return the cases and the ending.

    Every image must have a mask and every mask its images; all cases need the same channel count.
    """
    _require_folder(images_dir, "images")
    _require_folder(masks_dir, "masks")
    masks = _data_files(masks_dir)
    if not masks:
        raise NnsamError(f"no mask files found in {masks_dir} (expected nnU-Net naming such as CASE.nii.gz)")
    endings = {file_ending_of(p) for p in masks}
    if len(endings) > 1:
        raise NnsamError(f"masks in {masks_dir} mix file endings {sorted(endings)}; use one ending")
    ending = endings.pop()
    image_names = [p.name for p in _data_files(images_dir) if p.name.lower().endswith(ending)]
    cases: list[CaseFiles] = []
    for mask in masks:
        case_id = mask.name[: -len(ending)]
        images = [Path(p) for p in create_paths_fn(str(images_dir), image_names, ending, case_id)]
        if not images:
            raise NnsamError(f"mask {mask} has no image {case_id}_0000{ending} in {images_dir} "
                             f"(images need the channel suffix _0000)")
        cases.append(CaseFiles(case_id=case_id, images=sorted(images), mask=mask))
    paired = {p.name for c in cases for p in c.images}
    unpaired = sorted(set(image_names) - paired)
    if unpaired:
        raise NnsamError(f"image {images_dir / unpaired[0]} has no mask in {masks_dir} "
                         f"(expected {unpaired[0][:-len(ending) - 5]}{ending}); add it or move the image away")
    channels = {len(c.images) for c in cases}
    if len(channels) > 1:
        short = min(cases, key=lambda c: len(c.images))
        raise NnsamError(f"case {short.case_id} has {len(short.images)} image channels but others have "
                         f"{max(channels)}; every case needs the same _XXXX channel files")
    if gt_dir is not None:
        _require_folder(gt_dir, "ground-truth")
        for case in cases:
            case.gt = gt_dir / f"{case.case_id}{ending}"
            if not case.gt.is_file():
                raise NnsamError(f"ground truth {case.gt} is missing (--gt needs one label file per mask)")
    return cases, ending


def _read(reader: BaseReaderWriter, files: list[Path], what: str) -> tuple[np.ndarray, dict]:
    for f in files:
        if not f.is_file():
            raise NnsamError(f"{what} file not found: {f}")
    try:
        return reader.read_images([str(f) for f in files])
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        names = ", ".join(str(f) for f in files)
        raise NnsamError(f"cannot read {what} {names}: {detail[:200]} (is the file complete and of this "
                         f"format? channels must share shape and spacing)") from None


def _check_same_geometry(reference: dict, other: dict, shape: tuple, other_shape: tuple,
                         reference_file: Path, other_file: Path) -> None:
    axes = [len((props.get("sitk_stuff") or props)["spacing"]) for props in (reference, other)]
    if axes[0] != axes[1]:  # nnU-Net's reader takes a 4D file's 4th axis as channels
        raise NnsamError(f"{reference_file} has {axes[0]} axes but {other_file} has {axes[1]}; give each channel "
                         f"as its own file of the mask's dimension (CASE_0000, CASE_0001, ...)")
    if shape != other_shape:
        raise NnsamError(f"{other_file} has shape {other_shape} but {reference_file} has {shape}; "
                         f"masks must be on the image grid")
    if not np.allclose(reference["spacing"], other["spacing"], rtol=1e-3, atol=1e-5):
        raise NnsamError(f"{other_file} has spacing {list(other['spacing'])} but {reference_file} has "
                         f"{list(reference['spacing'])}; masks must be on the image grid")
    ref_itk, other_itk = reference.get("sitk_stuff"), other.get("sitk_stuff")
    if ref_itk and other_itk:
        for key in ("origin", "direction"):
            if not np.allclose(ref_itk[key], other_itk[key], atol=1e-3):
                raise NnsamError(f"{other_file} has {key} {list(other_itk[key])} but {reference_file} has "
                                 f"{list(ref_itk[key])}; masks must be on the image grid")


def _as_labels(array: np.ndarray, path: Path) -> np.ndarray:
    values = np.unique(array)
    if values.size and (values.min() < 0 or values.max() > MAX_LABEL or not np.all(values == np.round(values))):
        raise NnsamError(f"{path} is not a label map: values must be integers 0..{MAX_LABEL}, found "
                         f"{values[:5].tolist()}{'...' if values.size > 5 else ''}")
    return array.astype(np.int16)


def load_case(case: CaseFiles, ending: str) -> LoadedCase:
    """Read a case's image channels, mask (and ground truth) and check they share one grid."""
    reader = reader_for(ending)()
    image, image_props = _read(reader, case.images, "image")
    for channel, file in zip(image, case.images):
        bad = int(np.size(channel) - np.isfinite(channel).sum())
        if bad:
            raise NnsamError(f"{file} has {bad} NaN or infinite voxel(s); replace them (e.g. with the image's "
                             f"minimum) before refining")
    mask, mask_props = _read(reader, [case.mask], "mask")
    _check_same_geometry(image_props, mask_props, image.shape[1:], mask.shape[1:], case.images[0], case.mask)
    loaded = LoadedCase(image=image, mask=_as_labels(mask[0], case.mask), properties=mask_props)
    if case.gt is not None:
        gt, gt_props = _read(reader, [case.gt], "ground truth")
        _check_same_geometry(image_props, gt_props, image.shape[1:], gt.shape[1:], case.images[0], case.gt)
        loaded.gt = _as_labels(gt[0], case.gt)
    return loaded


PROBABILITY_KEY = "probabilities"  # the array nnUNetv2_predict --save_probabilities stores in CASE.npz


def probability_file(folder: Path, case_id: str) -> Path:
    """The probability file of a case, checked to be an nnU-Net .npz with a `probabilities` array (its header
    only: cheap enough to check every case before any work)."""
    path = folder / f"{case_id}.npz"
    if not path.is_file():
        raise NnsamError(f"--probabilities {folder} has no {path.name}; write one per mask with nnUNetv2_predict "
                         f"--save_probabilities")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise NnsamError(f"{path} is not a .npz file (is it complete? write it with nnUNetv2_predict "
                         f"--save_probabilities)") from None
    if f"{PROBABILITY_KEY}.npy" not in names:
        raise NnsamError(f"{path} has no '{PROBABILITY_KEY}' array (found {', '.join(names) or 'none'}): it is not "
                         f"nnUNetv2_predict --save_probabilities output")
    return path


def load_probabilities(path: Path, mask: np.ndarray, mask_file: Path) -> np.ndarray:
    """The softmax (K, Z, Y, X) float32 of a case, checked against its mask: same grid, a channel per label."""
    probabilities = np.load(path)[PROBABILITY_KEY]
    if probabilities.ndim == mask.ndim:  # a 2D case saved without the singleton slice axis
        probabilities = probabilities[:, None]
    if probabilities.shape[1:] != mask.shape:
        raise NnsamError(f"{path} holds probabilities of shape {probabilities.shape[1:]} but {mask_file} has "
                         f"{mask.shape}; give the probabilities of the model that made these masks")
    if mask.size and int(mask.max()) >= probabilities.shape[0]:
        raise NnsamError(f"{mask_file} has label {int(mask.max())} but {path} only {probabilities.shape[0]} classes; "
                         f"give the probabilities of the model that made these masks")
    if not np.all(np.isfinite(probabilities)) or probabilities.min() < 0 or probabilities.max() > 1.001:
        raise NnsamError(f"{path} is not a softmax: values must be probabilities in [0, 1]")
    return probabilities.astype(np.float32, copy=False)


def write_mask_like(labels: np.ndarray, template: Path, target: Path, ending: str, properties: dict) -> None:
    """Write a label map atomically with the template mask's geometry; files SimpleITK reads also keep
    the template's pixel type. Other formats go through nnU-Net's writer."""
    with atomic_path(target) as tmp:
        if ending in _SITK_ENDINGS:
            info = sitk.ImageFileReader()
            info.SetFileName(str(template))
            info.ReadImageInformation()
            array = labels[0] if info.GetDimension() == 2 else labels
            dtype = sitk.GetArrayViewFromImage(sitk.Image([1] * info.GetDimension(), info.GetPixelID())).dtype
            image = sitk.GetImageFromArray(array.astype(dtype))
            image.SetSpacing(info.GetSpacing())
            image.SetOrigin(info.GetOrigin())
            image.SetDirection(info.GetDirection())
            sitk.WriteImage(image, str(tmp), True)
        else:
            reader_for(ending)().write_seg(labels, str(tmp), properties)
