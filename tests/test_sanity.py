"""The model-randomisation sanity check: the cascade covers every tower, the re-draw, the measures by
hand, and the check itself: a method that ignores the model is flagged, GradCAM is not."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import camloc
from camloc.cams.registry import METHODS, register_method
from camloc.cli.app import app
from camloc.errors import ModelError
from camloc.evaluators.sanity import flagged, spearman, ssim, stage_summary
from camloc.models.cascade import Stage, cascade_stages, redraw_

runner = CliRunner()
TOWERS = ["tiny-rn", "tiny-vit", "open_clip:camloc-tiny-vit-avg:random", "open_clip:camloc-tiny-mapvit:random",
          "open_clip:camloc-tiny-eva:random", "open_clip:camloc-tiny-convnext:random"]


@pytest.fixture
def fixed_map_method():
    """A method that returns the same map whatever the model: the check must flag it."""
    name = "test-fixed-map"

    def fixed(ctx):
        y, x = torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij")
        blob = torch.exp(-((x - 2) ** 2 + (y - 4) ** 2) / 4)
        return blob.expand(len(ctx.prompts), 7, 7).to(ctx.model.device)

    register_method(name, description="test: a fixed map")(fixed)
    yield name
    del METHODS[name]


@pytest.mark.parametrize("name", TOWERS)
def test_the_cascade_places_every_parameter_once_head_first_blocks_top_down_stem_last(name):
    visual = camloc.load_model(name, device="cpu").visual
    stages = cascade_stages(visual)
    placed = [p for s in stages for p in s.parameters]
    assert sorted(placed) == sorted(n for n, _ in visual.named_parameters())  # each exactly once
    assert stages[0].name == "head" and stages[-1].name == "stem"
    blocks = [s.name for s in stages[1:-1]]
    assert len(blocks) >= 2
    numbers = [int(b.rsplit(".", 1)[1]) for b in blocks]
    if name.endswith("tiny-rn"):  # layer4.0, layer3.0, ...: the layer number falls
        numbers = [int(b[5]) for b in blocks]
    assert numbers == sorted(numbers, reverse=True)


def test_a_tower_parameter_the_cascade_cannot_place_is_refused():
    visual = camloc.load_model("tiny-vit", device="cpu").visual
    visual.register_parameter("mystery", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ModelError, match="mystery"):
        cascade_stages(visual)


def test_redraw_keeps_each_tensors_mean_and_sd_replaces_its_values_and_follows_the_seed():
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(200, 100) * 0.3 + 2.0)
    module.scalar = torch.nn.Parameter(torch.tensor([5.0]))
    before = module.w.detach().clone()
    stage = Stage("all", ("w", "scalar"))
    drawn = redraw_(module, stage, torch.Generator().manual_seed(7))
    assert drawn == 20000
    assert module.scalar.item() == 5.0  # one value has no spread to draw from: kept
    assert abs(module.w.mean().item() - before.mean().item()) < 0.01
    assert abs(module.w.std().item() - before.std().item()) < 0.01
    assert np.corrcoef(before.ravel(), module.w.detach().ravel())[0, 1] < 0.05
    first = module.w.detach().clone()
    module.w.data.copy_(before)
    redraw_(module, stage, torch.Generator().manual_seed(7))
    assert torch.equal(module.w.detach(), first)


def test_the_measures_by_hand():
    a = np.array([[0.0, 0.2], [0.5, 1.0]])
    assert spearman(a, a) == (1.0, False)
    assert spearman(a, 1 - a) == (-1.0, False)
    # ranks of [0, .2, .5, 1] vs [.2, 0, 1, .5]: d = (1, 1, 1, 1); rho = 1 - 6 * 4 / (4 * 15) = 0.6
    assert spearman(a, np.array([[0.2, 0.0], [1.0, 0.5]]))[0] == pytest.approx(0.6)
    zeros = np.zeros((2, 2))
    assert spearman(zeros, zeros) == (1.0, True) and spearman(a, zeros) == (0.0, True)
    image = np.random.default_rng(0).random((16, 16))
    assert ssim(image, image) == pytest.approx(1.0)
    assert ssim(image, 1 - image) < 0
    summary = stage_summary([0.2, 0.4], [0.5, 0.7], 1)
    assert summary["spearman"] == pytest.approx(0.3) and summary["spearman_sd"] == pytest.approx(0.02 ** 0.5)
    assert summary["ssim"] == pytest.approx(0.6) and summary["pairs"] == 2 and summary["constant_maps"] == 1
    assert flagged({"spearman": 0.5}, 0.5) and not flagged({"spearman": 0.49}, 0.5)
    assert not flagged({"spearman": None}, 0.5)


# GradCAM on the clip package's tiny-rn is left out on purpose: its "trained" weights are a random init
# whose residual branches are zero (CLIP zero-initialises bn3), so both maps follow the input's energy and
# their Spearman at the full cascade is 0.3-0.6 by seed; the check is for trained weights.
@pytest.mark.parametrize("model", ["open_clip:camloc-tiny-rn:random", "tiny-vit"])
def test_the_check_flags_a_method_that_ignores_the_model_and_passes_gradcam(model, fixed_map_method, tmp_path):
    clip_model = camloc.load_model(model, device="cpu")
    before = {k: v.clone() for k, v in clip_model.visual.state_dict().items()}
    result = camloc.sanity(clip_model, "demo", ["gradcam", fixed_map_method], out=tmp_path / "s", limit=3)
    assert result["flagged"] == [fixed_map_method]
    fixed, grad = result["results"][fixed_map_method], result["results"]["gradcam"]
    assert all(s["spearman"] == pytest.approx(1.0) and s["ssim"] == pytest.approx(1.0) for s in fixed)
    assert grad[-1]["spearman"] < 0.5 and grad[-1]["ssim"] < 0.5
    assert [s["stage"] for s in grad] == [s["name"] for s in result["stages"]]
    assert grad[0]["pairs"] == len(result["pairs"]) == 3
    after = clip_model.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the weights are restored
    written = json.loads((tmp_path / "s" / "sanity.json").read_text())
    assert written["flagged"] == [fixed_map_method] and written["redraw"].startswith("normal draws")
    assert len(written["per_pair"]["gradcam"][-1]["spearman"]) == len(result["pairs"])
    assert "test-fixed-map" in (tmp_path / "s" / "sanity.md").read_text()


def test_the_check_is_seeded(tmp_path):
    model = camloc.load_model("tiny-rn", device="cpu")
    one = camloc.sanity(model, "demo", "gradcam", out=tmp_path / "a", limit=2, seed=3)
    two = camloc.sanity(model, "demo", "gradcam", out=tmp_path / "b", limit=2, seed=3)
    other = camloc.sanity(model, "demo", "gradcam", out=tmp_path / "c", limit=2, seed=4)
    assert one["per_pair"] == two["per_pair"] and one["per_pair"] != other["per_pair"]


def test_cli_prints_the_table_flags_and_fails_on_flag(fixed_map_method, tmp_path):
    out = tmp_path / "s"
    args = ["sanity", "--model", "tiny-vit", "--method", f"gradcam,{fixed_map_method}", "--out", str(out),
            "--limit", "2", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"FLAGGED {fixed_map_method}" in result.output and "FLAGGED gradcam" not in result.output
    assert (out / "sanity.csv").read_text().startswith("method,stage,spearman")
    again = runner.invoke(app, args)  # results already there: refused, kept
    assert again.exit_code == 2 and "--force-new" in again.output
    assert runner.invoke(app, args + ["--force-new", "--fail-on-flag"]).exit_code == 1


@pytest.mark.parametrize("extra, says", [(["--flag-spearman", "1.5"], "--flag-spearman"),
                                         (["--method", "nosuch"], "nosuch"),
                                         (["--dataset", "nosuch"], "nosuch")])
def test_cli_bad_input_is_one_line_exit_2(extra, says, tmp_path):
    args = ["sanity", "--model", "tiny-rn", "--method", "gradcam", "--out", str(tmp_path / "s"), "--no-progress"]
    result = runner.invoke(app, args + extra)
    assert result.exit_code == 2 and says in result.output
    assert not (tmp_path / "s" / "sanity.json").exists()
