"""The one-forward dense family: methods that change or add an attention path in the last block(s)
of a ViT, project every patch token into the joint space and score it against the prompts, so one
image forward gives every prompt's map (no gradients, no masked forwards).

- `maskclip` (Zhou et al., ECCV 2022, "Extract free dense labels from CLIP"; the official MaskCLIP
  backbone path, as clip-cam's dense ViT computes it): in the last block the attention output is
  replaced by the value path, v = out_proj(value(ln_1(x))), then the block's residual and FFN,
  ln_post and proj on every token; map = cosine(patch token, prompt).
- `gem` (Bousselham et al., CVPR 2024, "Grounding everything: emerging localization properties in
  vision-language transformers", as gem-torch 1.0.1 computes it): a parallel path through the last
  `--gem-blocks` blocks (gem-torch's `depth` = blocks + 1), fed by the original path's ln_1: per head
  and for each of v, k, q, self-self attention with an adaptive inverse temperature (the mean token
  norm of ln_1(x) / sqrt(head dim)), `--gem-iterations` normalised refinement steps, the three
  outputs averaged, out_proj added to the path's residual (no FFN, no LayerNorm); ln_post and proj;
  map = cosine(patch token, prompt).

- `clearclip` (Lan et al., ECCV 2024, "ClearCLIP: decomposing CLIP representations for dense
  vision-language inference", mc-lan/ClearCLIP's `custom_attn(model_type="ClearCLIP")` with its default
  `ignore_residual=True`): the last block is replaced by its attention alone, with query-query logits
  (q q^T / sqrt(d)), no residual and no FFN; ln_post and proj; map = cosine(patch token, prompt).
- `sclip` (Wang et al., ECCV 2024, "SCLIP: rethinking self-attention for dense vision-language
  inference", wangf3014/SCLIP `encode_image(return_all=True, csa=True)`): in the last block the
  attention probabilities are softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d)) (correlative
  self-attention); the block keeps its residual and FFN.
- `cliptrase` (Shao et al., ECCV 2024, "Explore the potential of CLIP for training-free open vocabulary semantic
  segmentation"; leaves162/CLIPtrase, MIT (LICENSE as of 8815df1), `clip_utils/model.py` and `attn2.py` at 8fb4d74): the last block's
  attention is softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d)) + softmax(v v^T / sqrt(d)) (its
  `self_qk_weight` path), the block's residual and FFN kept. The reference then clusters the patches
  (DBSCAN on the second-to-last block's q/k/v self-similarity minus the class row) and gives each cluster its
  majority predicted class: a segmentation step over the argmax, which has no per-prompt map and is not done.
- `naclip` (Hajimiri et al., WACV 2025, "Pay attention to your neighbours: training-free open-vocabulary
  semantic segmentation", sinahmr/NACLIP's defaults arch="reduced", attn_strategy="naclip",
  gaussian_std=5): the last block is replaced by its attention alone with key-key logits
  (k k^T / sqrt(d)) plus a Gaussian neighbourhood term exp(-|p - p'|^2 / (2 std^2)) between patch
  positions (0 for the class token's row and column), no residual, no FFN.
  Both references average ImageNet prompt templates and infer on sliding windows (NACLIP also refines
  with PAMR): camloc scores the prompts it is given on the whole image, like every other method.
- `clipsurgery` (Li et al., "CLIP Surgery for better explainability with enhancement in open-vocabulary
  tasks", 2023; xmed-lab/CLIP_Surgery `clip_surgery_model.py` and `clip.py`): over the last 6 blocks a
  second path accumulates value-value attention (softmax(v v^T / sqrt(d)), per head, on ln_1 of the
  ORIGINAL path's block input) with out_proj, from the first such block's input, without FFN; its patch
  tokens go through ln_post and proj. Feature surgery then removes what the contrast set shares
  (`--contrast`, recorded and in the cache key, never implied): `none` keeps the plain cosine;
  `empty` scores the patch token against t_p - e (e: the empty prompt's embedding; the reference's
  single-text demo); `labels` (the image's prompts) and `dataset` (every prompt of the dataset) use
  the reference's redundancy removal, with w_m = softmax_m(2 cos(f, t_m)) / its mean over the set
  (f: the model's own image embedding, the reference's original-path class token):
  sim(i, p) = w_p cos(x_i, t_p) - mean_m w_m cos(x_i, t_m). With a single prompt in the set that is
  zero everywhere, so `labels` refuses images with one prompt. The reference averages prompt templates;
  camloc scores the prompts it is given.

ResNet forms (OpenAI's layout, both backends): `maskclip` scores c_proj(v_proj(x)) at every layer4
position (MaskCLIP's MaskClipHead without attention pooling); `clipsurgery` runs the reference's
attention pool with q = k = v = v_proj (see `rn_surgery_tokens`). The other variants are ViT-only.

The block access (`camloc.models.families.BlockAccess` and `CamContext.block_inputs`, shared with CLIP-ES and
Grad-ECLIP: ln_1, the attention's q/k/v projection and out_proj, LayerScale where open_clip
has it, the FFN) reads OpenAI's sequence-first and open_clip's batch-first blocks alike: tokens are
handled batch-first here, and the captured inputs are transposed where the family is sequence-first.
Post-processing: the cosine grid is min-max normalised without ReLU or epsilon (the references do
not clamp), resized to the image, min-max again (`resize_minmax`, as GroupCAM).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from camloc.cams.context import CamContext
from camloc.cams.options import at_least, between, method_option, one_of, positive
from camloc.cams.registry import register_method
from camloc.errors import OptionError
from camloc.models.families import BlockAccess, dense_tokens, encoder_pass  # noqa: F401  (BlockAccess: re-exported for tests)

CONTRASTS = ("none", "empty", "labels", "dataset")
GEM_BLOCKS = method_option("gem_blocks", int, 6, "GEM: last blocks on the self-self path (gem-torch's default depth "
                           "7 = 6 blocks).", at_least("--gem-blocks", 1))
GEM_ITERATIONS = method_option("gem_iterations", int, 1, "GEM: self-self refinement iterations (the reference's 1).",
                               at_least("--gem-iterations", 0))
NACLIP_STD = method_option("naclip_std", float, 5.0, "NACLIP: standard deviation of the Gaussian neighbourhood, in "
                           "patches (the reference's 5).", positive("--naclip-std"))
CONTRAST = method_option("contrast", str, "empty", "CLIP Surgery's redundant-feature removal: none, empty (subtract "
                         "the empty prompt's embedding: the reference's single-text demo), labels (the image's "
                         "prompts, >= 2 needed) or dataset (every prompt of the dataset; eval and threshold-search).",
                         one_of("--contrast", CONTRASTS))

CLS_LAMBDA = method_option("cls_lambda", float, 0.0, "MaskCLIP, SCLIP, ClearCLIP, NACLIP, CLIPtrase, ResCLIP, GEM: add this times the "
                           "cosine of the path's own class token with each prompt to every patch's (SegEarth-OV's "
                           "global-bias removal with a negative value, e.g. -0.3; 0 = off). A per-prompt constant: it "
                           "changes which prompt wins a pixel (--protocols ovseg, ResCLIP's feedback), not a "
                           "min-max normalised map.", between("--cls-lambda", -1, 1))

DENSE_FAMILIES = frozenset({"vit", "vit-avg", "timm-vit"})


def patch_similarity(ctx: CamContext, tokens: torch.Tensor, class_weighted: bool = False) -> torch.Tensor:
    """(1, N, D) tokens -> the rest of the tower per token (`dense_tokens`: ln_post and proj on OpenAI's
    layout) -> cosine of every patch token with every prompt (P, g, g), plus `--cls-lambda` times the
    path's own class token's (likyoo/SegEarth-OV `segearth_segmentor.py` at 1a8beee: `cls_token_lambda`)."""
    dense = dense_tokens(ctx.model.visual, tokens).float()[0]
    prefix = ctx.model.family.prefix
    similarity = F.normalize(dense[prefix:], dim=-1) @ ctx.text_features.T
    weight = float(ctx.options.get("cls_lambda", CLS_LAMBDA.default))
    if weight:  # SegEarth-OV: logits + lambda * cos(class token, prompt)
        if prefix < 1:
            raise OptionError(f"--cls-lambda needs a class token, and {ctx.model.name} has none")
        similarity = similarity + weight * (F.normalize(dense[0], dim=-1) @ ctx.text_features.T)[None]
    if class_weighted:  # CLIPtrase on VOC20: each prompt's patch logits times the class token's logit for it
        if prefix < 1:
            raise OptionError(f"--cliptrase-cls-weight needs a class token, and {ctx.model.name} has none")
        similarity = similarity * (F.normalize(dense[0], dim=-1) @ ctx.text_features.T)[None]
    return square_grid(similarity)


def similarity_attention(similarity: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """An attention from a patch similarity S: softmax over each row of (S - beta mean(S)) gamma with its
    negative entries -inf (ProxyCLIP's proxy attention; SC-CLIP's with beta 1, gamma 3)."""
    logits = (similarity - similarity.mean() * beta) * gamma
    if bool((logits < 0).all(dim=-1).any()):  # softmax over nothing: NaN rows, a constant map
        raise OptionError(f"beta {beta:g} masks every similarity of some patch (beta x the mean similarity "
                          f"{float(similarity.mean()):.3g} exceeds its largest): use a smaller --proxy-beta")
    return torch.softmax(logits.masked_fill(logits < 0, float("-inf")), dim=-1)


def square_grid(similarity: torch.Tensor) -> torch.Tensor:
    """(N patches, P) similarities on a square patch grid -> (P, g, g)."""
    grid = int(round(similarity.shape[0] ** 0.5))
    return similarity.T.reshape(similarity.shape[1], grid, grid)


@register_method("maskclip", segments=True, shares_forward=True, block_inputs_only=True, families=DENSE_FAMILIES | {"rn"}, postprocess="resize_minmax",
                 params=("cls_lambda",),
                 description="MaskCLIP (Zhou et al. 2022): value path in the last block (ResNet: of the attention "
                             "pool), patch tokens vs prompts; one forward.")
def maskclip(ctx: CamContext) -> torch.Tensor:
    if ctx.model.family.name == "rn":
        if float(ctx.options.get("cls_lambda", CLS_LAMBDA.default)):
            raise OptionError("--cls-lambda: MaskCLIP's ResNet form has no class token; drop the option")
        return square_grid(F.normalize(rn_value_tokens(ctx), dim=-1) @ ctx.text_features.T)
    _, inputs = ctx.block_inputs(ctx.depth - 1)
    access = ctx.block_access(-1)
    x = inputs[-1]
    with torch.no_grad():
        _, _, v = access.qkv(access.ln_1(x))
        v = x + access.ls_1(access.merge(v))
        v = v + access.ffn(v)
        return patch_similarity(ctx, v)


def rn_value_tokens(ctx: CamContext) -> torch.Tensor:
    """MaskCLIP's ResNet form (its MaskClipHead without attention pooling): every layer4 position through
    the attention pool's v_proj and c_proj (1 x 1 convolutions, no positional embedding): (h w, E)."""
    pool = ctx.model.visual.attnpool
    acts = ctx.activations  # (C, h, w), fp32
    tokens = acts.flatten(1).T.to(pool.v_proj.weight.dtype)
    with torch.no_grad():
        return pool.c_proj(pool.v_proj(tokens)).float()


def _self_self(s: torch.Tensor, values: torch.Tensor, tau: torch.Tensor, iterations: int) -> torch.Tensor:
    """GEM's self-self attention of each of the stacked projections `s` (3, B, heads, N, d) over `values`
    (B, heads, N, d): `iterations` normalised refinements, then the attention applied to the values."""
    for _ in range(iterations):
        s = F.normalize(s, dim=-1)
        s = torch.softmax(tau * s @ s.transpose(-2, -1), dim=-1) @ s
    s = F.normalize(s, dim=-1)
    return torch.softmax(tau * s @ s.transpose(-2, -1), dim=-1) @ values


@register_method("gem", segments=True, families=DENSE_FAMILIES, postprocess="resize_minmax", params=("gem_blocks", "gem_iterations", "cls_lambda"),
                 shares_forward=True, block_inputs_only=True,
                 description="GEM (Bousselham et al. 2024): self-self attention path over the last --gem-blocks "
                             "blocks; one forward.")
def gem(ctx: CamContext) -> torch.Tensor:
    """The path's q, k, v are the original path's. With the image's forward shared (another method reads it,
    or it has run), they are formed again from its block inputs; GEM alone on the image runs the tower only
    up to its first block (`CamContext.owns_forward`) and carries the original path itself through the other blocks,
    forming each block's q, k, v once for both paths, as gem-torch does (the same maps within float
    rounding: the tower's fused attention and camloc's recombination round differently)."""
    depth = ctx.depth
    n_blocks = int(ctx.options.get("gem_blocks", GEM_BLOCKS.default))
    iterations = int(ctx.options.get("gem_iterations", GEM_ITERATIONS.default))
    first = max(0, depth - n_blocks) if n_blocks > 0 else 0
    accesses = [ctx.block_access(index) for index in range(first, depth)]  # checks the reading once per model
    shared = not ctx.owns_forward("gem")
    if shared:
        inputs = ctx.block_inputs(first)[1]
    else:
        inputs = encoder_pass(ctx.model.visual, ctx.model.family, ctx.input, until=first)[2][-1:]
    with torch.no_grad():
        x = x_gem = inputs[0]
        for n, access in enumerate(accesses):
            x = inputs[n] if shared else x
            y = access.ln_1(x)
            q, k, v = access.qkv(y)
            tau = y.norm(dim=-1).mean() * q.shape[-1] ** -0.5  # multiplies the logits
            x_gem = x_gem + access.merge(_self_self(torch.stack((v, k, q)), v, tau, iterations).mean(dim=0))
            if not shared and n + 1 < len(accesses):  # the original path, carried on by hand
                x = x + access.ls_1(access.merge(F.scaled_dot_product_attention(q, k, v)))
                x = x + access.ffn(x)
        return patch_similarity(ctx, x_gem)


SELF_CORRELATION = {"sclip": ("q", "k"), "cliptrase": ("q", "k", "v"), "clearclip": ("q",), "naclip": ("k",)}
"""The last-block variants: the projections t whose softmax(t t^T / sqrt(d)) are summed into the attention."""
KEEPS_RESIDUAL = frozenset({"sclip", "cliptrase"})
"""SCLIP and CLIPtrase keep the block's residual and FFN; ClearCLIP and NACLIP replace the block by its attention."""


def last_block_variant(ctx: CamContext, base: str, logits_hook=None, attention_hook=None,
                       class_weighted: bool = False) -> torch.Tensor:
    """The last block with `base`'s attention (`SELF_CORRELATION`; NACLIP's Gaussian neighbourhood added to
    its logits): the patch-token similarity grid. `logits_hook` changes each logits matrix before its
    softmax (NACLIP: before the neighbourhood), `attention_hook` the summed attention (ResCLIP's SFR, RCS)."""
    _, inputs = ctx.block_inputs(ctx.depth - 1)
    access = ctx.block_access(-1)
    x = inputs[-1]
    with torch.no_grad():
        q, k, v = access.qkv(access.ln_1(x))
        scale = q.shape[-1] ** -0.5
        tensors = {"q": q, "k": k, "v": v}
        omega = 0
        if base == "naclip":
            prefix = ctx.model.family.prefix
            grid = int(round((q.shape[-2] - prefix) ** 0.5))
            std = float(ctx.options.get("naclip_std", NACLIP_STD.default))
            omega = neighbourhood(grid, std, prefix).to(q.dtype).to(q.device)
        attn = 0
        for part in SELF_CORRELATION[base]:
            logits = tensors[part] @ tensors[part].transpose(-2, -1) * scale
            logits = logits_hook(logits) if logits_hook else logits
            attn = attn + torch.softmax(logits + omega, dim=-1)
        attn = attention_hook(attn) if attention_hook else attn
        out = access.merge(attn @ v)
        if base in KEEPS_RESIDUAL:
            out = x + access.ls_1(out)
            out = out + access.ffn(out)
        return patch_similarity(ctx, out, class_weighted)


@register_method("sclip", segments=True, shares_forward=True, block_inputs_only=True, families=DENSE_FAMILIES, postprocess="resize_minmax",
                 params=("cls_lambda",),
                 description="SCLIP (Wang et al. 2024): correlative self-attention (q-q + k-k) in the last block, "
                             "residual and FFN kept; one forward.")
def sclip(ctx: CamContext) -> torch.Tensor:
    return last_block_variant(ctx, "sclip")


CLIPTRASE_CLS_WEIGHT = method_option("cliptrase_cls_weight", bool, False, "CLIPtrase: multiply each prompt's patch "
                                     "cosines by the class token's cosine with it (the reference's VOC20 setting).")


@register_method("cliptrase", segments=True, shares_forward=True, block_inputs_only=True, families=DENSE_FAMILIES, postprocess="resize_minmax",
                 params=("cls_lambda", "cliptrase_cls_weight"),
                 description="CLIPtrase (Shao et al. 2024): recalibrated self-correlation (q-q + k-k + v-v) in the last "
                             "block, residual and FFN kept; one forward (without the reference's DBSCAN cluster vote).")
def cliptrase(ctx: CamContext) -> torch.Tensor:
    return last_block_variant(ctx, "cliptrase",
                              class_weighted=bool(ctx.options.get("cliptrase_cls_weight", CLIPTRASE_CLS_WEIGHT.default)))


@register_method("clearclip", segments=True, shares_forward=True, block_inputs_only=True, families=DENSE_FAMILIES, postprocess="resize_minmax",
                 params=("cls_lambda",),
                 description="ClearCLIP (Lan et al. 2024): query-query attention, last block without residual "
                             "and FFN; one forward.")
def clearclip(ctx: CamContext) -> torch.Tensor:
    return last_block_variant(ctx, "clearclip")


def neighbourhood(grid: int, std: float, prefix: int = 1) -> torch.Tensor:
    """(N, N) Gaussian term between patch positions, exp(-|p - p'|^2 / (2 std^2)); 0 for prefix tokens."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()
    dist2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    out = torch.zeros(grid * grid + prefix, grid * grid + prefix, dtype=torch.float64)
    out[prefix:, prefix:] = torch.exp(-dist2 / (2 * std ** 2))
    return out


@register_method("naclip", segments=True, families=DENSE_FAMILIES, postprocess="resize_minmax", params=("naclip_std", "cls_lambda"),
                 shares_forward=True, block_inputs_only=True,
                 description="NACLIP (Hajimiri et al. 2025): key-key attention plus a Gaussian neighbourhood "
                             "(--naclip-std), last block without residual and FFN; one forward.")
def naclip(ctx: CamContext) -> torch.Tensor:
    return last_block_variant(ctx, "naclip")


SURGERY_BLOCKS = 6  # the reference's "for i in range(1, 7)": the last 6 blocks carry the v-v path


def rn_surgery_tokens(ctx: CamContext) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP Surgery's ResNet form (its AttentionPool2d, xmed-lab/CLIP_Surgery at 9f5be11): the layer4
    positions with their mean token first, plus the pool's positional embedding; q = k = v = v_proj of
    those tokens (the reference loads v_proj into all three), per head softmax(v v^T / sqrt(d)) v, c_proj.
    Returns the normalised position tokens (h w, E) and the normalised token 0 (E,), the reference's
    class token for the contrast weights. (The reference's normalised, 8x-temperature `resnet` branch is
    not selected by its own model code, so camloc does not use it either.)"""
    pool = ctx.model.visual.attnpool
    acts = ctx.activations
    tokens = acts.flatten(1).T
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens]) + pool.positional_embedding.float()
    with torch.no_grad():
        v = pool.v_proj(tokens.to(pool.v_proj.weight.dtype))
        n, dim = v.shape
        heads = pool.num_heads
        vh = v.reshape(n, heads, dim // heads).transpose(0, 1)  # (heads, N, d)
        attn = torch.softmax(vh @ vh.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1)
        out = pool.c_proj((attn @ vh).transpose(0, 1).reshape(n, dim)).float()
    out = F.normalize(out, dim=-1)
    return out[1:], out[0]


def surgery_tokens(ctx: CamContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The v-v path's patch tokens after ln_post and proj, L2-normalised (N patches, E), and the model's
    own normalised image embedding (E,), from one forward."""
    if ctx.model.family.name == "rn":
        return rn_surgery_tokens(ctx)
    depth = ctx.depth
    first = max(0, depth - SURGERY_BLOCKS)
    _, inputs, features = ctx.block_inputs(first, embedding=True)
    with torch.no_grad():
        path = inputs[0]
        for index, x in zip(range(first, depth), inputs):  # x: the original path's input of this block
            access = ctx.block_access(index)
            _, _, v = access.qkv(access.ln_1(x))
            attn = torch.softmax(v @ v.transpose(-2, -1) * v.shape[-1] ** -0.5, dim=-1)
            path = path + access.ls_1(access.merge(attn @ v))
        dense = dense_tokens(ctx.model.visual, path).float()[0, ctx.model.family.prefix:]
    return F.normalize(dense, dim=-1), F.normalize(features.float()[0], dim=-1)


def feature_surgery(patches: torch.Tensor, texts: torch.Tensor, image: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The reference's redundancy removal over a contrast set `texts` (M, E), for the set's `rows`:
    (N, len(rows)). `image`: the normalised image embedding (E,) that weighs the set."""
    prob = torch.softmax(2 * (texts @ image), dim=0)
    weights = prob / prob.mean()
    sims = (patches @ texts.T) * weights  # (N, M)
    return sims[:, rows] - sims.mean(dim=1, keepdim=True)


@register_method("clipsurgery", segments=True, families=DENSE_FAMILIES | {"rn"}, postprocess="resize_minmax", params=("contrast",),
                 shares_forward=True,
                 prompt_coupled=True,
                 description="CLIP Surgery (Li et al. 2023): v-v attention path over the last 6 blocks and feature "
                             "surgery against --contrast; one forward.")
def clipsurgery(ctx: CamContext) -> torch.Tensor:
    contrast = ctx.options.get("contrast", CONTRAST.default)
    patches, image = surgery_tokens(ctx)
    texts = ctx.text_features
    if contrast == "none":
        sim = patches @ texts.T
    elif contrast == "empty":
        sim = patches @ (texts - ctx.model.text_features([""])).T
    else:
        if contrast == "labels":
            pool = list(dict.fromkeys(ctx.prompts))
            if len(pool) < 2:
                raise OptionError(f"clipsurgery --contrast labels: this image has one prompt ({ctx.prompts[0]!r}), "
                                  "and feature surgery over a single prompt is zero everywhere; use --contrast "
                                  "empty, none or dataset")
        elif contrast == "dataset":
            pool = list(ctx.options.get("contrast_prompts") or [])
            if not pool:
                raise OptionError("clipsurgery --contrast dataset needs a dataset's prompts (camloc eval or "
                                  "threshold-search); for one image use --contrast labels with several --prompt, "
                                  "or empty")
            missing = [p for p in ctx.prompts if p not in pool]
            if missing:
                raise ValueError(f"prompts {missing} are not in the dataset's contrast set")
            if len(pool) < 2:
                raise OptionError("clipsurgery --contrast dataset: the dataset has one prompt, and feature surgery "
                                  "over a single prompt is zero everywhere; use --contrast empty or none")
        else:
            raise OptionError(f"--contrast {contrast!r} is not one of none, empty, labels, dataset")
        index = {p: i for i, p in enumerate(pool)}
        sim = feature_surgery(patches, ctx.model.text_features(pool), image, [index[p] for p in ctx.prompts])
    return square_grid(sim)
