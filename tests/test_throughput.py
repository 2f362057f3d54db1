"""Throughput paths give the maps of the plain ones: image batching of the one-forward methods
(`share_batch`, `--image-batch`), the one shared forward per image, the compiled masked encoder
(`--compile on`, static chunk shapes) and its chunk plan."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN, counting_forwards
from test_open_clip import golden_through_open_clip
from typer.testing import CliRunner

from camloc.cams import CamContext, compute_heatmaps
from camloc.cams.context import share_batch
from camloc.cams.engine import compute_raw
from camloc.cams.registry import METHODS, resolve_methods
from camloc.cli.app import app
from camloc.models import ClipModel, load_image
from camloc.models.encoder import plan_pieces
from camloc.run.eval import run_eval
from camloc.run.identity import EvalConfig
from camloc.run.pipeline import resolve_image_batch

DEMO = Path(__file__).resolve().parents[1] / "camloc" / "datasets" / "demo" / "images"
runner = CliRunner()


@pytest.fixture(scope="module")
def images():
    return [load_image(DEMO / name) for name in ("chelsea.jpg", "astronaut.jpg", "camera.jpg")]


def one_forward_methods(model: ClipModel) -> list[str]:
    return [s.name for s in resolve_methods("all", model.family, model.name)
            if s.shares_forward and not s.masked_forwards]


@pytest.mark.parametrize("build", ["tiny-rn", "tiny-vit", "tiny-vit-mh", "open_clip:tiny-vit",
                                   "open_clip:camloc-tiny-mapvit:random", "open_clip:camloc-tiny-eva:random",
                                   "open_clip:camloc-tiny-eva02:random"])
def test_a_batch_of_images_gives_the_maps_of_one_image_at_a_time(build, images):
    """Equal up to float rounding: everything after the batched forward runs per image on that image's
    rows, and the rows of a batched forward differ from a single forward's only where a kernel is picked
    by batch size (oneDNN convolutions, open_clip's attention): ~1e-6 of the map's range at most here; the
    clip package's ViTs give the same bits."""
    model = golden_through_open_clip("tiny-vit") if build == "open_clip:tiny-vit" else ClipModel.load(build, device="cpu")
    # (the timm trunks: SigLIP-style attention pool and EVA02 with rotary embeddings, whose block inputs are shared too)
    methods = one_forward_methods(model)
    assert {"gradcam", "maskclip"} <= set(methods)
    prompts = [["cat", "dog", "a tabby cat"], ["person"], ["camera", "man"]]  # different counts per image
    alone = [compute_raw(model, im, p, methods) for im, p in zip(images, prompts)]
    with counting_forwards(model) as calls:
        contexts = [CamContext(model, im, p, methods=methods) for im, p in zip(images, prompts)]
        share_batch(contexts)
        together = [compute_raw(model, im, p, methods, context=ctx) for im, p, ctx in zip(images, prompts, contexts)]
    # one batched encoder forward for the three images, none per image or method, but for a method whose maps
    # have hard cuts on the forward's values (SC-CLIP: MethodSpec.unbatched), which reads one of its image alone
    from camloc.cams.registry import METHODS

    alone_forwards = [1] * len(images) if any(METHODS[m].unbatched for m in methods) else []
    assert calls == [3, *alone_forwards]
    for one, batched in zip(alone, together):
        for method in methods:
            want, got = one[method][1].numpy(), batched[method][1].numpy()
            # GradCAM++ divides by 2 G^2 + sum(A) G^3, which turns that rounding into up to 5e-5 (open_clip)
            tolerance = 1e-4 if method == "gradcam++" else 1e-5
            assert np.abs(got - want).max() <= tolerance * np.abs(want).max(), f"{build} {method}"


def test_the_one_forward_methods_share_one_forward_per_image(tiny_vit, chelsea):
    methods = one_forward_methods(tiny_vit)
    with counting_forwards(tiny_vit) as calls:
        ctx = CamContext(tiny_vit, chelsea, ["cat", "dog"], {"contrast": "labels"}, methods=methods)
        compute_raw(tiny_vit, chelsea, ["cat", "dog"], methods, context=ctx)
    assert len(methods) >= 9 and calls == [1]


def test_share_batch_leaves_methods_without_shared_stages_alone(tiny_vit, images):
    with counting_forwards(tiny_vit) as calls:
        contexts = [CamContext(tiny_vit, im, ["cat"], methods=["legrad"]) for im in images]
        share_batch(contexts)
    assert calls == [] and all("_pass" not in ctx.__dict__ for ctx in contexts)


@pytest.mark.parametrize("methods,expected", [(["gradcam"], 8), (["gradcam", "maskclip"], 8),
                                              (["gradcam", "gscorecam"], 1), (["rise"], 1), (["legrad"], 1)])
def test_image_batch_auto_is_one_where_a_method_scores_masked_copies(methods, expected):
    assert resolve_image_batch("auto", methods) == expected
    assert resolve_image_batch(3, methods) == 3


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "pairs.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model,methods", [("tiny-rn", ["gradcam", "layercam", "maskclip"]),
                                           ("tiny-vit", ["gradcam++", "clip-es", "gem", "clipsurgery"])])
def test_eval_with_image_batches_writes_the_records_of_one_image_at_a_time(model, methods, tmp_path):
    runs = {}
    for batch in (1, 4):
        run_dir = tmp_path / f"batch{batch}"
        summary = run_eval(EvalConfig(model=model, methods=methods, dataset="demo"), run_dir, device="cpu",
                           progress=False, image_batch=batch)
        assert summary["timings"]["image_batch"] == batch
        assert summary["timings"]["encoder"] == {"compiled": False}
        runs[batch] = _records(run_dir)
    assert len(runs[1]) == len(runs[4]) > 0
    for one, batched in zip(runs[1], runs[4]):
        assert (batched["image_id"], batched["method"], batched["box"]) == (one["image_id"], one["method"], one["box"])
        assert batched["iou"] == pytest.approx(one["iou"], abs=1e-9)


def test_a_batch_that_runs_out_of_memory_falls_back_to_one_image_at_a_time(tiny_rn, images, monkeypatch):
    import camloc.cams.context as context
    from camloc.run.pipeline import compute_images

    real = context.encoder_pass
    batched = []

    def failing(visual, family, x, **kwargs):
        if x.shape[0] > 1:
            batched.append(x.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(visual, family, x, **kwargs)

    from camloc.datasets import load_dataset

    items = load_dataset("demo")[:3]
    config = EvalConfig(model="tiny-rn", methods=["gradcam"], dataset="demo")
    batch = [(item, {p.key: ["gradcam"] for p in item.pairs}, load_image(item.path), None) for item in items]
    expected = compute_images(tiny_rn, batch, config)
    monkeypatch.setattr(context, "encoder_pass", failing)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    got = compute_images(tiny_rn, batch, config)
    assert batched == [3] and sum(oom for _, oom, _ in got) == 1
    for (want, _, _), (have, _, _) in zip(expected, got):  # batched (expected) vs one at a time: float rounding
        np.testing.assert_allclose(have["gradcam"][1], want["gradcam"][1], atol=1e-5 * np.abs(want["gradcam"][1]).max())


@pytest.mark.parametrize("n,chunk,expected", [
    (300, 64, [64, 64, 64, 64, 32, 16]),  # 44 left: 32 + 12 padded to 16 (48 encoded, not 64)
    (300, 16, [16] * 19),  # 12 left: one 16 (8 + 8 would be the same work in two calls)
    (5, 16, [8]),
    (64, 64, [64]),
    (100, 187, [64, 32, 8]),  # CUDA's auto chunk need not be a power of two
    (3, 4, [4]),
])
def test_static_chunk_plan(n, chunk, expected):
    pieces = plan_pieces(n, chunk, static=True)
    assert [size for _, _, size in pieces] == expected
    assert [(a, b) for a, b, _ in pieces] == list(zip([0] + [b for _, b, _ in pieces[:-1]], [b for _, b, _ in pieces]))
    assert pieces[-1][1] == n and all(b - a <= size for a, b, size in pieces)
    eager = plan_pieces(n, chunk, static=False)
    assert [b - a for a, b, size in eager] == [min(chunk, n - a) for a, _, _ in eager] and eager[-1][1] == n


COMPILED = {"tiny-rn": (["scorecam", "gscorecam", "groupcam"], 100), "tiny-vit": (["scorecam", "gscorecam"], 30)}


@pytest.mark.parametrize("name", list(COMPILED))
def test_compiled_masked_forwards_give_the_eager_and_golden_maps(name, chelsea):
    methods, k = COMPILED[name]
    model = ClipModel.load(name, device="cpu")
    eager = compute_heatmaps(model, chelsea, ["cat", "dog"], methods, {"topk": k, "chunk_size": 16})
    assert model.encoder.configure("on") and model.encoder.static
    ctx = CamContext(model, chelsea, ["cat", "dog"], {"topk": k, "chunk_size": 16}, methods=methods)
    compiled = compute_heatmaps(model, chelsea, ["cat", "dog"], methods, context=ctx)
    info = model.encoder.info()
    assert info["compiled"] and info["compile_seconds"] > 0 and set(info["shapes"]) <= {8, 16}
    prefix = name.replace("-", "_")
    for method in methods:
        np.testing.assert_allclose(compiled[method], eager[method], atol=1e-5, rtol=0, err_msg=method)
        np.testing.assert_allclose(compiled[method][0], np.load(GOLDEN / f"{prefix}_{method}.npy"), atol=1e-5, rtol=0)
    assert not model.encoder.configure("off") and model.encoder.info() == {"compiled": False}


@pytest.mark.parametrize("name", ["tiny-rn", "tiny-vit"])
def test_the_encoders_attention_already_runs_fused(name, monkeypatch):
    """The clip package's blocks and attention pool call F.multi_head_attention_forward with
    need_weights=False, which dispatches to scaled_dot_product_attention: nothing to swap in."""
    import torch.nn.functional as F

    model = ClipModel.load(name, device="cpu")
    real, calls = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.encoder(model.as_input(torch.zeros(2, 3, model.input_size, model.input_size)))
    assert calls


@pytest.mark.parametrize("args,message", [
    (["--image-batch", "0"], "--image-batch '0' must be a positive number or auto"),
    (["--compile", "maybe"], "--compile 'maybe' is not one of auto, on, off"),
])
def test_bad_throughput_options_give_one_line(args, message, tmp_path):
    result = runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam", "--out", str(tmp_path / "r"),
                                 "--no-progress", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r" / "pairs.jsonl").exists()


def test_eval_records_the_compiled_path_and_its_compile_time(tmp_path):
    result = runner.invoke(app, ["eval", "--model", "tiny-vit", "--method", "scorecam", "--limit", "2", "--compile", "on",
                                 "--chunk-size", "16", "--out", str(tmp_path / "r"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "masked forwards compiled (--compile on): shapes [16]" in result.output
    timings = json.loads((tmp_path / "r" / "summary.json").read_text())["timings"]
    assert timings["image_batch"] == 1
    assert timings["encoder"]["compiled"] and timings["encoder"]["shapes"] == [16]
    assert timings["encoder"]["compile_seconds"] > 0
    assert METHODS["scorecam"].masked_forwards
