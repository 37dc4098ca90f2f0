"""nnsam_demo: its dataset generator, and a --quick-sized pipeline on CPU that resumes finished stages."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_sam.demo.dataset import SyntheticDatasetSpec, write_synthetic_dataset
from nnunet_sam.demo.pipeline import Demo, DemoDataSpec, Schedule, trainers
from nnunet_sam.demo.report import demo_report
from nnunet_sam.errors import NnsamError


def test_synthetic_dataset_has_nnunet_layout_and_consistent_anatomy(tmp_path):
    spec = SyntheticDatasetSpec(dataset_id=992, name="Gen", labelled=2, unlabelled=2, test=1, organs=3)
    folder = write_synthetic_dataset(tmp_path, spec)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
    assert dataset_json["numTraining"] == 2 and dataset_json["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["genTr_000_0000.nii.gz", "genTr_001_0000.nii.gz"]
    assert len(list((folder / "imagesUnlabeled").iterdir())) == 2 and len(list((folder / "labelsTs").iterdir())) == 1
    means = []
    for case in ("genTr_000", "genTr_001"):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz")))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz")))
        assert image.shape == labels.shape == spec.shape and set(np.unique(labels)) == {0, 1, 2, 3}
        means.append([float(image[labels == k].mean()) for k in (1, 2, 3)])
    # the same organ has the same contrast in every case (a dataset, not unrelated images)
    assert np.allclose(means[0], means[1], atol=40) and np.ptp(means[0]) > 100


@pytest.fixture
def restored_environment():
    """The demo points nnU-Net's environment variables at its own folders: undo that afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.slow
def test_quick_demo_runs_reports_and_resumes(tmp_path, restored_environment):
    spec = DemoDataSpec(dataset_id=993, name="DemoTest", cases=12, shape=(48, 48), organs=2, validation=2)
    schedule = Schedule(2, 2, 1)
    demo = Demo(tmp_path / "demo", torch.device("cpu"), quick=True, spec=spec, schedule=schedule, finetune=True)
    results = demo.run()
    models = trainers(quick=True)
    assert set(models) == {"baseline", "SAM pseudo"}
    assert results["dataset"]["split"] == {"labelled": 2, "validation": 2, "unlabelled": 4, "test": 4}
    splits = json.loads((demo.out / "nnUNet_preprocessed" / spec.folder_name / "splits_final.json").read_text())
    assert len(splits) == 1 and len(splits[0]["train"]) == 2 and len(splits[0]["val"]) == 2
    for name in models:
        assert set(results[f"evaluate {name}"]["dice"]) == {"1", "2"}
        assert len(results[f"train {name}"]["curve"]["ema_fg_dice"]) == schedule.epochs
    summary = results["refine"]["summary"]
    assert set(summary) <= {"1", "2"} and all(s["mean_dice_before"] is not None for s in summary.values())
    assert results["refine"]["slices_encoded"] == 4  # one slice per unlabelled 2D case
    assert results["refine fine-tuned"]["slices_encoded"] == 0  # the same slices: embeddings from the cache
    assert set(results["refine fine-tuned"]["summary"]) == set(summary)
    assert len(results["fine-tune SAM"]["loss"]) == results["fine-tune SAM"]["epochs"] > 0
    overlays = sorted(p.name for p in (demo.out / "overlays").iterdir())
    assert overlays == ["pseudo_labels_0.png", "pseudo_labels_1.png", "pseudo_labels_2.png", "pseudo_labels_3.png",
                        "pseudo_labels_finetuned_0.png", "pseudo_labels_finetuned_1.png",
                        "pseudo_labels_finetuned_2.png", "pseudo_labels_finetuned_3.png", "test_cases.png",
                        "validation_curves.png"]
    text = demo_report(results, models, ["liver", "kidney"], "CPU")
    assert "after SAM" in text and "`nnUNetTrainerSAMPseudoDemo`" in text and "vs baseline" in text
    assert "after fine-tuned SAM" in text and "change from the quarter before" in text
    stamps = {p.name: p.stat().st_mtime_ns for p in (demo.out / "stages").iterdir()}
    again = Demo(tmp_path / "demo", torch.device("cpu"), quick=True, spec=spec, schedule=schedule, finetune=True).run()
    assert again == json.loads(json.dumps(results))  # every stage was finished: nothing is redone
    assert {p.name: p.stat().st_mtime_ns for p in (demo.out / "stages").iterdir()} == stamps
    with pytest.raises(NnsamError, match="with --finetune"):
        Demo(tmp_path / "demo", torch.device("cpu"), quick=True, spec=spec, schedule=schedule).run()


def test_demo_output_that_is_a_file_is_one_clear_line(tmp_path, capsys):
    from nnunet_sam.cli import demo as demo_cli

    target = tmp_path / "report.txt"
    target.write_text("user file")
    with pytest.raises(SystemExit) as exc:
        demo_cli.main(["-o", str(target), "-device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0] and target.read_text() == "user file"
    with pytest.raises(SystemExit) as exc:
        demo_cli.main(["-o", str(tmp_path / "demo"), "-device", "gpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "-device gpu is not a device" in err[0]
    assert not (tmp_path / "demo").exists()


def test_plateau_change_compares_the_last_two_quarters():
    from nnunet_sam.demo.experiment import plateau_change

    assert plateau_change([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]) == pytest.approx(0.2)  # still rising
    assert plateau_change([0.1, 0.5, 0.9, 0.8, 0.9, 0.8, 0.9, 0.8]) == pytest.approx(0.0)  # noisy plateau
    assert plateau_change([0.5]) == 0.0
