#!/usr/bin/env bash
# One prepared GPU session: install the few missing wheels (carried in .device_wheels), check camloc's
# CUDA paths against the golden maps, then run the benchmark suite on the GPU. Output goes to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:/tmp/extra OMP_WAIT_POLICY=PASSIVE
python3 -m pip install -q --no-deps --no-index --target /tmp/extra .device_wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/cuda_check.txt"
import numpy as np, torch, time
from camloc.models import ClipModel, load_image
from camloc.cams import compute_heatmaps
img = load_image("tests/golden/chelsea_small.png")
print("torch", torch.__version__, torch.cuda.get_device_name(0))
for name, k, methods in [("tiny-rn", 100, ["gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "gscorecam", "groupcam"]),
                         ("tiny-vit", 30, ["gradcam", "gradcam++", "xgradcam", "scorecam", "gscorecam", "hilacam"])]:
    for prec in ["fp32", "fp16", "bf16"]:
        m = ClipModel.load(name, device="cuda", precision=prec)
        maps = compute_heatmaps(m, img, ["cat", "dog"], methods, {"topk": k})
        diffs = {meth: float(np.abs(maps[meth][0] - np.load(f"tests/golden/{name.replace('-', '_')}_{meth}.npy")).max()) for meth in methods}
        print(name, prec, "max abs diff vs golden:", {a: f"{b:.1e}" for a, b in diffs.items()})
PY
timeout 420 python3 benchmarks/run.py --device cuda --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.txt"
