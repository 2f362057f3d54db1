"""camloc against its peers' own released code, side by side in one run, on identical real-size random weights.

Each peer runs in a worker process of its own (they need open_clip 2.23.0, which camloc's process must not
import), started once per row and kept alive: the rounds alternate, one camloc call then one peer call, so
both see the same machine load. Both sides get the same preprocessed image tensor, the same normalised text
embeddings where the peer takes them, and the same number of torch threads. Before any timing, the maps are
checked equal (the first call of each side); a row whose maps differ is printed as such and not timed.
Ratios are peer time / camloc time, from the medians of CPU time (process time; wall time beside it).

Rows:
- LeGrad, ViT-B/16, P = 1 and 8 prompts: `legrad-torch` 1.1 `LeWrapper(model).compute_legrad_clip(image=x,
  text_embedding=t)` (it runs the image tower on P copies itself) against camloc's `legrad`, both from the
  preprocessed image and the text embeddings.
- GEM, ViT-B/16, P = 1 and 8: `gem-torch` 1.0.1 `GEMWrapper(model, tokenizer, depth=12)(x, prompts)` with its
  per-call text encoding replaced by the precomputed embeddings (as `cached away`: not part of the timing)
  against camloc's `gem` (`--gem-blocks 11`, the blocks GEM's depth=12 replaces).

Set-up (a folder only the workers put on their path; never a camloc dependency):

    pip install --no-deps --target benchmarks/.peers "legrad-torch==1.1" "gem-torch==1.0.1" "open-clip-torch==2.23.0" einops
    python benchmarks/peers.py [--peers benchmarks/.peers] [--rounds 3] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMAGE = ROOT / "camloc" / "datasets" / "demo" / "images" / "astronaut.jpg"
PROMPTS = ["a person", "an astronaut", "a flag", "a helmet", "a rocket", "a space suit", "a woman", "a patch"]
GEM_TEMPLATE = "a photo of a {}."  # gem-torch builds its prompts with this template


def _clock():
    return time.process_time(), time.perf_counter()


def _elapsed(start) -> tuple[float, float]:
    cpu, wall = _clock()
    return cpu - start[0], wall - start[1]


# ---------------------------------------------------------------------------------------------------- worker
def worker(kind: str, data: Path, prompts: int) -> None:
    """A peer's side: build its model from the state dict, answer each "run" line with one call's times."""
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))
    import open_clip

    sd = torch.load(data / "state_dict.pt", map_location="cpu")
    x = torch.load(data / "input.pt")
    text = torch.load(data / f"text_{kind}_{prompts}.pt")
    names = PROMPTS[:prompts]

    def fresh():
        return open_clip.model.build_model_from_openai_state_dict(dict(sd)).float().eval()

    if kind == "legrad":
        import legrad

        with open(os.devnull, "w") as quiet:  # the wrapper prints while it hooks
            stdout, sys.stdout = sys.stdout, quiet
            wrapper = legrad.LeWrapper(fresh())
            sys.stdout = stdout

        def call():
            return wrapper.compute_legrad_clip(image=x, text_embedding=text)[0]
    elif kind == "gem":
        import gem

        wrapper = gem.GEMWrapper(fresh(), open_clip.get_tokenizer("ViT-B-16"), depth=12)
        wrapper.encode_text = lambda _: text.unsqueeze(0)  # its text encoding, cached away

        def call():
            with torch.no_grad():
                return wrapper(x, names)[0]
    else:
        raise SystemExit(f"unknown peer {kind}")
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        start = _clock()
        maps = call()
        cpu, wall = _elapsed(start)
        if line.strip() == "maps":
            np.save(data / f"peer_{kind}_{prompts}.npy", maps.detach().float().numpy())
        print(json.dumps({"cpu": cpu, "wall": wall}), flush=True)


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=str(HERE / ".peers"), help="folder the peers were installed into")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="legrad,gem")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.data), args.prompts)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch

    from camloc.cams.context import CamContext
    from camloc.cams.engine import compute_raw
    from camloc.models import ClipModel
    from camloc.run.provenance import device_description, git_commit

    torch.set_num_threads(args.threads)
    peers = Path(args.peers)
    if not (peers / "legrad").is_dir():
        raise SystemExit(f"{peers} holds no peers: pip install --no-deps --target {peers} 'legrad-torch==1.1' "
                         "'gem-torch==1.0.1' 'open-clip-torch==2.23.0'")
    model = ClipModel.load("random-ViT-B/16", device="cpu", precision="fp32")
    from camloc.api import as_image

    image, _ = as_image(model, str(IMAGE))
    x = model.preprocess(image)
    report = {"machine": device_description(torch.device("cpu")), "commit": git_commit(), "threads": args.threads,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "rows": []}
    print(f"# camloc vs peers on {report['machine']}, {args.threads} torch thread(s) a side, torch {torch.__version__}, "
          f"commit {report['commit']}; ratio = peer / camloc (median CPU time; wall time in brackets)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        torch.save(model.model.state_dict(), data / "state_dict.pt")
        torch.save(x.cpu(), data / "input.pt")
        for kind in args.only.split(","):
            for prompts in (1, 8):
                names = PROMPTS[:prompts]
                ours_prompts = [GEM_TEMPLATE.format(n) for n in names] if kind == "gem" else names
                text = model.text_features(ours_prompts).float()
                torch.save(text.cpu(), data / f"text_{kind}_{prompts}.pt")
                options = {"gem_blocks": 11} if kind == "gem" else {}

                def ours():
                    ctx = CamContext(model, image, ours_prompts, options, methods=[kind], host_input=x)
                    ctx.__dict__["text_features"] = text  # both sides start from the embeddings
                    start = _clock()
                    _, maps = compute_raw(model, image, ours_prompts, [kind], context=ctx)[kind]
                    return maps, _elapsed(start)

                env = {**os.environ, "PYTHONPATH": str(peers), "PEER_THREADS": str(args.threads)}
                peer = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--data", str(data), "--prompts",
                                         str(prompts)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=env, cwd=tmp)

                def theirs(command="run"):
                    peer.stdin.write(command + "\n")
                    peer.stdin.flush()
                    line = peer.stdout.readline()
                    if not line:
                        raise SystemExit(f"the {kind} worker stopped (exit status {peer.wait()}; run it by hand to see why)")
                    got = json.loads(line)
                    return got["cpu"], got["wall"]

                try:
                    mine, _ = ours()
                    if kind == "gem":  # gem-torch returns its grid upsampled to the input and min-max normalised
                        up = torch.nn.functional.interpolate(mine[None].float(), size=x.shape[-2:], mode="bilinear",
                                                             align_corners=False)[0]
                        low, high = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
                        mine = (up - low) / (high - low)
                    theirs("maps")
                    reference = np.load(data / f"peer_{kind}_{prompts}.npy")
                    difference = float(np.abs(mine.float().cpu().numpy() - reference).max())
                    row = {"method": kind, "prompts": prompts, "max_abs_difference": difference}
                    if mine.shape != reference.shape or difference > 1e-4:
                        row["equal"] = False
                        print(f"{kind:7s} P={prompts}: maps differ (max |difference| {difference:.2e}); not timed")
                        report["rows"].append(row)
                        continue
                    times = {"camloc": [], "peer": []}
                    for _ in range(args.rounds):
                        times["camloc"].append(ours()[1])
                        times["peer"].append(theirs())
                finally:
                    peer.stdin.close()  # the worker's loop ends
                    peer.wait(timeout=60)
                cpu = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
                wall = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
                row.update({"equal": True, "camloc_cpu_s": cpu["camloc"], "peer_cpu_s": cpu["peer"],
                            "camloc_wall_s": wall["camloc"], "peer_wall_s": wall["peer"],
                            "ratio_cpu": cpu["peer"] / cpu["camloc"], "ratio_wall": wall["peer"] / wall["camloc"]})
                report["rows"].append(row)
                peer_name = {"legrad": "legrad-torch 1.1", "gem": "gem-torch 1.0.1"}[kind]
                print(f"{kind:7s} ViT-B/16 P={prompts}: camloc {cpu['camloc']:.3f} s, {peer_name} {cpu['peer']:.3f} s "
                      f"-> {row['ratio_cpu']:.2f}x  ({row['ratio_wall']:.2f}x wall); maps equal to {difference:.1e}",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
