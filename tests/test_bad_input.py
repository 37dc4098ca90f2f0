"""Every kind of bad input to the console scripts, in one table: each row exits with status 2, prints exactly one
stderr line that names the offending flag or file and says the fix, and writes or changes nothing, neither in the
user's folders (the raw dataset, files-mode inputs) nor where nnsam writes (nnUNet_preprocessed, nnUNet_results,
-o). A few rows run the installed console scripts as subprocesses, for the exit status the shell sees."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PlannedDataset, error_of, make_phantom, write_nifti
from nnunet_sam.cli import check, demo, finetune, preprocess_unlabeled, refine

MAINS = {"nnsam_refine": refine.main, "nnsam_preprocess_unlabeled": preprocess_unlabeled.main,
         "nnsam_finetune": finetune.main, "nnsam_demo": demo.main, "nnsam_check": check.main}
TRAIN = "nnUNetv2_train"  # nnU-Net's own command with one of our trainers: shell rows only
PROGRAM = {TRAIN: "nnunet-sam"}  # the name an error line starts with, where it is not the command's
PSEUDO_SET = "nnUNetPlans_3d_fullres_pseudolabels/nnUNetPlans/fold_0"  # the session dataset's set for fold 0
SHAPE = (6, 32, 32)  # files-mode phantoms: tiny, the errors come before any SAM work


@dataclass
class Scene:
    """What one row works on: the session's planned dataset (or a copy the row may break, in `tmp`) and `tmp`,
    the row's own folder for files-mode inputs and output targets."""

    dataset: PlannedDataset
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    raw: Path = field(init=False)  # the raw dataset folder the commands see

    def __post_init__(self) -> None:
        self.raw = self.dataset.raw

    @property
    def fields(self) -> dict[str, str]:
        """What a row's argv and expected fragments may name: {id}, {raw}, {tmp}."""
        return {"id": str(self.dataset.dataset_id), "raw": str(self.raw), "tmp": str(self.tmp)}


Prepare = Callable[[Scene], None]


@dataclass(frozen=True)
class Row:
    """One kind of bad input and the message it must give."""

    kind: str
    command: str  # console script
    argv: str  # template: {id} dataset id, {raw} raw dataset folder, {tmp} the row's folder
    expected: tuple[str, ...]  # templates of fragments the message must hold: the flag or file, and the fix
    prepare: tuple[Prepare, ...] = ()  # run in order before the command
    model: bool = False  # needs the trained baseline (nnUNetTrainerShort fold 0; its splits_final.json too)
    shell: bool = False  # run the installed console script in a subprocess
    training_log: bool = False  # nnUNetv2_train: nnU-Net's trainer writes its training log (and the fold
    # folder) while it is constructed, before any of our code runs; only that may appear


# --- what rows prepare ------------------------------------------------------------------------------------------

def copy_raw(scene: Scene) -> None:
    """The raw dataset copied into `tmp` (the session's stays untouched), nnUNet_raw pointing at the copy."""
    scene.raw = scene.tmp / "nnUNet_raw" / scene.dataset.name
    shutil.copytree(scene.dataset.raw, scene.raw)
    scene.monkeypatch.setenv("nnUNet_raw", str(scene.raw.parent))


def in_unlabeled(edit: Callable[[Path], object]) -> Prepare:
    """Copy the raw dataset, then `edit` its imagesUnlabeled folder."""
    def prepare(scene: Scene) -> None:
        copy_raw(scene)
        edit(scene.raw / "imagesUnlabeled")
    return prepare


def copy_preprocessed(scene: Scene, *leave_out: str) -> Path:
    """The preprocessed dataset copied into `tmp` (without `leave_out`), nnUNet_preprocessed pointing at the copy."""
    copy = scene.tmp / "nnUNet_preprocessed" / scene.dataset.name
    shutil.copytree(scene.dataset.preprocessed, copy, ignore=shutil.ignore_patterns(*leave_out))
    scene.monkeypatch.setenv("nnUNet_preprocessed", str(copy.parent))
    return copy


def without_pseudo_labels(scene: Scene) -> None:
    """A preprocessed copy without any pseudo-label set (as before the first nnsam_refine -d)."""
    copy_preprocessed(scene, "*_pseudolabels")


def without_unlabeled(scene: Scene) -> None:
    """A preprocessed copy without preprocessed unlabelled cases (as before nnsam_preprocess_unlabeled)."""
    copy_preprocessed(scene, "*_unlabeled")


def leaking_pseudo_labels(scene: Scene) -> None:
    """A preprocessed copy whose fold-0 pseudo-label set says an ensemble of folds 0 and 1 made it."""
    labels = copy_preprocessed(scene, "*_pseudolabels") / PSEUDO_SET
    labels.mkdir(parents=True)
    model = {"trainer": "nnUNetTrainerShort", "folds": ["0", "1"], "checkpoint": "checkpoint_final.pth",
             "tta": False, "folder": str(scene.dataset.results)}
    (labels / "refine_report.json").write_text(json.dumps({"mode": "dataset", "initial_model": model}))
    (labels / f"{UN}.pkl").write_bytes(pickle.dumps({}))  # a finished case (read only after the fold check)


def zscore_plans(scene: Scene) -> None:
    """A preprocessed copy whose plans normalise channel 0 with z-scores (MRI-like), not CT."""
    plans_file = copy_preprocessed(scene) / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    for configuration in plans["configurations"].values():
        if "normalization_schemes" in configuration:
            configuration["normalization_schemes"] = ["ZScoreNormalization"]
    plans_file.write_text(json.dumps(plans))


def fresh_preprocessed(scene: Scene) -> None:
    """A preprocessed copy as nnUNetv2_plan_and_preprocess leaves it: no splits_final.json yet."""
    copy_preprocessed(scene, "splits_final.json")


def unset(variable: str) -> Prepare:
    """Remove an environment variable (for this row only)."""
    def prepare(scene: Scene) -> None:
        scene.monkeypatch.delenv(variable)
    return prepare


def text_file(name: str, content: str = "a user's file") -> Prepare:
    """A file (its folders too) in `tmp` that nnsam did not write."""
    def prepare(scene: Scene) -> None:
        (scene.tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (scene.tmp / name).write_text(content)
    return prepare


def case_files(ending: str = ".nii.gz", nan: bool = False) -> Prepare:
    """A valid files-mode case: tmp/images/case0_0000, tmp/masks/case0 (a NaN voxel in the image with `nan`)."""
    def prepare(scene: Scene) -> None:
        phantom = make_phantom(shape=SHAPE)
        image = phantom.image.copy()
        if nan:
            image[SHAPE[0] // 2, 10, 10] = np.nan  # MetaImage keeps it (SimpleITK's NIfTI writer does not)
        write_nifti(image, scene.tmp / "images" / f"case0_0000{ending}")
        write_nifti(phantom.labels, scene.tmp / "masks" / f"case0{ending}")
    return prepare


def mask(array: Callable[[np.ndarray], np.ndarray]) -> Prepare:
    """Replace case0's mask by `array` of the phantom's labels."""
    def prepare(scene: Scene) -> None:
        write_nifti(array(make_phantom(shape=SHAPE).labels), scene.tmp / "masks" / "case0.nii.gz")
    return prepare


def remove(name: str) -> Prepare:
    """Delete a file of `tmp`."""
    def prepare(scene: Scene) -> None:
        (scene.tmp / name).unlink()
    return prepare


def image_4d(scene: Scene) -> None:
    """case0's image as a 4D file (two copies of the volume), its mask still 3D."""
    path = scene.tmp / "images" / "case0_0000.nii.gz"
    volume = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(path))


def extra_image(scene: Scene) -> None:
    """An image case1_0000 without a mask."""
    shutil.copy(scene.tmp / "images" / "case0_0000.nii.gz", scene.tmp / "images" / "case1_0000.nii.gz")


FILES = case_files()
UN = "pipelinetestUn_000"  # the planned dataset's first unlabelled case
DS = "-d {id} -device cpu"  # dataset-mode basics
SHORT = DS + " -tr nnUNetTrainerShort"  # ... with the trained baseline
TRAIN_PSEUDO = "{id} 3d_fullres 0 -tr nnUNetTrainerSAMPseudoShort -device cpu"
IO = "-i {tmp}/images -m {tmp}/masks -o {tmp}/out -device cpu"  # files mode

ROWS = [
    # nnsam_refine, dataset mode: which dataset, plans, model
    Row("unknown dataset id", "nnsam_refine", "-d 999 -device cpu", ("dataset 999 not found", "check -d")),
    Row("dataset neither id nor name", "nnsam_refine", "-d foo", ("-d foo is neither a dataset id",
                                                                  "(e.g. Dataset042_Liver)")),
    Row("malformed dataset name", "nnsam_refine", "-d DatasetAB_X", ("-d DatasetAB_X is neither a dataset id",)),
    Row("configuration not in plans", "nnsam_refine", DS + " -c 3d_lowres",
        ("configuration '3d_lowres' is not in", "nnUNetPlans.json; available: 2d, 3d_fullres")),
    Row("plans file missing", "nnsam_refine", DS + " -p NoSuchPlans",
        ("NoSuchPlans.json not found", "run nnUNetv2_plan_and_preprocess -d {id} first (or check -p)")),
    Row("nnUNet_raw unset", "nnsam_refine", DS, ("environment variable nnUNet_raw is not set", "export it"),
        (unset("nnUNet_raw"),)),
    Row("fold not a number", "nnsam_refine", SHORT + " -f zero",
        ("-f zero is not a fold", "use a number (0, 1, ...) or all")),
    Row("fold without a checkpoint", "nnsam_refine", SHORT + " -f 7",
        ("fold_7/checkpoint_final.pth not found", "or pick another -f/-chk"), model=True),
    Row("trainer never trained", "nnsam_refine", DS + " -tr nnUNetTrainerNeverTrained",
        ("no trained model in", "nnUNetTrainerNeverTrained__nnUNetPlans__3d_fullres; train one first: nnUNetv2_train")),
    Row("checkpoint name in no fold", "nnsam_refine", SHORT + " -chk checkpoint_nope.pth",
        ("has checkpoint_nope.pth", "or pick -chk"), model=True),
    Row("channel out of range (dataset)", "nnsam_refine", SHORT + " --channel 1",
        ("--channel 1 does not exist", "has 1 channel(s)"), model=True),
    Row("gt missing an unlabelled case", "nnsam_refine", SHORT + " --gt {raw}/labelsTr",
        (f"--gt {{raw}}/labelsTr has no {UN}.nii.gz", "needs one label file per unlabelled case"), model=True),
    Row("export into labelsTr", "nnsam_refine", SHORT + " --export {raw}/labelsTr",
        ("--export {raw}/labelsTr already holds files nnunet-sam did not write", "choose a new or empty folder"),
        model=True),
    Row("imagesUnlabeled missing", "nnsam_refine", SHORT,
        ("imagesUnlabeled does not exist", "put the unlabelled scans there"), (in_unlabeled(shutil.rmtree),),
        model=True),
    # nnsam_refine, dataset-mode options
    Row("processes zero", "nnsam_refine", DS + " -np 0", ("-np 0: the number of processes must be at least 1",)),
    Row("no-sam with continue", "nnsam_refine", DS + " --no-sam --continue",
        ("--no-sam writes every case in one run", "leave out -num_parts and --continue")),
    Row("min-case-agreement above 1", "nnsam_refine", DS + " --min-case-agreement 1.5",
        ("--min-case-agreement 1.5 must be a Dice in [0, 1]", "e.g. 0.85")),
    Row("ct-window on a z-score channel", "nnsam_refine", DS + " --ct-window -160 240",
        ("--ct-window is in HU, but channel 0 of", "is not CT (ZScoreNormalization); leave --ct-window out"),
        (zscore_plans,)),
    Row("dataset and files mode together", "nnsam_refine", DS + " -i {tmp}",
        ("use either -d (dataset mode) or -i/-m/-o/--probabilities (files mode), not both",)),
    # nnsam_refine, options of both modes (refinement, SAM, device, parts)
    Row("num_parts zero", "nnsam_refine", DS + " -num_parts 0", ("-num_parts 0 must be at least 1",)),
    Row("part_id out of range", "nnsam_refine", DS + " --num_parts 2 --part_id 2",
        ("-part_id must be in 0..1 for -num_parts 2",)),
    Row("ct-window inverted", "nnsam_refine", DS + " --ct-window 240 -160",
        ("--ct-window 240 -160: LOW must be below HIGH", "(e.g. --ct-window -160 240)")),
    Row("grid zero", "nnsam_refine", DS + " --context tile --grid 0", ("--grid 0 must be at least 1",)),
    Row("box-margin negative", "nnsam_refine", IO + " --box-margin -5", ("--box-margin -5 must be at least 0",),
        (FILES,)),
    Row("keep-confident above 1", "nnsam_refine", DS + " --keep-confident 2",
        ("--keep-confident 2 must be a probability in (0, 1]", "or 'off'")),
    Row("keep-confident not a number", "nnsam_refine", DS + " --keep-confident maybe",
        ("--keep-confident 'maybe' is neither a probability in (0, 1] nor 'off'",)),
    Row("activation negative", "nnsam_refine", DS + " --activation -1",
        ("--activation -1 must be a probability in (0, 1]", "or 'off'")),
    Row("min-iou above 1", "nnsam_refine", IO + " --min-iou 2", ("--min-iou 2 must be in [0, 1]",), (FILES,)),
    Row("max-gap negative", "nnsam_refine", IO + " --max-gap -1", ("--max-gap -1 must be at least 0",), (FILES,)),
    Row("recover-reach below -1", "nnsam_refine", IO + " --recover-reach -3",
        ("--recover-reach -3 must be -1 (off) or more",), (FILES,)),
    Row("argparse rejects a choice", "nnsam_refine", DS + " --axis 3",
        ("argument --axis: invalid choice: 3", "(see nnsam_refine --help)"), shell=True),
    Row("device unknown", "nnsam_refine", "-d {id} -device gpu",
        ("-device gpu is not a device", "use auto, cpu, cuda or cuda:N")),
    Row("sam model without weights", "nnsam_refine", DS + " --sam vit_b",
        ("--sam vit_b needs --checkpoint PATH",)),
    Row("sam checkpoint missing", "nnsam_refine", DS + " --checkpoint {tmp}/missing.pth",
        ("SAM checkpoint not found: {tmp}/missing.pth", "pass --checkpoint with the path")),
    Row("sam checkpoint not a checkpoint", "nnsam_refine", IO + " --checkpoint {tmp}/bad.pth",
        ("cannot read SAM checkpoint {tmp}/bad.pth", "is it a complete PyTorch .pth file?"),
        (FILES, text_file("bad.pth"))),
    # nnsam_refine, files mode: folders and files
    Row("files mode without -o", "nnsam_refine", "-i {tmp}/images -m {tmp}/masks",
        ("all of -i IMAGES -m MASKS -o OUT", "see nnsam_refine --help"), (FILES,)),
    Row("images folder missing", "nnsam_refine", IO.replace("{tmp}/images", "{tmp}/nope"),
        ("images folder not found: {tmp}/nope", "check the path"), (FILES,)),
    Row("mask without image", "nnsam_refine", IO, ("mask {tmp}/masks/case0.nii.gz has no image case0_0000.nii.gz",
                                                   "images need the channel suffix _0000"),
        (FILES, remove("images/case0_0000.nii.gz"))),
    Row("image without mask", "nnsam_refine", IO,
        ("image {tmp}/images/case1_0000.nii.gz has no mask", "add it or move the image away"), (FILES, extra_image)),
    Row("mask shape differs from image", "nnsam_refine", IO,
        ("{tmp}/masks/case0.nii.gz has shape (6, 24, 32) but", "masks must be on the image grid"),
        (FILES, mask(lambda labels: labels[:, :24]))),
    Row("mask not a label map", "nnsam_refine", IO,
        ("{tmp}/masks/case0.nii.gz is not a label map", "values must be integers 0..255"),
        (FILES, mask(lambda labels: labels * 0.5))),
    Row("NaN voxel", "nnsam_refine", IO, ("{tmp}/images/case0_0000.mha has 1 NaN or infinite voxel(s)",
                                          "replace them"), (case_files(".mha", nan=True),)),
    Row("4D image, 3D mask", "nnsam_refine", IO,
        ("{tmp}/images/case0_0000.nii.gz has 4 axes but", "give each channel as its own file"), (FILES, image_4d)),
    Row("channel out of range (files)", "nnsam_refine", IO + " --channel 1",
        ("--channel 1 does not exist: {tmp}/images/case0_0000.nii.gz has 1 channel(s)", "(use 0..0)"), (FILES,)),
    Row("gt missing a case (files)", "nnsam_refine", IO + " --gt {tmp}/gt",
        ("ground truth {tmp}/gt/case0.nii.gz is missing", "--gt needs one label file per mask"),
        (FILES, text_file("gt/other.txt"))),
    Row("probabilities missing a case", "nnsam_refine", IO + " --probabilities {tmp}/masks",
        ("--probabilities {tmp}/masks has no case0.npz", "nnUNetv2_predict --save_probabilities"), (FILES,)),
    Row("-o is a file", "nnsam_refine", IO.replace("{tmp}/out", "{tmp}/a_file"),
        ("-o {tmp}/a_file is a file, not a folder", "name a new folder"), (FILES, text_file("a_file"))),
    Row("-o is labelsTr", "nnsam_refine", IO.replace("{tmp}/out", "{raw}/labelsTr"),
        ("-o {raw}/labelsTr already holds files nnunet-sam did not write", "user files are never overwritten"),
        (FILES,)),
    Row("-o is the masks folder", "nnsam_refine", IO.replace("{tmp}/out", "{tmp}/masks"),
        ("output folder {tmp}/masks is the masks folder", "choose another -o"), (FILES,)),
    Row("-o parent missing", "nnsam_refine", IO.replace("{tmp}/out", "{tmp}/no/such/out"),
        ("the parent of -o {tmp}/no/such/out does not exist", "create {tmp}/no/such first"), (FILES,)),
    Row("dataset-mode flag in files mode", "nnsam_refine", IO + " --ignore-disagreement",
        ("--ignore-disagreement is for dataset mode (-d)",), (FILES,)),
    # nnsam_preprocess_unlabeled
    Row("processes zero (preprocess)", "nnsam_preprocess_unlabeled", "-d {id} -np 0",
        ("-np 0: the number of processes must be at least 1",), shell=True),
    Row("configuration not preprocessed", "nnsam_preprocess_unlabeled", "-d {id} -c 3d_fullres 2d",
        ("-c 2d:", "run nnUNetv2_preprocess -d {id} -c 2d")),
    Row("nnUNet_preprocessed unset", "nnsam_preprocess_unlabeled", "-d {id}",
        ("environment variable nnUNet_preprocessed is not set", "export it"), (unset("nnUNet_preprocessed"),)),
    Row("imagesUnlabeled empty", "nnsam_preprocess_unlabeled", "-d {id}", ("holds no images ending in .nii.gz",),
        (in_unlabeled(lambda folder: [p.unlink() for p in folder.iterdir()]),)),
    Row("unlabelled image with the wrong channel suffix", "nnsam_preprocess_unlabeled", "-d {id}",
        (f"case {UN} in", f"is missing {UN}_0000.nii.gz; dataset.json lists 1 channel(s)"),
        (in_unlabeled(lambda folder: (folder / f"{UN}_0000.nii.gz").rename(folder / f"{UN}_0001.nii.gz")),)),
    Row("unlabelled image without channel suffix", "nnsam_preprocess_unlabeled", "-d {id}",
        ("scan.nii.gz: name must be CASE_XXXX.nii.gz",),
        (in_unlabeled(lambda folder: (folder / f"{UN}_0000.nii.gz").rename(folder / "scan.nii.gz")),)),
    Row("unlabelled file of another format", "nnsam_preprocess_unlabeled", "-d {id}",
        ("file ending .nrrd differs from the dataset's .nii.gz", "convert it or move it out of imagesUnlabeled"),
        (in_unlabeled(lambda folder: (folder / "scan_0000.nrrd").write_bytes(b"x")),)),
    Row("unlabelled case also labelled", "nnsam_preprocess_unlabeled", "-d {id}",
        ("pipelinetestTr_000 is in both imagesTr and imagesUnlabeled", "rename the unlabelled one"),
        (in_unlabeled(lambda folder: shutil.copy(folder.parent / "imagesTr" / "pipelinetestTr_000_0000.nii.gz",
                                                 folder)),)),
    # nnsam_finetune (model=True: the fold's splits_final.json exists, as after nnsam_preprocess_unlabeled)
    Row("epochs zero", "nnsam_finetune", DS + " --epochs 0", ("--epochs must be at least 1, got 0",), shell=True),
    Row("weak-prompts above 1", "nnsam_finetune", DS + " --weak-prompts 1.5",
        ("--weak-prompts must be a fraction between 0 and 1, got 1.5",)),
    Row("learning rate zero", "nnsam_finetune", DS + " --lr 0", ("--lr must be positive, got 0.0",)),
    Row("box jitter negative", "nnsam_finetune", DS + " --box-jitter -1",
        ("--box-jitter must be a fraction between 0 and 1, got -1.0",)),
    Row("fold not in the splits", "nnsam_finetune", DS + " -f 7",
        ("fold 7 is not in", "splits_final.json (2 folds: 0-1); pick another -f"), model=True),
    Row("channel out of range (finetune)", "nnsam_finetune", DS + " --channel 3",
        ("--channel 3 does not exist", "has 1 channel(s)"), model=True),
    Row("-o not a .pth file", "nnsam_finetune", DS + " -o {tmp}/decoder.txt",
        ("-o {tmp}/decoder.txt should name a .pth file",), model=True),
    Row("-o a file nnsam_finetune did not write", "nnsam_finetune", DS + " -o {tmp}/weights.pth",
        ("-o {tmp}/weights.pth exists and was not written by nnsam_finetune", "choose another file"),
        (text_file("weights.pth"),), model=True),
    Row("grid zero (finetune)", "nnsam_finetune", SHORT + " --grid 0", ("--grid 0 must be at least 1",), model=True),
    Row("-o not a .pth file, no splits yet", "nnsam_finetune", DS + " -o {tmp}/decoder.txt",
        ("-o {tmp}/decoder.txt should name a .pth file",), (fresh_preprocessed,)),
    Row("grid zero, fold without a trained nnU-Net", "nnsam_finetune", DS + " --grid 0",
        ("--grid 0 must be at least 1",), model=True),
    # nnsam_check
    Row("check: dataset unknown", "nnsam_check", "-d 4711", ("dataset 4711 not found", "check -d")),
    Row("check: configuration not preprocessed", "nnsam_check", "-d {id} -c 3d_fullres 2d",
        ("-c 2d:", "run nnUNetv2_preprocess -d {id} -c 2d")),
    Row("check: plans unknown", "nnsam_check", "-d {id} -p nnUNetResEncUNetMPlans",
        ("nnUNetResEncUNetMPlans.json not found", "(or check -p)")),
    # nnUNetv2_train with our trainers (the error comes before nnU-Net writes anything)
    Row("trainer without pseudo labels", TRAIN, TRAIN_PSEUDO, ("nnsam_refine -d", "-f 0"), (without_pseudo_labels,),
        shell=True, training_log=True),
    Row("trainer with leaking pseudo labels", TRAIN, TRAIN_PSEUDO,
        ("come from fold(s) 0, 1, not fold 0 alone", "leakage"), (leaking_pseudo_labels,), shell=True,
        training_log=True),
    Row("trainer without preprocessed unlabelled cases", TRAIN, TRAIN_PSEUDO.replace("SAMPseudo", "MeanTeacher"),
        ("nnsam_preprocess_unlabeled -d",), (without_unlabeled,), shell=True, training_log=True),
    # nnsam_demo
    Row("demo -o is a file", "nnsam_demo", "-o {tmp}/a_file -device cpu",
        ("-o {tmp}/a_file is a file, not a folder", "name a new folder"), (text_file("a_file"),)),
    Row("demo -o is a user folder", "nnsam_demo", "-o {tmp}/userdir -device cpu",
        ("-o {tmp}/userdir already holds files nnunet-sam did not write (notes.txt)", "choose a new or empty folder"),
        (text_file("userdir/notes.txt"),)),
    Row("demo device unknown", "nnsam_demo", "-o {tmp}/demo -device gpu", ("-device gpu is not a device",)),
]


# --- checking ----------------------------------------------------------------------------------------------------

_DIGESTS: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    """A file's sha256, remembered per (path, size, mtime, ctime): any write changes ctime, so the checkpoints of
    nnUNet_results are hashed once per session, not twice per row."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _DIGESTS[key]


def snapshot(roots: list[Path]) -> dict[str, str]:
    """Every path under `roots` (folders too), with each file's sha256."""
    return {str(p): "folder" if p.is_dir() else _sha256(p) for root in roots if root.exists()
            for p in sorted(root.rglob("*"))}


class _CurrentStderr(logging.StreamHandler):
    """Writes each record to the sys.stderr of the moment (capsys replaces it between set-up and call)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@pytest.fixture
def stderr_logging(capsys, caplog) -> Iterator[None]:
    """Log records reach stderr as the console scripts' own logging sends them there (pytest's log capture would
    otherwise keep a warning printed before the error out of the one-line check)."""
    caplog.set_level(logging.INFO)
    handler = _CurrentStderr()
    logging.getLogger().addHandler(handler)
    yield
    logging.getLogger().removeHandler(handler)


def shell_error(command: str, argv: list[str]) -> str:
    """Run the installed console script (in this process's environment, with the row's changes); expect exit
    status 2 and one stderr line; return it."""
    script = Path(sys.executable).parent / command
    result = subprocess.run([str(script), *argv], env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    if command == TRAIN:  # torch and nnU-Net warn on stderr before our trainer runs: ours is the last line, alone
        assert [line for line in lines if line.startswith(f"{PROGRAM[TRAIN]}:")] == lines[-1:], lines
        return lines[-1]
    assert len(lines) == 1, lines
    return lines[0]


def _param(row: Row) -> object:
    """A row as a pytest parameter named by its kind."""
    return pytest.param(row, id=row.kind)


@pytest.mark.parametrize("row", [_param(row) for row in ROWS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(row: Row, planned_dataset: PlannedDataset, request,
                                                          tmp_path: Path, monkeypatch, capsys, stderr_logging) -> None:
    """Exit status 2, one stderr line with the row's fragments, and every watched path and file as it was."""
    if row.model:
        request.getfixturevalue("baseline")
        capsys.readouterr()  # what training it (the first time) printed
    scene = Scene(planned_dataset, tmp_path, monkeypatch)
    for prepare in row.prepare:
        prepare(scene)
    argv = shlex.split(row.argv.format(**scene.fields))
    watched = [planned_dataset.raw, planned_dataset.preprocessed, planned_dataset.results, tmp_path]
    before = snapshot(watched)
    if row.shell:
        message = shell_error(row.command, argv)
    else:
        message = error_of(MAINS[row.command], argv, capsys)
    assert message.startswith(f"{PROGRAM.get(row.command, row.command)}: error: ")
    for fragment in row.expected:
        assert fragment.format(**scene.fields) in message
    after = snapshot(watched)
    if row.training_log:
        after = {path: digest for path, digest in after.items() if path in before or not nnunet_training_log(path)}
    assert after == before


def nnunet_training_log(path: str) -> bool:
    """nnU-Net's training log of one of our trainers, or one of the folders holding it."""
    parts = Path(path).parts
    trainer = next((i for i, part in enumerate(parts) if part.startswith("nnUNetTrainer")), None)
    if trainer is None:
        return False
    rest = parts[trainer + 1:]
    return len(rest) == 0 or (rest[0].startswith("fold_") and (
        len(rest) == 1 or (len(rest) == 2 and rest[1].startswith("training_log_") and rest[1].endswith(".txt"))))


def test_the_table_covers_every_command_and_enough_kinds() -> None:
    """Every console script has rows, kinds are unique (they name the tests), and some rows run in a shell."""
    assert {row.command for row in ROWS} == set(MAINS) | {TRAIN}
    assert all(row.shell for row in ROWS if row.command not in MAINS)
    assert len({row.kind for row in ROWS}) == len(ROWS) >= 25
    assert sum(row.shell for row in ROWS) >= 2
