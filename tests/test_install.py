"""`pip install .` (not editable) into a fresh virtual environment: the wheel holds every module of the source
tree, `nnsam_trainer_dir` points into the installed package, nnU-Net finds our trainers there, and
nnUNetv2_train trains each of them from the installed package.

The fresh environment gets nnunet-sam alone (`--no-deps`); its dependencies (torch, nnU-Net, ...) are made
importable from the test's own environment by a `.pth` line, so that no gigabytes are installed twice. The
editable install of the test's environment is not on that path (its `.pth` files are not read from there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers.trainer_data import CONFIGURATION, DATASET, environment, prepare_dataset
from nnunet_sam.demo.nnunet_setup import OUR_TRAINERS

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pyproject.toml", "setup.cfg", "README.md", "nnunet_sam", "trainers")
ALL_TRAINERS = (*OUR_TRAINERS, "nnUNetTrainerSAMPseudoRound2")


@dataclass
class Installed:
    root: Path  # a folder without the sources: commands run here so that `python -c` cannot import the source tree
    python: Path
    scripts: Path
    site_packages: Path

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        environment_ = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}
        result = subprocess.run([*args], cwd=self.root, env=environment_, capture_output=True, text=True)
        assert result.returncode == 0, f"{args[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in PROJECT_FILES:  # a copy: building writes build/ and *.egg-info beside the sources
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(path, source / name)
    environment_dir = root / "venv"
    venv.create(environment_dir, with_pip=True)
    python = environment_dir / "bin" / "python"
    run_dir = root / "run"
    run_dir.mkdir()
    target = Installed(run_dir, python, environment_dir / "bin", Path())
    target.run(str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(source))
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    target.site_packages = Path(target.run(str(python), "-c", purelib).strip())
    dependencies = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (target.site_packages / "nnsam_test_dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    return target


def _modules(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def test_the_wheel_holds_every_module(installed):
    """A package folder missing from pyproject.toml's list would be missing from the wheel."""
    package = installed.site_packages / "nnunet_sam"
    expected = _modules(REPO / "nnunet_sam") | {f"trainers/{m}" for m in _modules(REPO / "trainers")}
    assert _modules(package) == expected
    assert not (installed.site_packages / "trainers").exists()  # no top-level 'trainers' package in site-packages


def test_trainer_dir_and_trainer_lookup_use_the_installed_package(installed):
    folder = Path(installed.run(str(installed.scripts / "nnsam_trainer_dir")).strip())
    assert folder == (installed.site_packages / "nnunet_sam" / "trainers").resolve()
    assert {f"{name}.py" for name in ALL_TRAINERS} <= {p.name for p in folder.iterdir()}
    lookup = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
              "import sys, nnunet_sam\n"
              "print('>', nnunet_sam.__file__)\n"
              "for name in sys.argv[1:]:\n"
              "    print('>', find(name).__module__, find(name).__name__)\n")
    env = {**os.environ, "nnUNet_extTrainer": str(folder)}
    output = installed.run(str(installed.python), "-c", lookup, *ALL_TRAINERS, env=env).splitlines()
    package, *found = [line[2:] for line in output if line.startswith("> ")]  # nnU-Net prints its search too
    assert Path(package) == installed.site_packages / "nnunet_sam" / "__init__.py"
    assert found == [f"{name} {name}" for name in ALL_TRAINERS]  # each imported from its module in `folder`


@pytest.mark.slow
def test_nnunet_trains_each_trainer_from_the_installed_package(installed, tmp_path):
    """nnUNetv2_train (its entry point, in one process of the fresh environment) runs a short variant of each
    trainer, which subclasses the installed trainer, with nnUNet_extTrainer=$(nnsam_trainer_dir)."""
    folder = installed.run(str(installed.scripts / "nnsam_trainer_dir")).strip()
    with environment({}):
        prepare_dataset(tmp_path, tmp_path / "short_trainers", epochs=1, iterations=1, nnsam_trainers=Path(folder))
        env = {**os.environ, "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "2"}
    train = ("import sys, nnunet_sam\n"  # argv: where nnunet_sam must come from, then one trainer name per training
             "assert nnunet_sam.__file__.startswith(sys.argv[1]), nnunet_sam.__file__\n"
             "from nnunetv2.run.run_training import run_training_entry\n"
             f"for name in sys.argv[2:]:\n"
             f"    sys.argv = ['nnUNetv2_train', '{DATASET}', '{CONFIGURATION}', '0', '-tr', name, '-device', 'cpu']\n"
             "    run_training_entry()\n")
    short = [f"{name}Short" for name in OUR_TRAINERS]
    installed.run(str(installed.python), "-c", train, str(installed.site_packages), *short, env=env)
    for name in short:
        results = tmp_path / "results" / DATASET / f"{name}__nnUNetPlans__{CONFIGURATION}" / "fold_0"
        checkpoint = torch.load(results / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert checkpoint["trainer_name"] == name and checkpoint["current_epoch"] == 1
        assert (results / "validation" / "summary.json").is_file()
