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
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from camloc.cams import CamContext, compute_heatmaps  # noqa: E402
from camloc.models import ClipModel, load_image  # noqa: E402
from camloc.provenance import device_description, git_commit  # noqa: E402
from straightforward import straightforward_cam, trainable_copy  # noqa: E402

IMAGE = Path(__file__).resolve().parent.parent / "camloc" / "datasets" / "demo" / "images" / "chelsea.jpg"
PROMPTS = ["cat", "dog", "a photo of a cat", "tabby cat", "kitten", "animal face", "whiskers", "pet"]
GRADIENT_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam"]


class PeakMemory:
    """Peak extra memory while a block runs: CUDA allocator peak, or process RSS sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base, self.top, self.running = self._rss(), self._rss(), True
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.top = max(self.top, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.top, self._rss()) - self.base
        return False


def timed(fn, device, reps=1):
    """(median seconds, peak extra bytes, last result) over `reps` runs."""
    times, peaks, out = [], [], None
    for _ in range(reps):
        with PeakMemory(device) as mem:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peaks.append(mem.peak)
    return statistics.median(times), max(peaks), out


def gib(n):
    return f"{n / 2**30:.2f} GiB"


def best_batch(model: ClipModel, candidates, device) -> tuple[int, float]:
    """The batch size with the least time per image for plain forwards."""
    n = model.input_size
    best = None
    for b in candidates:
        x = model.as_input(torch.randn(b, 3, n, n))
        with torch.no_grad():
            model.visual(x)  # warm-up
            t, _, _ = timed(lambda: model.visual(x), device)
        if best is None or t / b < best[1]:
            best = (b, t / b)
    return best


def floor_seconds(model, image, k, batch, device):
    """k plain forwards at the best batch size + one forward and backward to the target layer.
    Inputs are prepared on the device beforehand and every batch shape is warmed up."""
    n = model.input_size
    batches = [model.as_input(torch.randn(min(batch, k - start), 3, n, n)) for start in range(0, k, batch)]

    def k_forwards():
        with torch.no_grad():
            for x in batches:
                model.visual(x)

    if device.type == "cuda":
        k_forwards()
    t_fwd, _, _ = timed(k_forwards, device, reps=3 if device.type == "cuda" else 1)
    t_grad, _, _ = timed(lambda: CamContext(model, image, ["cat"]).gradients, device, reps=3)
    return t_fwd + t_grad, t_fwd, t_grad


def overlap_of_topk(model, image, prompts, k):
    top = CamContext(model, image, prompts).gradients.mean(dim=(2, 3)).topk(k, dim=1).indices.cpu().numpy()
    sets = [set(r) for r in top]
    pairs = [len(a & b) / k for i, a in enumerate(sets) for b in sets[i + 1:]]
    return float(np.mean(pairs)), len(set().union(*sets))


def section_gscorecam(model, image, k, args, device, report):
    print(f"\n## gScoreCAM per image-prompt: {model.name}, k={k}, {model.precision} on {device.type}")
    batch, per_image = best_batch(model, args.batches, device)
    floor, t_fwd, t_grad = floor_seconds(model, image, k, batch, device)
    opts = {"topk": k, "chunk_size": batch}
    compute_heatmaps(model, image, ["cat"], ["gradcam"], opts)  # warm-up
    t_cam, mem_cam, maps = timed(lambda: compute_heatmaps(model, image, ["cat"], ["gscorecam"], opts), device, args.reps)
    net = trainable_copy(model)
    t_ref, mem_ref, ref = timed(lambda: straightforward_cam(model, net, image, "cat", "gscorecam", k), device,
                                args.reps)
    del net
    diff = float(np.abs(maps["gscorecam"][0] - ref).max())
    rows = {
        "best_batch": batch, "forward_s_per_image": per_image, "floor_s": floor, "floor_forwards_s": t_fwd,
        "floor_grad_s": t_grad, "camloc_s": t_cam, "straightforward_s": t_ref, "camloc_peak_bytes": mem_cam,
        "straightforward_peak_bytes": mem_ref, "camloc_over_floor": t_cam / floor,
        "straightforward_over_camloc": t_ref / t_cam, "max_abs_diff_vs_straightforward": diff,
    }
    print(f"best batch {batch} ({per_image * 1e3:.1f} ms/image); floor {floor:.2f} s "
          f"({k} forwards {t_fwd:.2f} s + forward/backward {t_grad:.3f} s)")
    print(f"camloc {t_cam:.2f} s (peak {gib(mem_cam)}); straightforward {t_ref:.2f} s (peak {gib(mem_ref)}); "
          f"maps differ by {diff:.1e}")
    print(f"camloc / floor = {t_cam / floor:.3f}   (target <= 1.15)")
    print(f"straightforward / camloc = {t_ref / t_cam:.2f}   (target >= 2)")
    report[f"gscorecam/{model.name}"] = rows
    return rows


def section_prompts(model, image, k, args, device, report, per_prompt_ref=None):
    print(f"\n## prompt sharing: {model.name} ({model.precision}, {device.type})")
    out = {}
    for method in args.sharing_methods:
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

            t, mem, _ = timed(run, device, args.reps)
            forwards = ctx_holder["ctx"].masked_forwards
            base = base or t
            out[f"{method}/P={p}"] = {"seconds": t, "per_prompt_s": t / p, "masked_forwards": forwards,
                                      "peak_bytes": mem, "total_over_P1": t / base, "per_prompt_over_P1": t / p / base}
            print(f"{method:10s} P={p}: total {t:.2f} s, per prompt {t / p:.2f} s, {forwards} masked forwards, "
                  f"total/P1 {t / base:.2f}, per-prompt/P1 {t / p / base:.2f}, peak {gib(mem)}")
    overlap, union = overlap_of_topk(model, image, PROMPTS[:8], k)
    out["topk_overlap_P8"] = {"mean_pairwise_overlap": overlap, "union": union, "k": k}
    print(f"top-{k} sets of the 8 prompts: mean pairwise overlap {overlap:.2f}, union {union} channels")
    print("targets: scorecam total P=8 / P=1 <= 1.3; gscorecam per-prompt P=8 / P=1 <= 0.5 when overlap >= 0.5")
    if per_prompt_ref is not None and "gscorecam/P=8" in out:
        total_ref = 8 * per_prompt_ref
        ratio = total_ref / out["gscorecam/P=8"]["seconds"]
        out["gscorecam_P8_straightforward_over_camloc"] = ratio
        print(f"gscorecam P=8: straightforward 8 x {per_prompt_ref:.2f} s = {total_ref:.1f} s vs camloc "
              f"{out['gscorecam/P=8']['seconds']:.1f} s -> {ratio:.2f}x   (target >= 5)")
    report[f"prompts/{model.name}"] = out


def section_fusion(model, image, args, device, report):
    print(f"\n## method fusion: {model.name}")
    compute_heatmaps(model, image, PROMPTS[:1], ["gradcam"])
    t_one, _, _ = timed(lambda: compute_heatmaps(model, image, PROMPTS[:1], ["gradcam"]), device, 5)
    t_all, mem, _ = timed(lambda: compute_heatmaps(model, image, PROMPTS[:1], GRADIENT_METHODS), device, 5)
    print(f"gradcam alone {t_one * 1e3:.1f} ms; all four {t_all * 1e3:.1f} ms -> {t_all / t_one:.2f}x   "
          f"(target <= 1.3); peak {gib(mem)}")
    report[f"fusion/{model.name}"] = {"one_s": t_one, "four_s": t_all, "ratio": t_all / t_one, "peak_bytes": mem}


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
    start = time.perf_counter()
    ious = score_items(items, grid, workers=workers)
    seconds = time.perf_counter() - start
    print(f"{seconds:.1f} s on {workers} workers ({ious.shape[0] * ious.shape[1]} boxes)   (target < 60 s on 2 cores)")
    report["threshold_search"] = {"maps": n, "thresholds": len(grid) + 1, "workers": workers, "seconds": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the < 10 minute CPU subset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per timing (median)")
    ap.add_argument("--only", default=None, help="comma list of sections: gscorecam,prompts,fusion,memory,threshold")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.reps = args.reps or (1 if args.quick else 3)
    args.batches = [32, 64, 128, 256] if cuda else ([16, 32] if args.quick else [8, 16, 32, 64])
    args.prompt_counts = [1, 8] if args.quick else [1, 3, 8]
    args.sharing_methods = ["scorecam", "gscorecam"]
    sections = set((args.only or "gscorecam,prompts,fusion,memory,threshold").split(","))
    image = load_image(IMAGE)
    report = {"machine": device_description(device), "platform": platform.platform(), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "torch": torch.__version__}
    print(f"# camloc benchmarks on {report['machine']}; torch {torch.__version__}; commit {report['commit']}")
    started = time.perf_counter()

    def load(name):
        return ClipModel.load(name, device=args.device, precision=args.precision)

    if "threshold" in sections:
        section_threshold_search(args, report)
    rn50 = load("random-RN50") if sections & {"gscorecam", "fusion", "prompts"} else None
    ref_rn50 = None
    if "gscorecam" in sections:
        ref_rn50 = section_gscorecam(rn50, image, 300, args, device, report)["straightforward_s"]
    if "fusion" in sections:
        section_fusion(rn50, image, args, device, report)
    if "prompts" in sections:
        if args.quick:  # ScoreCAM on RN50 is 2048 forwards per run: the quick run uses ViT-B/32 (768 channels)
            del rn50
            vit = load("random-ViT-B/32")
            ref_vit = section_gscorecam(vit, image, 100, args, device, report)["straightforward_s"]
            section_prompts(vit, image, 100, args, device, report, per_prompt_ref=ref_vit)
        else:
            section_prompts(rn50, image, 300, args, device, report, per_prompt_ref=ref_rn50)
            del rn50
            vit = load("random-ViT-B/32")
            section_gscorecam(vit, image, 100, args, device, report)
        del vit
    if "memory" in sections and not args.quick:
        big = load("random-RN50x16")
        section_gscorecam(big, image, 300, args, device, report)
        if cuda:
            section_pairs_per_second(big, image, device, report)
    report["total_seconds"] = time.perf_counter() - started
    print(f"\ntotal {report['total_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


# Dense fp16/bf16 tensor-core peak of the card (vendor figures, SXM parts), for the fraction reached.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def forward_flops(model) -> float:
    """FLOPs of one image-encoder forward (batch 1), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.visual(model.as_input(torch.zeros(1, 3, model.input_size, model.input_size)))
    return float(counter.get_total_flops())


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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for key, v in PEAK_FLOPS.items() if key in name), None)
    report[f"pairs_per_second/{model.name}"] = {
        "pairs_per_second": n / t, "peak_bytes": mem, "chunk_size": model.auto_chunk_size,
        "gflops_per_forward": flops / 1e9, "achieved_tflops": achieved / 1e12,
        "fraction_of_peak": achieved / peak if peak else None, "card_peak_tflops": peak / 1e12 if peak else None}
    print(f"gScoreCAM {model.name} k=300 {model.precision}: {n / t:.2f} pairs/s (chunk {model.auto_chunk_size}), "
          f"peak {gib(mem)}; {flops / 1e9:.1f} GFLOP per forward -> {achieved / 1e12:.1f} TFLOP/s"
          + (f" = {achieved / peak:.1%} of the card's {peak / 1e12:.0f} TFLOP/s dense fp16 peak" if peak else ""))


if __name__ == "__main__":
    main()
