"""The one adapter for nnU-Net's internals: the version range it was checked with, and clear errors outside it."""

from __future__ import annotations

import logging

import pytest

from nnunet_sam.errors import NnsamError
from nnunet_sam.nnunet import nnunet_internals


@pytest.fixture
def installed_nnunet(monkeypatch):
    """Pretend another nnunetv2 release is installed (the version check is cached: cleared around the test)."""
    def pretend(release: str) -> None:
        monkeypatch.setattr(nnunet_internals, "version", lambda name: release)
        nnunet_internals.check_nnunet_version.cache_clear()

    yield pretend
    nnunet_internals.check_nnunet_version.cache_clear()


@pytest.mark.parametrize("release", ["2.8.0", "2.8.1", "2.8.7+local"])
def test_the_checked_releases_pass(installed_nnunet, release):
    installed_nnunet(release)
    assert nnunet_internals.check_nnunet_version() == release


@pytest.mark.parametrize("release", ["2.7.0", "2.9.0", "3.0"])
def test_another_release_is_refused_in_one_line_with_the_fix(installed_nnunet, monkeypatch, release):
    monkeypatch.delenv(nnunet_internals.UNCHECKED_VARIABLE, raising=False)
    installed_nnunet(release)
    with pytest.raises(NnsamError) as error:
        nnunet_internals.check_nnunet_version()
    message = str(error.value)
    assert "\n" not in message and f"nnunetv2 {release} is installed" in message
    assert "pip install 'nnunetv2>=2.8,<2.9'" in message and "NNSAM_UNCHECKED_NNUNET=1" in message


def test_the_override_warns_and_goes_on(installed_nnunet, monkeypatch, caplog):
    monkeypatch.setenv(nnunet_internals.UNCHECKED_VARIABLE, "1")
    installed_nnunet("2.9.0")
    with caplog.at_level(logging.WARNING, logger=nnunet_internals.__name__):
        assert nnunet_internals.check_nnunet_version() == "2.9.0"
    assert "checked with nnunetv2>=2.8,<2.9" in caplog.text


def test_a_missing_internal_names_itself_and_the_range():
    class Trainer:  # an nnU-Net release without the method we use
        pass

    with pytest.raises(NnsamError, match=r"^Trainer\.configure_rotation_dummyDA_mirroring_and_inital_patch_size is "
                                         r"missing from the installed nnunetv2 .*nnunetv2>=2\.8,<2\.9$"):
        nnunet_internals.initial_patch_size(Trainer())


def test_checkpoint_bytes_catch_what_the_saver_writes():
    assert nnunet_internals.checkpoint_bytes(lambda file: file.write(b"checkpoint")) == b"checkpoint"
    assert nnunet_internals.checkpoint_bytes(lambda file: None) == b""
