"""nnsam_refine in files mode: outputs, report, parts, --continue, and one-line errors on bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import degrade, make_phantom, write_nifti
from nnunet_sam.cli.refine import main
from nnunet_sam.nnunet.report import CASES_FOLDER
from nnunet_sam.utils.atomic import TEMP_PREFIX
from nnunet_sam.utils.output_folders import claim_output_folder

SPACING = (3.0, 0.8, 0.8)
ORIGIN = (10.0, -20.0, 5.0)


def _error_line(capsys) -> str:
    """The one error line on stderr (progress bars may precede it); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith("nnsam_refine: error:")
    return errors[0]


def _make_folders(root: Path, cases: int = 2) -> dict[str, Path]:
    folders = {name: root / name for name in ("images", "masks", "gt")}
    for index in range(cases):
        p = make_phantom(shape=(8, 48, 48), seed=index)
        write_nifti(p.image, folders["images"] / f"case{index}_0000.nii.gz", SPACING, ORIGIN)
        write_nifti(degrade(p.labels), folders["masks"] / f"case{index}.nii.gz", SPACING, ORIGIN, np.int16)
        write_nifti(p.labels, folders["gt"] / f"case{index}.nii.gz", SPACING, ORIGIN)
    return folders


def _run(folders: dict[str, Path], out: Path, *extra: str) -> None:
    main(["-i", str(folders["images"]), "-m", str(folders["masks"]), "-o", str(out), "-device", "cpu", *extra])


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.slow
def test_refines_a_folder_keeping_geometry_and_pixel_type(tmp_path):
    folders = _make_folders(tmp_path)
    out = tmp_path / "out"
    _run(folders, out, "--gt", str(folders["gt"]), "--overlays")
    for index in range(2):
        written = sitk.ReadImage(str(out / f"case{index}.nii.gz"))
        original = sitk.ReadImage(str(folders["masks"] / f"case{index}.nii.gz"))
        assert written.GetPixelID() == original.GetPixelID() == sitk.sitkInt16
        assert written.GetSpacing() == original.GetSpacing()
        assert written.GetOrigin() == original.GetOrigin()
        assert written.GetDirection() == original.GetDirection()
        assert (out / "overlays" / f"case{index}.png").stat().st_size > 1000
    report = json.loads((out / "refine_report.json").read_text())
    assert [c["case"] for c in report["cases"]] == ["case0", "case1"]
    assert report["sam"]["model"] == "litemedsam"
    for case in report["cases"]:
        for label in ("1", "2"):
            row = case["classes"][label]
            assert row["dice_after"] > row["dice_before"], (case["case"], label, row)
    assert report["summary"]["1"]["cases"] == 2
    assert not [p for p in _files_under(out) if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.slow
def test_cache_encodes_each_slice_once_across_runs_with_other_options(tmp_path):
    """--cache DIR: the first run encodes and stores; a rerun with another guard setting encodes nothing and
    gives the masks that a run reading the same stored embeddings gives."""
    folders = _make_folders(tmp_path, cases=1)
    cache = tmp_path / "embeddings"
    _run(folders, tmp_path / "first", "--cache", str(cache))
    first = json.loads((tmp_path / "first" / "refine_report.json").read_text())["cases"][0]
    stored = list(cache.rglob("*.npy"))
    assert first["slices_encoded"] > 0 and len(stored) == first["slices_encoded"]
    _run(folders, tmp_path / "again", "--cache", str(cache))
    _run(folders, tmp_path / "other", "--cache", str(cache), "--min-iou", "0")
    for name in ("again", "other"):
        assert json.loads((tmp_path / name / "refine_report.json").read_text())["cases"][0]["slices_encoded"] == 0
    assert sorted(cache.rglob("*.npy")) == sorted(stored)
    again, before = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "case0.nii.gz")))
                     for name in ("again", "first"))
    np.testing.assert_array_equal(again, before)


def test_a_cache_that_is_a_file_or_a_user_folder_is_one_line_and_nothing_is_written(tmp_path, capsys):
    folders = _make_folders(tmp_path, cases=1)
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(SystemExit):
        _run(folders, tmp_path / "out", "--cache", str(tmp_path / "cache"))
    line = _error_line(capsys)
    assert f"--cache {tmp_path / 'cache'} is a file" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # a user folder is never a cache
        _run(folders, tmp_path / "out", "--cache", str(folders["images"]))
    assert f"--cache {folders['images']} already holds files nnunet-sam did not write" in _error_line(capsys)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in folders["images"].iterdir()] == ["case0_0000.nii.gz"]


@pytest.mark.slow
def test_parts_split_the_cases_and_continue_skips_finished_ones(tmp_path):
    folders = _make_folders(tmp_path)
    out = tmp_path / "out"
    _run(folders, out, "--num_parts", "2", "--part_id", "1")
    assert not (out / "case0.nii.gz").exists() and (out / "case1.nii.gz").exists()
    _run(folders, out, "--num_parts", "2", "--part_id", "0")
    report = json.loads((out / "refine_report.json").read_text())
    assert sorted(c["case"] for c in report["cases"]) == ["case0", "case1"]

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("case*.nii.gz")}
    _run(folders, out, "--continue")
    assert {p: p.stat().st_mtime_ns for p in out.glob("case*.nii.gz")} == stamps
    (out / "case0.nii.gz").unlink()  # an interrupted case is redone
    _run(folders, out, "--continue")
    assert (out / "case0.nii.gz").exists()
    assert (out / "case1.nii.gz").stat().st_mtime_ns == stamps[out / "case1.nii.gz"]


def _break_extra_image(f):
    write_nifti(np.zeros((8, 48, 48)), f["images"] / "lonely_0000.nii.gz", SPACING, ORIGIN)
    return "lonely_0000.nii.gz"


def _break_missing_image(f):
    (f["images"] / "case1_0000.nii.gz").unlink()
    return "case1.nii.gz"


def _break_shape(f):
    write_nifti(np.zeros((8, 40, 48), dtype=np.int16), f["masks"] / "case0.nii.gz", SPACING, ORIGIN)
    return "case0.nii.gz"


def _break_spacing(f):
    write_nifti(np.zeros((8, 48, 48), dtype=np.int16), f["masks"] / "case0.nii.gz", (2.0, 0.8, 0.8), ORIGIN)
    return "case0.nii.gz"


def _break_origin(f):
    write_nifti(np.zeros((8, 48, 48), dtype=np.int16), f["masks"] / "case0.nii.gz", SPACING, (0.0, 0.0, 0.0))
    return "case0.nii.gz"


def _break_unreadable(f):
    (f["images"] / "case0_0000.nii.gz").write_bytes(b"not an image at all")
    return "case0_0000.nii.gz"


def _break_labels(f):
    mask = np.zeros((8, 48, 48), dtype=np.float32)
    mask[2:5, 10:20, 10:20] = 0.5
    write_nifti(mask, f["masks"] / "case0.nii.gz", SPACING, ORIGIN)
    return "case0.nii.gz"


def _break_negative_labels(f):
    mask = np.zeros((8, 48, 48), dtype=np.int16)
    mask[2:5, 10:20, 10:20] = -1
    write_nifti(mask, f["masks"] / "case0.nii.gz", SPACING, ORIGIN)
    return "case0.nii.gz"


def _break_nan(f):
    """One NaN voxel (MetaImage keeps it; SimpleITK's NIfTI writer does not) would turn the whole normalised
    volume into NaN."""
    for folder in (f["images"], f["masks"]):
        for path in sorted(folder.glob("*.nii.gz")):
            image = sitk.ReadImage(str(path))
            if path.name == "case0_0000.nii.gz":
                array = sitk.GetArrayFromImage(image).astype(np.float32)
                array[4, 20, 20] = np.nan
                nan_image = sitk.GetImageFromArray(array)
                nan_image.CopyInformation(image)
                image = nan_image
            sitk.WriteImage(image, str(path).replace(".nii.gz", ".mha"))
            path.unlink()
    return "case0_0000.mha has 1 NaN or infinite voxel"


def _break_4d_image(f):
    image = sitk.JoinSeries([sitk.ReadImage(str(f["images"] / "case0_0000.nii.gz"))] * 2)
    sitk.WriteImage(image, str(f["images"] / "case0_0000.nii.gz"))
    return "case0"


@pytest.mark.parametrize("breaker", [_break_extra_image, _break_missing_image, _break_shape, _break_spacing,
                                     _break_origin, _break_unreadable, _break_labels, _break_negative_labels,
                                     _break_nan, _break_4d_image])
def test_bad_input_is_one_clear_line_and_leaves_no_files(tmp_path, capsys, breaker):
    folders = _make_folders(tmp_path, cases=2)
    named = breaker(folders)
    before = {p: p.read_bytes() for p in _files_under(tmp_path)}
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        _run(folders, out, "--num_parts", "2", "--part_id", "0")  # case0 only: errors come before work
    assert exit_info.value.code == 2
    assert named in _error_line(capsys)
    assert _files_under(out) == []
    assert {p: p.read_bytes() for p in _files_under(tmp_path) if out not in p.parents} == before


@pytest.mark.parametrize("args, expected", [
    (["--channel", "2"], "--channel 2 does not exist"),
    (["--sam", "vit_b"], "needs --checkpoint"),
    (["--sam", "vit_b", "--checkpoint", "/nonexistent/sam.pth"], "/nonexistent/sam.pth"),
    (["--num_parts", "2", "--part_id", "2"], "-part_id must be in 0..1 for -num_parts 2"),
    (["-device", "gpu"], "-device gpu is not a device"),
    (["--ct-window", "240", "-160"], "--ct-window 240 -160: LOW must be below HIGH"),
    (["--keep-confident", "90"], "--keep-confident 90 must be a probability in (0, 1]"),
    (["--activation", "high"], "--activation 'high' is neither a probability"),
    (["--probabilities", "/nonexistent/probabilities"], "--probabilities /nonexistent/probabilities is not a folder"),
])
def test_bad_options_are_one_clear_line(tmp_path, capsys, args, expected):
    folders = _make_folders(tmp_path, cases=1)
    with pytest.raises(SystemExit) as exit_info:
        _run(folders, tmp_path / "out", *args)
    assert exit_info.value.code == 2
    assert expected in _error_line(capsys)
    assert _files_under(tmp_path / "out") == []


def test_output_folder_must_not_be_a_user_folder_and_needs_a_parent(tmp_path, capsys):
    folders = _make_folders(tmp_path, cases=1)
    before = (folders["masks"] / "case0.nii.gz").read_bytes()
    with pytest.raises(SystemExit):
        _run(folders, folders["masks"])
    assert "is the masks folder" in _error_line(capsys)
    assert (folders["masks"] / "case0.nii.gz").read_bytes() == before
    with pytest.raises(SystemExit):
        _run(folders, tmp_path / "no" / "such" / "out")
    assert "does not exist" in _error_line(capsys)
    labels = tmp_path / "nnUNet_raw" / "Dataset001_X" / "labelsTr"  # any folder holding files we did not write
    labels.mkdir(parents=True)
    (labels / "case0.nii.gz").write_bytes(b"a user's label")
    with pytest.raises(SystemExit):
        _run(folders, labels)
    assert "already holds files nnunet-sam did not write (case0.nii.gz)" in _error_line(capsys)
    assert [p.name for p in labels.iterdir()] == ["case0.nii.gz"]
    assert (labels / "case0.nii.gz").read_bytes() == b"a user's label"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit):
        _run(folders, tmp_path / "a_file")
    assert "is a file, not a folder" in _error_line(capsys)


@pytest.mark.slow
def test_an_output_folder_a_killed_run_left_is_ours_to_continue(tmp_path):
    folders = _make_folders(tmp_path, cases=1)
    out = tmp_path / "out"
    claim_output_folder(out, CASES_FOLDER)  # what a run does before its first case
    (out / "case0.nii.gz").write_bytes(b"half-written by a killed run")
    _run(folders, out)
    assert (out / "refine_report.json").is_file()
    assert (out / "case0.nii.gz").read_bytes() != b"half-written by a killed run"


def test_a_class_empty_in_every_pseudo_label_is_warned_about(caplog):
    from nnunet_sam.nnunet.report import summarize, warn_absent_classes

    def row(after: int) -> dict:
        return {"slices_refined": 1, "slices_kept": 0, "slices_filled": 0, "voxels_after": after,
                "mean_sam_iou": None, "dice_initial_refined": None}

    cases = [{"classes": {"1": row(40), "2": row(0)}}, {"classes": {"1": row(0), "2": row(0)}}]
    summary = summarize(cases)
    assert summary["1"]["cases_empty"] == 1 and summary["2"]["cases_empty"] == 2
    with caplog.at_level("WARNING"):
        assert warn_absent_classes(summary) == ["2"]
    assert "label 2 is empty in all 2 pseudo labels" in caplog.text and "label 1 " not in caplog.text


def test_keep_pieces_reaches_the_engine():
    from nnunet_sam.cli.refine import build_parser, settings_from_args

    args = build_parser().parse_args(["-i", "in", "-m", "masks", "-o", "out", "--keep", "pieces"])
    assert settings_from_args(args).keep == "pieces"


def _write_probabilities(folders: dict[str, Path], cases: int = 2, shape_change: bool = False) -> Path:
    """CASE.npz as nnUNetv2_predict --save_probabilities writes it: the softmax under 'probabilities', in the
    reader's (z, y, x) order; a map whose argmax is the mask."""
    from nnunet_sam.demo.degrade import soft_probabilities

    folder = folders["masks"].parent / "probabilities"
    folder.mkdir(exist_ok=True)
    for index in range(cases):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["masks"] / f"case{index}.nii.gz")))
        probabilities = soft_probabilities(mask, seed=index, n_classes=3, spacing=SPACING[::-1])
        if shape_change:
            probabilities = probabilities[:, :-1]
        np.savez_compressed(folder / f"case{index}.npz", probabilities=probabilities)
    return folder


@pytest.mark.slow
def test_probabilities_guide_files_mode_and_the_report_says_what_they_decided(tmp_path):
    folders = _make_folders(tmp_path, cases=1)
    probabilities = _write_probabilities(folders, cases=1)
    out = tmp_path / "out"
    _run(folders, out, "--gt", str(folders["gt"]), "--probabilities", str(probabilities))
    report = json.loads((out / "refine_report.json").read_text())
    assert report["probabilities"] == str(probabilities) and report["settings"]["confident"] == 0.9
    case = report["cases"][0]
    assert case["probabilities"] == str(probabilities / "case0.npz")
    refined = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case0.nii.gz")))
    for label in ("1", "2"):
        row = case["classes"][label]
        assert row["voxels_confident"] > 0 and row["voxels_sam_decided"] > 0
        assert row["voxels_confident"] + row["voxels_sam_decided"] == row["voxels_after"] == int(
            (refined == int(label)).sum())
        assert row["dice_after"] > row["dice_before"], (label, row)


def _no_npz(f, probabilities):
    (probabilities / "case0.npz").unlink()
    return "has no case0.npz"


def _not_a_zip(f, probabilities):
    (probabilities / "case0.npz").write_bytes(b"not a zip")
    return "case0.npz is not a .npz file"


def _wrong_key(f, probabilities):
    np.savez_compressed(probabilities / "case0.npz", softmax=np.zeros((3, 8, 48, 48), dtype=np.float32))
    return "case0.npz has no 'probabilities' array"


def _wrong_shape(f, probabilities):
    np.savez_compressed(probabilities / "case0.npz", probabilities=np.zeros((3, 7, 48, 48), dtype=np.float32))
    return "case0.npz holds probabilities of shape (7, 48, 48) but"


def _too_few_classes(f, probabilities):
    np.savez_compressed(probabilities / "case0.npz", probabilities=np.full((2, 8, 48, 48), 0.5, dtype=np.float32))
    return "has label 2 but"


def _not_probabilities(f, probabilities):
    np.savez_compressed(probabilities / "case0.npz", probabilities=np.full((3, 8, 48, 48), 3.0, dtype=np.float32))
    return "is not a softmax"


@pytest.mark.parametrize("breaker", [_no_npz, _not_a_zip, _wrong_key, _wrong_shape, _too_few_classes,
                                     _not_probabilities])
def test_a_probability_file_that_does_not_fit_is_one_clear_line(tmp_path, capsys, breaker):
    folders = _make_folders(tmp_path, cases=1)
    probabilities = _write_probabilities(folders, cases=1)
    expected = breaker(folders, probabilities)
    before = {p: p.read_bytes() for p in _files_under(tmp_path)}
    with pytest.raises(SystemExit) as exit_info:
        _run(folders, tmp_path / "out", "--probabilities", str(probabilities))
    assert exit_info.value.code == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "out" / "case0.nii.gz").exists()
    assert {p: p.read_bytes() for p in _files_under(tmp_path) if (tmp_path / "out") not in p.parents} == before


def test_dataset_mode_refuses_a_probability_folder(capsys):
    with pytest.raises(SystemExit):
        main(["-d", "1", "--probabilities", "/tmp"])
    assert "dataset mode computes the probabilities itself" in _error_line(capsys)
