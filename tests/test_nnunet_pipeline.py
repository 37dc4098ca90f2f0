"""End to end on CPU with the stock nnU-Net commands: plan and preprocess, nnsam_preprocess_unlabeled,
a baseline, nnsam_refine -d, each of our trainers, and nnUNetv2_predict on what they trained."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CONFIG, error_of, train_fold
from nnunet_sam.cli import preprocess_unlabeled as preprocess_cli
from nnunet_sam.cli import refine as refine_cli
from nnunet_sam.errors import NnsamError

DATA_ID = "nnUNetPlans_3d_fullres"
FOLD_0 = ("nnUNetPlans", "fold_0")  # the pseudo-label set that fold 0 of nnUNetPlans trains on


@pytest.fixture(scope="module")
def unlabeled(planned_dataset):
    preprocess_cli.main(["-d", str(planned_dataset.dataset_id)])
    return planned_dataset.preprocessed / f"{DATA_ID}_unlabeled"


@pytest.fixture(scope="module")
def pseudo_labels(planned_dataset, unlabeled, baseline, tmp_path_factory):
    export = tmp_path_factory.mktemp("export")
    refine_cli.main(["-d", str(planned_dataset.dataset_id), "-c", CONFIG, "-f", "0", "-tr", "nnUNetTrainerShort",
                     "--disable_tta", "-device", "cpu", "--gt", str(planned_dataset.raw / "labelsUnlabeledTruth"),
                     "--export", str(export)])
    return planned_dataset.preprocessed.joinpath(f"{DATA_ID}_pseudolabels", *FOLD_0), export


def test_preprocess_unlabeled_writes_cases_once_and_a_few_label_split(planned_dataset, unlabeled):
    cases = sorted(p.name[:-4] for p in unlabeled.glob("*.pkl"))
    assert cases == ["pipelinetestUn_000", "pipelinetestUn_001"]
    for case in cases:
        assert (unlabeled / f"{case}.b2nd").is_file() and (unlabeled / f"{case}_seg.b2nd").is_file()
        properties = pickle.loads((unlabeled / f"{case}.pkl").read_bytes())
        assert properties["class_locations"] == {}
        data = blosc2.open(str(unlabeled / f"{case}.b2nd"))[:]
        assert data.shape[0] == 1 and np.isfinite(data).all() and abs(float(data.mean())) < 5
    splits = json.loads((planned_dataset.preprocessed / "splits_final.json").read_text())
    assert len(splits) == 2 and all(len(s["train"]) == 1 and len(s["val"]) == 1 for s in splits)
    assert not any(k.startswith("pipelinetestUn") for s in splits for k in s["train"] + s["val"])

    stamp = (unlabeled / f"{cases[0]}.b2nd").stat().st_mtime_ns
    preprocess_cli.main(["-d", str(planned_dataset.dataset_id)])  # idempotent: nothing redone
    assert (unlabeled / f"{cases[0]}.b2nd").stat().st_mtime_ns == stamp
    preprocess_cli.main(["-d", str(planned_dataset.dataset_id), "--overwrite"])
    assert (unlabeled / f"{cases[0]}.b2nd").stat().st_mtime_ns != stamp
    assert not list(unlabeled.glob(".nnsam-tmp-*"))


def _raw_copy(planned_dataset, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the raw dataset (user files stay untouched), with nnUNet_raw pointing at it."""
    copy = tmp_path / "raw" / planned_dataset.name
    shutil.copytree(planned_dataset.raw, copy)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    return copy / "imagesUnlabeled"


def test_sam_is_shown_raw_hu_on_the_preprocessed_grid_cached_never_stale(planned_dataset, unlabeled, tmp_path):
    from nnunet_sam.nnunet.datasets import dataset_folders
    from nnunet_sam.nnunet.sam_views import ViewVolumes, dataset_view_settings, views_folder
    from nnunet_sam.nnunet.unlabeled import find_unlabeled_cases
    from nnunet_sam.sam import RefineSettings

    folders = dataset_folders(str(planned_dataset.dataset_id), CONFIG)
    case = find_unlabeled_cases(folders)[0]
    data = blosc2.open(str(unlabeled / f"{case.case_id}.b2nd"))[:]
    views = ViewVolumes(folders)
    view = views.volume(case.case_id, case.images, data.shape)
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(case.images[0])))
    assert view.shape == data.shape and views.made == 1
    assert float(view.min()) < -900 and float(data.min()) > -10  # HU (air), where nnU-Net's tensor is normalised
    if view.shape[1:] == raw.shape:  # nothing cropped or resampled: the very HU of the file
        np.testing.assert_allclose(view[0], raw, atol=1e-3)
    # the same grid: air (clipped to the tensor's lowest value there) is where the view's HU say air is
    assert np.mean(data[0][view[0] < -500] <= data.min() + 1e-3) > 0.95
    again = ViewVolumes(folders)
    assert np.array_equal(again.volume(case.case_id, case.images, data.shape), view) and again.made == 0
    # a cut-off cache file is never read as a view: it is made again
    cached = views_folder(folders) / f"{case.case_id}.npz"
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    assert "cannot be read" in again.stale(case.case_id, case.images)
    from nnunet_sam.nnunet.check import check_dataset
    assert [f.item for f in check_dataset(folders) if f.problem.startswith("stale SAM view")] == [cached.name]
    assert np.array_equal(again.volume(case.case_id, case.images, data.shape), view) and again.made == 1
    # an image changed since: its view is stale (the next use makes it again)
    changed = tmp_path / case.images[0].name
    shutil.copy(case.images[0], changed)
    with open(changed, "ab") as handle:
        handle.write(b"\0")
    assert "changed since" in again.stale(case.case_id, [changed])
    # the channel is CT: shown through the soft-tissue window, and a window is refused for a channel that is not
    assert dataset_view_settings(RefineSettings(), folders, 0).modality == "CT"
    with pytest.raises(NnsamError, match="--channel 3 does not exist"):
        dataset_view_settings(RefineSettings(), folders, 3)


@pytest.mark.parametrize("break_it, expected", [
    (lambda d: (d / "pipelinetestUn_000_0000.nii.gz").rename(d / "pipelinetestUn_000_0001.nii.gz"),
     "is missing pipelinetestUn_000_0000.nii.gz"),
    (lambda d: (d / "scan_0000.nrrd").write_bytes(b"x"), "file ending .nrrd differs from the dataset's .nii.gz"),
    (lambda d: shutil.copy(d.parent / "imagesTr" / "pipelinetestTr_000_0000.nii.gz", d),
     "pipelinetestTr_000 is in both imagesTr and imagesUnlabeled"),
    (lambda d: shutil.rmtree(d), "imagesUnlabeled does not exist"),
])
def test_preprocess_unlabeled_bad_input_is_one_clear_line(planned_dataset, tmp_path, monkeypatch, capsys,
                                                          break_it, expected):
    folder = _raw_copy(planned_dataset, tmp_path, monkeypatch)
    break_it(folder)
    before = sorted(p.name for p in folder.parent.rglob("*"))
    message = error_of(preprocess_cli.main, ["-d", str(planned_dataset.dataset_id)], capsys)
    assert expected in message
    assert sorted(p.name for p in folder.parent.rglob("*")) == before


def test_preprocess_unlabeled_rejects_zero_processes(capsys):
    assert "-np 0" in error_of(preprocess_cli.main, ["-d", "1", "-np", "0"], capsys)


def test_preprocess_unlabeled_needs_preprocessed_plans(planned_dataset, capsys):
    message = error_of(preprocess_cli.main, ["-d", str(planned_dataset.dataset_id), "-c", "2d"], capsys)
    assert "nnUNetv2_preprocess" in message and "2d" in message
    message = error_of(preprocess_cli.main, ["-d", str(planned_dataset.dataset_id), "-p", "NoSuchPlans"], capsys)
    assert "NoSuchPlans.json not found" in message and "nnUNetv2_plan_and_preprocess" in message


def test_refine_dataset_writes_pseudo_labels_where_trainers_read_them(planned_dataset, pseudo_labels):
    folder, export = pseudo_labels
    report = json.loads((folder / "refine_report.json").read_text())
    assert report["mode"] == "dataset" and report["initial_model"]["trainer"] == "nnUNetTrainerShort"
    assert report["initial_model"]["folds"] == ["0"] and report["sam"]["model"] == "litemedsam"
    assert [c["case"] for c in report["cases"]] == ["pipelinetestUn_000", "pipelinetestUn_001"]
    for case in report["cases"]:
        case_id = case["case"]
        seg = blosc2.open(str(folder / f"{case_id}_seg.b2nd"))[:]
        image = blosc2.open(str(planned_dataset.preprocessed / f"{DATA_ID}_unlabeled" / f"{case_id}.b2nd"))
        assert seg.shape == image.shape and seg.dtype == np.int16
        assert set(np.unique(seg)) <= {-1, 0, 1, 2}
        properties = pickle.loads((folder / f"{case_id}.pkl").read_bytes())
        for label, locations in properties["class_locations"].items():
            assert len(locations) == 0 or (seg[tuple(np.asarray(locations)[:5].T)] == label).all()
        for row in case["classes"].values():
            assert 0.0 <= row["dice_before"] <= 1.0 and 0.0 <= row["dice_after"] <= 1.0
        raw = sitk.ReadImage(str(planned_dataset.raw / "imagesUnlabeled" / f"{case_id}_0000.nii.gz"))
        exported = sitk.ReadImage(str(export / f"{case_id}.nii.gz"))
        assert exported.GetSize() == raw.GetSize() and exported.GetSpacing() == raw.GetSpacing()
        assert exported.GetOrigin() == raw.GetOrigin()
    assert not list(folder.glob(".nnsam-tmp-*"))


def test_refine_dataset_continue_skips_finished_cases(planned_dataset, pseudo_labels):
    folder, _ = pseudo_labels
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*_seg.b2nd")}
    refine_cli.main(["-d", str(planned_dataset.dataset_id), "-f", "0", "-tr", "nnUNetTrainerShort",
                     "--disable_tta", "-device", "cpu", "--continue"])
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*_seg.b2nd")} == stamps


@pytest.mark.parametrize("argv, expected", [
    (["-tr", "nnUNetTrainerNeverTrained"], "nnUNetv2_train"),
    (["-tr", "nnUNetTrainerShort", "-f", "1"], "fold_1"),
    (["-tr", "nnUNetTrainerShort", "-i", "x"], "either -d"),
    (["-tr", "nnUNetTrainerShort", "-f", "zero"], "-f zero is not a fold; use a number (0, 1, ...) or all"),
    (["-tr", "nnUNetTrainerShort", "-d", "DatasetAB_X"], "-d DatasetAB_X is neither a dataset id"),
])
def test_refine_dataset_errors_name_the_fix(planned_dataset, baseline, capsys, argv, expected):
    message = error_of(refine_cli.main, ["-d", str(planned_dataset.dataset_id), "-device", "cpu", *argv], capsys)
    assert expected in message


def test_refine_dataset_never_exports_into_a_user_folder(planned_dataset, baseline, capsys):
    labels = planned_dataset.raw / "labelsTr"
    before = {p.name: p.read_bytes() for p in labels.iterdir()}
    argv = ["-d", str(planned_dataset.dataset_id), "-device", "cpu", "-tr", "nnUNetTrainerShort", "--export"]
    message = error_of(refine_cli.main, argv + [str(labels)], capsys)
    assert f"--export {labels} already holds files nnunet-sam did not write" in message
    assert {p.name: p.read_bytes() for p in labels.iterdir()} == before


def _predict_with_stock_command(planned_dataset, trainer: str, out: Path) -> Path:
    """nnUNetv2_predict, the console script users run, on the test case."""
    command = ["nnUNetv2_predict", "-i", str(planned_dataset.raw / "imagesTs"), "-o", str(out),
               "-d", str(planned_dataset.dataset_id), "-c", CONFIG, "-f", "0", "-tr", trainer,
               "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
    bin_dir = Path(__import__("sys").executable).parent
    subprocess.run([str(bin_dir / command[0]), *command[1:]], check=True, env=planned_dataset.env,
                   capture_output=True, text=True)
    return out / "pipelinetestTs_000.nii.gz"


@pytest.mark.parametrize("trainer", ["nnUNetTrainerSAMPseudoShort", "nnUNetTrainerMeanTeacherShort",
                                     "nnUNetTrainerSAMPseudoMeanTeacherShort"])
def test_our_trainers_train_on_pseudo_labels_and_predict(planned_dataset, pseudo_labels, tmp_path, trainer):
    fold_dir = train_fold(planned_dataset, trainer)
    checkpoint = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer and checkpoint["current_epoch"] == 2
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert "pipelinetestTr" in json.dumps(summary) and "pipelinetestUn" not in json.dumps(summary)
    prediction = _predict_with_stock_command(planned_dataset, trainer, tmp_path / "predicted")
    image = sitk.ReadImage(str(planned_dataset.raw / "imagesTs" / "pipelinetestTs_000_0000.nii.gz"))
    predicted = sitk.ReadImage(str(prediction))
    assert predicted.GetSize() == image.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1, 2}


def test_pseudo_labels_that_no_longer_fit_their_images_are_refused(planned_dataset, pseudo_labels, tmp_path):
    from nnunet_sam.errors import NnsamError
    from nnunet_sam.nnunet.pseudolabels import open_pseudo_label_dataset

    folder, _ = pseudo_labels
    data = tmp_path / DATA_ID  # a copy: the session's dataset stays as it is
    labels = tmp_path.joinpath(f"{DATA_ID}_pseudolabels", *FOLD_0)
    shutil.copytree(planned_dataset.preprocessed / f"{DATA_ID}_unlabeled", tmp_path / f"{DATA_ID}_unlabeled")
    shutil.copytree(folder, labels)
    assert len(open_pseudo_label_dataset(data, labels, "nnsam_refine -d X").identifiers) == 2
    seg_file = labels / "pipelinetestUn_001_seg.b2nd"
    cropped = blosc2.open(str(seg_file))[:, :, :-2]
    seg_file.unlink()
    blosc2.asarray(np.ascontiguousarray(cropped), urlpath=str(seg_file))
    with pytest.raises(NnsamError, match="pipelinetestUn_001 has shape .* make new pseudo labels: nnsam_refine"):
        open_pseudo_label_dataset(data, labels, "nnsam_refine -d X")


def test_continue_redoes_cases_made_by_another_model_or_options(planned_dataset, pseudo_labels, baseline,
                                                                litemedsam):
    """A re-run with another initial model, other engine settings or other pseudo-label options, resumed with
    --continue, never keeps the old run's labels."""
    from nnunet_sam.nnunet.predict import ModelChoice
    from nnunet_sam.nnunet.refine_dataset import DatasetJob, _case_done, plan_dataset_job
    from nnunet_sam.sam import RefineSettings, SamRefiner

    def plan(tta: bool = False, **options):
        return plan_dataset_job(DatasetJob(dataset=str(planned_dataset.dataset_id), resume=True,
                                           model=ModelChoice("nnUNetTrainerShort", ("0",), tta=tta), **options))

    same, refiner = plan(), SamRefiner(litemedsam)
    assert all(_case_done(same, c, refiner) for c in same.cases)
    checkpoint = baseline / "checkpoint_final.pth"  # the initial model trained again under the same name
    times = checkpoint.stat()
    os.utime(checkpoint, ns=(times.st_atime_ns, times.st_mtime_ns + 10**9))
    try:
        assert not any(_case_done(plan(), c, refiner) for c in same.cases)
    finally:
        os.utime(checkpoint, ns=(times.st_atime_ns, times.st_mtime_ns))
    for other in (plan(tta=True), plan(ignore_disagreement=True), plan(min_case_agreement=0.5)):
        assert not any(_case_done(other, c, refiner) for c in other.cases)
    for settings in (RefineSettings(confident=0.5), RefineSettings(fuse=True), RefineSettings(activation=None)):
        assert not any(_case_done(same, c, SamRefiner(litemedsam, settings)) for c in same.cases)


def test_a_changed_unlabelled_image_is_preprocessed_again_and_its_pseudo_label_refused(planned_dataset,
                                                                                       pseudo_labels, litemedsam):
    """Only the changed case is preprocessed again; its pseudo label is refused by the trainers and redone by
    --continue; the same bytes copied back make the old pseudo label valid again."""
    from nnunet_sam.errors import NnsamError
    from nnunet_sam.nnunet.pseudolabels import open_pseudo_label_dataset
    from nnunet_sam.nnunet.predict import ModelChoice
    from nnunet_sam.nnunet.refine_dataset import DatasetJob, _case_done, plan_dataset_job
    from nnunet_sam.sam import SamRefiner

    folder, _ = pseudo_labels
    dataset, data = str(planned_dataset.dataset_id), planned_dataset.preprocessed / DATA_ID
    unlabeled = planned_dataset.preprocessed / f"{DATA_ID}_unlabeled"
    cases = ("pipelinetestUn_000", "pipelinetestUn_001")
    image_file = planned_dataset.raw / "imagesUnlabeled" / f"{cases[1]}_0000.nii.gz"
    original = image_file.read_bytes()
    stamps = {c: (unlabeled / f"{c}.b2nd").stat().st_mtime_ns for c in cases}
    try:
        image = sitk.ReadImage(str(image_file))
        changed = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) + 25)
        changed.CopyInformation(image)
        sitk.WriteImage(changed, str(image_file))
        preprocess_cli.main(["-d", dataset])
        assert [(unlabeled / f"{c}.b2nd").stat().st_mtime_ns != stamps[c] for c in cases] == [False, True]
        with pytest.raises(NnsamError, match=f"pseudo label {cases[1]} in .* was made from an earlier preprocessing"):
            open_pseudo_label_dataset(data, folder, "nnsam_refine -d X")
        plan = plan_dataset_job(DatasetJob(dataset=dataset, resume=True,
                                           model=ModelChoice("nnUNetTrainerShort", ("0",), tta=False)))
        assert [_case_done(plan, c, SamRefiner(litemedsam)) for c in cases] == [True, False]
    finally:
        image_file.write_bytes(original)
        preprocess_cli.main(["-d", dataset])
    assert len(open_pseudo_label_dataset(data, folder, "nnsam_refine -d X").identifiers) == 2


def test_check_lists_stale_orphan_leaking_and_half_written_work(planned_dataset, pseudo_labels, tmp_path, caplog):
    """nnsam_check finds nothing after a clean run; on a copy with one fault of each kind, each with its fix."""
    from nnunet_sam.cli import check as check_cli
    from nnunet_sam.nnunet.check import check_dataset
    from nnunet_sam.nnunet.datasets import DatasetFolders

    check_cli.main(["-d", str(planned_dataset.dataset_id)])  # clean: no SystemExit(1)
    raw, preprocessed = tmp_path / "raw" / planned_dataset.name, tmp_path / "preprocessed" / planned_dataset.name
    shutil.copytree(planned_dataset.raw, raw)
    shutil.copytree(planned_dataset.preprocessed, preprocessed)
    folders = DatasetFolders(planned_dataset.name, raw, preprocessed, "nnUNetPlans", CONFIG, DATA_ID)
    assert check_dataset(folders) == []
    unlabeled, labels = preprocessed / f"{DATA_ID}_unlabeled", preprocessed.joinpath(f"{DATA_ID}_pseudolabels", *FOLD_0)
    (unlabeled / ".nnsam-tmp-pipelinetestUn_001.99999.b2nd").write_bytes(b"killed")
    (unlabeled / "pipelinetestUn_000.pkl").unlink()  # a half-removed case: no trainer reads it
    shutil.copytree(labels, labels.with_name("fold_1"))  # made by fold 0's model, put where fold 1 reads
    image = raw / "imagesUnlabeled" / "pipelinetestUn_001_0000.nii.gz"
    image.write_bytes(image.read_bytes()[:-1] + b"x")  # the scan changed since it was preprocessed
    shutil.copy(labels / "pipelinetestUn_001.pkl", labels.parent.parent / "pipelinetestUn_001.pkl")  # old layout
    found = {(f.where.name, f.item, f.problem.split(":")[0].split(" (")[0]) for f in check_dataset(folders)}
    assert found == {
        (unlabeled.name, ".nnsam-tmp-pipelinetestUn_001.99999.b2nd", "temporary file of an unfinished write"),
        (unlabeled.name, "pipelinetestUn_000", "case without its .pkl"),
        (unlabeled.name, "pipelinetestUn_000", "not preprocessed"),
        (unlabeled.name, "pipelinetestUn_001", "stale"),
        (f"{DATA_ID}_sam_views", "pipelinetestUn_001.npz", "stale SAM view"),  # its view too, never used
        (f"{DATA_ID}_pseudolabels", "pipelinetestUn_001", "pseudo label in the layout before per-plans, per-fold sets"),
        *{(fold, "pipelinetestUn_000", "no preprocessed image of an unlabelled case") for fold in ("fold_0", "fold_1")},
        ("fold_1", "refine_report.json", "made by fold(s) 0, which saw fold 1's validation cases")}
    fixes = {f.item: f.fix for f in check_dataset(folders) if f.where.name == "fold_1"}
    assert fixes["refine_report.json"] == (f"nnsam_refine -d {planned_dataset.name} -c {CONFIG} -p nnUNetPlans -f 1 "
                                           f"-tr nnUNetTrainerShort")


def test_2d_configuration_preprocess_refine_no_sam_and_train(planned_dataset, unlabeled, baseline, capsys,
                                                             caplog, tmp_path):
    """nnU-Net's `2d` configuration of the same dataset: nnsam_preprocess_unlabeled -c 2d, a 2d baseline,
    nnsam_refine -d -c 2d (SAM) and --no-sam (the baseline's predictions as they are), then SAM-pseudo training.
    The SAM runs share an embedding cache (--cache): only the first encodes."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
    from nnunetv2.run.run_training import run_training

    from nnunet_sam.demo.nnunet_setup import spawn_pools_in_threads
    from nnunet_sam.nnunet.pseudolabels import sam_agreement

    dataset = str(planned_dataset.dataset_id)
    with spawn_pools_in_threads():
        preprocess([planned_dataset.dataset_id], configurations=("2d",), num_processes=(1,), show_progress_bar=False)
    preprocess_cli.main(["-d", dataset, "-c", "2d"])
    images = planned_dataset.preprocessed / "nnUNetPlans_2d_unlabeled"
    assert sorted(p.name for p in images.glob("*.pkl")) == ["pipelinetestUn_000.pkl", "pipelinetestUn_001.pkl"]
    run_training(dataset, "2d", "0", "nnUNetTrainerShort", device=torch.device("cpu"))
    refine = ["-d", dataset, "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerShort", "--disable_tta", "-device", "cpu",
              "--cache", str(tmp_path / "embeddings")]
    refine_cli.main(refine + ["--gt", str(planned_dataset.raw / "labelsUnlabeledTruth")])
    labels = planned_dataset.preprocessed.joinpath("nnUNetPlans_2d_pseudolabels", *FOLD_0)
    report = json.loads((labels / "refine_report.json").read_text())
    assert report["configuration"] == "2d" and len(report["cases"]) == 2
    assert all(case["axis"] == 0 for case in report["cases"])  # slices along z, as the 2d network sees them
    cases = ("pipelinetestUn_000", "pipelinetestUn_001")
    segs = {case: blosc2.open(str(labels / f"{case}_seg.b2nd"))[:] for case in cases}
    for case, seg in segs.items():
        assert seg.shape == blosc2.open(str(images / f"{case}.b2nd")).shape[:1] + seg.shape[1:]
    agreements = {case["case"]: case["sam_agreement"] for case in report["cases"]}
    assert all(case["selected"] for case in report["cases"])  # no --min-case-agreement: every case
    refine_cli.main(refine + ["--no-sam"])
    report = json.loads((labels / "refine_report.json").read_text())
    assert report["sam"] is None and report["source"] == "initial model"
    assert not (labels / "refine_report_cases").exists()  # the SAM run's case reports went with its labels
    assert sorted(p.name for p in labels.glob("*.pkl")) == ["pipelinetestUn_000.pkl", "pipelinetestUn_001.pkl"]
    predictions = {case: blosc2.open(str(labels / f"{case}_seg.b2nd"))[:] for case in cases}
    for case in cases:  # the report's SAM agreement: Dice between SAM's pseudo label and the model's prediction
        assert agreements[case] == pytest.approx(sam_agreement(segs[case], predictions[case], [1, 2]), abs=1e-4)
    # --keep-confident P --band max: the model's (cleaned) label where its top probability >= P; at 0.01 that is
    # everywhere (the default band, "class", locks only the model's foreground: test_probability_guidance.py)
    refine_cli.main(refine + ["--keep-confident", "0.01", "--band", "max"])
    report = json.loads((labels / "refine_report.json").read_text())
    for case in report["cases"]:
        assert case["settings"]["confident"] == 0.01 and case["settings"]["band"] == "max"
        assert case["slices_encoded"] == 0  # all from the cache
        for row in case["classes"].values():
            assert row["voxels_sam_decided"] == 0 and row["voxels_confident"] == row["voxels_after"]
    # how many voxels the band overruled depends on what SAM made of this run's (unseeded) short model; the
    # count itself is tested exactly in test_engine.py and test_probability_guidance.py: here it is reported
    assert all(row["voxels_overruled"] >= 0 for case in report["cases"] for row in case["classes"].values())
    # --ignore-disagreement: SAM's pseudo label where it equals the model's prediction, else the unsure label;
    # with --min-case-agreement between the two cases' agreements, the less agreeing case gets no pseudo label
    worse, better = sorted(cases, key=agreements.get)
    assert agreements[worse] < agreements[better]
    threshold = (agreements[worse] + agreements[better]) / 2
    refine_cli.main(refine + ["--ignore-disagreement", "--min-case-agreement", str(threshold)])
    unsure = 1 + max(int(k) for k in json.loads((planned_dataset.raw / "dataset.json").read_text())["labels"].values())
    report = json.loads((labels / "refine_report.json").read_text())
    assert {case["case"]: case["selected"] for case in report["cases"]} == {worse: False, better: True}
    assert not (labels / f"{worse}.pkl").exists() and not (labels / f"{worse}_seg.b2nd").exists()
    fractions = {case["case"]: case["unsure_fraction"] for case in report["cases"]}
    seg = blosc2.open(str(labels / f"{better}_seg.b2nd"))[:]
    np.testing.assert_array_equal(seg, np.where(segs[better] == predictions[better], segs[better], unsure))
    assert fractions[better] == pytest.approx(float(np.mean(seg == unsure)), abs=1e-6)
    assert fractions[better] > 0  # SAM changed the short model's mask: the training below meets the label
    with caplog.at_level(logging.INFO):
        refine_cli.main(refine + ["--ignore-disagreement", "--min-case-agreement", str(threshold), "--continue"])
    assert "2 of 2 cases already done" in caplog.text  # the left-out case counts as done
    capsys.readouterr()  # the progress bars so far
    assert "--no-sam is for dataset mode" in error_of(refine_cli.main, ["-i", "a", "-m", "b", "-o", "c", "--no-sam"],
                                                      capsys)
    assert "is for dataset mode" in error_of(
        refine_cli.main, ["-i", "a", "-m", "b", "-o", "c", "--ignore-disagreement"], capsys)
    assert "leave one of them out" in error_of(refine_cli.main, refine + ["--no-sam", "--ignore-disagreement"], capsys)
    assert "must be a probability" in error_of(refine_cli.main, refine + ["--keep-confident", "90"], capsys)
    assert "must be a Dice in [0, 1]" in error_of(refine_cli.main, refine + ["--min-case-agreement", "85"], capsys)
    with spawn_pools_in_threads():
        run_training(dataset, "2d", "0", "nnUNetTrainerSAMPseudoShort", device=torch.device("cpu"))
    fold = planned_dataset.results / planned_dataset.name / "nnUNetTrainerSAMPseudoShort__nnUNetPlans__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
