"""camloc benchmark suite: median-of-N timings and ratios, measured side by side in one run.

    python benchmarks/run.py --quick            # < 10 min on a 2-core CPU
    python benchmarks/run.py --device cuda      # full suite on a GPU (fp16 encoders by default)

Real-size random-init CLIP models (`random-RN50`, ...) make the compute real without weights.
Prints each section's table and the target ratios of issue 6; `--json FILE` saves everything.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from straightforward import straightforward_cam, trainable_copy  # noqa: E402
from throughput import (card_peak, forward_flops, section_batching, section_compile, section_peak,  # noqa: E402
                        section_profile)
from timing import PeakMemory, gib, timed  # noqa: E402

from camloc.cams import CamContext, compute_heatmaps  # noqa: E402
from camloc.datasets import load_dataset  # noqa: E402
from camloc.models import ClipModel, load_image  # noqa: E402
from camloc.run.provenance import device_description, git_commit  # noqa: E402

IMAGE = Path(__file__).resolve().parent.parent / "camloc" / "datasets" / "demo" / "images" / "chelsea.jpg"
PROMPTS = ["cat", "dog", "a photo of a cat", "tabby cat", "kitten", "animal face", "whiskers", "pet"]
GRADIENT_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam"]


def best_batch(model: ClipModel, encoder, memory_format, candidates, device) -> tuple[int, float]:
    """The batch size with the least time per image for forwards of `encoder`."""
    n = model.input_size
    best = None
    for b in candidates:
        x = model.as_input(torch.randn(b, 3, n, n)).contiguous(memory_format=memory_format)
        with torch.no_grad():
            encoder(x)  # warm-up
            t, _, _ = timed(lambda: encoder(x), device)
        if best is None or t / b < best[1]:
            best = (b, t / b)
    return best


def forwards_seconds(model, encoder, memory_format, k, batch, device, images=None):
    """Time of k forwards of `encoder` at batch size `batch`, inputs prepared on the device beforehand
    and every batch shape warmed up on CUDA. `images` < k: time that many and scale to k (the quick
    CPU run, where every forward costs ~0.1-0.2 s)."""
    n = model.input_size
    timed_k = min(k, images or k)
    batches = [model.as_input(torch.randn(min(batch, timed_k - start), 3, n, n)).contiguous(memory_format=memory_format)
               for start in range(0, timed_k, batch)]

    def forwards():
        with torch.no_grad():
            for x in batches:
                encoder(x)

    if device.type == "cuda":
        forwards()
    t, _, _ = timed(forwards, device, reps=3 if device.type == "cuda" else 1)
    return t * k / timed_k


def overlap_of_topk(model, image, prompts, k):
    grads = CamContext(model, image, prompts).gradients.mean(dim=(2, 3))
    top = grads.topk(min(k, grads.shape[1]), dim=1).indices.cpu().numpy()
    sets = [set(r) for r in top]
    pairs = [len(a & b) / k for i, a in enumerate(sets) for b in sets[i + 1:]]
    return float(np.mean(pairs)), len(set().union(*sets))


def time_gscorecam(model, image, k, device, reps):
    """camloc's gScoreCAM on one image-prompt as a user runs it (the default chunk size), after a warm-up:
    (median seconds, peak extra bytes, maps, the last run's context)."""
    opts = {"topk": k}
    compute_heatmaps(model, image, ["cat"], ["gradcam"], opts)  # warm-up
    held = {}

    def camloc():
        held["ctx"] = CamContext(model, image, ["cat"], opts, methods=["gscorecam"])
        return compute_heatmaps(model, image, ["cat"], ["gscorecam"], context=held["ctx"])

    seconds, peak, maps = timed(camloc, device, reps)
    return seconds, peak, maps, held["ctx"]


def section_gscorecam(model, image, k, args, device, report):
    """The floor twice: with the encoder as the clip package builds it (the issue's "plain" forwards)
    and with camloc's own encoder (BatchNorm folded on the CPU, channels_last ResNets), so both
    camloc's gain from a faster encoder and its overhead over its own encoder are visible."""
    print(f"\n## gScoreCAM per image-prompt: {model.name}, k={k}, {model.precision} on {device.type}")
    net = trainable_copy(model)  # the model as the clip package builds it: the floor's and straightforward's
    scaled = f" (timed on {args.floor_images} of them, scaled)" if args.floor_images and args.floor_images < k else ""
    floors = {}
    for label, encoder, fmt in (("plain", net.visual, torch.contiguous_format),
                                ("camloc's encoder", model.visual, model.memory_format)):
        batch, per_image = best_batch(model, encoder, fmt, args.batches, device)
        floors[label] = (batch, per_image, forwards_seconds(model, encoder, fmt, k, batch, device, args.floor_images))
    t_grad, _, _ = timed(lambda: CamContext(model, image, ["cat"]).gradients, device, reps=3)
    floor = floors["plain"][2] + t_grad
    own_floor = floors["camloc's encoder"][2] + t_grad
    t_cam, mem_cam, maps, ctx = time_gscorecam(model, image, k, device, args.reps)
    t_ref, mem_ref, ref = timed(lambda: straightforward_cam(model, net, image, "cat", "gscorecam", k), device,
                                args.reps)
    net = None  # free the copy before the next section
    diff = float(np.abs(maps["gscorecam"][0] - ref).max())
    rows = {
        "best_batch": floors["plain"][0], "forward_s_per_image": floors["plain"][1],
        "own_best_batch": floors["camloc's encoder"][0], "own_forward_s_per_image": floors["camloc's encoder"][1],
        "floor_s": floor, "floor_forwards_s": floors["plain"][2], "floor_grad_s": t_grad,
        "own_floor_s": own_floor, "floor_images_timed": min(k, args.floor_images or k),
        "camloc_s": t_cam, "straightforward_s": t_ref, "camloc_peak_bytes": mem_cam,
        "straightforward_peak_bytes": mem_ref, "camloc_over_floor": t_cam / floor, "camloc_over_own_floor": t_cam / own_floor,
        "straightforward_over_camloc": t_ref / t_cam, "max_abs_diff_vs_straightforward": diff,
        "masked_forwards": ctx.masked_forwards,
    }
    for label, (batch, per_image, t_fwd) in floors.items():
        print(f"floor, {label}: best batch {batch} ({per_image * 1e3:.1f} ms/image); {k} forwards {t_fwd:.2f} s{scaled} "
              f"+ forward/backward {t_grad:.3f} s = {t_fwd + t_grad:.2f} s")
    print(f"camloc {t_cam:.2f} s (peak {gib(mem_cam)}); straightforward {t_ref:.2f} s (peak {gib(mem_ref)}); "
          f"maps differ by {diff:.1e}")
    print(f"camloc / floor = {t_cam / floor:.3f}   (target <= 1.15)")
    print(f"camloc / floor with camloc's encoder = {t_cam / own_floor:.3f}   (camloc's overhead over its own forwards)")
    print(f"straightforward / camloc = {t_ref / t_cam:.2f}   (target >= 2)")
    report[f"gscorecam/{model.name}"] = rows
    return rows


def section_prompts(model, image, k, args, device, report, methods, per_prompt_ref=None, known=None):
    """`known`: {method: (seconds, masked forwards, peak bytes)} of a P = 1 run already measured the same
    way (the gScoreCAM section's camloc run), reused instead of timed again."""
    print(f"\n## prompt sharing: {model.name} ({model.precision}, {device.type})")
    out = report.setdefault(f"prompts/{model.name}", {})
    known = known or {}
    for method in methods:
        base = None
        if device.type == "cuda":  # warm up every batch shape this method uses
            for p in args.prompt_counts:
                compute_heatmaps(model, image, PROMPTS[:p], [method], {"topk": k})
        for p in args.prompt_counts:
            prompts = PROMPTS[:p]
            ctx_holder = {}

            def run():
                ctx = CamContext(model, image, prompts, {"topk": k}, methods=[method])
                ctx_holder["ctx"] = ctx
                return compute_heatmaps(model, image, prompts, [method], context=ctx)

            if p == 1 and method in known:
                t, forwards, mem = known[method]
                note = " (the gScoreCAM section's run)"
            else:
                t, mem, _ = timed(run, device, args.reps)
                forwards, note = ctx_holder["ctx"].masked_forwards, ""
            base = base or t
            out[f"{method}/P={p}"] = {"seconds": t, "per_prompt_s": t / p, "masked_forwards": forwards,
                                      "peak_bytes": mem, "total_over_P1": t / base, "per_prompt_over_P1": t / p / base}
            print(f"{method:10s} P={p}: total {t:.2f} s, per prompt {t / p:.2f} s, {forwards} masked forwards, "
                  f"total/P1 {t / base:.2f}, per-prompt/P1 {t / p / base:.2f}, peak {gib(mem)}{note}")
    if "gscorecam" in methods:
        overlap, union = overlap_of_topk(model, image, PROMPTS[:8], k)
        out["topk_overlap_P8"] = {"mean_pairwise_overlap": overlap, "union": union, "k": k}
        print(f"top-{k} sets of the 8 prompts: mean pairwise overlap {overlap:.2f}, union {union} channels")
        print("target: gscorecam per-prompt P=8 / P=1 <= 0.5 when overlap >= 0.5")
    if "scorecam" in methods:
        print("target: scorecam total P=8 / P=1 <= 1.3")
    if per_prompt_ref is not None and "gscorecam/P=8" in out:
        total_ref = 8 * per_prompt_ref
        ratio = total_ref / out["gscorecam/P=8"]["seconds"]
        out["gscorecam_P8_straightforward_over_camloc"] = ratio
        print(f"gscorecam P=8: straightforward 8 x {per_prompt_ref:.2f} s = {total_ref:.1f} s (it runs one prompt at "
              f"a time) vs camloc {out['gscorecam/P=8']['seconds']:.1f} s -> {ratio:.2f}x   (target >= 5)")


def section_fusion(model, image, args, device, report):
    print(f"\n## method fusion: {model.name}")
    compute_heatmaps(model, image, PROMPTS[:1], ["gradcam"])
    t_one, _, _ = timed(lambda: compute_heatmaps(model, image, PROMPTS[:1], ["gradcam"]), device, 5)
    t_all, mem, _ = timed(lambda: compute_heatmaps(model, image, PROMPTS[:1], GRADIENT_METHODS), device, 5)
    print(f"gradcam alone {t_one * 1e3:.1f} ms; all four {t_all * 1e3:.1f} ms -> {t_all / t_one:.2f}x   "
          f"(target <= 1.3); peak {gib(mem)}")
    report[f"fusion/{model.name}"] = {"one_s": t_one, "four_s": t_all, "ratio": t_all / t_one, "peak_bytes": mem}


def section_pipeline(model, args, device, report):
    """`camloc eval`'s pipeline (`runner.run_pipeline`: the next images decoded and preprocessed in
    threads, pinned for an asynchronous copy on CUDA, the previous images' boxes derived in threads)
    against the same steps one after another, and against the model stage alone (images preloaded)."""
    import tempfile
    from dataclasses import replace

    from camloc.run.files import append_jsonl
    from camloc.run.identity import EvalConfig
    from camloc.run.pipeline import compute_images, image_records, pending, resolve_image_batch, run_pipeline
    from camloc.run.progress import NoBar

    n = 24 if args.quick else 120
    demo = load_dataset("demo")
    images = []
    for i in range(n):  # the demo images over and over, as distinct images
        item = demo[i % len(demo)]
        iid = f"{item.image_id}#{i}"
        images.append(replace(item, image_id=iid, pairs=[replace(p, image_id=iid) for p in item.pairs]))
    methods = ["gradcam"] if args.quick else ["gradcam", "gscorecam"]
    print(f"\n## eval pipeline: {model.name}, {n} demo images ({sum(len(i.pairs) for i in images)} pairs), "
          f"{model.precision} on {device.type}")
    out = report.setdefault(f"pipeline/{model.name}", {})
    for method in methods:
        config = EvalConfig(model=model.name, methods=[method])
        work = pending(images, [method], set())
        pairs = sum(len(todo) for _, todo in work)
        runtime = {"chunk_size": "auto"}
        batch = resolve_image_batch("auto", [method])  # as eval runs it: 8 images per step for GradCAM
        with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "pairs.jsonl", "a") as handle:
            run_pipeline(model, work[:4], config, handle, NoBar(), runtime, None, batch)  # warm-up

            def pipeline():
                run_pipeline(model, work, config, handle, NoBar(), runtime, None, batch)

            def serial():
                for item, todo in work:
                    image = load_image(item.path)
                    ((native, _),) = compute_images(model, [(item, todo, image, None)], config, runtime)
                    append_jsonl(handle, image_records(model.name, item, todo, config, native, image.size))

            loaded = [(item, todo, load_image(item.path)) for item, todo in work]
            prepared = [(item, todo, image, model.host_input(image)) for item, todo, image in loaded]

            def model_only():
                for start in range(0, len(prepared), batch):
                    compute_images(model, prepared[start:start + batch], config, runtime)

            t_pipe = timed(pipeline, device)[0]
            t_serial = timed(serial, device)[0]
            t_model = timed(model_only, device)[0]
        out[method] = {"pairs": pairs, "image_batch": batch, "pipeline_s": t_pipe, "serial_s": t_serial, "model_only_s": t_model,
                       "pipeline_pairs_per_s": pairs / t_pipe, "serial_pairs_per_s": pairs / t_serial,
                       "model_only_pairs_per_s": pairs / t_model, "pipeline_over_model_only": t_pipe / t_model}
        print(f"{method:10s} (image batch {batch}): pipeline {pairs / t_pipe:.2f} pairs/s, one image and step after "
              f"another {pairs / t_serial:.2f} pairs/s, model stage alone {pairs / t_model:.2f} pairs/s -> pipeline / model alone "
              f"{t_pipe / t_model:.2f} (1.00 = loading and boxes fully hidden)")


def section_threshold_search(args, report, n=10_000):
    """Re-scoring n cached heatmaps over the 20-value grid + Otsu, as `camloc threshold-search` does:
    7x7 grid maps (RN50's native resolution) re-derived at COCO-like raw sizes, in parallel workers."""
    from camloc.evaluators.threshold import Item, score_items, threshold_grid

    print(f"\n## threshold search: {n} cached heatmaps x 20 thresholds + Otsu")
    rng = np.random.default_rng(0)
    sizes = [(640, 480), (480, 640), (640, 427), (500, 375)]
    items = []
    for i in range(n):
        native = rng.random((7, 7)).astype(np.float16)
        w, h = sizes[i % len(sizes)]
        x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        items.append(Item("grid", native, (w, h), [[x, y, x + w // 3, y + h // 3]]))
    grid = threshold_grid()
    workers = os.cpu_count() or 1
    import resource

    start = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as mem:
        ious = score_items(items, grid, workers=workers)
    seconds = time.perf_counter() - start
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest worker's peak RSS
    print(f"{seconds:.1f} s on {workers} workers ({ious.shape[0] * ious.shape[1]} boxes)   (target < 60 s on 2 cores); "
          f"peak: main process +{gib(mem.peak)}, each worker <= {gib(worker_peak)} RSS")
    report["threshold_search"] = {"maps": n, "thresholds": len(grid) + 1, "workers": workers, "seconds": seconds,
                                  "peak_bytes_main": mem.peak, "peak_rss_worker_bytes": worker_peak}


def section_open_clip(model, image, k, args, device, report):
    """gScoreCAM on an open_clip model against its floor (k forwards of its own encoder at the best
    batch + one forward/backward): the same ratio as section_gscorecam, for the open_clip backend's
    adapters (no straightforward reference: the original code runs OpenAI models only). The text side
    does not matter for timing: a fixed random text embedding stands in (SigLIP's tokenizer needs the hub)."""
    print(f"\n## open_clip gScoreCAM per image-prompt: {model.name} ({model.family.name}), k={k}, {model.precision} "
          f"on {device.type}")
    model.set_text_features({"cat": torch.randn(model.model.visual(model.preprocess(image)).shape[-1],
                                                generator=torch.Generator().manual_seed(0))})
    batch, per_image = best_batch(model, model.visual, model.memory_format, args.batches, device)
    t_fwd = forwards_seconds(model, model.visual, model.memory_format, k, batch, device, args.floor_images)
    t_grad, _, _ = timed(lambda: CamContext(model, image, ["cat"]).gradients, device, reps=3)
    t_cam, mem_cam, _, ctx = time_gscorecam(model, image, k, device, args.reps)
    floor = t_fwd + t_grad
    rows = {"family": model.family.name, "best_batch": batch, "forward_s_per_image": per_image, "floor_s": floor,
            "camloc_s": t_cam, "camloc_over_floor": t_cam / floor, "camloc_peak_bytes": mem_cam,
            "masked_forwards": ctx.masked_forwards}
    print(f"floor: best batch {batch} ({per_image * 1e3:.1f} ms/image); {k} forwards {t_fwd:.2f} s + forward/backward "
          f"{t_grad:.3f} s = {floor:.2f} s")
    print(f"camloc {t_cam:.2f} s (peak {gib(mem_cam)}, {ctx.masked_forwards} masked forwards); "
          f"camloc / floor = {t_cam / floor:.3f}   (target <= 1.15)")
    report[f"open_clip/{model.name}"] = rows
    return rows


def section_frontier(model, image, args, device, report):
    """Time per image-prompt of the later methods beside GradCAM and gScoreCAM, with P = 1 and 8 prompts
    on one image: the one-forward methods (MaskCLIP, SCLIP, ClearCLIP, NACLIP, CLIPtrase, SC-CLIP, CLIPer, ResCLIP, ProxyCLIP with a random
    DINO ViT-B/8 proxy, GEM, CLIP Surgery with its default contrast), CLIP-ES, Grad-ECLIP and LeGrad (one batched
    backward), AttnLRP (one forward of P copies, one backward) and RISE (N masked forwards shared by the prompts). RISE runs 500 masks here (the original's default is 8000; its time scales linearly with N)."""
    print(f"\n## later methods per image-prompt: {model.name}, {model.precision} on {device.type}")
    prompts = ["cat", "dog", "a tabby cat", "sofa", "a photo of a cat", "tree", "grass", "rug"]
    options = {"topk": 100, "rise_masks": 500, "seed": 0, "gem_blocks": 6, "legrad_layers": 2,
               "proxy_model": "vit_base_patch8_224.dino:random"}  # ProxyCLIP's DINO ViT-B/8, random weights
    out = report.setdefault(f"frontier/{model.name}", {})
    for method in ("gradcam", "gscorecam", "clip-es", "grad-eclip", "legrad", "attnlrp", "maskclip", "sclip", "clearclip",
                   "naclip", "cliptrase", "scclip", "cliper", "resclip", "proxyclip", "gem", "clipsurgery", "rise"):
        times = {}
        for p in (1, 8):
            compute_heatmaps(model, image, prompts[:1], [method], {**options, "rise_masks": 16})  # warm-up
            times[p] = timed(lambda: compute_heatmaps(model, image, prompts[:p], [method], options), device,
                             args.reps)[0]
        out[method] = {"p1_s": times[1], "p8_s": times[8], "p8_per_prompt_s": times[8] / 8}
        print(f"{method:10s}: P=1 {times[1]:.3f} s; P=8 {times[8]:.3f} s = {times[8] / 8:.3f} s per prompt "
              f"({times[1] * 8 / times[8]:.1f}x cheaper per prompt)")
    return out


def section_ovseg(model, image, args, device, report):
    """Open-vocabulary segmentation (`--protocols ovseg`, sclip preset: short side 336, crop 224, stride 112):
    one image's windows (a 500 x 375 photo -> 448 x 336 -> 6 windows) in ONE batched encoder forward vs the
    reference wrappers' one window at a time, for the 150 ADE20K classes; the maps agree within float
    rounding (tests/test_ovseg.py)."""
    from camloc.cams.registry import resolve_methods
    from camloc.datasets.segmentation import SEG_DATASETS
    from camloc.segment.infer import image_windows, query_features, resolve_settings, window_grids

    print(f"\n## ovseg windows: batched vs one at a time, {model.name}, {model.precision} on {device.type}")
    settings = resolve_settings("ade20k-150", templates="single")  # the queries are made once per run: not timed
    queries, _, names = query_features(model, SEG_DATASETS["ade20k-150"].classes(), "single")
    _, windows, boxes = image_windows(model, image.resize((500, 375)), settings)
    out = report.setdefault(f"ovseg/{model.name}", {"windows": len(boxes)})
    for method in ("sclip", "maskclip", "naclip"):
        specs = resolve_methods([method], model.family.name)
        window_grids(model, specs, {}, windows[:1], queries, names)  # warm-up
        batched = timed(lambda: window_grids(model, specs, {}, windows, queries, names), device, args.reps)[0]
        single = timed(lambda: [window_grids(model, specs, {}, windows[i:i + 1], queries, names)
                                for i in range(len(windows))], device, args.reps)[0]
        out[method] = {"batched_s": batched, "one_at_a_time_s": single, "ratio": single / batched}
        print(f"{method:9s}: {len(boxes)} windows batched {batched:.3f} s, one at a time {single:.3f} s: "
              f"{single / batched:.2f}x ({len(boxes) / batched:.1f} windows/s)")
    section_ovseg_image(model, image, args, device, report, settings, queries, names)
    return out


def section_ovseg_image(model, image, args, device, report, settings, queries, names):
    """One whole 683 x 512 image, 150 ADE20K classes, label map at the image's size: camloc (windows in one
    batch, the label map without the softmax where no threshold needs it) against the reference harness's way
    (one window at a time, stitch, resize, x logit scale, softmax, argmax), label maps checked identical."""
    import torch.nn.functional as F

    from camloc.cams.registry import resolve_methods
    from camloc.segment.infer import _predict_softmax, finish_logits, image_windows, window_grids
    from camloc.segment.windows import stitch

    size = (683, 512)
    x, windows, boxes = image_windows(model, image.resize(size), settings)
    owner = list(range(len(names)))
    out = report.setdefault(f"ovseg_image/{model.name}", {"size": list(size), "windows": len(boxes),
                                                          "threads": torch.get_num_threads()})
    print(f"\n## ovseg, one {size[0]} x {size[1]} image ({len(boxes)} windows, {len(names)} classes), "
          f"{torch.get_num_threads()} torch thread(s): camloc vs a one-window loop with the harness's post-processing")
    for method in ("sclip",):
        specs = resolve_methods([method], model.family.name)

        def ours():
            grids = window_grids(model, specs, {}, windows, queries, names)[method]
            return finish_logits(grids, boxes, x, size, owner, settings)

        def loop():
            grids = torch.cat([window_grids(model, specs, {}, windows[i:i + 1], queries, names)[method]
                               for i in range(len(windows))])
            canvas = stitch(grids.float().cpu(), boxes, x.shape[-2], x.shape[-1])
            logits = F.interpolate(canvas[None], size=(size[1], size[0]), mode="bilinear", align_corners=False)[0]
            return _predict_softmax(logits, owner, settings)

        same = bool(torch.equal(ours(), loop()))
        t_ours = timed(ours, device, args.reps)[0]
        t_loop = timed(loop, device, args.reps)[0]
        out[method] = {"camloc_s": t_ours, "loop_s": t_loop, "ratio": t_loop / t_ours, "label_maps_equal": same}
        print(f"{method:9s}: camloc {t_ours:.3f} s, one-window loop {t_loop:.3f} s: {t_loop / t_ours:.2f}x; "
              f"label maps {'identical' if same else 'DIFFER'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the < 10 minute CPU subset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per timing (median)")
    ap.add_argument("--only", default=None,
                    help="comma list of sections: gscorecam,prompts,fusion,pipeline,memory,threshold,batching,compile,"
                         "ovseg,open_clip,frontier,gpu (open_clip and frontier: not in --quick unless named; gpu: the "
                         "prepared GPU session's plan, CUDA only)")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="gpu section: seconds it may take; later steps are skipped (and said so) past it")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.reps = args.reps or (1 if args.quick else 3)
    args.batches = [32, 64, 128, 256] if cuda else ([16, 32] if args.quick else [8, 16, 32, 64])
    args.prompt_counts = [1, 8] if args.quick else [1, 3, 8]
    args.floor_images = 96 if args.quick else None  # quick: time 96 of the k floor forwards and scale
    every = "gscorecam,prompts,fusion,pipeline,memory,threshold,batching,compile,ovseg" + (
        "" if args.quick else ",open_clip,frontier")
    sections = set((args.only or every).split(","))
    image = load_image(IMAGE)
    report = {"machine": device_description(device), "platform": platform.platform(), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "torch": torch.__version__}
    print(f"# camloc benchmarks on {report['machine']}; torch {torch.__version__}; commit {report['commit']}")
    started = time.perf_counter()

    def load(name):
        return ClipModel.load(name, device=args.device, precision=args.precision)

    if "gpu" in sections:
        gpu_plan(load, image, args, device, report, started)
        sections = set()
    if "threshold" in sections:
        section_threshold_search(args, report)
    rn50 = load("random-RN50") if sections & {"gscorecam", "fusion", "prompts", "pipeline", "batching",
                                              "compile"} else None
    g = None
    if "gscorecam" in sections:
        g = section_gscorecam(rn50, image, 300, args, device, report)
    if "fusion" in sections:
        section_fusion(rn50, image, args, device, report)
    if "pipeline" in sections:
        section_pipeline(rn50, args, device, report)
    if "batching" in sections:
        print(f"\n## image batching (eval's model stage, --image-batch 8 vs 1): {args.precision} on {device.type}")
        section_batching(rn50, device, report)
    if "compile" in sections:
        print(f"\n## compiled masked encoder (--compile on vs eager): {device.type}")
        section_compile(rn50, device, report, batch=16 if not cuda else 64, batches=2 if args.quick else 4,
                        fold=cuda)
    if "prompts" in sections:
        known = {"gscorecam": (g["camloc_s"], g["masked_forwards"], g["camloc_peak_bytes"])} if g else None
        ref = g["straightforward_s"] if g else None
        if args.quick:  # ScoreCAM on RN50 is 2048 forwards per run: the quick run measures it on ViT-B/32 (768)
            section_prompts(rn50, image, 300, args, device, report, ["gscorecam"], ref, known)
        else:
            section_prompts(rn50, image, 300, args, device, report, ["scorecam", "gscorecam"], ref, known)
    del rn50
    if sections & {"gscorecam", "prompts", "batching"}:
        vit = load("random-ViT-B/32")
        if "batching" in sections:
            section_batching(vit, device, report)
        if "gscorecam" in sections and not args.quick:
            section_gscorecam(vit, image, 100, args, device, report)
        if "prompts" in sections and args.quick:
            section_prompts(vit, image, 100, args, device, report, ["scorecam"])
        del vit
    if "memory" in sections and not args.quick:
        big = load("random-RN50x16")
        section_gscorecam(big, image, 300, args, device, report)
        if cuda:
            section_pairs_per_second(big, image, device, report)
    if "ovseg" in sections:
        vit16 = load("random-ViT-B/16")
        section_ovseg(vit16, image, args, device, report)
        del vit16
    if "frontier" in sections:
        vit = load("random-ViT-B/32")
        section_frontier(vit, image, args, device, report)
        del vit
    if "open_clip" in sections:  # one open_clip ViT, one timm trunk (SigLIP's attention-pool ViT), random weights
        for name in ("open_clip:ViT-B-16:random", "open_clip:ViT-B-16-SigLIP:random"):
            oc = load(name)
            section_open_clip(oc, image, 100, args, device, report)
            del oc
    report["total_seconds"] = time.perf_counter() - started
    print(f"\ntotal {report['total_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def section_pairs_per_second(model, image, device, report, n=20):
    """Throughput of gScoreCAM (k=300) as `camloc eval` runs it: one prompt per image, boxes included."""
    from camloc.evaluators import box_from_heatmap

    def run():
        for _ in range(n):
            box_from_heatmap(compute_heatmaps(model, image, ["cat"], ["gscorecam"], {"topk": 300})["gscorecam"][0])

    run()
    t, mem, _ = timed(run, device)
    flops = forward_flops(model)
    achieved = n / t * 301 * flops  # 300 masked forwards + the plain one per pair (backward through the head ~0)
    _, peak = card_peak(device)
    report[f"pairs_per_second/{model.name}"] = {
        "pairs_per_second": n / t, "peak_bytes": mem, "chunk_size": model.auto_chunk_size,
        "gflops_per_forward": flops / 1e9, "achieved_tflops": achieved / 1e12,
        "fraction_of_peak": achieved / peak if peak else None, "card_peak_tflops": peak / 1e12 if peak else None}
    print(f"gScoreCAM {model.name} k=300 {model.precision}: {n / t:.2f} pairs/s (chunk {model.auto_chunk_size}), "
          f"peak {gib(mem)}; {flops / 1e9:.1f} GFLOP per forward -> {achieved / 1e12:.1f} TFLOP/s"
          + (f" = {achieved / peak:.1%} of the card's {peak / 1e12:.0f} TFLOP/s dense fp16 peak" if peak else ""))


def gpu_plan(load, image, args, device, report, started):
    """The prepared GPU session (`bash benchmarks/gpu_run.sh`), most important first, each step skipped
    (and said so) once `--budget` seconds are spent, the JSON rewritten after every step: RN50x16
    pairs/s and fraction of peak (eager vs compiled), its kernel-time split and encoder variants
    (compiled, BatchNorm folded, cudnn.benchmark); RN50 (eager), image batching and eval's data path;
    ViT-B/32 and ViT-B/16 (eager); RN50's encoder compiled last (compiling costs ~a minute per model
    and shape, so the compiled path is measured where the issue's target is first)."""
    def left():
        return args.budget - (time.perf_counter() - started)

    def step(label, need, fn):
        if left() < need:
            print(f"\n(skipped, {left():.0f} s of the budget left: {label})")
            report.setdefault("skipped", []).append(label)
            return
        print(f"\n## {label}  [{left():.0f} s of the budget left]")
        try:
            fn()
        except Exception as exc:  # a step that fails is reported; the others still run
            print(f"FAILED: {type(exc).__name__}: {exc}")
            report.setdefault("failed", {})[label] = f"{type(exc).__name__}: {exc}"
        if args.json:  # a run cut short by its time limit keeps what it measured
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))

    models = {}

    def get(name):
        if name not in models:
            models.clear()
            torch.cuda.empty_cache()
            models[name] = load(name)
        return models[name]

    step("RN50x16: pairs/s and fraction of peak", 60,
         lambda: section_peak(get("random-RN50x16"), device, report, budget_s=40))
    step("RN50x16 gScoreCAM: kernel-time split (eager)", 20,
         lambda: section_profile(get("random-RN50x16"), device, report))
    step("RN50x16 encoder: eager, BatchNorm folded, cudnn.benchmark, compiled (ScoreCAM's chunk shape)", 30,
         lambda: section_compile(get("random-RN50x16"), device, report, batch=256, batches=2, fold=True))
    step("random-RN50: pairs/s and fraction of peak (eager)", 40,
         lambda: section_peak(get("random-RN50"), device, report, compiled=False, budget_s=30))
    step("image batching, RN50: GradCAM, batch of 8 vs one at a time", 10,
         lambda: section_batching(get("random-RN50"), device, report))
    step("eval's data path: GradCAM and gScoreCAM on RN50, pipeline vs model stage alone", 30,
         lambda: section_pipeline(get("random-RN50"), args, device, report))
    for name in ("random-ViT-B/32", "random-ViT-B/16"):
        step(f"{name}: pairs/s and fraction of peak (eager)", 30,
             lambda name=name: section_peak(get(name), device, report, compiled=False, budget_s=30))
    step("image batching, ViT-B/16: GradCAM, batch of 8 vs one at a time", 10,
         lambda: section_batching(get("random-ViT-B/16"), device, report))
    step("RN50 encoder: eager, BatchNorm folded, cudnn.benchmark, compiled", 60,
         lambda: section_compile(get("random-RN50"), device, report, batch=256, batches=4, fold=True))


if __name__ == "__main__":
    main()
