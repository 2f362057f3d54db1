"""The post-2024 dense variants against their references written out: ResCLIP (yvhangyang/ResCLIP
`clip/model.py` at 6b082d9: RCS and SFR, `create_logit_temp`, `create_patch_matrix`, `generate_attention_sfr`
with `delete_same_entity`, `custom_attn` for the resclip/naclip, sclip and clearclip strategies), CLIPtrase,
SC-CLIP, and SegEarth-OV's class-token term, on the clip package's sequence-first tiny ViT with two heads;
and their option checks."""
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from camloc.cams.engine import compute_raw
from camloc.cli.app import app
from camloc.models import ClipModel
from camloc.segment.pamr import pamr

runner = CliRunner()
PROMPTS = ["cat", "a dog", "grass"]


@pytest.fixture(scope="module")
def model():
    return ClipModel.load("tiny-vit-mh", device="cpu")


def stem_tokens(model, image) -> torch.Tensor:
    """The clip package's ViT up to its first block, sequence-first (N, 1, D), as the references start."""
    visual = model.visual
    x = visual.conv1(model.preprocess(image)).flatten(2).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.expand(1, 1, -1), x], dim=1) + visual.positional_embedding
    return visual.ln_pre(x).permute(1, 0, 2)


def omega_reference(grid: int, std: float) -> torch.Tensor:
    """NACLIP's addition as the reference builds it: a (2g - 1)^2 Gaussian window convolved ('same') with
    every one-hot patch map, the class row and column zero."""
    c = 1 / (std * math.sqrt(2))
    side = 2 * grid - 1
    ks = torch.linspace(-(side - 1) / 2 * c, (side - 1) / 2 * c, side)
    window = torch.exp(-(torch.stack(torch.meshgrid(ks, ks, indexing="ij")) ** 2).sum(0))
    eye = torch.einsum("ij,kl->ijkl", torch.eye(grid), torch.eye(grid)).permute(0, 3, 1, 2).contiguous()
    out = F.conv2d(eye.view(-1, grid, grid)[:, None], window[None, None], padding="same")[:, 0]
    out = out.reshape(grid * grid, grid * grid)
    full = torch.zeros(grid * grid + 1, grid * grid + 1)
    full[1:, 1:] = out
    return full


def sfr_reference(labels: torch.Tensor, std: float) -> torch.Tensor:
    """generate_attention_sfr(delete_same_entity=True), one pair at a time."""
    g = labels.shape[0]
    total = g * g
    pos = [(i // g, i % g) for i in range(total)]
    longest = max(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a in pos for b in pos)
    ts = torch.linspace(0, 1, longest + 1)
    att = torch.zeros(total, total)
    for i, a in enumerate(pos):
        for j, b in enumerate(pos):
            if labels[a] != labels[b]:
                continue
            steps = max(abs(a[0] - b[0]), abs(a[1] - b[1]))
            ok = True
            for s in range(steps + 1):  # the first steps + 1 of the longest + 1 points along the segment
                r = int(torch.round(a[0] * (1 - ts[s]) + b[0] * ts[s]))
                c = int(torch.round(a[1] * (1 - ts[s]) + b[1] * ts[s]))
                ok = ok and bool(labels[r, c] == labels[a])
            # the reference's decay: torch's float32 exp of the step ratio
            att[i, j] = 1.0 if ok else torch.exp(torch.tensor(-steps / longest, dtype=torch.float32))
    size = min(total, int(6 * std + 1))
    size += 1 - size % 2
    x = torch.arange(size) - size // 2
    kernel = torch.exp(-(x ** 2) / (2 * std ** 2))
    kernel = kernel / kernel.sum()
    blurred = F.relu(F.conv1d(att[:, None], kernel.view(1, 1, -1), padding=size // 2)[:, 0])
    full = torch.zeros(total + 1, total + 1)
    full[1:, 1:] = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    return full[None]


def resclip_reference(model, image, prompts, strategy="naclip", rcs_blocks=(0, 1), rcs_w=(2.0, 0.6),
                      sfr_w=(2.1, 0.6), temp_thd=0.1, std=5.0, use_rcs=True, use_sfr=True) -> torch.Tensor:
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    x_img = model.preprocess(image)
    text = model.text_features(prompts)
    arch = "w_resi" if strategy == "sclip" else "wo_resi"
    with torch.no_grad():
        x = stem_tokens(model, image)  # (N, 1, D)
        n_tok, _, dim = x.shape
        grid = int(round((n_tok - 1) ** 0.5))
        heads = blocks[0].attn.num_heads
        hd = dim // heads

        def split(t):
            return t.contiguous().view(n_tok, heads, hd).transpose(0, 1)

        def qkv(blk, y):
            return [split(t) for t in F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)]

        def merge(blk, a, v):
            return blk.attn.out_proj(torch.bmm(a, v).transpose(0, 1).contiguous().view(n_tok, 1, dim))

        maps = []
        for blk in blocks[:-1]:
            q, k, v = qkv(blk, blk.ln_1(x))
            a = torch.softmax(torch.bmm(q * hd ** -0.5, k.transpose(1, 2)), dim=-1)
            maps.append(a)
            x = x + merge(blk, a, v)
            x = x + blk.mlp(blk.ln_2(x))
        rcs = torch.stack([maps[i] for i in rcs_blocks]).mean(0) if use_rcs else None
        omega = omega_reference(grid, std)

        def custom(blk, y, sfr):
            q, k, v = qkv(blk, y)
            s = hd ** -0.5

            def sfr_mix(t):
                if sfr is None:
                    return t
                tau, lam = sfr_w
                return tau * ((1 - lam) * t + lam * (sfr / sfr.max()).half())

            if strategy == "naclip":
                a = torch.softmax(sfr_mix(torch.bmm(k, k.transpose(1, 2)) * s) + omega, dim=-1)
            elif strategy == "clearclip":
                a = torch.softmax(sfr_mix(torch.bmm(q, q.transpose(1, 2)) * s), dim=-1)
            else:
                a = (torch.softmax(sfr_mix(torch.bmm(q, q.transpose(1, 2)) * s), dim=-1)
                     + torch.softmax(sfr_mix(torch.bmm(k, k.transpose(1, 2)) * s), dim=-1))
            if rcs is not None:
                tau, lam = rcs_w
                a = tau * ((1 - lam) * a + lam * rcs)
            return merge(blk, a, v)

        def last(sfr):
            blk = blocks[-1]
            if arch == "w_resi":
                out = x + custom(blk, blk.ln_1(x), sfr)
                out = out + blk.mlp(blk.ln_2(out))
            else:
                out = custom(blk, blk.ln_1(x), sfr)
            feats = visual.ln_post(out.permute(1, 0, 2)) @ visual.proj
            feats = feats[:, 1:] / feats[:, 1:].norm(dim=-1, keepdim=True)
            return (feats @ text.T).permute(0, 2, 1).reshape(1, len(prompts), grid, grid)

        sfr = None
        if use_sfr:
            logits = F.interpolate(last(None), size=x_img.shape[-2:], mode="bilinear", align_corners=False)
            logits = torch.softmax(pamr(x_img, logits, 10, (8, 16))[0] * 40, dim=0)
            pred = logits.argmax(0)
            pred[logits.max(0)[0] < temp_thd] = 0
            patch = visual.conv1.kernel_size[0]
            cells = pred.unfold(0, patch, patch).unfold(1, patch, patch).reshape(grid, grid, -1)
            sfr = sfr_reference(torch.mode(cells, dim=-1)[0], std)
        return last(sfr)[0]


@pytest.mark.parametrize("base", ["naclip", "sclip", "clearclip"])
def test_resclip_equals_the_reference_written_out(base, model, chelsea):
    options = {"resclip_base": base, "resclip_rcs_layers": "1-2"}
    kind, maps = compute_raw(model, chelsea, PROMPTS, ["resclip"], options)["resclip"]
    assert kind == "resize_minmax"
    want = resclip_reference(model, chelsea, PROMPTS, strategy=base)
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parts, rcs, sfr", [("rcs", True, False), ("sfr", True, True), ("none", False, False)])
def test_resclip_parts_are_the_reference_with_them_switched(parts, rcs, sfr, model, chelsea):
    """`sfr` alone: RCS off in both passes; `none`: the base alone (here NACLIP's own formula)."""
    options = {"resclip_parts": parts, "resclip_rcs_layers": "2"}
    _, maps = compute_raw(model, chelsea, PROMPTS, ["resclip"], options)["resclip"]
    want = resclip_reference(model, chelsea, PROMPTS, rcs_blocks=(1,), use_rcs=(parts != "sfr") and rcs,
                             use_sfr=sfr)
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-5)
    if parts == "none":
        _, naclip = compute_raw(model, chelsea, PROMPTS, ["naclip"])["naclip"]
        torch.testing.assert_close(maps, naclip, rtol=1e-5, atol=1e-6)


def test_resclip_options_are_checked(model, tmp_path):
    base = ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "resclip", "--model",
            "tiny-vit-mh"]
    for extra, says in ((["--resclip-parts", "rcs,xyz"], "--resclip-parts"),
                        (["--resclip-rcs-weights", "2"], "--resclip-rcs-weights"),
                        (["--resclip-rcs-layers", "3-9"], "--resclip-rcs-layers 3-9"),
                        (["--resclip-base", "gem"], "--resclip-base")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and says in result.stderr, (extra, result.output)
    assert runner.invoke(app, base).exit_code == 0  # auto: the reference's range scaled to 3 blocks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sfr_attention_equals_the_references_on_mixed_labels(seed):
    """The path check and the decay only act where patches of one prompt are separated by another's."""
    from camloc.methods.resclip import sfr_attention

    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (6, 6), generator=generator)
    labels[1:4, 1:4] = 2  # a block, so some same-prompt pairs connect and others do not
    want = sfr_reference(labels, 5.0)[0]
    got = sfr_attention(labels, 5.0, prefix=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    decayed = (want[1:, 1:] > 0) & (want[1:, 1:] < want[1:, 1:].max())
    assert decayed.any()
    # with the path check off (every same-prompt pair connected) it would differ
    uniform = sfr_reference(torch.zeros(6, 6, dtype=torch.long), 5.0)[0]
    assert not torch.allclose(uniform, want)


@pytest.mark.parametrize("method", ["sclip", "naclip", "resclip", "maskclip"])
def test_cls_lambda_adds_the_paths_class_token_cosine_per_prompt(method, model, chelsea):
    """SegEarth-OV's cls_token_lambda: every patch's cosine plus lambda times the class token's, a constant per
    prompt (so a min-max normalised map is unchanged while the winning prompt per pixel can change)."""
    from camloc.cams.postprocess import minmax_

    _, plain = compute_raw(model, chelsea, PROMPTS, [method], {"resclip_parts": "rcs"})[method]
    _, low = compute_raw(model, chelsea, PROMPTS, [method], {"cls_lambda": -0.3, "resclip_parts": "rcs"})[method]
    _, high = compute_raw(model, chelsea, PROMPTS, [method], {"cls_lambda": 0.6, "resclip_parts": "rcs"})[method]
    shift_low, shift_high = low - plain, high - plain
    assert torch.allclose(shift_low, shift_low[:, :1, :1].expand_as(shift_low), atol=1e-6)
    torch.testing.assert_close(shift_high, -2 * shift_low, rtol=1e-4, atol=1e-6)
    assert shift_low.abs().min() > 0
    torch.testing.assert_close(minmax_(low, eps=0), minmax_(plain, eps=0), rtol=1e-4, atol=1e-5)


def test_cls_lambda_is_refused_without_a_class_token(chelsea):
    base = ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--cls-lambda", "-0.3"]
    result = runner.invoke(app, base + ["--method", "sclip", "--model", "open_clip:camloc-tiny-mapvit:random"])
    assert result.exit_code == 2 and "--cls-lambda needs a class token" in result.stderr
    result = runner.invoke(app, base + ["--method", "maskclip", "--model", "tiny-rn"])
    assert result.exit_code == 2 and "ResNet form has no class token" in result.stderr


def test_cliptrase_equals_its_self_qk_weight_block_written_out(model, chelsea):
    """leaves162/CLIPtrase at 8fb4d74, `multi_head_attention_forward(self_qk_weight=True)` in the last block of
    `ResidualAttentionBlock.forward`: the three self-correlation softmaxes summed, out_proj, residual, FFN."""
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    with torch.no_grad():
        x = stem_tokens(model, chelsea)
        for blk in blocks[:-1]:
            x = blk(x)
        blk = blocks[-1]
        n, bsz, dim = x.shape
        heads = blk.attn.num_heads
        hd = dim // heads
        q, k, v = (t.contiguous().view(n, bsz * heads, hd).transpose(0, 1)
                   for t in F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1))
        s = hd ** -0.5
        weights = sum(torch.softmax(torch.bmm(t * s, t.transpose(1, 2)), dim=-1) for t in (q, k, v))
        x = x + blk.attn.out_proj(torch.bmm(weights, v).transpose(0, 1).contiguous().view(n, bsz, dim))
        x = x + blk.mlp(blk.ln_2(x))
        feats = visual.ln_post(x.permute(1, 0, 2)) @ visual.proj
        feats = feats[0, 1:] / feats[0, 1:].norm(dim=-1, keepdim=True)
        grid = int(round((n - 1) ** 0.5))
        want = (feats @ model.text_features(PROMPTS).T).T.reshape(len(PROMPTS), grid, grid)
    kind, maps = compute_raw(model, chelsea, PROMPTS, ["cliptrase"])["cliptrase"]
    assert kind == "resize_minmax"
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-5)
    _, sclip = compute_raw(model, chelsea, PROMPTS, ["sclip"])["sclip"]
    assert not torch.allclose(maps, sclip, atol=1e-4)  # the v-v term is not ignored


def scclip_reference(model, image, prompts, pre=1, post=0, start=0, end=2, beta=0.4, res_cls=0.3):
    """SuleBai/SC-CLIP `VisionTransformer.forward(return_all=True)` at 0417ba9 written out (sequence-first,
    B = 1; `feats_list[i]` = block i's output), its LOF and neighbour-mean replacement one token at a time.
    Returns the patch-prompt cosines (P, g, g) and the outliers found."""
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    with torch.no_grad():
        x = stem_tokens(model, image)
        feats_list = []
        for blk in blocks[:-1]:
            x = blk(x)
            feats_list.append(x[:, 0])
        n = x.shape[0] - 1
        g = int(round(n ** 0.5))
        cls_token, patches = x[0, 0], x[1:, 0]
        k = min(30, n - 1)
        dist = torch.norm(patches[:, None] - patches[None, :], dim=2, p=2) ** 2
        knn_d, knn_i = torch.topk(dist, k=k + 1, largest=False)
        knn_d, knn_i = knn_d[:, 1:], knn_i[:, 1:]
        lrd = k / torch.max(knn_d, knn_d[:, -1:].expand_as(knn_d)).mean(dim=1)
        lof = (lrd[knn_i] / lrd[:, None]).mean(dim=1)
        outliers = set(torch.where(lof > torch.quantile(lof, 0.95))[0].tolist())

        def replace(tokens):  # (n, D) patch tokens
            out = tokens.clone()
            for o in outliers:
                r, c = divmod(o, g)
                nbrs = [(r + dr) * g + (c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr or dc)
                        and 0 <= r + dr < g and 0 <= c + dc < g and (r + dr) * g + (c + dc) not in outliers]
                if nbrs:
                    out[o] = tokens[nbrs].sum(0) / len(nbrs)
            return out

        def cosines(t):
            t = t / t.norm(dim=1, keepdim=True)
            return t @ t.T

        def agg(t, corr):
            return (corr / (corr.sum(dim=-1, keepdim=True) + 1e-6)) @ t

        blk = blocks[-1]
        heads = blk.attn.num_heads
        dim = patches.shape[-1]
        hd = dim // heads
        mid = cosines(replace(feats_list[pre][1:]))

        def custom(t):
            q, kk, v = (u.contiguous().view(-1, heads, hd).transpose(0, 1)
                        for u in F.linear(blk.ln_1(t), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1))
            m = (mid - mid.mean()) * 3.0
            m[m < 0] = float("-inf")
            a = (torch.softmax(m.repeat(heads, 1, 1), dim=-1)
                 + torch.softmax(torch.bmm(kk, kk.transpose(1, 2)) * hd ** -0.5, dim=-1)) / 2
            return blk.attn.out_proj(torch.bmm(a, v).transpose(0, 1).reshape(-1, dim))

        before = mid.clone()
        before[before < beta] = 0
        x = agg(replace(patches), before)
        x = custom(x) + res_cls * cls_token
        after = cosines(feats_list[post][1:])
        after[after < beta] = 0
        x = agg(x, after)
        re = sum(feats_list[start:end])
        x = x + agg(custom(re[1:]) + res_cls * re[0], after)
        feats = visual.ln_post(x) @ visual.proj
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return (feats @ model.text_features(prompts).T).T.reshape(len(prompts), g, g), outliers


def test_scclip_equals_the_reference_written_out(model, chelsea):
    want, outliers = scclip_reference(model, chelsea, PROMPTS)
    assert outliers  # the replacement is exercised
    kind, maps = compute_raw(model, chelsea, PROMPTS, ["scclip"], {"scclip_layers": "1,0,0-2"})["scclip"]
    assert kind == "resize_minmax"
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-5)
    auto, _ = scclip_reference(model, chelsea, PROMPTS, pre=1, post=1, start=1, end=2)  # auto on 3 blocks
    torch.testing.assert_close(compute_raw(model, chelsea, PROMPTS, ["scclip"])["scclip"][1], auto, rtol=1e-5,
                               atol=1e-5)
    result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "scclip",
                                 "--model", "tiny-vit-mh", "--scclip-layers", "5,0,0-2"])
    assert result.exit_code == 2 and "--scclip-layers 5,0,0-2" in result.stderr


def cliper_reference(model, image, prompts, background=("background",), scale=100.0, threshold=0.2,
                     copy_per_level=False, commit="0bfad0d"):
    """linsun449/cliper.code at 0bfad0d, `CLIPer.forward` with attn_type="fused-attn", fuse_feature=True, on the
    clip package's sequence-first blocks: the blocks before the last through nn.MultiheadAttention with their
    per-head weights summed, every level through the last block's `custom_attn` with the sum divided in place
    (so once more per level), ln_post and proj on every token, `classify` and the propagation."""
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    with torch.no_grad():
        x = stem_tokens(model, image)
        attn_maps = 0
        feats = torch.zeros([len(blocks)] + list(x.shape))
        for i, blk in enumerate(blocks[:-1]):
            ln_x = blk.ln_1(x)
            feats[i] = ln_x
            ln_x, attn_map = blk.attn(ln_x, ln_x, ln_x, need_weights=True, average_attn_weights=False)
            attn_maps += attn_map
            x = x + ln_x
            x = x + blk.mlp(blk.ln_2(x))
        last = blocks[-1]
        feats[-1] = x
        n, bsz, dim = x.shape
        heads = last.attn.num_heads
        hd = dim // heads
        for kth, level in enumerate(feats):
            y = last.ln_1(level)
            v = F.linear(y, last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)[2]
            v = v.contiguous().view(-1, bsz * heads, hd).transpose(0, 1)
            mask = attn_maps.clone() if copy_per_level else attn_maps
            mask /= torch.sum(mask, dim=-2, keepdim=True)
            mask /= torch.sum(mask, dim=-1, keepdim=True)
            mask = (mask + mask.transpose(-2, -1)) / 2
            mask -= mask.mean(-2, keepdim=True)
            mask = torch.clamp(mask, 0)
            mask /= torch.sum(mask, dim=-1, keepdim=True)
            weights = mask.flatten(0, 1)
            out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(-1, bsz, dim)
            feats[kth] = last.attn.out_proj(out)
        feats = visual.ln_post(feats.squeeze()) @ visual.proj
        texts = model.text_features(list(prompts) + list(background))
        fg = model.text_features(list(prompts))
        texts = torch.cat([texts, fg.mean(0, True)])
        feats = feats / feats.norm(dim=-1, keepdim=True)
        texts = texts / texts.norm(dim=-1, keepdim=True)
        seg = (scale * feats @ texts.t()).softmax(dim=-1)[:, 1:, :len(prompts)]
        seg_last = seg[-1]
        seg_last[seg_last < seg_last.amax(0, keepdim=True) * threshold] = 0
        if commit == "0bfad0d":
            seg = weights.mean(0)[1:, 1:] @ seg_last + seg[:-1].mean(0)
        else:  # 85fbe81, modified_clip/model.py `forward` (select_layer -1, no sliding window): the prompts' maps as
            # rows, multiplied by the attention from the right, plus the mean of every level (the last one zeroed
            # in place above, through the view)
            seg_last = seg_last.T @ weights.mean(0)[1:, 1:]
            seg = (seg_last + seg.transpose(-1, -2).mean(0)).T
    g = int(round((n - 1) ** 0.5))
    return seg.T.reshape(len(prompts), g, g)


@pytest.mark.parametrize("commit", ["85fbe81", "0bfad0d"])
def test_cliper_equals_the_reference_written_out(model, chelsea, commit):
    base = {"cliper_variant": commit}
    kind, maps = compute_raw(model, chelsea, PROMPTS, ["cliper"], base)["cliper"]
    assert kind == "resize_minmax"
    torch.testing.assert_close(maps, cliper_reference(model, chelsea, PROMPTS, commit=commit), rtol=1e-5, atol=1e-5)
    options = {**base, "cliper_background": "sky,wall", "cliper_scale": 40.0, "cliper_threshold": 0.5}
    _, other = compute_raw(model, chelsea, PROMPTS, ["cliper"], options)["cliper"]
    want = cliper_reference(model, chelsea, PROMPTS, ("sky", "wall"), 40.0, 0.5, commit=commit)
    torch.testing.assert_close(other, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, maps, atol=1e-3)
    # a background word equal to a prompt is left out (it would split the prompt's own probability)
    _, same = compute_raw(model, chelsea, PROMPTS, ["cliper"], {**base, "cliper_background": "background,grass"})[
        "cliper"]
    torch.testing.assert_close(same, maps)
    _, none = compute_raw(model, chelsea, PROMPTS, ["cliper"], {**base, "cliper_background": ""})["cliper"]
    torch.testing.assert_close(none, cliper_reference(model, chelsea, PROMPTS, (), commit=commit), rtol=1e-5,
                               atol=1e-5)


def test_cliper_follows_the_newest_commit_by_default(model, chelsea):
    """The two commits give other maps; the default is 85fbe81 (issue 30: camloc followed 0bfad0d only)."""
    _, default = compute_raw(model, chelsea, PROMPTS, ["cliper"])["cliper"]
    _, old = compute_raw(model, chelsea, PROMPTS, ["cliper"], {"cliper_variant": "0bfad0d"})["cliper"]
    torch.testing.assert_close(default, cliper_reference(model, chelsea, PROMPTS, commit="85fbe81"), rtol=1e-5,
                               atol=1e-5)
    assert not torch.allclose(default, old, atol=1e-3)


@pytest.mark.parametrize("commit", ["85fbe81", "0bfad0d"])
def test_cliper_keeps_the_references_in_place_rounds(model, chelsea, commit):
    """The reference divides the summed attention in place, once more per level: a copy per level (one round
    each) gives another map, so the written-out reference above does test the rounds."""
    _, maps = compute_raw(model, chelsea, PROMPTS, ["cliper"], {"cliper_variant": commit})["cliper"]
    want = cliper_reference(model, chelsea, PROMPTS, copy_per_level=True, commit=commit)
    assert not torch.allclose(maps, want, atol=1e-4)


def test_cliper_options_are_checked(chelsea):
    base = ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "cliper", "--model", "tiny-vit-mh"]
    result = runner.invoke(app, base + ["--cliper-threshold", "1.5"])
    assert result.exit_code == 2 and "--cliper-threshold must be in [0, 1]" in result.stderr
    result = runner.invoke(app, base + ["--cliper-scale", "0"])
    assert result.exit_code == 2 and "--cliper-scale must be in (0, 1000]" in result.stderr
    result = runner.invoke(app, base + ["--cliper-variant", "c05fa41"])
    assert result.exit_code == 2 and "--cliper-variant 'c05fa41' is not one of 85fbe81, 0bfad0d" in result.stderr
