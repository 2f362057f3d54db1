"""Peak memory of one gScoreCAM (k=300) on a real-size random-init model, CPU fp32 by default.

    python benchmarks/memory.py [--model random-RN50x16] [--topk 300] [--chunk-size auto]

Prints the process's peak RSS (whole process: Python, torch, model) and the extra peak while the
heatmap is computed (sampled every 2 ms), plus the masked forwards and the time.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from camloc.cams import CamContext, compute_heatmaps  # noqa: E402
from camloc.models import ClipModel, load_image  # noqa: E402
from run import IMAGE  # noqa: E402
from timing import PeakMemory, gib  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-RN50x16")
    ap.add_argument("--topk", type=int, default=300)
    ap.add_argument("--chunk-size", default="auto")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model = ClipModel.load(args.model, device=args.device)
    image = load_image(IMAGE)
    after_load = PeakMemory._rss()
    ctx = CamContext(model, image, ["cat"], {"topk": args.topk, "chunk_size": args.chunk_size}, methods=["gscorecam"])
    start = time.perf_counter()
    with PeakMemory(torch.device(args.device)) as mem:
        compute_heatmaps(model, image, ["cat"], ["gscorecam"], context=ctx)
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"gScoreCAM {args.model} k={args.topk} chunk {ctx.chunk_size} on {args.device}: {seconds:.1f} s, "
          f"{ctx.masked_forwards} masked forwards")
    print(f"process peak RSS {gib(peak_rss)} (after model load {gib(after_load)}); extra peak during the CAM "
          f"{gib(mem.peak)}")


if __name__ == "__main__":
    main()
