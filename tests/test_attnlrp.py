"""AttnLRP against lxt's rules written out (rachtibat/LRP-eXplains-Transformers at 68a8393: `identity_rule_implicit`,
`divide_gradient`, `layer_norm_forward`, `wrap_attention_forward`, `cp_multi_head_attention_forward`), against lxt 2.1's
own CP-LRP run (tests/golden-lxt: `lxt` needs transformers at import, so it is not a test dependency), relevance
conservation where the rules conserve it, the gated-MLP rule, and the refusals."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.mlp import GluMlp, SwiGLU
from typer.testing import CliRunner

from camloc.methods.attnlrp import lrp_rules
from camloc.cams.engine import compute_raw
from camloc.cli.app import app
from camloc.errors import ModelError
from camloc.models import ClipModel

runner = CliRunner()
PROMPTS = ["cat", "a dog", "grass"]
TINY = ["tiny-vit", "open_clip:camloc-tiny-vit:random", "open_clip:camloc-tiny-vit-avg:random",
        "open_clip:camloc-tiny-mapvit:random", "open_clip:camloc-tiny-eva:random", "open_clip:camloc-tiny-eva02:random",
        "open_clip:camloc-tiny-eva-avg:random"]


class IdentityImplicit(torch.autograd.Function):
    """lxt's `identity_rule_implicit_fn`: saves f(x) / (x + 1e-10), multiplies the incoming gradient by it."""

    @staticmethod
    def forward(ctx, fn, x):
        out = fn(x)
        ctx.save_for_backward(out / (x + 1e-10))
        return out

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.saved_tensors[0] * grad


class DivideGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.factor, None


def lxt_layer_norm(ln, x):
    mean = x.mean(dim=-1, keepdim=True)
    std = (((x - mean) ** 2).mean(dim=-1, keepdim=True) + ln.eps).sqrt()
    return (x - mean) / std.detach() * ln.weight + ln.bias


def reference_relevance(model, image, prompts, rule):
    """The clip package's ViT forward with lxt's rules, sequence-first as the package runs it, for each prompt
    on its own copy of the image: (input * grad).sum(1)."""
    visual = model.visual
    x0 = model.preprocess(image).expand(len(prompts), -1, -1, -1).clone().requires_grad_(True)
    x = visual.conv1(x0).flatten(2).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.expand(len(prompts), 1, -1), x], dim=1) + visual.positional_embedding
    x = lxt_layer_norm(visual.ln_pre, x).permute(1, 0, 2)
    for blk in visual.transformer.resblocks:
        y = lxt_layer_norm(blk.ln_1, x)
        n, bsz, dim = y.shape
        heads = blk.attn.num_heads
        hd = dim // heads
        qkv = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.contiguous().view(n, bsz * heads, hd).transpose(0, 1) for t in qkv)
        if rule == "cp":
            q, k = q.detach(), k.detach()
        else:
            q, k, v = DivideGradient.apply(q, 4), DivideGradient.apply(k, 4), DivideGradient.apply(v, 2)
        attn = torch.softmax(torch.bmm(q * hd ** -0.5, k.transpose(1, 2)), dim=-1)
        x = x + blk.attn.out_proj(torch.bmm(attn, v).transpose(0, 1).contiguous().view(n, bsz, dim))
        h = blk.mlp.c_fc(lxt_layer_norm(blk.ln_2, x))
        h = IdentityImplicit.apply(lambda t: t * torch.sigmoid(1.702 * t), h)
        x = x + blk.mlp.c_proj(h)
    f = lxt_layer_norm(visual.ln_post, x.permute(1, 0, 2)[:, 0]) @ visual.proj
    f = f / f.norm(dim=-1, keepdim=True).detach()
    scores = model.logit_scale * (f * model.text_features(prompts)).sum(dim=-1)
    scores.sum().backward()
    return (x0 * x0.grad).sum(dim=1).detach()


@pytest.mark.parametrize("rule", ["attnlrp", "cp"])
def test_attnlrp_equals_lxts_rules_written_out(rule, chelsea):
    model = ClipModel.load("tiny-vit-mh", device="cpu")
    kind, maps = compute_raw(model, chelsea, PROMPTS, ["attnlrp"], {"lrp_attention": rule})["attnlrp"]
    want = reference_relevance(model, chelsea, PROMPTS, rule)
    assert kind == "grid" and maps.shape == want.shape == (3, model.input_size, model.input_size)
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # the two rules differ, and the prompts' maps differ
    other = reference_relevance(model, chelsea, PROMPTS, "cp" if rule == "attnlrp" else "attnlrp")
    assert not torch.allclose(maps, other, atol=1e-3 * float(want.abs().max()))
    assert not torch.allclose(maps[0], maps[1], atol=1e-3 * float(want.abs().max()))


def _without_biases(model) -> None:
    """Every bias, class token and position embedding zero: the tower is then homogeneous under the rules."""
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "bias" in leaf or leaf in ("class_embedding", "positional_embedding", "pos_embed", "cls_token"):
                p.zero_()


@pytest.mark.parametrize("name", TINY)
def test_cp_lrp_conserves_the_score_on_every_tower(name, chelsea):
    """With biases and embeddings zero, CP-LRP (attention constant, identity rules) conserves relevance: the
    pixels' relevance sums to each prompt's logit without the bias, on every tiny ViT family."""
    model = ClipModel.load(name, device="cpu")
    _without_biases(model)
    _, maps = compute_raw(model, chelsea, PROMPTS, ["attnlrp"], {"lrp_attention": "cp"})["attnlrp"]
    with torch.no_grad():
        scores = model.scores(model.visual(model.preprocess(chelsea)), model.text_features(PROMPTS))[0]
    torch.testing.assert_close(maps.sum(dim=(1, 2)), scores - model.logit_bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mlp", [SwiGLU(8, 16, bias=False), GluMlp(8, 16, act_layer=nn.Sigmoid, bias=False)])
def test_gated_mlps_take_the_uniform_rule_and_conserve(mlp):
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        own = mlp(x)
    with lrp_rules(nn.Sequential(mlp), [], "attnlrp"):
        out = mlp(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, own)
    torch.testing.assert_close((x * grad).sum(), out.sum(), rtol=1e-5, atol=1e-5)
    assert "forward" not in mlp.__dict__  # the patch is gone


def test_a_module_without_a_rule_is_refused(chelsea):
    model = ClipModel.load("tiny-vit", device="cpu")
    model.visual.transformer.resblocks[0].mlp.gelu = nn.Tanh()
    with pytest.raises(ModelError, match="AttnLRP has no rule for the image tower's Tanh modules"):
        compute_raw(model, chelsea, ["cat"], ["attnlrp"])
    with pytest.raises(ModelError, match="Tanh"):  # and nothing stays patched
        compute_raw(model, chelsea, ["cat"], ["attnlrp"])
    assert all("forward" not in m.__dict__ for m in model.visual.modules())


def test_attnlrp_on_the_command_line(chelsea):
    base = ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "attnlrp"]
    result = runner.invoke(app, base + ["--model", "tiny-vit", "--lrp-attention", "lrp0"])
    assert result.exit_code == 2 and "--lrp-attention 'lrp0' is not one of attnlrp, cp" in result.stderr
    result = runner.invoke(app, base + ["--model", "tiny-rn"])
    assert result.exit_code == 2 and "works only on ViT" in result.stderr


LXT = Path(__file__).parent / "golden-lxt"


@pytest.mark.parametrize("key, name", [("tiny_vit_mh", "tiny-vit-mh"), ("open_clip_tiny_vit", "open_clip:camloc-tiny-vit:random")])
def test_cp_lrp_equals_lxts_own_run(key, name, chelsea):
    """lxt 2.1 itself (its torchvision-ViT rule set, CP-LRP) run on the same random-init CLIP ViTs
    (tests/golden-lxt/make_fixtures.py, meta.json): the clip package's sequence-first blocks and open_clip's
    batch-first ones."""
    want = torch.from_numpy(np.load(LXT / f"{key}_cp.npy"))
    model = ClipModel.load(name, device="cpu")
    _, maps = compute_raw(model, chelsea, PROMPTS, ["attnlrp"], {"lrp_attention": "cp"})["attnlrp"]
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    plain = _plain_gradient_times_input(model, chelsea)  # the fixture is not plain Gradient x Input
    assert not torch.allclose(plain, want, atol=1e-2 * float(want.abs().max()))


@pytest.mark.parametrize("key, name", [("tiny_vit_mh", "tiny-vit-mh"), ("open_clip_tiny_vit", "open_clip:camloc-tiny-vit:random")])
def test_the_gamma_rule_equals_lxt_with_zennit(key, name, chelsea):
    """lxt's ViT recipe with zennit's Gamma on Conv2d (0.25) and Linear (0.05) layers (`monkey_patch_zennit`,
    `LayerMapComposite`), run by lxt and zennit 0.5.1 themselves (tests/golden-lxt)."""
    want = torch.from_numpy(np.load(LXT / f"{key}_cp_gamma.npy"))
    model = ClipModel.load(name, device="cpu")
    options = {"lrp_attention": "cp", "lrp_gamma_conv": 0.25, "lrp_gamma_linear": 0.05}
    _, maps = compute_raw(model, chelsea, PROMPTS, ["attnlrp"], options)["attnlrp"]
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    lrp0 = torch.from_numpy(np.load(LXT / f"{key}_cp.npy"))
    assert not torch.allclose(lrp0, want, atol=1e-2 * float(want.abs().max()))  # gamma changes the map
    assert all("forward" not in m.__dict__ for m in model.visual.modules())


def _plain_gradient_times_input(model, image):
    x = model.preprocess(image).expand(len(PROMPTS), -1, -1, -1).clone().requires_grad_(True)
    f = model.visual(x).float()
    scores = model.logit_scale * (f / f.norm(dim=-1, keepdim=True).detach() * model.text_features(PROMPTS)).sum(-1)
    scores.sum().backward()
    return (x * x.grad).sum(dim=1).detach()
