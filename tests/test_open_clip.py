"""The open_clip backend: golden heatmaps through open_clip's own build of the golden tiny models, every
family end to end (native ViT, average-pooled ViT, ModifiedResNet, SigLIP-style attention-pool timm
trunk, EVA, ConvNeXt), the layout check, model names, refusals and offline errors."""
import json

import numpy as np
import pytest
import torch
from conftest import PREFIX, golden
from typer.testing import CliRunner

open_clip = pytest.importorskip("open_clip")

from camloc.cams import CamContext, compute_heatmaps  # noqa: E402
from camloc.cli.app import app  # noqa: E402
from camloc.errors import CamlocError  # noqa: E402
from camloc.models import ClipModel  # noqa: E402
from camloc.models.clip_model import Backend  # noqa: E402
from camloc.models.loading import random_state_dict  # noqa: E402
from camloc.models.specs import TINY_SPECS  # noqa: E402

runner = CliRunner()
TINY = ["camloc-tiny-vit", "camloc-tiny-vit-avg", "camloc-tiny-rn", "camloc-tiny-mapvit", "camloc-tiny-eva",
        "camloc-tiny-convnext"]
FAMILY = {"camloc-tiny-vit": "vit", "camloc-tiny-vit-avg": "vit-avg", "camloc-tiny-rn": "rn",
          "camloc-tiny-mapvit": "timm-vit", "camloc-tiny-eva": "timm-vit", "camloc-tiny-convnext": "convnext"}


def golden_through_open_clip(name: str) -> ClipModel:
    """The golden tiny model's weights, built by open_clip (`build_model_from_openai_state_dict`)."""
    state = {k: v.float() for k, v in random_state_dict(TINY_SPECS[name]).items()}
    model = open_clip.model.build_model_from_openai_state_dict(state).float().eval()
    assert type(model.visual).__module__.startswith("open_clip")
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    return ClipModel(model, f"open_clip:golden-{name}", torch.device("cpu"), "fp32",
                     Backend("open_clip", lambda: tokenizer, info={"backend": "open_clip"}))


GOLDEN = {"tiny-rn": ["gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "gscorecam", "groupcam"],
          "tiny-vit": ["gradcam", "gradcam++", "xgradcam", "scorecam", "gscorecam", "hilacam"]}
TOPK = {"tiny-rn": 100, "tiny-vit": 30}  # the golden fixtures' k


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_heatmaps_through_open_clip(name, chelsea):
    """The same fixtures as the OpenAI path, within the same 1e-4, through open_clip's batch-first
    build of the golden weights (open_clip's ViT family, its ModifiedResNet)."""
    model = golden_through_open_clip(name)
    assert model.family.name == ("rn" if name == "tiny-rn" else "vit")
    maps = compute_heatmaps(model, chelsea, ["cat"], GOLDEN[name], {"topk": TOPK[name]})
    for method in GOLDEN[name]:
        np.testing.assert_allclose(maps[method][0], golden(f"{PREFIX[name]}_{method}.npy"), atol=1e-4, rtol=0,
                                   err_msg=method)
    ctx = CamContext(model, chelsea, ["cat"])
    np.testing.assert_allclose(ctx.activations.numpy(), golden(f"{PREFIX[name]}_activations.npy")[0], atol=1e-5)


@pytest.mark.parametrize("arch", TINY)
def test_the_adapters_pooled_token_equals_encode_image(arch):
    """A wrong layout (batch-first read as sequence-first, a wrong prefix count, a missing norm) cannot
    pass silently: for every family, the adapter's head applied to the target layer's output is the
    model's own image embedding."""
    model = ClipModel.load(f"open_clip:{arch}:random", device="cpu")
    assert model.family.name == FAMILY[arch]
    x = torch.randn(3, 3, model.input_size, model.input_size)
    captured = []
    handle = model.family.target_layer(model.visual).register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        embedding = model.model.encode_image(x)
    handle.remove()
    with torch.no_grad():
        again = model.family.head(model.visual, captured[-1])
    torch.testing.assert_close(again, embedding, rtol=0, atol=1e-6)
    grid = model.family.to_grid(captured[-1])
    assert grid.shape[0] == 3 and grid.shape[2] == grid.shape[3]
    # each image's grid belongs to that image: the second image alone gives the second grid
    captured.clear()
    handle = model.family.target_layer(model.visual).register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model.model.encode_image(x[1:2])
    handle.remove()
    torch.testing.assert_close(model.family.to_grid(captured[-1])[0], grid[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", TINY)
def test_every_valid_method_end_to_end_through_explain_and_eval(arch, tmp_path):
    name = f"open_clip:{arch}:random"
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "all",
                                 "--model", name, "--topk", "30", "--json"])
    assert result.exit_code == 0, result.output
    methods = set(json.loads(result.stdout)["results"][0]["methods"])
    expected = {"gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "gscorecam", "gscorecam-abs", "groupcam"}
    assert methods == expected | ({"hilacam"} if FAMILY[arch] == "vit" else set())
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--dataset", "demo", "--limit", "2", "--method", "all", "--model", name,
                                 "--topk", "30", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and set(summary["methods"]) == methods
    weights = summary["config"]["weights"]
    assert weights["backend"] == "open_clip" and weights["arch"] == arch and weights["weights"] == "random"


def test_methods_that_do_not_apply_are_refused_in_one_line(tmp_path):
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "hilacam",
                                 "--model", "open_clip:camloc-tiny-mapvit:random"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: method 'hilacam' works only on ViT CLIP models, and open_clip:camloc-tiny-mapvit:random is a "
        "timm-trunk ViT; pick a ViT model or another method"]


def test_model_names_and_refusals(monkeypatch, tmp_path):
    for bad, message in [("open_clip:ViT-B-32", "must look like open_clip:ARCH:TAG"),
                         ("open_clip:No-Such-Arch:random", "open_clip has no architecture 'No-Such-Arch'"),
                         ("open_clip:ViT-B-32:nope", "has no pretrained tag 'nope'"),
                         (f"open_clip:ViT-B-32:{tmp_path / 'missing.pt'}", "does not exist")]:
        with pytest.raises(CamlocError, match=message):
            ClipModel.load(bad, device="cpu")
    # the silent trap: OpenAI weights on a GELU architecture -> mapped to -quickgelu (offline: the error names it)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CamlocError) as info:
        ClipModel.load("open_clip:ViT-B-32:openai", device="cpu", cache_dir=tmp_path)
    assert "ViT-B-32-quickgelu:openai" in str(info.value)


def test_missing_weights_offline_name_the_hub_repo_and_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "gradcam",
                                 "--model", "open_clip:ViT-B-32:laion2b_s34b_b79k", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "hub repository laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in line and "open_clip_pytorch_model.bin" in line
    assert "HF_HUB_OFFLINE" in line and str(tmp_path) in line


def test_precomputed_text_embeddings_need_no_tokenizer(chelsea):
    model = ClipModel.load("open_clip:camloc-tiny-mapvit:random", device="cpu")

    def no_tokenizer():
        raise CamlocError("the tokenizer needs the network")

    model.backend.make_tokenizer = no_tokenizer
    with pytest.raises(CamlocError, match="needs the network"):
        model.text_features(["cat"])
    model.set_text_features({"cat": torch.randn(64)})
    maps = compute_heatmaps(model, chelsea, ["cat"], ["gradcam"])
    assert maps["gradcam"].shape == (1, 100, 150)


def test_list_models_of_the_open_clip_backend():
    result = runner.invoke(app, ["list", "models", "--backend", "open_clip", "ViT-B-32*"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert "open_clip:ViT-B-32:laion2b_s34b_b79k" in lines and all(line.startswith("open_clip:ViT-B-32") for line in lines)
