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
        "camloc-tiny-eva02", "camloc-tiny-eva-avg", "camloc-tiny-convnext"]
FAMILY = {"camloc-tiny-vit": "vit", "camloc-tiny-vit-avg": "vit-avg", "camloc-tiny-rn": "rn",
          "camloc-tiny-mapvit": "timm-vit", "camloc-tiny-eva": "timm-vit", "camloc-tiny-eva02": "timm-vit",
          "camloc-tiny-eva-avg": "timm-vit", "camloc-tiny-convnext": "convnext"}
ROTARY = ("camloc-tiny-eva", "camloc-tiny-eva02", "camloc-tiny-eva-avg")


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
                                 "--model", name, "--topk", "30", "--rise-masks", "16", "--json"])
    assert result.exit_code == 0, result.output
    methods = set(json.loads(result.stdout)["results"][0]["methods"])
    expected = {"gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "gscorecam", "gscorecam-abs", "groupcam",
                "rise"}
    assert methods == (expected | ({"hilacam"} if FAMILY[arch] in ("vit", "vit-avg", "timm-vit") else set())
                       | ({"clip-es", "maskclip", "sclip", "clearclip", "naclip", "cliptrase", "scclip", "cliper", "resclip", "gem", "clipsurgery"}
                          if FAMILY[arch] in ("vit", "vit-avg", "timm-vit") else set())
                       | ({"legrad", "attnlrp"} if FAMILY[arch] in ("vit", "vit-avg", "timm-vit") else set())
                       | ({"grad-eclip"} if FAMILY[arch] in ("vit", "timm-vit") and arch != "camloc-tiny-eva-avg" else set())
                       | ({"maskclip", "clipsurgery"} if FAMILY[arch] == "rn" else set()))
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--dataset", "demo", "--limit", "2", "--method", "all", "--model", name,
                                 "--topk", "30", "--rise-masks", "16", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and set(summary["methods"]) == methods
    weights = summary["config"]["weights"]
    assert weights["backend"] == "open_clip" and weights["arch"] == arch and weights["weights"] == "random"


def test_methods_that_do_not_apply_are_refused_in_one_line(tmp_path):
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "hilacam",
                                 "--model", "open_clip:camloc-tiny-convnext:random"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: method 'hilacam' works only on ViT, average-pooled ViT or timm-trunk ViT CLIP models, and "
        "open_clip:camloc-tiny-convnext:random is a ConvNeXt; pick such a model or another method"]


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


def write_hf_clip(folder, spec_name="tiny-vit", act="quick_gelu", heads=None, drop_layer=False):
    """A Hugging Face CLIPModel folder (config.json + model.safetensors) holding the golden tiny ViT's
    weights, in the transformers naming (written here from HF's layout, not from camloc's converter)."""
    from safetensors.torch import save_file

    sd = {k: v.float() for k, v in random_state_dict(TINY_SPECS[spec_name]).items()}
    hf = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"], "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T.contiguous(), "logit_scale": sd["logit_scale"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"], "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T.contiguous(),
    }
    for ours, theirs in (("transformer", "text_model"), ("visual.transformer", "vision_model")):
        n = len({k.split(".")[-3] for k in sd if k.startswith(f"{ours}.resblocks.") and k.endswith("in_proj_weight")})
        for i in range(n):
            a, b = f"{ours}.resblocks.{i}", f"{theirs}.encoder.layers.{i}"
            for kind in ("weight", "bias"):
                q, k, v = sd[f"{a}.attn.in_proj_{kind}"].chunk(3)
                hf.update({f"{b}.self_attn.q_proj.{kind}": q.contiguous(), f"{b}.self_attn.k_proj.{kind}": k.contiguous(),
                           f"{b}.self_attn.v_proj.{kind}": v.contiguous(),
                           f"{b}.self_attn.out_proj.{kind}": sd[f"{a}.attn.out_proj.{kind}"],
                           f"{b}.layer_norm1.{kind}": sd[f"{a}.ln_1.{kind}"], f"{b}.layer_norm2.{kind}": sd[f"{a}.ln_2.{kind}"],
                           f"{b}.mlp.fc1.{kind}": sd[f"{a}.mlp.c_fc.{kind}"], f"{b}.mlp.fc2.{kind}": sd[f"{a}.mlp.c_proj.{kind}"]})
    if drop_layer:  # a truncated checkpoint: the last vision layer missing
        hf = {k: v for k, v in hf.items() if not k.startswith("vision_model.encoder.layers.1.")}
    folder.mkdir(parents=True)
    save_file(hf, str(folder / "model.safetensors"))
    config = {"model_type": "clip", "projection_dim": 64,
              "text_config": {"hidden_size": 64, "num_attention_heads": heads or 1, "hidden_act": act,
                              "num_hidden_layers": 1},
              "vision_config": {"hidden_size": 64, "num_attention_heads": heads or 1, "hidden_act": act,
                                "num_hidden_layers": 2, "patch_size": 16, "image_size": 64}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hugging_face_clip_folder_is_converted_and_gives_the_golden_maps(tmp_path, chelsea):
    folder = write_hf_clip(tmp_path / "hf-tiny-vit")
    model = ClipModel.load(str(folder), device="cpu")
    assert model.family.name == "vit" and model.backend.info["arch"] == "hf-clip"
    assert model.backend.info["weights"].endswith("model.safetensors") and len(model.backend.info["sha256"]) == 64
    maps = compute_heatmaps(model, chelsea, ["cat"], ["gradcam", "scorecam", "hilacam"], {"topk": 30})
    for method in ("gradcam", "scorecam", "hilacam"):
        np.testing.assert_allclose(maps[method][0], golden(f"tiny_vit_{method}.npy"), atol=1e-4, rtol=0)
    gelu = write_hf_clip(tmp_path / "gelu", act="gelu")
    with pytest.raises(CamlocError, match="hidden_act is 'gelu'.*wrong activation"):
        ClipModel.load(str(gelu), device="cpu")
    heads = write_hf_clip(tmp_path / "heads", heads=4)
    with pytest.raises(CamlocError, match="4 attention heads of width 64"):
        ClipModel.load(str(heads), device="cpu")
    # OpenAI's build_model counts the layers it finds: a missing one would build a shallower model silently
    short = write_hf_clip(tmp_path / "short", drop_layer=True)
    with pytest.raises(CamlocError, match="vision_config.num_hidden_layers is 2, the weights have 1"):
        ClipModel.load(str(short), device="cpu")


def test_hilacam_on_timm_trunks_reads_their_own_attention(chelsea):
    """timm's unfused attention (switched on for the pass) gives the probabilities softmax(q k^T / sqrt(d))
    of each block, recomputed here from the block's own q and k; the attention-pool query's
    probabilities likewise; and P prompts in one pass equal P single-prompt passes."""
    from camloc.methods.hila import attention_probs_and_scores

    model = ClipModel.load("open_clip:camloc-tiny-mapvit:random", device="cpu")
    trunk = model.visual.trunk
    fused_before = [b.attn.fused_attn for b in trunk.blocks]
    assert all(fused_before)  # timm's default: no probabilities to read
    ctx = CamContext(model, chelsea, ["cat"])
    blocks, pool, scores = attention_probs_and_scores(ctx)
    assert [b.attn.fused_attn for b in trunk.blocks] == fused_before  # restored after the pass
    assert len(blocks) == len(trunk.blocks) and pool.shape == (1, 2, 1, 16)
    inputs = []
    handle = trunk.blocks[0].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        model.visual(ctx.input)
    handle.remove()
    attn = trunk.blocks[0].attn
    x = trunk.blocks[0].norm1(inputs[0])
    q, k, _ = attn.qkv(x).reshape(1, 16, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    expected = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
    torch.testing.assert_close(blocks[0].detach(), expected, rtol=1e-5, atol=1e-6)
    both = compute_heatmaps(model, chelsea, ["cat", "dog"], ["hilacam"])["hilacam"]
    for i, prompt in enumerate(["cat", "dog"]):
        alone = compute_heatmaps(model, chelsea, [prompt], ["hilacam"])["hilacam"][0]
        np.testing.assert_allclose(both[i], alone, atol=1e-5)


def test_normalisation_follows_the_weights_not_clips_default():
    """SigLIP weights expect mean = std = 0.5: a tag gives its own, a file or random weights the one
    every tag of the architecture shares; CLIP's where the tags disagree or there are none."""
    from types import SimpleNamespace

    from camloc.models.open_clip_backend import _normalisation

    bare = SimpleNamespace(visual=SimpleNamespace())
    assert _normalisation(open_clip, "ViT-B-16-SigLIP2", "webli", bare) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert _normalisation(open_clip, "ViT-B-16-SigLIP2", None, bare) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert _normalisation(open_clip, "camloc-tiny-vit", None, bare)[0] == (0.48145466, 0.4578275, 0.40821073)
    model = ClipModel.load("open_clip:camloc-tiny-mapvit:random", device="cpu")
    assert model.backend.info["mean"] == [0.48145466, 0.4578275, 0.40821073]  # recorded with the run


def test_siglip_scores_are_the_models_own_logits_bias_included(chelsea, tmp_path):
    """SigLIP scores logit_scale.exp() * cos + logit_bias (its sigmoid's logit): camloc's score, the one
    every score-weighted method uses, is that logit; the bias is recorded with the weights."""
    model = ClipModel.load("open_clip:camloc-tiny-mapvit-bias:random", device="cpu")
    assert model.logit_bias == -10.0 and model.backend.info["logit_bias"] == -10.0
    prompts = ["cat", "a dog", "sofa"]
    x = model.preprocess(chelsea)
    tokens = model.backend.tokenizer(prompts)
    with torch.no_grad():
        image_features, text_features, scale, bias = model.model(x, tokens)
    own = scale * image_features @ text_features.T + bias  # open_clip normalises both in its forward
    ctx = CamContext(model, chelsea, prompts, {})
    torch.testing.assert_close(ctx.image_scores, own[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        scored = model.scores(model.model.encode_image(x), model.text_features(prompts))
    torch.testing.assert_close(scored[0], own[0], rtol=1e-5, atol=1e-5)
    # gScoreCAM weighs its top-k channels' scores beside zeros, so the bias moves its map
    with_bias = compute_heatmaps(model, chelsea, ["cat"], ["gscorecam"], {"topk": 10})["gscorecam"]
    model.logit_bias = 0.0
    without = compute_heatmaps(model, chelsea, ["cat"], ["gscorecam"], {"topk": 10})["gscorecam"]
    assert not np.allclose(with_bias, without, atol=1e-4)
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--dataset", "demo", "--limit", "1", "--method", "gradcam", "--model",
                                 "open_clip:camloc-tiny-mapvit-bias:random", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["weights"]["logit_bias"] == -10.0


TRANSFORMERS = ["camloc-tiny-vit", "camloc-tiny-vit-avg", "camloc-tiny-mapvit", "camloc-tiny-eva", "camloc-tiny-eva02",
                "camloc-tiny-eva-avg"]


@pytest.mark.parametrize("arch", TRANSFORMERS)
def test_every_blocks_access_recombined_as_the_original_is_the_blocks_own_forward(arch, chelsea):
    """The dense methods' starting point on every transformer family (open_clip's blocks, timm's Block with
    a fused qkv, EVA's EvaBlock with rotary embeddings): q, k, v from `BlockAccess`, softmax(q k^T / sqrt(d))
    v, merge, LayerScale, residual and FFN give each block's own output, captured from the model's forward."""
    from camloc.models.families import block_access, vit_blocks

    model = ClipModel.load(f"open_clip:{arch}:random", device="cpu")
    ctx = CamContext(model, chelsea, ["cat"])
    blocks, inputs = ctx.block_inputs(0)
    outputs = []
    handles = [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in blocks]
    with torch.no_grad():
        model.visual(ctx.input)
    for h in handles:
        h.remove()
    assert len(blocks) == len(vit_blocks(model.visual)) == len(inputs) == 2
    for i, x in enumerate(inputs):
        access = block_access(model.visual, i)
        assert (access.rope is not None) == (arch in ROTARY)
        with torch.no_grad():
            q, k, v = access.qkv(access.ln_1(x))
            attn = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
            y = x + access.ls_1(access.merge(attn @ v))
            y = y + access.ffn(y)
        torch.testing.assert_close(y, outputs[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", TRANSFORMERS)
def test_the_dense_tokens_are_the_models_own_embedding_where_it_reads_one_token(arch, chelsea):
    """`dense_tokens`, the per-token rest of the tower every dense method scores: the class token's is
    `encode_image` on class-token pooled towers; on an attention-pool head, a token's equals the pool run
    over that token alone (its query's softmax weight is then 1); on average pooling, the tokens' mean
    through the (linear) projection equals the model's own where the norm comes before the pool, and on a timm
    trunk that normalises after the pool, a token's equals the head pooling that token alone."""
    from camloc.models.families import dense_tokens, vit_blocks

    model = ClipModel.load(f"open_clip:{arch}:random", device="cpu")
    ctx = CamContext(model, chelsea, ["cat"])
    last = []
    handle = vit_blocks(model.visual)[-1].register_forward_hook(lambda m, a, out: last.append(out))
    with torch.no_grad():
        expected = model.model.encode_image(ctx.input)
        handle.remove()
        dense = dense_tokens(model.visual, last[0])
        if model.family.pooling == "token":
            torch.testing.assert_close(dense[:, 0], expected, rtol=1e-5, atol=1e-5)
        elif model.family.pooling == "map":
            trunk = model.visual.trunk
            normed = trunk.norm(last[0])
            for i in (0, 5, normed.shape[1] - 1):
                alone = model.visual.head(trunk.head(trunk.fc_norm(trunk.attn_pool(normed[:, i:i + 1]))))
                torch.testing.assert_close(dense[:, i], alone, rtol=1e-5, atol=1e-5)
        elif hasattr(model.visual, "trunk"):  # a timm trunk averaging its tokens, its fc_norm after the pool:
            trunk = model.visual.trunk  # a token's is the head pooling that token alone
            normed, prefix = trunk.norm(last[0]), model.family.prefix
            for i in (prefix, prefix + 5, normed.shape[1] - 1):
                alone = model.visual.head(trunk.forward_head(torch.cat([normed[:, :prefix], normed[:, i:i + 1]], 1)))
                torch.testing.assert_close(dense[:, i], alone, rtol=1e-5, atol=1e-5)
        else:
            assert not model.visual.final_ln_after_pool
            torch.testing.assert_close(dense[:, 1:].mean(dim=1), expected, rtol=1e-5, atol=1e-5)


def legrad_siglip_reference(model, image, prompt: str, norm: bool, threshold: float | None = 0.8) -> torch.Tensor:
    """WalBouss/LeGrad's SigLIP path written out (wrapper.py `compute_legrad_siglip` at 8c2ca90, utils.py
    `hooked_resblock_timm_forward` / `hooked_attentional_pooler_timm_forward` at c5c7b20), for one prompt:
    the last 2 blocks' outputs through the hooked pool, grads w.r.t. its stored `attn_probs`, the empty
    prompt's correction, min-max, bilinear upsampling by the patch size. `norm`: trunk.norm before the
    pool (camloc's default; the reference pools the raw block output)."""
    visual, trunk = model.visual, model.visual.trunk
    pool, blocks = trunk.attn_pool, list(trunk.blocks)
    for p in pool.parameters():
        p.requires_grad_(True)
    feats = {}
    hooks = [blocks[i].register_forward_hook(lambda m, a, o, i=i: feats.__setitem__(i, o))
             for i in range(len(blocks) - 2, len(blocks))]
    x_in = model.preprocess(image)
    with torch.no_grad():
        visual(x_in)
    for h in hooks:
        h.remove()

    def hooked_pool(x):
        b, n, c = x.shape
        q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, pool.latent_len, pool.num_heads, pool.head_dim)
        q = q.transpose(1, 2)
        k, v = pool.kv(x).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = pool.q_norm(q), pool.k_norm(k)
        attn = ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        pool.attn_probs = attn
        x = pool.proj((attn @ v).transpose(1, 2).reshape(b, pool.latent_len, c))
        x = x + pool.mlp(pool.norm(x))
        return x[:, 0]

    text = model.text_features([prompt]).float()
    empty = model.text_features(["a photo of a"]).float().t()
    grid = int(round(feats[len(blocks) - 1].shape[1] ** 0.5))
    total, total_empty = 0, 0
    with torch.enable_grad():
        for i in sorted(feats):
            feat = feats[i].clone().requires_grad_(True)
            pooled = torch.nn.functional.normalize(hooked_pool(trunk.norm(feat) if norm else feat), dim=-1)
            grad = torch.autograd.grad((text @ pooled.T).sum(), [pool.attn_probs], retain_graph=True)[0]
            total = total + grad.clamp(min=0).mean(dim=1)[:, 0].reshape(1, 1, grid, grid)
            grad = torch.autograd.grad((pooled @ empty).sum(), [pool.attn_probs], retain_graph=True)[0]
            total_empty = total_empty + grad.clamp(min=0).mean(dim=1)[:, 0].reshape(1, 1, grid, grid)

    def min_max(t):
        return (t - t.min()) / (t.max() - t.min())

    if threshold is not None:
        total[min_max(total_empty) > threshold] = 0
    patch = trunk.patch_embed.patch_size[0]
    return torch.nn.functional.interpolate(min_max(total), scale_factor=patch, mode="bilinear")[0, 0]


@pytest.mark.parametrize("arch", ["camloc-tiny-mapvit", "camloc-tiny-mapvit-bias"])
@pytest.mark.parametrize("official", [True, False])
def test_legrad_on_an_attention_pool_head_equals_the_references_siglip_recipe(arch, official, chelsea):
    from camloc.cams.engine import compute_raw

    model = ClipModel.load(f"open_clip:{arch}:random", device="cpu")
    assert model.family.pooling == "map"
    prompts = ["cat", "a dog"]
    _, maps = compute_raw(model, chelsea, prompts, ["legrad"], {"legrad_official": official})["legrad"]
    for i, prompt in enumerate(prompts):  # the reference scores one prompt at a time
        expected = legrad_siglip_reference(model, chelsea, prompt, norm=not official)
        torch.testing.assert_close(maps[i], expected, rtol=0, atol=1e-5)
    # the correction is not ignored: off (1), the maps differ where the empty prompt's map was high
    _, plain = compute_raw(model, chelsea, prompts, ["legrad"], {"legrad_official": official,
                                                                 "legrad_correction": 1.0})["legrad"]
    torch.testing.assert_close(plain[0], legrad_siglip_reference(model, chelsea, "cat", norm=not official,
                                                                 threshold=None), rtol=0, atol=1e-5)
    assert not torch.allclose(plain, maps)


def eclip_timm_reference(model, image, prompt: str):
    """Grad-ECLIP's recipe (Cyang-Zhao/Grad-Eclip `grad_eclip` at 5c1b5cc) written out on a timm trunk, per
    prompt: EVA (class token): the last block re-run from its input with the attention output o as the
    differentiated point; SigLIP (attention pool): the pool's cross-attention output. Returns the map and
    the embedding the recompute gives (which must be the model's own)."""
    from timm.layers import apply_rot_embed_cat

    from camloc.models.families import block_ropes

    visual, trunk = model.visual, model.visual.trunk
    block = trunk.blocks[-1]
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    with torch.no_grad():
        visual(model.preprocess(image))
    handle.remove()
    x = captured["x"]
    text = model.text_features([prompt])

    def split(t, heads):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    def cat(t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    def score(features):
        f = torch.nn.functional.normalize(features.float(), dim=-1)
        return (model.logit_scale * (f * text).sum(dim=-1) + model.logit_bias).sum()

    if trunk.global_pool == "token":
        attn = block.attn
        y = block.norm1(x)
        q, k, v = (split(t, attn.num_heads) for t in attn.qkv(y).chunk(3, dim=-1))
        rope = block_ropes(visual)[-1]
        q = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], rope)], dim=2)
        k = torch.cat([k[:, :, :1], apply_rot_embed_cat(k[:, :, 1:], rope)], dim=2)
        o = cat(torch.softmax(q @ k.transpose(-2, -1) * attn.head_dim ** -0.5, dim=-1) @ v).requires_grad_(True)
        with torch.enable_grad():
            h = x + attn.proj(attn.norm(o))
            h = h + block.mlp(block.norm2(h))
            features = visual.head(trunk.forward_head(trunk.norm(h)))
            (grad,) = torch.autograd.grad(score(features), o)
        qc, kc, vc = cat(q), cat(k), cat(v)
        sim = torch.nn.functional.cosine_similarity(attn.proj(qc)[0, :1], attn.proj(kc)[0, 1:], dim=-1)
        values, g = vc[0, 1:], grad[0, 0]
    else:
        pool = trunk.attn_pool
        t = trunk.norm(block(x))
        q = split(pool.q(pool.latent), pool.num_heads)
        k, v = (split(u, pool.num_heads) for u in pool.kv(t).chunk(2, dim=-1))
        o = cat(torch.softmax(q @ k.transpose(-2, -1) * pool.head_dim ** -0.5, dim=-1) @ v).requires_grad_(True)
        with torch.enable_grad():
            pooled = pool.proj(o)
            pooled = pooled + pool.mlp(pool.norm(pooled))
            features = visual.head(pooled[:, 0])
            (grad,) = torch.autograd.grad(score(features), o)
        sim = torch.nn.functional.cosine_similarity(pool.proj(cat(q))[0, :1], pool.proj(cat(k))[0], dim=-1)
        values, g = cat(v)[0], grad[0, 0]
    sim = (sim - sim.min()) / (sim.max() - sim.min())
    maps = torch.relu((g[None] * values * sim[:, None]).sum(dim=-1))
    side = int(round(maps.shape[0] ** 0.5))
    return maps.reshape(side, side).detach(), features.detach()


@pytest.mark.parametrize("arch", ["camloc-tiny-eva", "camloc-tiny-mapvit-bias"])
def test_grad_eclip_on_timm_trunks_follows_the_recipe_on_the_models_own_forward(arch, chelsea):
    from camloc.cams.engine import compute_raw

    model = ClipModel.load(f"open_clip:{arch}:random", device="cpu")
    prompts = ["cat", "a dog"]
    _, maps = compute_raw(model, chelsea, prompts, ["grad-eclip"])["grad-eclip"]
    for i, prompt in enumerate(prompts):
        want, embedding = eclip_timm_reference(model, chelsea, prompt)
        torch.testing.assert_close(embedding, model.model.encode_image(model.preprocess(chelsea)), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(maps[i], want, rtol=1e-4, atol=1e-6)
        assert want.abs().max() > 0
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method",
                                 "grad-eclip", "--model", f"open_clip:{arch}:random", "--eclip-official"])
    assert result.exit_code == 2 and "--eclip-official" in result.stderr


def test_a_block_layout_camloc_does_not_read_is_refused_not_mapped(chelsea):
    """A timm block whose forward differs from the layout the attention methods assume (here its attention
    computed at twice the usual scale) stops the dense methods with one line instead of giving maps of a
    forward the model never runs."""
    from camloc.cams.engine import compute_raw
    from camloc.errors import ModelError

    model = ClipModel.load("open_clip:camloc-tiny-mapvit:random", device="cpu")
    compute_raw(model, chelsea, ["cat"], ["maskclip"])  # the unmodified blocks pass the check
    model = ClipModel.load("open_clip:camloc-tiny-mapvit:random", device="cpu")
    attn = model.visual.trunk.blocks[-1].attn
    attn.fused_attn, attn.scale = False, attn.scale * 2
    with pytest.raises(ModelError, match="does not reproduce their forward"):
        compute_raw(model, chelsea, ["cat"], ["maskclip"])


def test_grad_eclip_is_left_out_of_all_and_refused_on_a_trunk_that_averages_its_tokens(tmp_path):
    """Grad-ECLIP is defined at a class token or an attention-pool query (MethodSpec.poolings): `--method all`
    on an average-pooled timm trunk runs every other method (checked above); asked for by name, one line."""
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method",
                                 "grad-eclip", "--model", "open_clip:camloc-tiny-eva-avg:random"])
    assert result.exit_code == 2
    assert "method 'grad-eclip' needs an embedding that reads an attention-pool query or a class token" in result.stderr
    assert "reads the mean of its tokens" in result.stderr
