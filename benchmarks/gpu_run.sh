#!/usr/bin/env bash
# The prepared GPU session (issue 16), about 7-8 minutes (checks <= 2 min, plan budget 330 s + the step in flight). Before it, HERE: `bash benchmarks/device_wheels.sh`;
# then with the device tool: run(command="bash benchmarks/gpu_run.sh", carry=[".device_wheels"], timeout_s=560).
#  1. CUDA checks against the golden maps: fp32/fp16 eager, the compiled masked encoder (--compile on),
#     and image batching (share_batch) against one image at a time.
#  2. benchmarks/run.py --only gpu (its gpu_plan): RN50x16 pairs/s and fraction of the card's fp16 peak
#     for gScoreCAM, ScoreCAM, GradCAM (eager vs compiled; GradCAM one image vs 8), its kernel-time split,
#     the encoder variants (compiled, BatchNorm folded, cudnn.benchmark); RN50, image batching, eval's data
#     path; ViT-B/32, ViT-B/16; RN50's encoder compiled; each step skipped (and said so) past the budget.
# Everything lands in $OUT (cuda_check.txt, bench_gpu.txt, bench_gpu.json).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:/tmp/extra OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/extra .device_wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/cuda_check.txt"
import numpy as np, torch, triton
from camloc.models import ClipModel, load_image
from camloc.cams import CamContext, compute_heatmaps
from camloc.cams.context import share_batch
from camloc.cams.engine import compute_raw
img = load_image("tests/golden/chelsea_small.png")
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))
def golden(name, meth):
    return np.load(f"tests/golden/{name.replace('-', '_')}_{meth}.npy")
for name, k, methods in [("tiny-rn", 100, ["gradcam", "gradcam++", "layercam", "scorecam", "gscorecam", "groupcam"]),
                         ("tiny-vit", 30, ["gradcam", "gradcam++", "scorecam", "gscorecam", "hilacam"])]:
    for prec in ["fp32", "fp16"]:
        m = ClipModel.load(name, device="cuda", precision=prec)
        maps = compute_heatmaps(m, img, ["cat", "dog"], methods, {"topk": k})
        print(name, prec, "eager, max abs diff vs golden:", {a: f"{np.abs(maps[a][0] - golden(name, a)).max():.1e}" for a in methods})
        prompts = [["cat", "dog"], ["cat"], ["dog", "a cat", "tree"]]  # image batching vs one at a time
        one = [compute_raw(m, img.rotate(r), p, ["gradcam", "layercam"]) for r, p in zip((0, 90, 180), prompts)]
        ctxs = [CamContext(m, img.rotate(r), p, methods=["gradcam", "layercam"]) for r, p in zip((0, 90, 180), prompts)]
        share_batch(ctxs)
        many = [compute_raw(m, img.rotate(r), p, ["gradcam", "layercam"], context=c) for r, p, c in zip((0, 90, 180), prompts, ctxs)]
        print(name, prec, "image batch of 3 vs one at a time, max relative diff:",
              max(float(((a[x][1] - b[x][1]).abs().max() / a[x][1].abs().max()).item()) for a, b in zip(one, many) for x in a))
        if prec != "fp32":  # the compiled path is checked once per model (each compile costs seconds)
            continue
        masked = [a for a in methods if a in ("scorecam", "gscorecam", "groupcam")]
        m.encoder.configure("on")
        comp = compute_heatmaps(m, img, ["cat", "dog"], masked, {"topk": k})
        print(name, prec, "compiled", m.encoder.info(), "max abs diff vs eager:",
              {a: f"{np.abs(comp[a] - maps[a]).max():.1e}" for a in masked},
              "vs golden:", {a: f"{np.abs(comp[a][0] - golden(name, a)).max():.1e}" for a in masked})
        m.encoder.configure("off")
PY
timeout 400 python3 benchmarks/run.py --device cuda --only gpu --budget 330 --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
