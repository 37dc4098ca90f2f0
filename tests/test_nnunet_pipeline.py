"""End to end on CPU with the stock nnU-Net commands: plan and preprocess, nnsam_preprocess_unlabeled,
a baseline, nnsam_refine -d, each of our trainers, and nnUNetv2_predict on what they trained."""

from __future__ import annotations

import json
import logging
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

DATA_ID = "nnUNetPlans_3d_fullres"


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
    return planned_dataset.preprocessed / f"{DATA_ID}_pseudolabels", export


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
        image = blosc2.open(str(folder.parent / f"{DATA_ID}_unlabeled" / f"{case_id}.b2nd"))
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
    from nnunet_sam.nnunet.datasets import open_pseudo_label_dataset

    folder, _ = pseudo_labels
    data = tmp_path / DATA_ID  # a copy: the session's dataset stays as it is
    shutil.copytree(folder.parent / f"{DATA_ID}_unlabeled", tmp_path / f"{DATA_ID}_unlabeled")
    shutil.copytree(folder, tmp_path / f"{DATA_ID}_pseudolabels")
    assert len(open_pseudo_label_dataset(data, "nnsam_refine -d X").identifiers) == 2
    seg_file = tmp_path / f"{DATA_ID}_pseudolabels" / "pipelinetestUn_001_seg.b2nd"
    cropped = blosc2.open(str(seg_file))[:, :, :-2]
    seg_file.unlink()
    blosc2.asarray(np.ascontiguousarray(cropped), urlpath=str(seg_file))
    with pytest.raises(NnsamError, match="pipelinetestUn_001 has shape .* make new pseudo labels: nnsam_refine"):
        open_pseudo_label_dataset(data, "nnsam_refine -d X")


def test_continue_redoes_cases_made_by_another_model_or_options(planned_dataset, pseudo_labels, litemedsam):
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
    for other in (plan(tta=True), plan(ignore_disagreement=True), plan(min_case_agreement=0.5)):
        assert not any(_case_done(other, c, refiner) for c in other.cases)
    for settings in (RefineSettings(confident=0.5), RefineSettings(fuse=True), RefineSettings(activation=None)):
        assert not any(_case_done(same, c, SamRefiner(litemedsam, settings)) for c in same.cases)


def test_2d_configuration_preprocess_refine_no_sam_and_train(planned_dataset, unlabeled, baseline, capsys, caplog):
    """nnU-Net's `2d` configuration of the same dataset: nnsam_preprocess_unlabeled -c 2d, a 2d baseline,
    nnsam_refine -d -c 2d (SAM) and --no-sam (the baseline's predictions as they are), then SAM-pseudo training."""
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
    refine = ["-d", dataset, "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerShort", "--disable_tta", "-device", "cpu"]
    refine_cli.main(refine + ["--gt", str(planned_dataset.raw / "labelsUnlabeledTruth")])
    labels = planned_dataset.preprocessed / "nnUNetPlans_2d_pseudolabels"
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
    # --keep-confident P: the model's (cleaned) label where its top probability >= P; at 0.01 that is everywhere
    refine_cli.main(refine + ["--keep-confident", "0.01"])
    report = json.loads((labels / "refine_report.json").read_text())
    for case in report["cases"]:
        assert case["settings"]["confident"] == 0.01
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
