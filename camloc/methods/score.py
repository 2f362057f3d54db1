"""The score family (docs/protocol.md §3): ScoreCAM, gScoreCAM (+ -abs) and GroupCAM.

Channel weights come from CLIP scores of masked copies of the image. Masked embeddings are shared
across prompts (one matrix product scores them all) and, where exact enough, across methods.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from camloc.cams.context import CamContext
from camloc.methods.gradient import weighted_sum
from camloc.cams.masked import REUSE_MIN_RANGE, encode_in_chunks
from camloc.cams.options import method_option, one_of
from camloc.cams.registry import default_topk, register_method
from camloc.errors import OptionError


def _topk(value) -> int | str:
    if value == "auto":
        return value
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise OptionError(f"--topk {value!r} must be a number of channels or auto") from None
    if k < 1:
        raise OptionError(f"--topk must be at least 1, got {k}")
    return k


TOPK = method_option("topk", str, "auto", "gScoreCAM: channels kept, or auto: 300 for OpenAI models (the paper), "
                     "ResNets and ConvNeXt, 100 for open_clip transformers (the gScoreCAM authors' advice for "
                     "768-channel ViTs); recorded as resolved. Capped at the channel count with a warning.", _topk)
GROUPING = method_option("grouping", str, "kmeans", "GroupCAM channel groups: kmeans (the original CLIP port) or "
                         "chunk (the GroupCAM paper).", one_of("--grouping", ("kmeans", "chunk")))
GROUPS = 32


@register_method("scorecam", shares_forward=True, masked_forwards=True)
def scorecam(ctx: CamContext) -> torch.Tensor:
    """ScoreCAM: w = softmax over all C of s_p(x * minmax(up(A_c))); M = sum_c w_c A_c."""
    channels = torch.arange(ctx.activations.shape[0], device=ctx.activations.device)
    scores = ctx.masked(None).scores(channels)  # (C, P)
    return weighted_sum(torch.softmax(scores.T, dim=1), ctx.activations)


_CAPPED: set[tuple[int, int]] = set()


def topk_channels(importance: torch.Tensor, k: int) -> torch.Tensor:
    """(P, C) importance -> (P, k) channel indices, largest first; k capped at C with a warning."""
    channels = importance.shape[1]
    if k > channels:
        if (k, channels) not in _CAPPED:  # once per process: a run caps every image the same way
            _CAPPED.add((k, channels))
            warnings.warn(f"--topk {k} exceeds the {channels} channels of the target layer; using k = {channels}",
                          stacklevel=2)
        k = channels
    if k < 1:
        raise ValueError(f"topk must be at least 1, got {k}")
    return importance.topk(k, dim=1).indices


def _gscorecam(ctx: CamContext, importance: torch.Tensor) -> torch.Tensor:
    """Top-k channels per prompt; their masked scores (eps 1e-6 masks); 0 for the other channels;
    softmax over ALL C; M = sum over all c of w_c A_c. The union of the prompts' top-k sets is
    embedded once; with ScoreCAM on the same image its embeddings are reused (see REUSE_MIN_RANGE)."""
    k = ctx.options.get("topk", TOPK.default)
    top = topk_channels(importance, default_topk(ctx.model) if k == "auto" else int(k))  # (P, k)
    store = ctx.masked(1e-6)
    if "scorecam" in ctx.methods:
        acts = ctx.activations.flatten(1)
        store.adopt(ctx.masked(None), where=(acts.amax(1) - acts.amin(1)) >= REUSE_MIN_RANGE)
    union, inverse = top.unique(return_inverse=True)
    union_scores = store.scores(union)  # (|union|, P)
    prompt_index = torch.arange(top.shape[0], device=top.device)[:, None]
    top_scores = union_scores[inverse, prompt_index]  # (P, k): prompt p's score of its own channels
    scores = torch.zeros_like(importance).scatter_(1, top, top_scores)
    return weighted_sum(torch.softmax(scores, dim=1), ctx.activations)


@register_method("gscorecam", shares_forward=True, masked_forwards=True, uses_gradients=True, params=("topk",))
def gscorecam(ctx: CamContext) -> torch.Tensor:
    """gScoreCAM: ScoreCAM over the top-k channels by signed mean gradient (k = --topk, 300)."""
    return _gscorecam(ctx, ctx.gradients.mean(dim=(2, 3)))


@register_method("gscorecam-abs", masked_forwards=True, uses_gradients=True, params=("topk",),
                 shares_forward=True)
def gscorecam_abs(ctx: CamContext) -> torch.Tensor:
    """gScoreCAM variant: top-k channels by mean absolute gradient."""
    return _gscorecam(ctx, ctx.gradients.abs().mean(dim=(2, 3)))


def group_labels(weighted: np.ndarray, grouping: str) -> np.ndarray:
    """Channel -> group: k-means on the rows of A' (32 clusters, random_state 0: the original CLIP
    port) or 32 contiguous chunks (the GroupCAM paper's default)."""
    channels = weighted.shape[0]
    if grouping == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=GROUPS, random_state=0).fit(weighted.reshape(channels, -1)).labels_
    if grouping == "chunk":
        return np.arange(channels) * GROUPS // channels
    raise ValueError(f"grouping must be kmeans or chunk, got {grouping!r}")


def gaussian_blur(x: torch.Tensor, kernel: int = 51, sigma: float = 50.0) -> torch.Tensor:
    """Blur baseline of GroupCAM (kornia's gaussian_blur2d: separable kernel, reflect border)."""
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    return tv_blur(x, [kernel, kernel], [sigma, sigma])


@register_method("groupcam", masked_forwards=True, uses_gradients=True, postprocess="resize_minmax",
                 shares_forward=True,
                 params=("grouping",))
def groupcam(ctx: CamContext) -> torch.Tensor:
    """GroupCAM: 32 channel groups of A' = mean_hw(G) A; d_g = relu(s(x m_g + b (1 - m_g)) - s(b)) with b
    a blurred x; M = sum_g (d_g + 1e-6) S_g at the input size (S_g = upsampled relu(group sum))."""
    grouping = ctx.options.get("grouping", GROUPING.default)
    acts, size = ctx.activations, ctx.model.input_size
    weighted = ctx.gradients.mean(dim=(2, 3))[:, :, None, None] * acts  # (P, C, h, w)
    x = ctx.input.float()
    blurred = gaussian_blur(x)
    group_maps = []
    for p in range(len(ctx.prompts)):
        labels = torch.as_tensor(group_labels(weighted[p].cpu().numpy(), grouping), device=acts.device)
        sums = torch.zeros((GROUPS, *acts.shape[1:]), device=acts.device).index_add_(0, labels, weighted[p])
        group_maps.append(F.interpolate(sums.clamp_min(0)[None], size=(size, size), mode="bilinear",
                                        align_corners=False)[0])
    maps = torch.stack(group_maps)  # (P, 32, n, n)
    flat = maps.flatten(2)
    low = flat.amin(dim=2)[..., None, None]
    masks = ((maps - low) / (flat.amax(dim=2)[..., None, None] - low + 1e-6)).flatten(0, 1)[:, None]  # (P*32, 1, n, n)

    def blend(rows: slice) -> torch.Tensor:
        return x * masks[rows] + blurred * (1 - masks[rows])

    feats = encode_in_chunks(ctx, masks.shape[0], blend)  # (P*32, E)
    base = ctx.model.scores(encode_in_chunks(ctx, 1, lambda _: blurred), ctx.text_features)[0]  # (P,)
    prompt_of_row = torch.arange(len(ctx.prompts), device=acts.device).repeat_interleave(GROUPS)
    scores = ctx.model.scores(feats, ctx.text_features)[torch.arange(masks.shape[0]), prompt_of_row]
    gains = (scores.view(-1, GROUPS) - base[:, None]).clamp_min(0)  # (P, 32)
    return ((gains + 1e-6)[:, :, None, None] * maps).sum(dim=1)  # (P, n, n)
