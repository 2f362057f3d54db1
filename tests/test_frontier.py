"""Methods beyond the eight CAMs, against the frontier fixtures (`golden-frontier/`, a copy of
../shared/golden-frontier without the 7.9 MB state dict, which camloc rebuilds from its seed)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import counting_forwards
from typer.testing import CliRunner

from camloc.cams import CamContext, compute_heatmaps
from camloc.methods.rise import RiseMasks, draw_grids, upsampling_matrix
from camloc.cli.app import app
from camloc.models import ClipModel
from camloc.models.loading import random_state_dict
from camloc.models.specs import TINY_SPECS

FRONTIER = Path(__file__).parent / "golden-frontier"
MODELS = {"tiny-vit": "tiny_vit", "tiny-vit-mh": "tiny_vit_mh"}
RISE_SEED = {"tiny-vit": 1616, "tiny-vit-mh": 1717}
PROMPTS = ["cat", "dog"]
runner = CliRunner()


def fixture(name: str):
    path = FRONTIER / name
    if path.suffix == ".npz":
        with np.load(path) as data:
            return data["masks"]
    return np.load(path)


def meta(model: str) -> dict:
    return json.loads((FRONTIER / f"{MODELS[model]}_meta.json").read_text())


def tiny_vit_mh(build: str) -> ClipModel:
    """tiny-vit-mh from the clip package, or the same weights built by open_clip (batch-first blocks)."""
    if build == "clip":
        return ClipModel.load("tiny-vit-mh", device="cpu")
    import open_clip

    from camloc.models.clip_model import Backend

    sd = {k: v.float() for k, v in random_state_dict(TINY_SPECS["tiny-vit-mh"]).items()}
    built = open_clip.model.build_model_from_openai_state_dict(sd).float().eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    return ClipModel(built, "open_clip:tiny-vit-mh", torch.device("cpu"), "fp32", Backend("open_clip", lambda: tokenizer))


@pytest.fixture(scope="module")
def models():
    return {name: ClipModel.load(name, device="cpu") for name in MODELS}


def test_tiny_vit_mh_is_the_fixtures_model():
    """Rebuilt from its seed (the golden recipe), the checksum the frontier README gives."""
    sd = random_state_dict(TINY_SPECS["tiny-vit-mh"])
    digest = hashlib.sha256()
    for key, value in sd.items():
        t = value.float().contiguous()
        digest.update(key.encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.numpy().tobytes())
    assert digest.hexdigest() == meta("tiny-vit-mh")["checksum_fp32_state_dict"]


@pytest.mark.parametrize("model", list(MODELS))
def test_the_models_input_and_logits_are_the_fixtures(model, models, chelsea):
    m = models[model]
    ctx = CamContext(m, chelsea, PROMPTS)
    np.testing.assert_allclose(ctx.input.numpy(), fixture(f"{MODELS[model]}_input.npy"), atol=1e-6)
    np.testing.assert_allclose(ctx.image_scores.numpy(), meta(model)["logits_per_image"], atol=1e-4)


# --- RISE ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(MODELS))
def test_rise_masks_are_the_originals(model, models):
    """The seeded draws give the original's grids and shifts, and the closed-form upsampling its masks,
    bit for bit."""
    n = models[model].input_size
    grids, shifts = draw_grids(500, 8, 0.1, n, RISE_SEED[model])
    np.testing.assert_array_equal(grids, fixture(f"{MODELS[model]}_rise_mask_grid.npy").astype(bool))
    np.testing.assert_array_equal(shifts, fixture(f"{MODELS[model]}_rise_mask_shifts.npy"))
    masks = RiseMasks(n, 500, 8, 0.1, RISE_SEED[model]).chunk(slice(0, 500))
    np.testing.assert_array_equal(masks, fixture(f"{MODELS[model]}_rise_masks.npz"))
    assert upsampling_matrix(8, 72).sum(axis=1).round(12).tolist() == [1.0] * 72  # rows are convex weights


@pytest.mark.parametrize("model", list(MODELS))
def test_rise_reproduces_the_original(model, models, chelsea, tmp_path):
    """Fed the stored masks (--rise-masks-file) and, separately, drawing them from the seed: the
    original's heatmaps within the README's 1e-5."""
    masks_file = FRONTIER / f"{MODELS[model]}_rise_masks.npz"
    expected = fixture(f"{MODELS[model]}_rise.npy")
    for options in ({"rise_masks_file": str(masks_file)}, {"rise_masks": 500, "seed": RISE_SEED[model]}):
        maps = compute_heatmaps(models[model], chelsea, PROMPTS, ["rise"], options)["rise"]
        np.testing.assert_allclose(maps, expected, atol=1e-5, rtol=0)


def test_rise_prompts_share_the_forwards(models, chelsea):
    """P prompts cost one prompt's masked forwards: every prompt is scored from the same embeddings."""
    model = models["tiny-vit"]
    options = {"rise_masks": 64, "seed": 0}
    one = CamContext(model, chelsea, ["cat"], options)
    compute_heatmaps(model, chelsea, ["cat"], ["rise"], context=one)
    many = CamContext(model, chelsea, ["cat", "dog", "a tabby", "sofa", "tree"], options)
    maps = compute_heatmaps(model, chelsea, many.prompts, ["rise"], context=many)["rise"]
    assert one.rise_forwards == many.rise_forwards == 64
    alone = compute_heatmaps(model, chelsea, ["sofa"], ["rise"], options)["rise"][0]
    np.testing.assert_allclose(maps[3], alone, atol=1e-6)


def test_rise_on_other_families_and_options(tmp_path):
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "rise",
                                 "--model", "open_clip:camloc-tiny-convnext:random", "--rise-masks", "32", "--json"])
    assert result.exit_code == 0, result.output
    bad = tmp_path / "bad.npz"
    np.savez(bad, masks=np.zeros((4, 10, 10), np.float32))
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "rise",
                                 "--model", "tiny-vit", "--rise-masks-file", str(bad)])
    assert result.exit_code == 2 and "masks of shape (4, 10, 10); this model needs (N, 64, 64)" in result.stderr
    result = runner.invoke(app, ["eval", "--method", "rise", "--model", "tiny-rn", "--rise-masks", "16", "--limit", "1",
                                 "--seed", "3", "--out", str(tmp_path / "run"), "--no-progress", "--save-heatmaps"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["options"]["rise_masks"] == 16 and config["options"]["seed"] == 3
    assert any("rise-rise_masks=16" in str(p) and "seed=3" in str(p) for p in (tmp_path / "run" / "heatmaps").rglob("*"))


# --- LeGrad -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("layers,suffix", [(2, ""), (0, "_alllayers")])
def test_legrad_reproduces_legrad_torch(model, layers, suffix, models, chelsea):
    """legrad-torch 1.1's maps (default layer_index=-2, and 0 = every block), both prompts, within 1e-5."""
    from camloc.cams.engine import compute_native

    kind, maps = compute_native(models[model], chelsea, PROMPTS, ["legrad"], {"legrad_layers": layers})["legrad"]
    assert kind == "resize" and maps.shape == fixture(f"{MODELS[model]}_legrad{suffix}.npy")[0].shape
    np.testing.assert_allclose(maps, fixture(f"{MODELS[model]}_legrad{suffix}.npy")[0], atol=1e-5, rtol=0)


def test_legrad_on_open_clips_batch_first_blocks(chelsea):
    """The same weights built by open_clip 3.3 (batch-first blocks, where the reference package itself
    silently gives other maps: frontier README §9) give the reference maps through camloc."""
    from camloc.cams.engine import compute_native

    model = tiny_vit_mh("open_clip")
    assert model.family.batch_dim == 0
    _, maps = compute_native(model, chelsea, PROMPTS, ["legrad"])["legrad"]
    np.testing.assert_allclose(maps, fixture("tiny_vit_mh_legrad.npy")[0], atol=1e-5, rtol=0)


def test_legrad_runs_one_batched_backward_for_all_prompts_and_blocks(models, chelsea, monkeypatch):
    import camloc.methods.legrad as legrad_module

    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(legrad_module.torch.autograd, "grad", counting)
    compute_heatmaps(models["tiny-vit-mh"], chelsea, ["cat", "dog", "sofa", "tree"], ["legrad"], {"legrad_layers": 0})
    assert len(calls) == 1


# --- the one-forward dense family ---------------------------------------------------------------------

GEM_PROMPTS = ["a photo of a cat.", "a photo of a dog."]  # gem-torch builds its prompts with this template


def _compute(model, image, prompts, method, options=None):
    from camloc.cams.registry import METHODS, list_methods

    list_methods()
    return METHODS[method].compute(CamContext(model, image, prompts, options)).numpy()


@pytest.mark.parametrize("model", list(MODELS))
def test_maskclip_reproduces_the_reference(model, models, chelsea):
    grid = _compute(models[model], chelsea, PROMPTS, "maskclip")
    np.testing.assert_allclose(grid, fixture(f"{MODELS[model]}_maskclip_grid.npy")[0], atol=1e-5, rtol=0)
    up = torch.nn.functional.interpolate(torch.from_numpy(grid)[None], size=(models[model].input_size,) * 2,
                                         mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(up, fixture(f"{MODELS[model]}_maskclip_inputsize.npy")[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model,blocks,suffix", [("tiny-vit", 1, ""), ("tiny-vit", 2, "_depth3"),
                                                 ("tiny-vit-mh", 2, ""), ("tiny-vit-mh", 3, "_depth4")])
def test_gem_reproduces_gem_torch(model, blocks, suffix, models, chelsea):
    """gem-torch's depth D replaces the last D - 1 blocks: camloc's --gem-blocks says that number."""
    grid = torch.from_numpy(_compute(models[model], chelsea, GEM_PROMPTS, "gem", {"gem_blocks": blocks}))
    np.testing.assert_allclose(grid.numpy(), fixture(f"{MODELS[model]}_gem{suffix}_grid.npy")[0], atol=1e-5, rtol=0)
    n = models[model].input_size
    up = torch.nn.functional.interpolate(grid[None], size=(n, n), mode="bilinear", align_corners=False)[0]
    low, high = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    np.testing.assert_allclose(((up - low) / (high - low)).numpy(), fixture(f"{MODELS[model]}_gem{suffix}.npy")[0],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("build", ["clip", "open_clip"])
def test_the_block_access_reduces_to_the_models_own_forward(build, chelsea):
    """With the last block's attention recombined as the original (softmax(q k^T / sqrt(d)) v, out_proj,
    residual, FFN), ln_post and proj on the class token give `encode_image`: for OpenAI's sequence-first
    and open_clip's batch-first blocks alike, so a layout mistake in the dense family fails loudly."""
    from camloc.methods.dense import BlockAccess

    model = tiny_vit_mh(build)
    ctx = CamContext(model, chelsea, ["cat"])
    blocks, inputs = ctx.block_inputs(len(blocks_of(model)) - 1)
    access = BlockAccess(blocks[-1])
    x = inputs[-1]
    with torch.no_grad():
        q, k, v = access.qkv(blocks[-1].ln_1(x))
        attn = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        x = x + access.ls_1(access.merge(attn @ v))
        x = x + access.ffn(x)
        cls = model.visual.ln_post(x[:, 0]) @ model.visual.proj
        expected = model.model.encode_image(ctx.input)
    torch.testing.assert_close(cls, expected, rtol=1e-5, atol=1e-5)


def blocks_of(model):
    return list(model.visual.transformer.resblocks)


def block_input(model, image, index: int) -> torch.Tensor:
    """The input of block `index` in the model's own layout (sequence-first for OpenAI's ViT), captured
    by a hook on the real block during one plain forward: the references' starting point."""
    captured = {}
    handle = blocks_of(model)[index].register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    with torch.no_grad():
        model.visual(model.preprocess(image))
    handle.remove()
    return captured["x"]


@pytest.mark.parametrize("method,options", [("maskclip", {}), ("sclip", {}), ("clearclip", {}), ("naclip", {}), ("gem", {"gem_blocks": 2}), ("clipsurgery", {"contrast": "empty"}), ("legrad", {}),
                                            ("rise", {"rise_masks": 8})])
def test_p_prompts_cost_one_prompts_image_forwards(method, options, models, chelsea):
    model = models["tiny-vit-mh"]
    with counting_forwards(model) as calls:
        compute_heatmaps(model, chelsea, ["cat"], [method], options)
        one = sum(calls)
        calls.clear()
        compute_heatmaps(model, chelsea, ["cat", "dog", "sofa", "a tabby cat", "tree", "sky", "grass", "rug"],
                         [method], options)
    assert sum(calls) == one and one == (8 if method == "rise" else 1)


@pytest.mark.parametrize("contrast", ["labels", "dataset"])
def test_clip_surgery_weighs_the_contrast_set_from_the_same_forward(contrast, models, chelsea):
    model = models["tiny-vit-mh"]
    with counting_forwards(model) as calls:
        compute_heatmaps(model, chelsea, ["cat", "dog", "sofa"], ["clipsurgery"],
                         {"contrast": contrast, "contrast_prompts": ["cat", "dog", "sofa", "tree"]})
    assert calls == [1]


def test_explain_native_saves_the_maps_before_post_processing(tmp_path):
    out = tmp_path / "maps.npz"
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "-p", "cat", "-p", "dog", "--method",
                                 "maskclip,legrad,gradcam", "--model", "tiny-vit", "--save-heatmap", str(out), "--native"])
    assert result.exit_code == 0, result.output
    with np.load(out) as saved:
        np.testing.assert_allclose(saved["maskclip"], fixture("tiny_vit_maskclip_grid.npy")[0], atol=1e-5)
        np.testing.assert_allclose(saved["legrad"], fixture("tiny_vit_legrad.npy")[0], atol=1e-5)
        assert saved["gradcam"].shape == (2, 4, 4)  # the grid, before ReLU and min-max
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "-p", "cat", "--method", "gradcam",
                                 "--model", "tiny-vit", "--native"])
    assert result.exit_code == 2 and "give --save-heatmap FILE too" in result.stderr


def _reference_last_block(model, image, logits_fn, probs_fn=None, keep_residual=False):
    """The recipe the ClearCLIP / NACLIP code applies, written out here on the clip package's own
    sequence-first block: the last block's attention alone (custom logits, softmax, values, out_proj),
    no residual, no FFN; ln_post and proj on every token; cosine of each patch with each prompt."""
    visual = model.visual
    x = model.preprocess(image)
    x = visual.conv1(x).flatten(2).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(1, 1, x.shape[-1])
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding).permute(1, 0, 2)  # (N, 1, D)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    y = block.ln_1(x)
    n, _, dim = y.shape
    heads, d = attn.num_heads, dim // attn.num_heads
    q, k, v = (t.reshape(n, heads, d).transpose(0, 1) for t in _qkv(y[:, 0], attn))
    weights = probs_fn(q, k, d) if probs_fn else torch.softmax(logits_fn(q, k, d), dim=-1)
    out = attn.out_proj((weights @ v).transpose(0, 1).reshape(n, dim))
    if keep_residual:  # SCLIP keeps the block's residual and FFN
        out = x[:, 0] + out
        out = out + block.mlp(block.ln_2(out))
    dense = visual.ln_post(out) @ visual.proj
    patches = dense[1:] / dense[1:].norm(dim=-1, keepdim=True)
    text = model.text_features(PROMPTS)
    g = int(round((n - 1) ** 0.5))
    return (patches @ text.T).T.reshape(len(PROMPTS), g, g).detach().numpy()


def _qkv(y, attn):
    return torch.nn.functional.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)


def naclip_window_by_convolution(g: int, std: float) -> torch.Tensor:
    """NACLIP's construction of its neighbourhood term: a (2g-1) x (2g-1) Gaussian window, 'same'
    convolved with a one-hot image of every patch position; class-token row and column zero."""
    c = 1 / (std * 2 ** 0.5)
    ax = torch.linspace(-(g - 1) * c, (g - 1) * c, 2 * g - 1, dtype=torch.float64)
    window = torch.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2))
    onehot = torch.eye(g * g, dtype=torch.float64).reshape(g * g, 1, g, g)
    spread = torch.nn.functional.conv2d(onehot, window[None, None], padding="same").reshape(g * g, g * g)
    out = torch.zeros(g * g + 1, g * g + 1, dtype=torch.float64)
    out[1:, 1:] = spread
    return out


@pytest.mark.parametrize("model", list(MODELS))
def test_sclip_clearclip_and_naclip_follow_their_recipes(model, models, chelsea):
    """No reference output could be run for these two (their packages need mmseg): the formula is
    checked on the stored model instead, written out on the clip package's own blocks."""
    from camloc.methods.dense import neighbourhood

    m = models[model]
    got = _compute(m, chelsea, PROMPTS, "clearclip")
    expected = _reference_last_block(m, chelsea, lambda q, k, d: q @ q.transpose(-2, -1) * d ** -0.5)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    g = int(round((m.visual.positional_embedding.shape[0] - 1) ** 0.5))
    torch.testing.assert_close(neighbourhood(g, 5.0), naclip_window_by_convolution(g, 5.0), rtol=0, atol=1e-12)
    got = _compute(m, chelsea, PROMPTS, "sclip")
    expected = _reference_last_block(m, chelsea, None, lambda q, k, d: (
        torch.softmax(q @ q.transpose(-2, -1) * d ** -0.5, dim=-1) + torch.softmax(k @ k.transpose(-2, -1) * d ** -0.5,
                                                                               dim=-1)), keep_residual=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    omega = naclip_window_by_convolution(g, 2.0).float()
    got = _compute(m, chelsea, PROMPTS, "naclip", {"naclip_std": 2.0})
    expected = _reference_last_block(m, chelsea, lambda q, k, d: k @ k.transpose(-2, -1) * d ** -0.5 + omega)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def clip_es_reference(model, image, prompts, background):
    """CLIP-ES's recipe written out the reference's way, one prompt at a time: the real last block module
    (OpenAI's sequence-first nn.MultiheadAttention or open_clip's batch-first one) runs on its captured
    input with a hook that swaps ln_1's output for a leaf; ln_post on every token, the mean of the patch
    tokens, proj, softmax over prompts + background of logit_scale * cos; GradCAM on the patch tokens."""
    visual = model.visual
    block = blocks_of(model)[-1]
    x_in = block_input(model, image, -1)
    seq_first = model.family.batch_dim == 1
    texts = model.text_features(list(prompts) + list(background))
    maps = []
    for p in range(len(prompts)):
        leaf = {}

        def swap(module, args, out):
            leaf["y"] = out.detach().requires_grad_(True)
            return leaf["y"]

        h = block.ln_1.register_forward_hook(swap)
        with torch.enable_grad():
            out = block(x_in)
            out = out.transpose(0, 1) if seq_first else out
            feat = visual.ln_post(out)[:, 1:].mean(dim=1) @ visual.proj
            feat = feat / feat.norm(dim=-1, keepdim=True)
            prob = (model.logit_scale * feat @ texts.T).softmax(dim=-1)[0, p]
            (grad,) = torch.autograd.grad(prob, leaf["y"])
        h.remove()
        y, g = (leaf["y"].detach(), grad)
        if seq_first:
            y, g = y.transpose(0, 1), g.transpose(0, 1)
        acts, grads = y[0, 1:], g[0, 1:]  # (N, D) patch tokens
        side = int(round(acts.shape[0] ** 0.5))
        maps.append((acts @ grads.mean(dim=0)).reshape(side, side))
    return torch.stack(maps)


@pytest.mark.parametrize("build", ["clip", "open_clip"])
def test_clip_es_is_gradcam_with_the_background_softmax(build, chelsea):
    from camloc.cams.engine import compute_raw

    model = tiny_vit_mh(build)
    prompts = ["cat", "dog", "sofa"]
    kind, maps = compute_raw(model, chelsea, prompts, ["clip-es"], {"background": "ground,sky,dog,grass"})["clip-es"]
    assert kind == "grid"
    # "dog" is one of the prompts: left out of the background for this image
    expected = clip_es_reference(model, chelsea, prompts, ["ground", "sky", "grass"])
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 0
    # another background gives other maps (the option is not ignored)
    _, other = compute_raw(model, chelsea, prompts, ["clip-es"], {"background": "tree"})["clip-es"]
    torch.testing.assert_close(other, clip_es_reference(model, chelsea, prompts, ["tree"]), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(other, maps, rtol=1e-3, atol=1e-6)


def test_clip_es_background_option_is_checked_recorded_and_keyed(tmp_path):
    from camloc.cams.options import parse_method_options
    from camloc.errors import CamlocError
    from camloc.run.heatmap_cache import method_key

    with pytest.raises(CamlocError, match="--background is empty"):
        parse_method_options({"background": " , "})
    assert parse_method_options({"background": " sky, ground,sky"})["background"] == "sky,ground"
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "clip-es",
                                 "--model", "tiny-vit", "--background", ""])
    assert result.exit_code == 2 and "--background is empty" in result.stderr
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "clip-es",
                                 "--model", "tiny-rn", "--background", "sky"])
    assert result.exit_code == 2 and "'clip-es' works only on ViT, average-pooled ViT or timm-trunk ViT" in result.stderr
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "clip-es",
                                 "--model", "tiny-vit", "--background", "sky,tree", "--json"])
    assert result.exit_code == 0, result.output
    key = lambda words: method_key("clip-es", {"background": words}, "fp32")  # noqa: E731
    assert key("sky") == key("sky") != key("ground")
    assert key("a b,c") != key("a,b c")  # file-name-safe mapping alone would merge these
    assert len(key(parse_method_options()["background"])) < 80


def surgery_reference(model, image, prompts, contrast_texts=None, empty=None):
    """CLIP Surgery written out the reference's way (xmed-lab/CLIP_Surgery): the dual path over the last 6
    blocks with its own qkv reshape (B, N, 3, heads, d), the original path through the real block modules,
    the class token from the original path, ln_post and proj on every token, and feature surgery as the
    reference's element-wise product, weighting and mean over the contrast set."""
    visual = model.visual
    blocks = blocks_of(model)
    first = max(0, len(blocks) - 6)
    seq_first = model.family.batch_dim == 1
    x_in = block_input(model, image, first)
    with torch.no_grad():
        x_ori = x_in.transpose(0, 1) if seq_first else x_in  # (B, N, C)
        x = x_ori.clone()
        for block in blocks[first:]:
            attn = block.attn
            b, n, c = x_ori.shape
            heads = attn.num_heads
            qkv = torch.nn.functional.linear(block.ln_1(x_ori), attn.in_proj_weight, attn.in_proj_bias)
            qkv = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            v = qkv[2]
            a = ((v @ v.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
            x = x + attn.out_proj((a @ v).transpose(1, 2).reshape(b, n, c))
            inp = x_ori.transpose(0, 1) if seq_first else x_ori
            out = block(inp)
            x_ori = out.transpose(0, 1) if seq_first else out
        x[:, 0] = x_ori[:, 0]
        feats = visual.ln_post(x) @ visual.proj
        feats = feats / feats.norm(dim=-1, keepdim=True)  # (1, 1 + N, E)
        if empty is not None:
            texts = model.text_features(prompts)
            sim = feats @ (texts - model.text_features([empty])).T
            rows = list(range(len(prompts)))
        elif contrast_texts is None:
            sim = feats @ model.text_features(prompts).T
            rows = list(range(len(prompts)))
        else:
            texts = model.text_features(contrast_texts)
            prob = ((feats[:, :1] @ texts.T) * 2).softmax(-1)
            w = prob / prob.mean(-1, keepdim=True)
            bsz, n_t, n_i, c = feats.shape[0], texts.shape[0], feats.shape[1], feats.shape[2]
            prod = feats.reshape(bsz, n_i, 1, c) * texts.reshape(1, 1, n_t, c)
            prod = prod * w.reshape(1, 1, n_t, 1)
            sim = (prod - prod.mean(2, keepdim=True)).sum(-1)
            rows = [contrast_texts.index(p) for p in prompts]
        sim = sim[0, 1:, rows]  # patch tokens, the prompts' columns
        side = int(round(sim.shape[0] ** 0.5))
        return sim.T.reshape(len(prompts), side, side)


@pytest.mark.parametrize("build", ["clip", "open_clip"])
def test_clip_surgery_follows_the_reference_for_every_contrast(build, chelsea):
    from camloc.cams.engine import compute_raw

    model = tiny_vit_mh(build)
    prompts = ["cat", "dog", "sofa"]
    dataset = ["bird", "cat", "dog", "sofa", "tree"]
    expected = {"none": surgery_reference(model, chelsea, prompts),
                "empty": surgery_reference(model, chelsea, prompts, empty=""),
                "labels": surgery_reference(model, chelsea, prompts, contrast_texts=prompts),
                "dataset": surgery_reference(model, chelsea, prompts, contrast_texts=dataset)}
    for contrast, want in expected.items():
        kind, maps = compute_raw(model, chelsea, prompts, ["clipsurgery"],
                                 {"contrast": contrast, "contrast_prompts": dataset})["clipsurgery"]
        assert kind == "resize_minmax"
        torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-6, msg=contrast)
    assert not torch.allclose(expected["labels"], expected["dataset"], atol=1e-4)
    assert not torch.allclose(expected["none"], expected["empty"], atol=1e-4)


def test_clip_surgery_refuses_a_contrast_set_of_one(models, chelsea):
    from camloc.errors import CamlocError

    with pytest.raises(CamlocError, match="one prompt"):
        compute_heatmaps(models["tiny-vit"], chelsea, ["cat"], ["clipsurgery"], {"contrast": "labels"})
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method",
                                 "clipsurgery", "--model", "tiny-vit", "--contrast", "dataset"])
    assert result.exit_code == 2 and "--contrast dataset needs a dataset's prompts" in result.stderr
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method",
                                 "clipsurgery", "--model", "tiny-vit", "--contrast", "some"])
    assert result.exit_code == 2 and "--contrast 'some' is not one of" in result.stderr
    # the single-prompt surgery the reference would give (all zeros) is what labels refuses:
    model = models["tiny-vit"]
    zero = surgery_reference(model, chelsea, ["cat"], contrast_texts=["cat"])
    assert zero.abs().max() < 1e-6


def eclip_reference(model, image, prompt, heads):
    """Grad-ECLIP as the official `clip_encode_dense` + `grad_eclip` compute it (sequence-first, the
    attention written out with `heads` heads: the official code passes 1), one prompt at a time."""
    visual = model.visual
    block = blocks_of(model)[-1]
    x_in = block_input(model, image, -1)  # (L, 1, D)
    text = model.text_features([prompt])[0]
    linear = torch.nn.functional.linear
    with torch.enable_grad():
        q, k, v = linear(block.ln_1(x_in), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        length, bsz, dim = q.shape
        hd = dim // heads
        qh = (q * hd ** -0.5).contiguous().view(length, bsz * heads, hd).transpose(0, 1)
        kh = k.contiguous().view(-1, bsz * heads, hd).transpose(0, 1)
        vh = v.contiguous().view(-1, bsz * heads, hd).transpose(0, 1)
        weights = torch.softmax(torch.bmm(qh, kh.transpose(1, 2)), dim=-1)
        att_output = torch.bmm(weights, vh).transpose(0, 1).contiguous().view(length, bsz, dim)
        att_output = att_output.detach().requires_grad_(True)
        xo = linear(att_output, block.attn.out_proj.weight, block.attn.out_proj.bias) + x_in
        xo = xo + block.mlp(block.ln_2(xo))
        out = visual.ln_post(xo.permute(1, 0, 2)) @ visual.proj
        emb = torch.nn.functional.normalize(out[:, 0], dim=-1)
        c = (emb @ text)[0]
        (grad,) = torch.autograd.grad(c, att_output)
    with torch.no_grad():
        q_out = linear(q, block.attn.out_proj.weight, block.attn.out_proj.bias)
        k_out = linear(k, block.attn.out_proj.weight, block.attn.out_proj.bias)
        q_cls = torch.nn.functional.normalize(q_out[:1, 0, :], dim=-1)
        k_patch = torch.nn.functional.normalize(k_out[1:, 0, :], dim=-1)
        cosine = (q_cls * k_patch).sum(-1)
        cosine = (cosine - cosine.min()) / (cosine.max() - cosine.min())
        emap = torch.relu((grad[:1, 0, :] * v[1:, 0, :] * cosine[:, None]).sum(-1))
        side = int(round(emap.shape[0] ** 0.5))
    return emap.reshape(side, side), out[:, 0]


@pytest.mark.parametrize("official", [True, False])
def test_grad_eclip_follows_the_official_recipe(official, models, chelsea):
    from camloc.cams.engine import compute_raw

    model = models["tiny-vit-mh"]
    heads = blocks_of(model)[-1].attn.num_heads
    assert heads > 1
    prompts = ["cat", "dog"]
    kind, maps = compute_raw(model, chelsea, prompts, ["grad-eclip"], {"eclip_official": official})["grad-eclip"]
    assert kind == "grid"
    for i, prompt in enumerate(prompts):
        want, embedding = eclip_reference(model, chelsea, prompt, 1 if official else heads)
        # the scaled score (camloc's s_p) and the reference's cosine differ by logit_scale > 0
        torch.testing.assert_close(maps[i], want * model.logit_scale, rtol=1e-4, atol=1e-6)
        if not official:  # the model's own heads reproduce the model's own embedding
            torch.testing.assert_close(embedding, model.model.encode_image(model.preprocess(chelsea)),
                                       rtol=1e-5, atol=1e-5)
    _, other = compute_raw(model, chelsea, prompts, ["grad-eclip"], {"eclip_official": not official})["grad-eclip"]
    assert not torch.allclose(other, maps, atol=1e-6)


def test_grad_eclip_needs_a_class_token_or_a_pool_query(tmp_path):
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method",
                                 "grad-eclip", "--model", "open_clip:camloc-tiny-vit-avg:random"])
    assert result.exit_code == 2 and "'grad-eclip' works only on ViT or timm-trunk ViT CLIP models" in result.stderr
    assert "is an average-pooled ViT" in result.stderr


def rn_layer4(model, image):
    captured = {}
    handle = model.visual.layer4.register_forward_hook(lambda m, a, out: captured.__setitem__("x", out))
    with torch.no_grad():
        model.visual(model.preprocess(image))
    handle.remove()
    return captured["x"].float().contiguous()  # (1, C, h, w)


def test_maskclip_resnet_form_is_maskclips_head(tiny_models, chelsea):
    """MaskClipHead (non-ViT, no attention pooling): q/k/v/c_proj as 1 x 1 convolutions on the backbone
    output, feat = c_proj(v_proj(x)), normalised, convolved with the text embeddings."""
    from camloc.cams.engine import compute_raw

    model = tiny_models["tiny-rn"]
    pool = model.visual.attnpool
    x = rn_layer4(model, chelsea)
    v = torch.nn.functional.conv2d(x, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)
    feat = torch.nn.functional.conv2d(v, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)
    feat = feat / feat.norm(dim=1, keepdim=True)
    texts = model.text_features(["cat", "dog"])
    want = torch.nn.functional.conv2d(feat, texts[:, :, None, None])[0]
    kind, maps = compute_raw(model, chelsea, ["cat", "dog"], ["maskclip"])["maskclip"]
    assert kind == "resize_minmax"
    torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("contrast", ["empty", "labels"])
def test_clip_surgery_resnet_form_is_the_references_attention_pool(contrast, tiny_models, chelsea):
    """CLIP Surgery's AttentionPool2d: the mean token first, positional embedding, its Attention module with
    qkv = [v_proj, v_proj, v_proj] (reshape (B, N, 3, heads, d)), proj = c_proj, token 0 from the
    original path; then the feature surgery of the ViT test."""
    from camloc.cams.engine import compute_raw

    model = tiny_models["tiny-rn"]
    pool = model.visual.attnpool
    x = rn_layer4(model, chelsea)
    n, c, h, w = x.shape
    with torch.no_grad():
        t = x.reshape(n, c, h * w).permute(2, 0, 1)
        t = torch.cat([t.mean(dim=0, keepdim=True), t], dim=0) + pool.positional_embedding[:, None, :]
        t = t.transpose(0, 1)  # (B, N, C)
        weight = torch.cat([pool.v_proj.weight] * 3)
        bias = torch.cat([pool.v_proj.bias] * 3)
        heads = pool.num_heads
        qkv = torch.nn.functional.linear(t, weight, bias).reshape(n, h * w + 1, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        scale = (c // heads) ** -0.5
        attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        attn = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)
        x_ori = torch.nn.functional.linear((attn_ori @ v).transpose(1, 2).reshape(n, -1, c), pool.c_proj.weight,
                                           pool.c_proj.bias)
        out = torch.nn.functional.linear((attn @ v).transpose(1, 2).reshape(n, -1, c), pool.c_proj.weight,
                                         pool.c_proj.bias)
        out[:, 0] = x_ori[:, 0]
        feats = out / out.norm(dim=-1, keepdim=True)
        prompts = ["cat", "dog", "sofa"]
        texts = model.text_features(prompts)
        if contrast == "empty":
            sim = feats @ (texts - model.text_features([""])).T
        else:
            prob = ((feats[:, :1] @ texts.T) * 2).softmax(-1)
            wts = prob / prob.mean(-1, keepdim=True)
            prod = feats.reshape(n, -1, 1, feats.shape[-1]) * texts.reshape(1, 1, 3, -1) * wts.reshape(1, 1, 3, 1)
            sim = (prod - prod.mean(2, keepdim=True)).sum(-1)
        want = sim[0, 1:].T.reshape(3, h, w)
    kind, maps = compute_raw(model, chelsea, prompts, ["clipsurgery"], {"contrast": contrast})["clipsurgery"]
    torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["maskclip", "clipsurgery"])
def test_resnet_forms_cost_one_forward_for_any_number_of_prompts(method, tiny_models, chelsea):
    model = tiny_models["tiny-rn"]
    with counting_forwards(model) as calls:
        compute_heatmaps(model, chelsea, ["cat", "dog", "sofa", "tree", "sky", "grass", "rug", "a cat"], [method])
    assert calls == [1]


def test_legrad_alone_stops_the_forward_at_its_first_block_with_the_same_maps(models, chelsea):
    """LeGrad as the image's only method runs the tower up to its first block only (the blocks after it would
    run twice); its maps are exactly those it makes from the image's full shared forward."""
    from camloc.cams.engine import compute_raw

    model = models["tiny-vit-mh"]
    shared = CamContext(model, chelsea, ["cat", "dog"], methods=["legrad", "gradcam"])
    with_gradcam = compute_raw(model, chelsea, ["cat", "dog"], ["legrad", "gradcam"], context=shared)["legrad"][1]
    alone = CamContext(model, chelsea, ["cat", "dog"], methods=["legrad"])
    with counting_forwards(model) as calls:
        maps = compute_raw(model, chelsea, ["cat", "dog"], ["legrad"], context=alone)["legrad"][1]
    assert "_pass" in shared.__dict__ and "_pass" not in alone.__dict__ and calls == [1]
    assert torch.equal(maps, with_gradcam)


@pytest.mark.parametrize("model,blocks", [("tiny-vit", 2), ("tiny-vit-mh", 3)])
def test_gem_alone_runs_one_forward_stopped_at_its_first_block(model, blocks, models, chelsea):
    """GEM as the image's only method runs the tower only up to its first block and carries the original path
    itself (each block's q, k, v formed once for both paths): one begun forward, the same maps as from the
    shared forward within float rounding, and gem-torch's maps."""
    from camloc.cams.engine import compute_raw

    clip = models[model]
    options = {"gem_blocks": blocks}
    compute_raw(clip, chelsea, GEM_PROMPTS, ["gem"], options)  # the block reading is checked once per model
    shared = CamContext(clip, chelsea, GEM_PROMPTS, options, methods=["gem", "gradcam"])
    with_gradcam = compute_raw(clip, chelsea, GEM_PROMPTS, ["gem", "gradcam"], options, context=shared)["gem"][1]
    alone = CamContext(clip, chelsea, GEM_PROMPTS, options, methods=["gem"])
    with counting_forwards(clip) as calls:
        maps = compute_raw(clip, chelsea, GEM_PROMPTS, ["gem"], options, context=alone)["gem"][1]
    assert "_pass" in shared.__dict__ and "_pass" not in alone.__dict__ and calls == [1]
    torch.testing.assert_close(maps, with_gradcam, rtol=0, atol=1e-5)
    suffix = {("tiny-vit", 2): "_depth3", ("tiny-vit-mh", 3): "_depth4"}[(model, blocks)]
    np.testing.assert_allclose(maps.numpy(), fixture(f"{MODELS[model]}_gem{suffix}_grid.npy")[0], atol=1e-5, rtol=0)


def test_a_forward_for_the_blocks_inputs_stops_before_the_last_block(models, chelsea):
    """`encoder_pass(until=-1)`: the same block inputs as the full forward, bit for bit, and the last
    block, the head and the projection never run."""
    from camloc.models.families import encoder_pass, vit_blocks

    clip = models["tiny-vit-mh"]
    x = clip.preprocess(chelsea)
    _, _, full = encoder_pass(clip.visual, clip.family, x)
    ran = []
    handle = vit_blocks(clip.visual)[-1].register_forward_hook(lambda m, args, out: ran.append(1))
    try:
        raw, features, stopped = encoder_pass(clip.visual, clip.family, x, until=-1)
    finally:
        handle.remove()
    assert raw is None and features is None and ran == []
    assert len(stopped) == len(full) and all(torch.equal(a, b) for a, b in zip(stopped, full))


@pytest.mark.parametrize("model", list(MODELS))
def test_methods_reading_only_block_inputs_run_a_forward_stopped_there(model, models, chelsea):
    """Each method declaring `block_inputs_only` reads nothing else of the image's forward: alone on an image it
    runs one forward that stops before the last block (no full `_pass`), with the maps it makes from the full
    forward shared with GradCAM (GEM alone carries its original path by hand: within float rounding)."""
    from camloc.cams.engine import compute_raw
    from camloc.cams.registry import METHODS, list_methods

    clip = models[model]
    options = {"proxy_model": "vit_small_patch8_224.dino:random"}
    methods = [m for m in list_methods() if METHODS[m].block_inputs_only]
    assert {"maskclip", "sclip", "naclip", "clearclip", "cliptrase", "resclip", "scclip", "cliper", "gem",
            "proxyclip"} <= set(methods) and "clipsurgery" not in methods
    compute_raw(clip, chelsea, PROMPTS, ["sclip"])  # the block reading is checked once per model (a full forward)
    for method in methods:
        alone = CamContext(clip, chelsea, PROMPTS, options, methods=[method])
        with counting_forwards(clip) as calls:
            maps = compute_raw(clip, chelsea, PROMPTS, [method], options, context=alone)[method][1]
        assert "_pass" not in alone.__dict__ and calls == [1], method
        both = CamContext(clip, chelsea, PROMPTS, options, methods=[method, "gradcam"])
        want = compute_raw(clip, chelsea, PROMPTS, [method, "gradcam"], options, context=both)[method][1]
        assert "_pass" in both.__dict__
        if method == "gem":
            torch.testing.assert_close(maps, want, rtol=0, atol=1e-5)
        else:
            assert torch.equal(maps, want), method


def test_a_batch_of_block_input_readers_shares_one_stopped_forward(models, chelsea):
    """`share_batch` of images whose methods all read block inputs only: one batched forward stopped before the
    last block, each image's maps those of its own forward; with a method needing more in the group, the full
    forward."""
    from camloc.cams.context import share_batch
    from camloc.cams.engine import compute_raw

    clip = models["tiny-vit"]
    images = [chelsea, chelsea.transpose(0)]
    own = [compute_raw(clip, im, PROMPTS, ["sclip"])["sclip"][1] for im in images]
    contexts = [CamContext(clip, im, PROMPTS, methods=["sclip"]) for im in images]
    with counting_forwards(clip) as calls:
        share_batch(contexts)
    assert calls == [2] and all("_block_pass" in c.__dict__ and "_pass" not in c.__dict__ for c in contexts)
    for im, ctx, want in zip(images, contexts, own):
        torch.testing.assert_close(compute_raw(clip, im, PROMPTS, ["sclip"], context=ctx)["sclip"][1], want,
                                   rtol=0, atol=1e-6)
    mixed = [CamContext(clip, images[0], PROMPTS, methods=["sclip"]),
             CamContext(clip, images[1], PROMPTS, methods=["gradcam"])]
    share_batch(mixed)
    assert all("_pass" in c.__dict__ for c in mixed)
