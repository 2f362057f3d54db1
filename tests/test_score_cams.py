"""Score family and HilaCAM: golden heatmaps, agreement with a straightforward per-prompt reference,
and the sharing of masked forwards across prompts and methods."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PREFIX, golden

from camloc.cams import CamContext, compute_heatmaps
from camloc.cams.postprocess import grid_maps_to_raw

TOPK = {"tiny-rn": 100, "tiny-vit": 30}  # the golden fixtures' k
GOLDEN_CASES = [("tiny-rn", "scorecam"), ("tiny-rn", "gscorecam"), ("tiny-rn", "groupcam"),
                ("tiny-vit", "scorecam"), ("tiny-vit", "gscorecam"), ("tiny-vit", "hilacam")]


@pytest.mark.parametrize("model_name,method", GOLDEN_CASES)
def test_heatmaps_match_golden(model_name, method, tiny_models, chelsea):
    maps = compute_heatmaps(tiny_models[model_name], chelsea, ["cat"], [method], {"topk": TOPK[model_name]})
    # groupcam: the golden raw-size map (the original's wrapper returned the input-size map, a bug)
    np.testing.assert_allclose(maps[method][0], golden(f"{PREFIX[model_name]}_{method}.npy"), atol=1e-4, rtol=0)


def test_all_methods_together_match_golden(tiny_models, chelsea):
    """Sharing work between methods (one context, reused masked embeddings) changes nothing."""
    model = tiny_models["tiny-rn"]
    maps = compute_heatmaps(model, chelsea, ["cat"], "all", {"topk": 100, "rise_masks": 8})
    for method in ["gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "gscorecam", "groupcam"]:
        np.testing.assert_allclose(maps[method][0], golden(f"tiny_rn_{method}.npy"), atol=1e-4, rtol=0)


def test_scorecam_internals_match_golden(tiny_rn, chelsea):
    ctx = CamContext(tiny_rn, chelsea, ["cat"])
    channels = torch.arange(256)
    scores = ctx.masked(None).scores(channels)[:, 0].numpy()
    np.testing.assert_allclose(scores, golden("tiny_rn_scorecam_scores.npy"), atol=1e-4)
    nan_channels = torch.isnan(ctx.masked(None).rows[:, 0]).nonzero().flatten().tolist()
    from conftest import golden_meta

    assert nan_channels == golden_meta("tiny-rn")["methods"]["scorecam"]["scorecam_nan_score_channels"]
    assert ctx.masked_forwards == 256 - len(nan_channels)  # constant channels need no forward: their score is 0


@pytest.mark.parametrize("model_name", list(PREFIX))
def test_gscorecam_topk_matches_golden(model_name, tiny_models, chelsea):
    ctx = CamContext(tiny_models[model_name], chelsea, ["cat"])
    idx = ctx.gradients.mean(dim=(2, 3)).topk(TOPK[model_name], dim=1).indices[0]
    assert set(idx.tolist()) == set(golden(f"{PREFIX[model_name]}_gscorecam_topk_idx.npy").tolist())
    scores = ctx.masked(1e-6).scores(torch.as_tensor(golden(f"{PREFIX[model_name]}_gscorecam_topk_idx.npy")))
    np.testing.assert_allclose(scores[:, 0].numpy(), golden(f"{PREFIX[model_name]}_gscorecam_topk_scores.npy"),
                               atol=1e-4)


# ---- a straightforward reference: one prompt at a time, one masked image at a time, no sharing ----

def _score_one(model, image_input, text):
    with torch.no_grad():
        f = model.model.encode_image(image_input).float()
    f = f / f.norm(dim=-1, keepdim=True)
    s = float(model.logit_scale * f @ text)
    return 0.0 if np.isnan(s) else s


def reference_map(model, image, prompt, method, k):
    x = model.preprocess(image)
    text = model.text_features([prompt])[0]
    ctx = CamContext(model, image, [prompt])  # only for A and G of this single prompt
    acts, grads = ctx.activations, ctx.gradients[0]
    n = model.input_size
    channels = acts.shape[0]
    if method == "scorecam":
        chosen, eps = range(channels), None
    else:
        imp = grads.abs().mean(dim=(1, 2)) if method == "gscorecam-abs" else grads.mean(dim=(1, 2))
        chosen, eps = imp.topk(min(k, channels)).indices.tolist(), 1e-6
    scores = torch.zeros(channels)
    for c in chosen:
        up = F.interpolate(acts[c][None, None], size=(n, n), mode="bilinear", align_corners=True)[0, 0]
        rng = up.max() - up.min()
        mask = (up - up.min()) / (rng if eps is None else rng + eps)
        scores[c] = _score_one(model, x * mask, text)
    weights = torch.softmax(scores, dim=0)
    grid = (weights[:, None, None] * acts).sum(0)
    return grid_maps_to_raw(grid[None], image.size)[0]


@pytest.mark.parametrize("model_name", list(PREFIX))
@pytest.mark.parametrize("method", ["scorecam", "gscorecam", "gscorecam-abs"])
def test_shared_equals_straightforward_reference(model_name, method, tiny_models, chelsea):
    model, k = tiny_models[model_name], TOPK[model_name]
    prompts = ["cat", "dog", "a photo of a sofa"]
    shared = compute_heatmaps(model, chelsea, prompts, ["scorecam", "gscorecam", "gscorecam-abs"], {"topk": k})
    for i, prompt in enumerate(prompts):
        np.testing.assert_allclose(shared[method][i], reference_map(model, chelsea, prompt, method, k),
                                   atol=1e-5, rtol=0)


def _masked_forward_count(model, image, prompts, methods, options):
    sizes = []
    handle = model.visual.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    try:
        ctx = CamContext(model, image, prompts, options, methods=methods)
        compute_heatmaps(model, image, prompts, methods, context=ctx)
    finally:
        handle.remove()
    assert sizes[0] == 1  # the one plain forward
    assert sum(sizes[1:]) == ctx.masked_forwards
    return ctx


@pytest.mark.parametrize("model_name", list(PREFIX))
def test_scorecam_masked_forwards_do_not_grow_with_prompts(model_name, tiny_models, chelsea):
    model = tiny_models[model_name]
    one = _masked_forward_count(model, chelsea, ["cat"], ["scorecam"], {})
    five = _masked_forward_count(model, chelsea, ["cat", "dog", "car", "sofa", "tabby"], ["scorecam"], {})
    assert one.masked_forwards == five.masked_forwards > 0


@pytest.mark.parametrize("model_name", list(PREFIX))
def test_gscorecam_masked_forwards_equal_union_of_topk(model_name, tiny_models, chelsea):
    model, k = tiny_models[model_name], TOPK[model_name] // 2
    prompts = ["cat", "dog", "car", "sofa"]
    ctx = _masked_forward_count(model, chelsea, prompts, ["gscorecam"], {"topk": k})
    top = ctx.gradients.mean(dim=(2, 3)).topk(k, dim=1).indices
    union = set(top.flatten().tolist())
    assert len(union) < len(prompts) * k  # the prompts overlap, so sharing saves forwards
    assert ctx.masked_forwards == len(union)


def test_gscorecam_reuses_scorecam_embeddings(tiny_vit, chelsea):
    alone = _masked_forward_count(tiny_vit, chelsea, ["cat"], ["gscorecam"], {"topk": 30})
    both = _masked_forward_count(tiny_vit, chelsea, ["cat"], ["scorecam", "gscorecam"], {"topk": 30})
    # tiny-vit's channels all have an activation range >= 1: gScoreCAM needs no forwards of its own
    assert both.masked_forwards == both.masked(None).forwards == 64
    assert alone.masked_forwards == 30
    together = compute_heatmaps(tiny_vit, chelsea, ["cat"], ["scorecam", "gscorecam"], {"topk": 30})["gscorecam"]
    np.testing.assert_allclose(together[0], golden("tiny_vit_gscorecam.npy"), atol=1e-4, rtol=0)


def test_topk_above_channel_count_is_capped_with_a_warning(tiny_vit, chelsea):
    with pytest.warns(UserWarning, match="--topk 500 exceeds the 64 channels"):
        capped = compute_heatmaps(tiny_vit, chelsea, ["cat"], ["gscorecam"], {"topk": 500})["gscorecam"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = compute_heatmaps(tiny_vit, chelsea, ["cat"], ["gscorecam"], {"topk": 64})["gscorecam"]
    np.testing.assert_array_equal(capped, full)


def test_chunk_size_does_not_change_results(tiny_rn, chelsea):
    a = compute_heatmaps(tiny_rn, chelsea, ["cat"], ["scorecam", "groupcam"], {"chunk_size": 7})
    b = compute_heatmaps(tiny_rn, chelsea, ["cat"], ["scorecam", "groupcam"], {"chunk_size": 64})
    for m in a:  # oneDNN picks kernels by batch size: fp32 rounding only, on maps scaled to [0, 1]
        np.testing.assert_allclose(a[m], b[m], atol=5e-6)


def test_groupcam_internals_and_chunk_grouping(tiny_rn, chelsea):
    from camloc.methods.score import group_labels

    ctx = CamContext(tiny_rn, chelsea, ["cat"])
    weighted = (ctx.gradients.mean(dim=(2, 3))[:, :, None, None] * ctx.activations)[0].numpy()
    np.testing.assert_array_equal(group_labels(weighted, "kmeans"), golden("tiny_rn_groupcam_kmeans_labels.npy"))
    chunks = group_labels(weighted, "chunk")
    assert chunks.tolist() == [c // 8 for c in range(256)]  # 32 contiguous groups of 8
    maps = compute_heatmaps(tiny_rn, chelsea, ["cat"], ["groupcam"], {"grouping": "chunk"})["groupcam"]
    assert maps.shape == (1, 100, 150) and maps.min() == 0 and maps.max() == pytest.approx(1, abs=1e-6)
    assert not np.allclose(maps[0], golden("tiny_rn_groupcam.npy"), atol=1e-3)


def test_hilacam_prompts_batched_and_start_layer(tiny_vit, chelsea):
    both = compute_heatmaps(tiny_vit, chelsea, ["cat", "dog"], ["hilacam"])["hilacam"]
    dog = compute_heatmaps(tiny_vit, chelsea, ["dog"], ["hilacam"])["hilacam"]
    np.testing.assert_allclose(both[0], golden("tiny_vit_hilacam.npy"), atol=1e-4)
    np.testing.assert_allclose(both[1], dog[0], atol=1e-5)
    last = compute_heatmaps(tiny_vit, chelsea, ["cat"], ["hilacam"], {"start_layer": -1})["hilacam"]
    assert last.shape == (1, 100, 150) and not np.allclose(last[0], both[0], atol=1e-3)
