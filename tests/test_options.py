"""Method options are data owned by the methods: one declaration in a method's module reaches the
command line, config files, the Python API, cache keys and run identities."""
import json
import re

import numpy as np
import pytest
import torch
from conftest import GOLDEN
from typer.testing import CliRunner

from camloc.cams.options import OPTIONS, all_options, at_least, default_options, method_option, parse_method_options
from camloc.cams.registry import METHODS, register_method
from camloc.cli.app import app
from camloc.config import load_config
from camloc.errors import CamlocError, OptionError
from camloc.run.heatmap_cache import method_key

runner = CliRunner()
IMAGE = str(GOLDEN / "chelsea_small.png")


@pytest.fixture
def gain_method():
    """A method declared the way a method module declares one: its option beside its registration."""
    option = method_option("test_gain", float, 2.0, "Test method: the map's left-to-right slope.",
                           at_least("--test-gain", 0.5))

    @register_method("test-gain", params=("test_gain",))
    def test_gain(ctx):
        """Test method: a ramp whose slope is --test-gain."""
        gain = float(ctx.options.get("test_gain", option.default))
        ramp = torch.linspace(0, 1, 7) ** gain
        return ramp.expand(len(ctx.prompts), 7, 7).clone()

    yield option
    OPTIONS.pop("test_gain")
    METHODS.pop("test-gain")


def test_a_declared_option_reaches_every_reader(gain_method, tmp_path):
    assert "test_gain" in all_options() and default_options()["test_gain"] == 2.0
    # declared outside camloc's own modules (a plug-in's way): given by name on the command line; camloc's own
    # options are flags of their own, read from the option manifest (tests/test_cli.py checks it is current)
    assert "--method-option" in runner.invoke(app, ["explain", "--help"]).stdout
    out = tmp_path / "maps.npz"
    result = runner.invoke(app, ["explain", IMAGE, "-p", "cat", "--method", "test-gain", "--model", "tiny-rn",
                                 "--method-option", "test_gain=3", "--save-heatmap", str(out), "--native"])
    assert result.exit_code == 0, result.output
    assert np.allclose(np.load(out)["test-gain"][0], np.linspace(0, 1, 7) ** 3)  # the method read 3
    bad = runner.invoke(app, ["explain", IMAGE, "-p", "cat", "--method", "test-gain", "--model", "tiny-rn",
                              "--method-option", "test-gain=0.1"])
    assert bad.exit_code == 2 and "--test-gain must be at least 0.5, got 0.1" in bad.stderr
    config = tmp_path / "c.toml"
    config.write_text('[eval]\nmethods = ["test-gain"]\n[eval.options]\ntest_gain = 4.0\n')
    assert load_config(config, "eval")["options"] == {"test_gain": 4.0}
    assert "-test_gain=4.0-" in method_key("test-gain", parse_method_options({"test_gain": 4.0}), "fp32")
    run = runner.invoke(app, ["eval", "--config", str(config), "--model", "tiny-rn", "--out", str(tmp_path / "run"),
                              "--no-progress", "--limit", "1"])
    assert run.exit_code == 0, run.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["options"]["test_gain"] == 4.0


def test_option_values_are_checked_by_their_declaration():
    assert parse_method_options({"topk": "12", "rise_p1": 1, "background": ["sky", " sky", "road"]}) == {
        **default_options(), "topk": 12, "rise_p1": 1.0, "background": "sky,road"}
    cases = {"topk": (0, "--topk must be at least 1"), "grouping": ("x", "--grouping 'x' is not one of kmeans, chunk"),
             "rise_masks": ("many", "--rise-masks 'many' must be an integer"),
             "legrad_layers": (-1, "--legrad-layers must be at least 0 (0 = every block)"),
             "naclip_std": (0.0, "--naclip-std must be positive"), "eclip_official": ("yes", "is a switch"),
             "rise_masks_file": ("/no/such.npz", "--rise-masks-file /no/such.npz does not exist")}
    for name, (value, message) in cases.items():
        with pytest.raises(OptionError, match=re.escape(message)):
            parse_method_options({name: value})
    with pytest.raises(OptionError, match="unknown method option.*nosuch.*the methods' options are: topk"):
        parse_method_options({"nosuch": 1})
    assert issubclass(OptionError, CamlocError) and issubclass(OptionError, ValueError)


def test_options_are_listed_in_the_methods_order():
    assert list(all_options())[:3] == ["topk", "grouping", "start_layer"]
    assert list(all_options())[-4:] == ["rise_masks", "rise_cell", "rise_p1", "rise_masks_file"]
