"""Throughput sections of the benchmark suite (issue 16): image batching of the one-forward methods, the
compiled masked encoder, pairs/s and the fraction of the card's peak per model and method, and where
the GPU time goes (kernel-time split). Imported by run.py; every ratio is measured side by side."""
from __future__ import annotations

import copy
import time
from dataclasses import replace

import numpy as np
import torch
from timing import sync, timed

from camloc.cams import compute_heatmaps
from camloc.datasets import load_dataset
from camloc.models import ClipModel, load_image
from camloc.models.clip_model import fold_batchnorm
from camloc.run.identity import EvalConfig
from camloc.run.pipeline import compute_images

# Dense fp16/bf16 tensor-core peak of the card (vendor figures, SXM parts), for the fraction reached.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def card_peak(device: torch.device) -> tuple[str, float | None]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return name, next((v for key, v in PEAK_FLOPS.items() if key in name), None)


def demo_work(n: int, method: str) -> list[tuple]:
    """n distinct images (the demo set's, over and over) as compute_images' batch entries, one prompt each."""
    demo = load_dataset("demo")
    out = []
    for i in range(n):
        item = demo[i % len(demo)]
        iid = f"{item.image_id}#{i}"
        item = replace(item, image_id=iid, pairs=[replace(p, image_id=iid) for p in item.pairs[:1]])
        out.append((item, {item.pairs[0].key: [method]}, load_image(item.path)))
    return out


def section_batching(model: ClipModel, device, report, n: int = 8, method: str = "gradcam", reps: int = 3):
    """The model stage of eval for n images: one batch of n (`--image-batch n`) vs one image at a time, the
    same images, inputs prepared on the host beforehand (what eval's loader threads do)."""
    config = EvalConfig(model=model.name, methods=[method])
    work = [(item, todo, image, model.host_input(image)) for item, todo, image in demo_work(n, method)]

    def batched():
        return compute_images(model, work, config)

    def single():
        return [compute_images(model, [entry], config)[0] for entry in work]

    a, b = batched(), single()  # warm-up, and the maps compared
    diff = max(float(np.abs(x[method][1] - y[method][1]).max() / max(np.abs(y[method][1]).max(), 1e-12))
               for (x, _), (y, _) in zip(a, b))
    t_batch, t_single = timed(batched, device, reps)[0], timed(single, device, reps)[0]
    report[f"batching/{model.name}/{method}"] = {
        "images": n, "batched_s": t_batch, "single_s": t_single, "speedup": t_single / t_batch,
        "batched_images_per_s": n / t_batch, "single_images_per_s": n / t_single, "max_rel_map_diff": diff}
    print(f"{method} {model.name}: batch of {n} {t_batch * 1e3:.1f} ms ({n / t_batch:.1f} images/s) vs one at a time "
          f"{t_single * 1e3:.1f} ms ({n / t_single:.1f} images/s) -> {t_single / t_batch:.2f}x; maps differ by "
          f"{diff:.1e} of their range")


def encoder_seconds_per_image(encoder, model: ClipModel, batch: int, batches: int, device, reps: int) -> float:
    x = model.as_input(torch.randn(batch, 3, model.input_size, model.input_size,
                                   generator=torch.Generator().manual_seed(0)))

    def run():
        with torch.no_grad():
            for _ in range(batches):
                encoder(x)

    run()
    return timed(run, device, reps)[0] / (batch * batches)


def section_compile(model: ClipModel, device, report, batch: int = 16, batches: int = 4, reps: int = 3,
                    fold: bool = False):
    """Time per masked image of the encoder as camloc runs it (eager) vs compiled (`--compile on`: inductor,
    static batch shape), the compile time (the first call of the shape), and, with `fold`, eager with the
    ResNet's BatchNorm folded into its convolutions (what the CPU path does; measured on CUDA here)."""
    eager = encoder_seconds_per_image(model.encoder, model, batch, batches, device, reps)
    rows = {"batch": batch, "eager_s_per_image": eager}
    if fold and model.family.name == "rn" and model.batchnorms_folded == 0:
        folded = copy.deepcopy(model.visual)
        rows["batchnorms_folded"] = fold_batchnorm(folded)
        rows["eager_folded_s_per_image"] = encoder_seconds_per_image(
            lambda x: folded(x).float(), model, batch, batches, device, reps)
        del folded
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        rows["eager_cudnn_benchmark_s_per_image"] = encoder_seconds_per_image(model.encoder, model, batch, batches,
                                                                             device, reps)
        torch.backends.cudnn.benchmark = False
    model.encoder.configure("on")
    x = model.as_input(torch.randn(batch, 3, model.input_size, model.input_size))
    model.encoder(x)  # compiles this shape
    rows["compile_s"] = model.encoder.shapes[batch]
    rows["compiled_s_per_image"] = encoder_seconds_per_image(model.encoder, model, batch, batches, device, reps)
    model.encoder.configure("off")
    torch.backends.cudnn.benchmark = False
    rows["compiled_speedup"] = eager / rows["compiled_s_per_image"]
    rows["break_even_images"] = rows["compile_s"] / max(eager - rows["compiled_s_per_image"], 1e-12) \
        if eager > rows["compiled_s_per_image"] else None
    report[f"compile/{model.name}"] = rows
    extra = ""
    if "eager_folded_s_per_image" in rows:
        extra += f"; eager with BatchNorm folded {rows['eager_folded_s_per_image'] * 1e3:.2f} ms"
    if "eager_cudnn_benchmark_s_per_image" in rows:
        extra += f"; eager with cudnn.benchmark {rows['eager_cudnn_benchmark_s_per_image'] * 1e3:.2f} ms"
    even = f"pays back after {rows['break_even_images']:.0f} masked images" if rows["break_even_images"] else "never pays back"
    print(f"{model.name} ({model.precision}), batch {batch}: eager {eager * 1e3:.2f} ms per masked image, compiled "
          f"{rows['compiled_s_per_image'] * 1e3:.2f} ms ({rows['compiled_speedup']:.2f}x) after {rows['compile_s']:.1f} s "
          f"of compiling ({even}){extra}")
    return rows


def forward_flops(model: ClipModel, batch: int = 8) -> float:
    """FLOPs of one image-encoder forward, counted by torch.utils.flop_counter (a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.visual(model.as_input(torch.zeros(batch, 3, model.input_size, model.input_size)))
    return float(counter.get_total_flops()) / batch


def pair_flops(model: ClipModel, image, method: str, options: dict) -> tuple[float, int]:
    """(FLOPs, encoder forwards) of one image-prompt pair of `method`: encoder forward FLOPs
    (`forward_flops`) x the forwards the pair runs (the image's own and its masked copies). The backward
    through the head (after the target layer) is left out: the fraction of peak is a lower bound there.
    (FlopCounterMode cannot wrap the gradient pass itself: its module tracker breaks autograd.grad.)"""
    from camloc.cams import CamContext

    ctx = CamContext(model, image, ["cat"], options, methods=[method])
    compute_heatmaps(model, image, ["cat"], [method], context=ctx)
    forwards = 1 + ctx.masked_forwards
    return forward_flops(model) * forwards, forwards


# Chunk sizes of the peak section: one static shape per method and model (gScoreCAM's k = 300 masked
# images in one chunk; ScoreCAM's 2048, 3072 or 768 channels in chunks of 256), so each compiles once.
PEAK_CHUNK = {"gscorecam": 300, "scorecam": 256, "gradcam": "auto"}


def section_peak(model: ClipModel, device, report, methods=("gscorecam", "scorecam", "gradcam"), compiled: bool = True,
                 budget_s: float = 60.0):
    """Pairs/s (one prompt per image, as eval runs the paper's protocol) and the fraction of the card's
    dense fp16 peak (FLOPs counted by torch.utils.flop_counter) per method, eager vs compiled masked
    forwards (`compiled`), at the chunk sizes of PEAK_CHUNK; GradCAM (no masked forwards) one image vs a
    batch of 8. Each timing runs for about `budget_s` / 4 seconds at most."""
    name, peak = card_peak(device)
    image = load_image(demo_work(1, "gradcam")[0][0].path)
    out = report.setdefault(f"peak/{model.name}", {"card": name, "card_peak_tflops": peak / 1e12 if peak else None})
    for method in methods:
        options = {"topk": 300, "chunk_size": PEAK_CHUNK[method]}
        flops, forwards = pair_flops(model, image, method, options)  # also the warm-up (chunk size probe)
        probe = timed(lambda: compute_heatmaps(model, image, ["cat"], [method], options), device)[0]
        n = max(1, min(20, int(budget_s / 4 / max(probe, 1e-3))))
        rows = {"gflop_per_pair": flops / 1e9, "forwards_per_pair": forwards, "pairs_timed": n,
                "chunk_size": PEAK_CHUNK[method]}
        paths = ["eager"] + (["compiled"] if compiled and method != "gradcam" else [])
        for path in paths:
            model.encoder.configure("on" if path == "compiled" else "off")
            if path == "compiled":
                started = time.perf_counter()
                compute_heatmaps(model, image, ["cat"], [method], options)  # compiles the plan's shapes
                sync(device)
                rows["compile_s"] = time.perf_counter() - started
            t = timed(lambda: [compute_heatmaps(model, image, ["cat"], [method], options) for _ in range(n)], device)[0]
            rows[f"{path}_pairs_per_s"] = n / t
            rows[f"{path}_tflops"] = n / t * flops / 1e12
            rows[f"{path}_fraction_of_peak"] = n / t * flops / peak if peak else None
        model.encoder.configure("off")
        if method == "gradcam":
            config = EvalConfig(model=model.name, methods=[method])
            work = [(item, todo, img, model.host_input(img)) for item, todo, img in demo_work(8, method)]
            compute_images(model, work, config)
            t = timed(lambda: compute_images(model, work, config), device, 3)[0]
            rows["batched8_pairs_per_s"] = 8 / t
            rows["batched8_tflops"] = 8 / t * flops / 1e12
            rows["batched8_fraction_of_peak"] = 8 / t * flops / peak if peak else None
        out[method] = rows
        shown = ", ".join(f"{path} {rows[f'{path}_pairs_per_s']:.2f} pairs/s = {rows[f'{path}_tflops']:.1f} TFLOP/s"
                          + (f" = {rows[f'{path}_fraction_of_peak']:.1%} of peak" if peak else "")
                          for path in paths + (["batched8"] if method == "gradcam" else []))
        print(f"{model.name} {method} ({forwards} forwards, {flops / 1e9:.0f} GFLOP per pair): {shown}"
              + (f"; compile {rows['compile_s']:.0f} s" if "compile_s" in rows else ""))
    return out


def section_profile(model: ClipModel, device, report, method: str = "gscorecam"):
    """Where one pair's GPU time goes: CUDA kernel time by kind (convolution/GEMM, normalisation,
    element-wise, pooling, copies, other) and the ten longest kernels, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        print("(the kernel-time split is measured on CUDA only)")
        return
    image = load_image(demo_work(1, "gradcam")[0][0].path)
    options = {"topk": 300}
    compute_heatmaps(model, image, ["cat"], [method], options)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        compute_heatmaps(model, image, ["cat"], [method], options)
        sync(device)
    # first match wins: layout conversions are copies, cuDNN's BatchNorm kernels are normalisation
    kinds = {"copy/layout": ("tonhwc", "tonchw", "copy", "memcpy", "memset", "transpose", "cat_", "catarray"),
             "norm": ("norm", "bn_fw", "batch_norm"), "pool": ("pool",), "softmax": ("softmax",),
             "conv/gemm": ("conv", "gemm", "xmma", "cutlass", "sm80_", "sm90_", "fprop", "implicit", "winograd",
                           "cudnn", "ampere", "hopper", "triton_mm", "mm_"),
             "element-wise": ("elementwise", "vectorized", "unrolled", "reduce", "add", "mul", "relu", "gelu",
                              "sigmoid", "triton_poi", "triton_red", "triton_per")}
    from torch.autograd import DeviceType

    split: dict[str, float] = {}
    per_kernel: dict[str, float] = {}
    for event in prof.events():  # the kernels themselves (CPU-side ops would count their kernels again)
        if event.device_type != DeviceType.CUDA:
            continue
        us = event.time_range.elapsed_us()
        lower = event.name.lower()
        kind = next((k for k, words in kinds.items() if any(w in lower for w in words)), "other")
        split[kind] = split.get(kind, 0.0) + us
        per_kernel[event.name[:90]] = per_kernel.get(event.name[:90], 0.0) + us
    kernels = [(us, name) for name, us in per_kernel.items()]
    whole = sum(split.values()) or 1.0
    report[f"profile/{model.name}/{method}"] = {"split_us": split, "top": sorted(kernels, reverse=True)[:10]}
    print(f"{model.name} {method}: kernel time {whole / 1e3:.1f} ms: "
          + ", ".join(f"{k} {v / whole:.0%}" for k, v in sorted(split.items(), key=lambda kv: -kv[1])))
    for total, key in sorted(kernels, reverse=True)[:10]:
        print(f"  {total / 1e3:8.2f} ms  {key}")

