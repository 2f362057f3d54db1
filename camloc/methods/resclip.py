"""ResCLIP (Yang et al., CVPR 2025, "ResCLIP: residual attention for training-free dense vision-language
inference"; yvhangyang/ResCLIP `clip/model.py` at 6b082d9, read only: that commit has no LICENSE file, an MIT one was added at 1f39a42), a plug-in on the dense family's
last-block variants (`--resclip-base`: NACLIP, the reference's default `resclip` strategy, SCLIP or
ClearCLIP), with its two parts (`--resclip-parts`):

- RCS, residual cross-correlation self-attention: the model's own attention probabilities
  softmax(q k^T / sqrt(d)) of the blocks `--resclip-rcs-layers` (the reference's 6th to 9th, 1-based, of
  ViT-B's 12; `auto` scales that range to the model's depth), averaged per head, R; the last block's attention A becomes tau ((1 - lambda) A + lambda R)
  (`--resclip-rcs-weights` tau,lambda: the demo's 2.0,0.6).
- SFR, semantic feedback refinement: a first pass of the last block (with RCS) scores every patch
  against the image's prompts; those logits, bilinearly resized to the input, refined by PAMR
  (10 steps, dilations 8 and 16, as the reference hard-codes) and softmaxed over the prompts at scale
  40, give each pixel's prompt (the first prompt where the top probability is below
  `--resclip-sfr-threshold`, the reference's class 0; its demo's 0.1), each patch the most frequent
  one (`torch.mode`). Patches i, j of the same prompt get 1, others 0; a same-prompt pair whose
  straight path (the reference's sampling: max-distance + 1 points from i towards j, the first
  distance(i, j) + 1 of them checked) leaves the prompt is decayed by exp(-distance / max distance);
  each row is smoothed by a 1-D Gaussian over the flattened patch index (std `--naclip-std`, 5, size
  6 std + 1 made odd), clamped >= 0 and normalised to sum 1; prefix tokens' rows and columns are 0. S,
  divided by its maximum and cast to float16 (as the reference does, whose lambda S is then a float16
  product), enters the attention logits L of the final pass before their softmax:
  L <- tau ((1 - lambda) L + lambda S)
  (`--resclip-sfr-weights`: the demo's 2.1,0.6), for SCLIP both the q-q and the k-k logits.

The base keeps its own form: NACLIP's neighbourhood term added after the SFR mix, no residual or FFN
for NACLIP and ClearCLIP, SCLIP's residual and FFN kept. The prompts are the image's (SFR's
argmax runs over them, so maps depend on the image's other prompts: `prompt_coupled`); the reference
averages 80 templates per class and segments with sliding windows. Like the other dense methods,
the patch tokens' cosines with the prompts are min-max normalised (`resize_minmax`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from camloc.cams.context import CamContext
from camloc.methods.dense import NACLIP_STD, last_block_variant
from camloc.cams.options import between, method_option, one_of
from camloc.cams.registry import register_method
from camloc.errors import OptionError

BASES = ("naclip", "sclip", "clearclip")
SFR_LOGIT_SCALE = 40.0  # the segmentor's logit_scale for the first pass's softmax
SFR_PAMR_STEPS, SFR_PAMR_DILATIONS = 10, (8, 16)  # create_logit_temp's PAMR(10, dilations=(8, 16))


def _parts(value: str) -> str:
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    if parts == ["none"]:
        return "none"
    unknown = [p for p in parts if p not in ("rcs", "sfr")]
    if unknown or not parts:
        raise OptionError(f"--resclip-parts {value!r}: a comma list of rcs and sfr, or none")
    return ",".join(p for p in ("rcs", "sfr") if p in parts)


def _pair(flag: str):
    def check(value: str) -> str:
        try:
            tau, lam = (float(v) for v in str(value).split(","))
        except ValueError:
            raise OptionError(f"{flag} {value!r} must be two numbers tau,lambda (e.g. 2.0,0.6)") from None
        if not (tau > 0 and 0 <= lam <= 1):
            raise OptionError(f"{flag} {value!r}: tau must be positive and lambda in [0, 1]")
        return f"{tau:g},{lam:g}"
    return check


def _layers(value: str) -> str:
    if str(value) == "auto":
        return "auto"
    try:
        first, last = (int(v) for v in str(value).split("-")) if "-" in str(value) else (int(value),) * 2
    except ValueError:
        raise OptionError(f"--resclip-rcs-layers {value!r} must be a block number or a range like 6-9") from None
    if not 1 <= first <= last:
        raise OptionError(f"--resclip-rcs-layers {value!r}: blocks are numbered from 1, first <= last")
    return f"{first}-{last}"


BASE = method_option("resclip_base", str, "naclip", "ResCLIP: the last-block attention it refines, naclip (the "
                     "reference's default), sclip or clearclip.", one_of("--resclip-base", BASES))
PARTS = method_option("resclip_parts", str, "rcs,sfr", "ResCLIP: its parts, a comma list of rcs (cross-correlation "
                      "of earlier blocks) and sfr (semantic feedback), or none (the base alone).", _parts)
RCS_LAYERS = method_option("resclip_rcs_layers", str, "auto", "ResCLIP RCS: the blocks (1-based, a range like 6-9) "
                           "whose attention is averaged; auto = the reference's 6-9 of 12 blocks, scaled to the "
                           "model's depth (blocks floor(5 d / 12) + 1 to floor(9 d / 12)).", _layers)
RCS_WEIGHTS = method_option("resclip_rcs_weights", str, "2,0.6", "ResCLIP RCS: tau,lambda of the mix (the "
                            "demo's 2.0,0.6).", _pair("--resclip-rcs-weights"))
SFR_WEIGHTS = method_option("resclip_sfr_weights", str, "2.1,0.6", "ResCLIP SFR: tau,lambda of the mix (the "
                            "demo's 2.1,0.6).", _pair("--resclip-sfr-weights"))
SFR_THRESHOLD = method_option("resclip_sfr_threshold", float, 0.1, "ResCLIP SFR: pixels whose top prompt "
                              "probability is below this count as the first prompt (the demo's temp_thd 0.1).",
                              between("--resclip-sfr-threshold", 0, 1))


def _weights(text: str) -> tuple[float, float]:
    tau, lam = (float(v) for v in text.split(","))
    return tau, lam


def rcs_attention(ctx: CamContext, layers: str) -> torch.Tensor:
    """R: the mean over the chosen blocks of the model's own attention probabilities, (1, heads, N, N)."""
    layers = _layers(layers)
    if layers == "auto":
        first, last = 5 * ctx.depth // 12 + 1, 9 * ctx.depth // 12
        first, last = min(first, max(1, last)), max(1, last)
    else:
        first, last = (int(v) for v in layers.split("-"))
    if last >= ctx.depth:
        raise OptionError(f"--resclip-rcs-layers {layers}: {ctx.model.name} has {ctx.depth} blocks, and the RCS "
                          f"blocks must come before the last (1..{ctx.depth - 1})")
    _, inputs = ctx.block_inputs(first - 1)
    total = 0
    for index, x in zip(range(first - 1, last), inputs):
        access = ctx.block_access(index)
        q, k, _ = access.qkv(access.ln_1(x))
        total = total + torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    return total / (last - first + 1)


def _mix(tensor: torch.Tensor, other: torch.Tensor | None, weights: tuple[float, float]) -> torch.Tensor:
    if other is None:
        return tensor
    tau, lam = weights
    return tau * ((1 - lam) * tensor + (lam * other).to(tensor.dtype))  # S: lambda * S in float16, as the reference


def last_block(ctx: CamContext, base: str, rcs: torch.Tensor | None, sfr: torch.Tensor | None) -> torch.Tensor:
    """The base's last block (`last_block_variant`) with SFR (S) mixed into its logits and RCS (R) into its
    attention: the patch similarity grid (P, g, g)."""
    rcs_w = _weights(ctx.options.get("resclip_rcs_weights", RCS_WEIGHTS.default))
    sfr_w = _weights(ctx.options.get("resclip_sfr_weights", SFR_WEIGHTS.default))
    return last_block_variant(ctx, base, logits_hook=lambda t: _mix(t, sfr, sfr_w),
                              attention_hook=lambda a: _mix(a, rcs, rcs_w))


def patch_labels(ctx: CamContext, similarity: torch.Tensor, threshold: float) -> torch.Tensor:
    """The first pass's prompt per patch (g, g): the logits at input size, PAMR, softmax at scale 40, the
    argmax (0 below `threshold`), the most frequent prompt in each patch."""
    from camloc.segment.pamr import pamr

    n = ctx.model.input_size
    grid = similarity.shape[-1]
    logits = F.interpolate(similarity[None].float(), size=(n, n), mode="bilinear", align_corners=False)
    logits = pamr(ctx.input.float(), logits, SFR_PAMR_STEPS, SFR_PAMR_DILATIONS)[0]
    probs = torch.softmax(logits * SFR_LOGIT_SCALE, dim=0)
    top, labels = probs.max(dim=0)
    labels = labels.masked_fill(top < threshold, 0)
    patch = n // grid
    cells = labels[:grid * patch, :grid * patch].reshape(grid, patch, grid, patch).permute(0, 2, 1, 3)
    return torch.mode(cells.reshape(grid, grid, patch * patch), dim=-1).values


def sfr_attention(labels: torch.Tensor, std: float, prefix: int) -> torch.Tensor:
    """S (prefix + g², prefix + g²) from the patches' prompts (g, g): see the module docstring."""
    grid = labels.shape[0]
    total = grid * grid
    flat = labels.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    coords = torch.stack([torch.arange(total) // grid, torch.arange(total) % grid], dim=1).to(labels.device)
    start = coords[:, None, :].expand(total, total, 2).reshape(-1, 2)
    end = coords[None, :, :].expand(total, total, 2).reshape(-1, 2)
    steps = (end - start).abs().max(dim=1).values
    longest = int(steps.max())
    if longest > 0:
        t = torch.linspace(0, 1, longest + 1, device=labels.device)[None, :, None]
        along = (start[:, None].float() * (1 - t) + end[:, None].float() * t).round().long()
        checked = torch.arange(longest + 1, device=labels.device)[None] <= steps[:, None]
        on_path = labels[along[..., 0], along[..., 1]] == labels[start[:, 0], start[:, 1]][:, None]
        connected = (on_path | ~checked).all(dim=1).reshape(total, total)
        decay = torch.exp(-steps.float() / longest).reshape(total, total)
        same = torch.where(connected, same, same * decay)
    size = min(total, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=labels.device) - size // 2
    kernel = torch.exp(-(x.float() ** 2) / (2 * std ** 2))
    kernel = kernel / kernel.sum()
    smoothed = F.relu(F.conv1d(same[:, None], kernel.view(1, 1, -1), padding=size // 2)[:, 0])
    smoothed = smoothed / (smoothed.sum(dim=1, keepdim=True) + 1e-8)
    out = torch.zeros(prefix + total, prefix + total, device=labels.device)
    out[prefix:, prefix:] = smoothed
    return out


@register_method("resclip", segments=True, shares_forward=True, block_inputs_only=True, prompt_coupled=True,
                 families=frozenset({"vit", "vit-avg", "timm-vit"}), postprocess="resize_minmax",
                 params=("resclip_base", "resclip_parts", "resclip_rcs_layers", "resclip_rcs_weights",
                         "resclip_sfr_weights", "resclip_sfr_threshold", "naclip_std", "cls_lambda"),
                 description="ResCLIP (Yang et al. 2025): RCS (earlier blocks' attention) and SFR (semantic feedback) "
                             "on NACLIP/SCLIP/ClearCLIP's last block (--resclip-base, --resclip-parts); one forward "
                             "and a second last-block pass.")
def resclip(ctx: CamContext) -> torch.Tensor:
    base = ctx.options.get("resclip_base", BASE.default)
    parts = ctx.options.get("resclip_parts", PARTS.default).split(",")
    with torch.no_grad():
        rcs = rcs_attention(ctx, ctx.options.get("resclip_rcs_layers", RCS_LAYERS.default)) if "rcs" in parts else None
        sfr = None
        if "sfr" in parts:
            first = last_block(ctx, base, rcs, None)
            labels = patch_labels(ctx, first, float(ctx.options.get("resclip_sfr_threshold", SFR_THRESHOLD.default)))
            std = float(ctx.options.get("naclip_std", NACLIP_STD.default))
            sfr = sfr_attention(labels, std, ctx.model.family.prefix)
            sfr = (sfr / sfr.max()).half()[None, None]  # the reference's normalisation and float16 cast
        return last_block(ctx, base, rcs, sfr)
