"""AttnLRP (Achtibat et al., ICML 2024, "AttnLRP: attention-aware layer-wise relevance propagation for
transformers") on CLIP's image towers, in the Gradient x Input form of its `lxt` package (rachtibat/
LRP-eXplains-Transformers, `lxt/efficient/rules.py` and `patches.py` at 68a8393, BSD-3-Clause-Clear; `lxt` has
no CLIP support, so the rules are written out here, none of its code copied).

For each prompt p, relevance starts at the model's score s_p = exp(logit_scale) (f / |f|) . t_p + logit_bias
and is propagated to the input pixels by one backward through the model's own forward with these rules:
- LayerNorm (every one, q/k norms and sub-norms included): the identity rule on the division, i.e. the
  standard deviation taken as a constant (lxt's `layer_norm_forward`); the image embedding's L2 norm the same;
- element-wise activations (GELU, QuickGELU, SiLU): the identity rule, relevance passed through as
  f(x) / x times the incoming gradient (`identity_rule_implicit`);
- gated MLPs (timm's SwiGLU, GluMlp): the identity rule on the activation and the uniform rule on the
  product, half the relevance to each factor (`gated_mlp_forward`);
- attention, `--lrp-attention attnlrp` (default): the softmax by its own gradient (AttnLRP's softmax rule in
  this form) and the uniform rule on both matrix products, so the gradients at q and k are divided by 4 and at
  v by 2 (`wrap_attention_forward`); `cp`: CP-LRP (Ali et al. 2022), no relevance through q and k, the
  attention probabilities constant (`cp_multi_head_attention_forward`, lxt's rule set for ViTs);
- an attention-pool head (SigLIP): the query and keys constant, relevance through the values only, as lxt's
  SigLIP2 head (which also halves the relevance after the pool: a constant factor on every map, left out);
- linear layers and the patch convolution: LRP-0 (plain Gradient x Input) by default; `--lrp-gamma-linear` and
  `--lrp-gamma-conv` give them zennit's generalised Gamma rule, as lxt's ViT example does (`LayerMapComposite`
  of `Gamma` on Conv2d and Linear through `monkey_patch_zennit`): on the linear modules the tower calls outside
  attention (MLPs, heads; the patch convolution), not on the attention's projections, which lxt's recipe leaves
  at LRP-0 (torch computes nn.MultiheadAttention's as functions, where zennit's module hooks never fire).
The map is the relevance at the model's normalised input, summed over the colour channels (lxt's
`(input * input.grad).sum(1)`), at input size; post-processing keeps the positive relevance (relu, min-max).
The forward with the rules is checked to give the model's own embedding; a tower with a module camloc has
no rule for is refused in one line. `cp` equals lxt 2.1's own run on the clip package's and open_clip's tiny ViTs
(tests/golden-lxt).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from camloc.cams.context import CamContext
from camloc.methods.hila import latent_pool_attention
from camloc.cams.options import between, method_option, one_of
from camloc.cams.registry import register_method
from camloc.errors import ModelError
from camloc.models.families import BlockAccess

RULES = ("attnlrp", "cp")
LRP_ATTENTION = method_option("lrp_attention", str, "attnlrp", "AttnLRP: the rule inside attention: attnlrp (the "
                              "softmax's own gradient, the uniform rule on q k^T and A v) or cp (CP-LRP: the attention "
                              "probabilities constant, lxt's rule set for ViTs).", one_of("--lrp-attention", RULES))

GAMMA_LINEAR = method_option("lrp_gamma_linear", float, 0.0, "AttnLRP: the Gamma rule's gamma on the linear layers "
                             "outside attention (MLPs, heads; 0 = LRP-0; lxt's ViT example tries 0-1).",
                             between("--lrp-gamma-linear", 0, 1000))
GAMMA_CONV = method_option("lrp_gamma_conv", float, 0.0, "AttnLRP: the Gamma rule's gamma on the patch convolution "
                           "(0 = LRP-0; lxt's ViT example tries 0.1-100).", between("--lrp-gamma-conv", 0, 1000))

ACTIVATIONS = frozenset({"GELU", "QuickGELU", "SiLU", "GELUTanh", "ReLU"})
PASS_THROUGH = frozenset({"Identity", "Dropout", "DropPath", "PatchDropout", "LayerScale", "RotaryEmbeddingCat",
                          "RotaryEmbedding", "Sequential"})
"""Leaf modules that are linear in their input (or not on the token path: the rotary tables), kept as they are."""


class _IdentityRule(Function):
    """y = f(x); the backward passes g * f(x) / x (the identity rule in Gradient x Input form)."""

    @staticmethod
    def forward(ctx, x, fn):
        y = fn(x)
        xf = x.float()  # in fp32: 1e-10 is 0 in half precision
        ctx.save_for_backward(y.float() / torch.where(xf.abs() < 1e-10, torch.full_like(xf, 1e-10), xf))
        return y

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return (grad.float() * ratio).to(grad.dtype), None


class _Divide(Function):
    """The identity forward; the backward divides the gradient by `factor` (the uniform rule)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.factor, None


def divide(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _Divide.apply(x, factor)


def identity_rule(fn, x: torch.Tensor) -> torch.Tensor:
    return _IdentityRule.apply(x, fn)


def _layer_norm(module: nn.LayerNorm):
    if len(module.normalized_shape) != 1:
        raise ModelError(f"AttnLRP: {type(module).__name__} over {tuple(module.normalized_shape)} is not supported")

    def forward(x):
        dtype = x.dtype
        x = x.float()
        mean = x.mean(dim=-1, keepdim=True)
        std = ((x - mean) ** 2).mean(dim=-1, keepdim=True).add(module.eps).sqrt()
        y = (x - mean) / std.detach()
        if module.weight is not None:
            y = y * module.weight.float()
        if module.bias is not None:
            y = y + module.bias.float()
        return y.to(dtype)

    return forward


def _stabilised(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """x moved away from 0 by epsilon with its sign (+ for 0), for a safe division."""
    return x + ((x == 0).to(x) + x.sign()) * epsilon


def _affine(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


class _GammaRule(Function):
    """y = the module's own forward; the backward gives the generalised Gamma rule's relevance (zennit 0.5.1's
    `rules.Gamma`: positive and negative inputs and outputs apart, W + gamma W+ or W + gamma W-, the biases of the
    input-sign-matching terms only, stabiliser 1e-6) in Gradient x Input form: relevance y * g in, relevance / x
    out (lxt's `monkey_patch_zennit`)."""

    @staticmethod
    def forward(ctx, x, module, gamma):
        y = _affine(module, x, module.weight, module.bias)
        ctx.module, ctx.gamma = module, gamma
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        module, gamma = ctx.module, ctx.gamma
        relevance_out = grad * y

        def lift(p, low=None, high=None):
            return None if p is None else p + gamma * p.clamp(min=low, max=high)

        w_up, w_down = lift(module.weight, low=0.0), lift(module.weight, high=0.0)
        terms = [(x.clamp(min=0), w_up, lift(module.bias, low=0.0)), (x.clamp(max=0), w_down, None),
                 (x.clamp(min=0), w_down, lift(module.bias, high=0.0)), (x.clamp(max=0), w_up, None)]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(True) for t, _, _ in terms]
            outs = [_affine(module, i, w.detach(), None if b is None else b.detach())
                    for i, (_, w, b) in zip(inputs, terms)]
            up = (y > 0).to(y) * relevance_out / _stabilised(outs[0] + outs[1], 1e-6)
            down = (y < 0).to(y) * relevance_out / _stabilised(outs[2] + outs[3], 1e-6)
            grads = torch.autograd.grad(outs, inputs, [up.detach(), up.detach(), down.detach(), down.detach()])
        relevance_in = sum(i.detach() * g for i, g in zip(inputs, grads))
        return relevance_in / _stabilised(x, 1e-10), None, None


def _gamma(module: nn.Module, gamma: float):
    def forward(x):
        return _GammaRule.apply(x, module, gamma)

    return forward


def _own(module: nn.Module):
    """The module's class forward (not a patch on the instance)."""
    return lambda t: type(module).forward(module, t)


def _activation(module: nn.Module):
    def forward(x):
        return identity_rule(_own(module), x)

    return forward


def _swiglu(module: nn.Module):
    def forward(x):
        gated = divide(identity_rule(_own(module.act), module.fc1_g(x)) * module.fc1_x(x), 2)
        return module.drop2(module.fc2(module.norm(module.drop1(gated))))

    return forward


def _glu_mlp(module: nn.Module):
    def forward(x):
        x1, x2 = module.fc1(x).chunk(2, dim=module.chunk_dim)
        act = _own(module.act)
        gated = x1 * identity_rule(act, x2) if module.gate_last else identity_rule(act, x1) * x2
        return module.drop2(module.fc2(module.norm(module.drop1(divide(gated, 2)))))

    return forward


def rule_attention(access: BlockAccess, y: torch.Tensor, rule: str) -> torch.Tensor:
    """The block's attention on its ln_1-ed tokens `y` (B, N, D) with `rule`'s relevance flow (`BlockAccess`:
    q/k norms and rotary embeddings as the model applies them)."""
    q, k, v = access.qkv(y)
    if rule == "cp":
        q, k = q.detach(), k.detach()
    else:
        q, k, v = divide(q, 4), divide(k, 4), divide(v, 2)
    attention = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    return access.merge(attention @ v)


def _mha(attn: nn.MultiheadAttention, access: BlockAccess, rule: str):
    def forward(query, key=None, value=None, need_weights=False, attn_mask=None, **kwargs):
        if attn_mask is not None or kwargs.get("key_padding_mask") is not None:
            raise ModelError("AttnLRP: masked image-tower attention is not supported")
        y = query if attn.batch_first else query.transpose(0, 1)
        out = rule_attention(access, y, rule)
        return (out if attn.batch_first else out.transpose(0, 1)), None

    return forward


def _timm_attention(access: BlockAccess, rule: str):
    def forward(x, rope=None, attn_mask=None, **kwargs):
        if attn_mask is not None:
            raise ModelError("AttnLRP: masked image-tower attention is not supported")
        return rule_attention(access, x, rule)

    return forward


def _attention_pool(pool: nn.Module):
    """timm's AttentionPoolLatent with its query and keys constant (lxt's SigLIP2 head)."""

    def forward(x, attn_mask=None):
        if attn_mask is not None:
            raise ModelError("AttnLRP: attention-pool masks are not supported")
        batch, n, dim = x.shape
        _, _, _, probs, _ = latent_pool_attention(pool, x.detach())
        tokens = x + pool.pos_embed.unsqueeze(0).to(x.dtype) if pool.pos_embed is not None else x
        v = pool.kv(tokens).reshape(batch, n, 2, pool.num_heads, pool.head_dim)[:, :, 1].transpose(1, 2)
        out = (probs.detach() @ v).transpose(1, 2).reshape(batch, pool.latent_len, dim)
        out = pool.proj_drop(pool.proj(out))
        if pool.mlp is not None:
            out = out + pool.mlp(pool.norm(out))
        return out[:, 0] if pool.pool == "token" else (out.mean(1) if pool.pool == "avg" else out)

    return forward


def _attends(name: str) -> bool:
    """An attention or pooling module by its class name (the blocks that hold one excepted)."""
    return ("Attention" in name or "Pool" in name) and not name.endswith("Block")


@contextlib.contextmanager
def lrp_rules(visual: nn.Module, accesses: list[BlockAccess], rule: str, gamma_linear: float = 0.0,
              gamma_conv: float = 0.0):
    """While active, the image tower's modules run with AttnLRP's rules (their forward values unchanged).
    Every module of the tower must have a rule or be linear; otherwise one ModelError line."""
    attentions = {id(a.block.attn): a for a in accesses}
    patches: list[tuple[nn.Module, object]] = []
    inside: set[int] = set()  # modules computed inside a replaced forward, not called on their own
    for module in visual.modules():
        name = type(module).__name__
        if id(module) in attentions:
            access = attentions[id(module)]
            forward = _mha(module, access, rule) if isinstance(module, nn.MultiheadAttention) \
                else _timm_attention(access, rule)
            inside.update(id(m) for m in module.modules() if not isinstance(m, nn.LayerNorm))
        elif name == "AttentionPoolLatent":
            forward = _attention_pool(module)
            inside.update(id(m) for m in (module.q, module.kv, module.q_norm, module.k_norm, module.proj))
        elif name == "SwiGLU":
            forward = _swiglu(module)
            inside.add(id(module.act))
        elif name == "GluMlp":
            forward = _glu_mlp(module)
            inside.add(id(module.act))
        elif isinstance(module, nn.LayerNorm):
            forward = _layer_norm(module)
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and id(module) not in inside \
                and (gamma_conv if isinstance(module, nn.Conv2d) else gamma_linear):
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                raise ModelError(f"AttnLRP's Gamma rule: a {module.padding_mode}-padded convolution is not supported")
            forward = _gamma(module, gamma_conv if isinstance(module, nn.Conv2d) else gamma_linear)
        elif name in ACTIVATIONS and not list(module.children()):
            forward = _activation(module)
        else:
            continue
        patches.append((module, forward))
    covered = inside | {id(m) for m, _ in patches}
    unknown = sorted({type(m).__name__ for m in visual.modules()
                      if not list(m.children()) and id(m) not in covered
                      and not isinstance(m, (nn.Linear, nn.Conv2d)) and type(m).__name__ not in PASS_THROUGH})
    pending = {type(m).__name__ for m in visual.modules() if _attends(type(m).__name__) and id(m) not in covered}
    if unknown or pending:
        raise ModelError(f"AttnLRP has no rule for the image tower's {', '.join(sorted(set(unknown) | pending))} "
                         "modules; it is not available for this model")
    saved = [(m, m.__dict__.get("forward")) for m, _ in patches]
    try:
        for module, forward in patches:
            module.forward = forward
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


def relevance(ctx: CamContext, rule: str) -> torch.Tensor:
    """(P, H, W) relevance at the model's input for each prompt's score, from one forward of P copies of the
    image with the rules and one backward."""
    model = ctx.model
    accesses = [ctx.block_access(i) for i in range(ctx.depth)]
    _, _, own = ctx.block_inputs(ctx.depth - 1, embedding=True)
    x = ctx.input.expand(len(ctx.prompts), -1, -1, -1).clone().requires_grad_(True)
    gammas = (float(ctx.options.get("lrp_gamma_linear", GAMMA_LINEAR.default)),
              float(ctx.options.get("lrp_gamma_conv", GAMMA_CONV.default)))
    with lrp_rules(model.visual, accesses, rule, *gammas), torch.enable_grad():
        features = model.visual(x).float()
        tolerance = (1e-4 if x.dtype == torch.float32 else 1e-2) * (float(own.float().abs().max()) or 1.0)
        if not float((features.detach() - own.float()).abs().max()) <= tolerance:
            raise ModelError(f"AttnLRP: {model.name}'s forward with the rules does not give its own embedding; "
                             "it is not available for this model")
        unit = features / features.norm(dim=-1, keepdim=True).detach()
        scores = model.logit_scale * (unit * ctx.text_features).sum(dim=-1) + model.logit_bias
        (grad,) = torch.autograd.grad(scores.sum(), x)
    return (x.detach().float() * grad.float()).sum(dim=1)


@register_method("attnlrp", families=frozenset({"vit", "vit-avg", "timm-vit"}), uses_gradients=True,
                 params=("lrp_attention", "lrp_gamma_linear", "lrp_gamma_conv"),
                 description="AttnLRP (Achtibat et al. 2024): layer-wise relevance of each prompt's score at the input "
                             "pixels (lxt's rules: LayerNorm and activations identity, uniform rule on products, "
                             "--lrp-attention attnlrp or cp); one forward of P copies and one backward.")
def attnlrp(ctx: CamContext) -> torch.Tensor:
    return relevance(ctx, str(ctx.options.get("lrp_attention", LRP_ATTENTION.default)))
