"""Gradient family: golden heatmaps, pytorch-grad-cam agreement, one forward for P prompts."""
import cv2
import numpy as np
import pytest
import torch
from conftest import PREFIX, golden

from camloc.cams import CamContext, compute_heatmaps
from camloc.methods.gradient import gradcam, gradcam_plus_plus, layercam, xgradcam
from camloc.cams.postprocess import grid_maps_to_raw

GRADIENT_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam"]
ATOL = 1e-4  # the spec's faithfulness target; observed max differences are ~2e-6


@pytest.mark.parametrize("model_name", list(PREFIX))
def test_internals_match_golden(model_name, tiny_models, chelsea):
    ctx = CamContext(tiny_models[model_name], chelsea, ["cat"])
    p = PREFIX[model_name]
    np.testing.assert_allclose(ctx.activations.numpy(), golden(f"{p}_activations.npy")[0], atol=1e-5)
    raw = golden(f"{p}_grads_raw.npy")
    expected = raw if model_name == "tiny-rn" else raw[0].reshape(1, -1, 1, 1)  # ViT: class-token gradient
    np.testing.assert_allclose(ctx.gradients.numpy(), expected, atol=1e-5)
    assert ctx.image_scores.item() == pytest.approx(golden_logit(model_name), abs=1e-5)


def golden_logit(model_name):
    from conftest import golden_meta

    return golden_meta(model_name)["logit_per_image"]


# The original's ViT LayerCAM is all zero; camloc's is checked in test_vit_layercam_uses_class_token_gradient.
GOLDEN_CASES = [(m, x) for m in PREFIX for x in GRADIENT_METHODS if (m, x) != ("tiny-vit", "layercam")]


@pytest.mark.parametrize("model_name,method", GOLDEN_CASES)
def test_heatmaps_match_golden(model_name, method, tiny_models, chelsea):
    heatmap = compute_heatmaps(tiny_models[model_name], chelsea, ["cat"], [method])[method]
    assert heatmap.shape == (1, 100, 150) and heatmap.dtype == np.float32
    np.testing.assert_allclose(heatmap[0], golden(f"{PREFIX[model_name]}_{method}.npy"), atol=ATOL, rtol=0)


def test_vit_layercam_uses_class_token_gradient(tiny_vit, chelsea):
    """camloc's ViT LayerCAM = the formula on the golden activations and the golden class-token gradient."""
    assert not golden("tiny_vit_layercam.npy").any()  # the original's all-zero map
    acts = golden("tiny_vit_activations.npy")[0]  # (64, 4, 4)
    cls_grad = golden("tiny_vit_grads_raw.npy")[0, 0]  # (64,)
    grid = (np.maximum(cls_grad, 0)[:, None, None] * acts).sum(axis=0)
    grid = np.maximum(grid, 0)
    grid = (grid - grid.min()) / (grid.max() - grid.min() + 1e-8)
    expected = np.maximum(cv2.resize(grid, (150, 100), interpolation=cv2.INTER_LINEAR), 0)
    expected = (expected - expected.min()) / (expected.max() - expected.min() + 1e-8)
    got = compute_heatmaps(tiny_vit, chelsea, ["cat"], ["layercam"])["layercam"][0]
    assert got.max() == pytest.approx(1.0) and got.std() > 0.1
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_one_forward_and_one_backward_for_many_prompts(tiny_models, chelsea):
    prompts = ["cat", "dog", "a photo of a cat", "tabby", "sofa"]
    for model in tiny_models.values():
        forwards, heads = [], []
        h1 = model.visual.register_forward_hook(lambda m, a, o: forwards.append(a[0].shape[0]))
        head_module = model.visual.attnpool if model.family.name == "rn" else model.visual.ln_post
        h2 = head_module.register_forward_hook(lambda m, a, o: heads.append(a[0].shape))
        try:
            maps = compute_heatmaps(model, chelsea, prompts, GRADIENT_METHODS)
        finally:
            h1.remove(), h2.remove()
        assert forwards == [1]  # ONE image-encoder forward for 5 prompts and 4 methods
        # the head runs once inside that forward and once more, batched over the 5 prompts, for the gradients
        assert len(heads) == 2
        for method in GRADIENT_METHODS:
            assert maps[method].shape == (5, 100, 150)


@pytest.mark.parametrize("model_name", list(PREFIX))
def test_batched_prompts_equal_one_prompt_at_a_time(model_name, tiny_models, chelsea):
    model = tiny_models[model_name]
    prompts = ["cat", "dog", "a red car"]
    together = compute_heatmaps(model, chelsea, prompts, GRADIENT_METHODS)
    for i, prompt in enumerate(prompts):
        alone = compute_heatmaps(model, chelsea, [prompt], GRADIENT_METHODS)
        for method in GRADIENT_METHODS:
            np.testing.assert_allclose(together[method][i], alone[method][0], atol=1e-5)


class _ClipLogit(torch.nn.Module):
    """image -> (B, 1) scaled cosine with a fixed prompt: the score pytorch-grad-cam differentiates."""

    def __init__(self, visual, text, scale):
        super().__init__()
        self.visual, self.text, self.scale = visual, text, scale

    def forward(self, x):
        f = self.visual(x)
        f = f / f.norm(dim=-1, keepdim=True)
        return self.scale * f @ self.text.T


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_resnet_agrees_with_pytorch_grad_cam(method, chelsea):
    """Same target layer and score. pytorch-grad-cam post-processes differently (relu, min-max with eps
    1e-7, cv2 resize to the INPUT size, no second relu/min-max), so camloc's pre-post-processing map is
    put through exactly those steps before comparing."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camloc.models import ClipModel, load_clip

    model = ClipModel.load("tiny-rn", device="cpu")
    theirs_model = load_clip("tiny-rn")[0]  # a separate copy with trainable parameters, as pytorch-grad-cam expects
    classes = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
               "layercam": pgc.LayerCAM}
    wrapped = _ClipLogit(theirs_model.visual, model.text_features(["cat"]), model.logit_scale).eval()
    x = model.preprocess(chelsea)
    with classes[method](model=wrapped, target_layers=[theirs_model.visual.layer4[-1]]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)])[0]

    fns = {"gradcam": gradcam, "gradcam++": gradcam_plus_plus, "xgradcam": xgradcam, "layercam": layercam}
    grid = np.maximum(fns[method](CamContext(model, chelsea, ["cat"]))[0].numpy(), 0)
    grid = grid - grid.min()
    grid = grid / (1e-7 + grid.max())
    ours = cv2.resize(grid, (128, 128))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_postprocess_two_stage_minmax():
    grid = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]]])
    out = grid_maps_to_raw(grid, (4, 2))
    assert out.shape == (1, 2, 4)
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0, abs=1e-7)
    # a constant (all-negative) map stays finite: zeros
    assert not grid_maps_to_raw(-torch.ones(1, 2, 2), (3, 3)).any()
