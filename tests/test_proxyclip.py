"""ProxyCLIP against its reference written out (mc-lan/ProxyCLIP `proxyclip_segmentor.py` at 05c3c18 and `open_clip/transformer.py` at f2919bb: `forward_feature` with a DINO
proxy and `VisionTransformer.custom_attn`), with a random-init timm DINO ViT-S/8 as the proxy (its 12 x 12
grid against the CLIP model's 6 x 6, so the values are resized), and the option checks."""
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from camloc.cams.engine import compute_raw
from camloc.cli.app import app
from camloc.models import ClipModel

pytest.importorskip("timm")
runner = CliRunner()
PROXY = "vit_small_patch8_224.dino:random"
PROMPTS = ["cat", "a dog"]


@pytest.fixture(scope="module")
def model():
    return ClipModel.load("tiny-vit-mh", device="cpu")


def proxyclip_reference(model, image, prompts, beta=1.2, gamma=3.0):
    from camloc.methods.proxy import load_proxy

    proxy, _, _ = load_proxy(PROXY, model.input_size, torch.device("cpu"))
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    img = model.preprocess(image)
    with torch.no_grad():
        # imgs_norm = Normalize(ImageNet)(UnNormalize(CLIP)(img)); DINO's normed last-block patch tokens
        clip_mean, clip_std = (torch.tensor(t).view(1, 3, 1, 1) for t in (model.backend.mean, model.backend.std))
        inet_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        inet_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        imgs_norm = (img * clip_std + clip_mean - inet_mean) / inet_std
        feat = proxy.forward_features(imgs_norm)[:, 1:]
        side = model.input_size // 8
        ex_feats = feat.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # CLIP: every block but the last as it is, then custom_attn on the last block's ln_1
        x = visual.conv1(img).flatten(2).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding.expand(1, 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x).permute(1, 0, 2)
        for blk in blocks[:-1]:
            x = blk(x)
        blk = blocks[-1]
        y = blk.ln_1(x)
        heads = blk.attn.num_heads
        n, bsz, dim = y.shape
        hd = dim // heads
        _, _, v = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
        v = v.contiguous().view(-1, bsz * heads, hd).transpose(0, 1)
        _, _, h, w = ex_feats.shape
        q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)
        similarity = torch.einsum("bcm,bcn->bmn", q_k, q_k)
        similarity = (similarity - similarity.mean(dim=(1, 2), keepdim=True) * beta) * gamma
        similarity[similarity < 0.0] = float("-inf")
        attn = F.softmax(similarity.unsqueeze(1).repeat(1, heads, 1, 1).reshape(heads, h * w, h * w), dim=-1)
        grid = int(round((n - 1) ** 0.5))
        v = v[:, 1:, :].reshape(heads, grid, grid, hd).permute(0, 3, 1, 2)
        v = F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(heads, h * w, hd)
        out = blk.attn.out_proj(torch.bmm(attn, v).transpose(0, 1).contiguous().view(-1, bsz, dim))
        feats = visual.ln_post(out.permute(1, 0, 2)) @ visual.proj
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = feats @ model.text_features(prompts).T
        return logits.permute(0, 2, 1).reshape(len(prompts), h, w)


@pytest.mark.parametrize("beta, gamma", [(1.2, 3.0), (1.0, 5.0)])
def test_proxyclip_equals_the_reference_written_out(beta, gamma, model, chelsea):
    options = {"proxy_model": PROXY, "proxy_beta": beta, "proxy_gamma": gamma}
    kind, maps = compute_raw(model, chelsea, PROMPTS, ["proxyclip"], options)["proxyclip"]
    assert kind == "resize_minmax" and maps.shape == (2, 12, 12)  # on the proxy's grid
    torch.testing.assert_close(maps, proxyclip_reference(model, chelsea, PROMPTS, beta, gamma), rtol=1e-5, atol=1e-5)


def test_proxyclip_runs_on_every_transformer_family(chelsea):
    for name in ("open_clip:camloc-tiny-vit-avg:random", "open_clip:camloc-tiny-mapvit:random",
                 "open_clip:camloc-tiny-eva:random"):
        clip_model = ClipModel.load(name, device="cpu")
        _, maps = compute_raw(clip_model, chelsea, PROMPTS, ["proxyclip"], {"proxy_model": PROXY})["proxyclip"]
        assert maps.shape == (2, 8, 8) and torch.isfinite(maps).all() and maps.std() > 0


def test_proxyclip_is_not_in_all_and_needs_its_model(model, tmp_path, monkeypatch):
    from camloc.cams import resolve_methods

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the pretrained proxy is not in the cache: fail at once
    assert "proxyclip" not in [s.name for s in resolve_methods("all", "vit")]
    base = ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "proxyclip", "--model",
            "tiny-vit-mh"]
    for extra, says in (([], "needs --proxy-model"),
                        (["--proxy-model", "nosuch:random"], "timm has no model 'nosuch'"),
                        (["--proxy-model", "vit_small_patch8_224.dino"], "timm/vit_small_patch8_224.dino"),
                        (["--proxy-model", PROXY, "--proxy-gamma", "0"], "--proxy-gamma")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and says in result.stderr, (extra, result.output)
    # the proxy is part of the run's identity: another proxy is another run
    args = ["eval", "--model", "tiny-vit-mh", "--method", "proxyclip", "--dataset", "demo", "--limit", "1",
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert runner.invoke(app, args + ["--proxy-model", PROXY]).exit_code == 0
    other = runner.invoke(app, args + ["--proxy-model", "vit_tiny_patch16_224:random"])
    assert other.exit_code == 2 and 'options.proxy_model: "vit_small_patch8_224.dino:random" there' in other.output


def test_a_random_proxy_is_seeded_and_its_weights_are_recorded(tmp_path, monkeypatch):
    """`NAME:random[@SEED]` draws the proxy from its seed (issue 30: an unseeded draw moved the maps by 0.05
    while the run identity said the runs were the same); config.json records its state_dict's SHA-256."""
    import json
    import re

    import camloc.methods.proxy as proxy

    def run(out, name):
        monkeypatch.setattr(proxy, "_LOADED", {})  # a fresh process: the proxy is built again
        torch.manual_seed(1234 + len(str(out)))   # whatever the global RNG holds, the proxy is the same
        result = runner.invoke(app, ["eval", "--model", "tiny-vit-mh", "--method", "proxyclip", "--dataset", "demo",
                                     "--limit", "2", "--out", str(out), "--no-progress", "--proxy-model", name])
        assert result.exit_code == 0, result.output
        config = json.loads((out / "config.json").read_text())
        records = re.sub(r',"seconds":[0-9.e-]+', "", (out / "pairs.jsonl").read_text())  # wall time: never equal
        return records, config["weights"]["methods"]["proxyclip"]

    first, weights = run(tmp_path / "a", PROXY)
    again, weights_again = run(tmp_path / "bb", PROXY)
    assert first == again and weights == weights_again
    assert weights["proxy_model"] == PROXY and weights["seed"] == 0 and len(weights["sha256"]) == 64
    assert run(tmp_path / "c", PROXY + "@0")[1]["sha256"] == weights["sha256"]  # @0 is the default seed
    _, other = run(tmp_path / "d", PROXY + "@7")
    assert other["seed"] == 7 and other["sha256"] != weights["sha256"]
    # a different seed is a different run
    monkeypatch.setattr(proxy, "_LOADED", {})
    refused = runner.invoke(app, ["eval", "--model", "tiny-vit-mh", "--method", "proxyclip", "--dataset", "demo",
                                  "--limit", "2", "--out", str(tmp_path / "a"), "--no-progress", "--proxy-model",
                                  PROXY + "@7"])
    assert refused.exit_code == 2 and "options.proxy_model" in refused.output
    for bad in ("random@-1", "random@x", f"random@{2**32}", "random@"):
        result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method",
                                     "proxyclip", "--model", "tiny-vit-mh", "--proxy-model",
                                     f"vit_small_patch8_224.dino:{bad}"])
        assert result.exit_code == 2 and "NAME:random[@SEED]" in result.stderr, (bad, result.output)


def test_state_dict_sha256_sees_names_values_and_dtypes():
    from camloc.models.loading import state_dict_sha256

    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    assert state_dict_sha256(a) == state_dict_sha256({k: v.clone() for k, v in a.items()})
    assert state_dict_sha256(a) != state_dict_sha256({"w": a["w"], "c": a["b"]})
    assert state_dict_sha256(a) != state_dict_sha256({"w": a["w"].half(), "b": a["b"]})
    changed = {"w": a["w"].clone(), "b": a["b"]}
    changed["w"][1, 2] += 1e-6
    assert state_dict_sha256(a) != state_dict_sha256(changed)


def dino_interpolate_pos_encoding(pos_embed, patch, w, h):
    """DINO's VisionTransformer.interpolate_pos_encoding (facebookresearch/dino vision_transformer.py), as the
    ProxyCLIP harness runs its torch-hub proxy on 336-pixel windows, written out: bicubic by the scale factor
    (n + 0.1) / sqrt(N) per side."""
    import math

    n = pos_embed.shape[1] - 1
    class_pos, patch_pos = pos_embed[:, 0], pos_embed[:, 1:]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos = torch.nn.functional.interpolate(
        patch_pos.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), -1).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    return torch.cat((class_pos.unsqueeze(0), patch_pos.permute(0, 2, 3, 1).view(1, -1, pos_embed.shape[-1])), dim=1)


def test_a_pretrained_proxy_at_a_harness_crop_has_dinos_own_position_resize(monkeypatch):
    """Under an ovseg preset that resizes positions the harness's way (`sclip`), a pretrained proxy at a crop
    other than its own size gets DINO's interpolate_pos_encoding (what ProxyCLIP's torch-hub DINO computes at 336
    px), not timm's resize to exactly n x n; its other weights are the pretrained ones. "Pretrained" weights are
    stood in for by a seeded draw (no download here)."""
    import timm

    from camloc.methods import proxy as proxy_module

    real = timm.create_model

    def seeded(arch, pretrained=False, **kwargs):  # the same "pretrained" weights at any size, timm's resize
        torch.manual_seed(7)
        return real(arch, pretrained=False, **kwargs) if not pretrained else _pretrained(real, arch, **kwargs)

    monkeypatch.setattr(timm, "create_model", seeded)
    monkeypatch.setattr(proxy_module, "_LOADED", {})
    trained = seeded("vit_small_patch8_224.dino", pretrained=True, num_classes=0)
    harness, _, _ = proxy_module.load_proxy("vit_small_patch8_224.dino", 336, torch.device("cpu"), "sclip")
    want = dino_interpolate_pos_encoding(trained.pos_embed.detach(), 8, 336, 336)
    assert harness.pos_embed.shape == (1, 1 + 42 * 42, 384)
    assert torch.allclose(harness.pos_embed, want, atol=1e-6)
    assert torch.equal(harness.blocks[0].attn.qkv.weight, trained.blocks[0].attn.qkv.weight)
    sized, _, _ = proxy_module.load_proxy("vit_small_patch8_224.dino", 336, torch.device("cpu"), "size")
    assert not torch.allclose(sized.pos_embed, want, atol=1e-4)  # timm's exact-size resize samples elsewhere
    own, _, _ = proxy_module.load_proxy("vit_small_patch8_224.dino", 224, torch.device("cpu"), "sclip")
    assert torch.equal(own.pos_embed, trained.pos_embed)


def _pretrained(real, arch, img_size=None, **kwargs):
    """A seeded model standing in for the pretrained one, at `img_size` through timm's own position resize."""
    torch.manual_seed(7)
    base = real(arch, pretrained=False, **kwargs)
    if img_size is None or img_size == base.patch_embed.img_size[0]:
        return base
    from timm.layers import resample_abs_pos_embed

    model = real(arch, pretrained=False, img_size=img_size, **kwargs)
    state = base.state_dict()
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=model.patch_embed.grid_size,
                                                num_prefix_tokens=1)
    model.load_state_dict(state)
    return model
