"""camloc against its peers' own released code, side by side in one run, on identical real-size random weights.

Each peer runs in a worker process of its own (they need open_clip 2.23.0, which camloc's process must not
import), started once per row and kept alive: the rounds alternate, one camloc call then one peer call, so
both see the same machine load. Both sides get the same preprocessed image tensor, the same normalised text
embeddings where the peer takes them, and the same number of torch threads. Before any timing, the maps are
checked equal (the first call of each side); a row whose maps differ is printed as such and not timed.
Ratios are peer time / camloc time, from the medians of CPU time (process time; wall time beside it).

Rows:
- GradCAM, RN50, 1 image x 1 prompt, 1 x 8, 8 x 1: `pytorch-grad-cam` 1.5.7 `GradCAM` on `layer4[-1]` of the
  `clip` package's model built from the same checkpoint, CLIP's scaled cosines over the prompts as its
  classifier output and one `ClassifierOutputTarget` per batch item (P copies of the image for P prompts, as
  its users batch them), against camloc's `gradcam` (eval's image batching for 8 images); camloc's grid is
  put through the peer's post-processing (relu, min-max, cv2's resize, min-max again) for the check.
- LeGrad, ViT-B/16, P = 1 and 8 prompts: `legrad-torch` 1.1 `LeWrapper(model).compute_legrad_clip(image=x,
  text_embedding=t)` (it runs the image tower on P copies itself) against camloc's `legrad`, both from the
  preprocessed image and the text embeddings.
- GEM, ViT-B/16, P = 1 and 8: `gem-torch` 1.0.1 `GEMWrapper(model, tokenizer, depth=12)(x, prompts)` with its
  per-call text encoding replaced by the precomputed embeddings (as `cached away`: not part of the timing)
  against camloc's `gem` (`--gem-blocks 11`, the blocks GEM's depth=12 replaces).

Set-up (a folder only the workers put on their path; never a camloc dependency):

    pip install --no-deps --target benchmarks/.peers "legrad-torch==1.1" "gem-torch==1.0.1" "open-clip-torch==2.23.0" einops
    (pytorch-grad-cam 1.5.7 comes with camloc's test extras)
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
def worker(kind: str, data: Path, case: str) -> None:
    """A peer's side: build its model from the state dict, answer each line ("maps", "run") with one call's
    times ("maps" also saves the call's maps)."""
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))
    x = torch.load(data / f"input_{kind}_{case}.pt")
    text = torch.load(data / f"text_{kind}_{case}.pt")
    sd = torch.load(data / f"state_dict_{kind}.pt", map_location="cpu")
    if kind == "gradcam":
        import clip
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        net = clip.model.build_model(dict(sd)).float().eval()

        class Logits(torch.nn.Module):  # CLIP as a classifier over the prompts: what pytorch-grad-cam explains
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, images):
                features = self.net.encode_image(images)
                features = features / features.norm(dim=-1, keepdim=True)
                return self.net.logit_scale.exp() * features @ text.T

        cam = GradCAM(model=Logits(), target_layers=[net.visual.layer4[-1]])
        targets = [ClassifierOutputTarget(int(i)) for i in torch.load(data / f"targets_{kind}_{case}.pt")]

        def call():
            return torch.from_numpy(cam(input_tensor=x, targets=targets))
    else:
        import open_clip

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
            names = [f"p{i}" for i in range(len(text))]

            def call():
                with torch.no_grad():
                    return wrapper(x, names)[0]
        else:
            raise SystemExit(f"unknown peer {kind}")
    for line in sys.stdin:
        start = _clock()
        maps = call()
        cpu, wall = _elapsed(start)
        if line.strip() == "maps":
            np.save(data / f"peer_{kind}_{case}.npy", maps.detach().float().numpy())
        print(json.dumps({"cpu": cpu, "wall": wall}), flush=True)


# ------------------------------------------------------------------------------------------------------ main
ROWS = [("gradcam", "1x1"), ("gradcam", "1x8"), ("gradcam", "8x1"), ("legrad", "1x1"), ("legrad", "1x8"),
        ("gem", "1x1"), ("gem", "1x8")]
"""(method, images x prompts) of the table."""
PEERS = {"gradcam": "pytorch-grad-cam 1.5.7", "legrad": "legrad-torch 1.1", "gem": "gem-torch 1.0.1"}
MODELS = {"gradcam": "random-RN50", "legrad": "random-ViT-B/16", "gem": "random-ViT-B/16"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=str(HERE / ".peers"), help="folder the peers were installed into")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="gradcam,legrad,gem")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case", default="1x1", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.data), args.case)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import cv2
    import numpy as np
    import torch

    from camloc.api import as_image
    from camloc.cams.context import CamContext, share_batch
    from camloc.cams.engine import compute_raw
    from camloc.models import ClipModel
    from camloc.models.loading import random_state_dict
    from camloc.models.specs import ALL_SPECS
    from camloc.run.provenance import device_description, git_commit

    torch.set_num_threads(args.threads)
    peers = Path(args.peers)
    if not (peers / "legrad").is_dir():
        raise SystemExit(f"{peers} holds no peers: pip install --no-deps --target {peers} 'legrad-torch==1.1' "
                         "'gem-torch==1.0.1' 'open-clip-torch==2.23.0' einops")
    report = {"machine": device_description(torch.device("cpu")), "commit": git_commit(), "threads": args.threads,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "rows": []}
    print(f"# camloc vs peers on {report['machine']}, {args.threads} torch thread(s) a side, torch {torch.__version__}, "
          f"commit {report['commit']}; ratio = peer / camloc (median CPU time; wall time in brackets)")
    paths = sorted((ROOT / "camloc" / "datasets" / "demo" / "images").glob("*.jpg"))[:8]
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        for kind, case in ROWS:
            if kind not in args.only.split(","):
                continue
            if MODELS[kind] not in models:
                models[MODELS[kind]] = ClipModel.load(MODELS[kind], device="cpu", precision="fp32")
            model = models[MODELS[kind]]
            # the checkpoint the model was built from (camloc folds a ResNet's batchnorms into its convolutions)
            torch.save(random_state_dict(ALL_SPECS[MODELS[kind]]), data / f"state_dict_{kind}.pt")
            n_images, n_prompts = map(int, case.split("x"))
            images = [as_image(model, str(p))[0] for p in ([IMAGE] if n_images == 1 else paths[:n_images])]
            x = torch.cat([model.preprocess(im) for im in images])
            prompts = PROMPTS[:n_prompts]
            ours_prompts = [GEM_TEMPLATE.format(n) for n in prompts] if kind == "gem" else prompts
            text = model.text_features(ours_prompts).float()
            peer_x = x.repeat(n_prompts, 1, 1, 1) if kind == "gradcam" and n_prompts > 1 else x
            torch.save(peer_x.cpu(), data / f"input_{kind}_{case}.pt")
            torch.save(text.cpu(), data / f"text_{kind}_{case}.pt")
            # pytorch-grad-cam: one target per batch item (P copies of the image for P prompts, the usual way)
            torch.save(list(range(n_prompts)) if n_prompts > 1 else [0] * n_images, data / f"targets_{kind}_{case}.pt")
            options = {"gem_blocks": 11} if kind == "gem" else {}

            def ours():
                contexts = [CamContext(model, im, ours_prompts, options, methods=[kind], host_input=x[i:i + 1])
                            for i, im in enumerate(images)]
                for ctx in contexts:
                    ctx.__dict__["text_features"] = text  # both sides start from the embeddings
                start = _clock()
                share_batch(contexts)  # eval's image batching (8 images x 1 prompt)
                maps = [compute_raw(model, im, ours_prompts, [kind], context=ctx)[kind][1]
                        for im, ctx in zip(images, contexts)]
                return torch.cat(maps), _elapsed(start)

            def comparable(maps: torch.Tensor) -> np.ndarray:
                """camloc's maps in the peer's output form."""
                if kind == "gradcam":  # relu, min-max with its 1e-7, cv2's bilinear resize, min-max again
                    def minmax(m):
                        m = m - m.min()
                        return m / (1e-7 + m.max())

                    return np.stack([minmax(cv2.resize(minmax(m), tuple(x.shape[-2:][::-1])))
                                     for m in maps.float().clamp_min(0).cpu().numpy()])
                if kind == "gem":  # its grid upsampled to the input and min-max normalised
                    up = torch.nn.functional.interpolate(maps[None].float(), size=x.shape[-2:], mode="bilinear",
                                                         align_corners=False)[0]
                    low, high = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
                    return ((up - low) / (high - low)).numpy()
                return maps.float().cpu().numpy()

            env = {**os.environ, "PYTHONPATH": str(peers), "PEER_THREADS": str(args.threads)}
            peer = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--data",
                                     str(data), "--case", case], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, env=env, cwd=tmp)

            def theirs(command="run"):
                peer.stdin.write(command + "\n")
                peer.stdin.flush()
                line = peer.stdout.readline()
                if not line:
                    raise SystemExit(f"the {kind} worker stopped (exit status {peer.wait()}; run it by hand)")
                got = json.loads(line)
                return got["cpu"], got["wall"]

            label = f"{kind:7s} {MODELS[kind][7:]:9s} {n_images} image(s) x {n_prompts} prompt(s)"
            try:
                mine = comparable(ours()[0])
                theirs("maps")
                reference = np.load(data / f"peer_{kind}_{case}.npy")
                difference = float(np.abs(mine - reference).max()) if mine.shape == reference.shape else float("inf")
                row = {"method": kind, "model": MODELS[kind], "images": n_images, "prompts": n_prompts,
                       "peer": PEERS[kind], "max_abs_difference": difference}
                if difference > 1e-4:
                    row["equal"] = False
                    print(f"{label}: maps differ (max |difference| {difference:.2e}); not timed", flush=True)
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
            print(f"{label}: camloc {cpu['camloc']:.3f} s, {PEERS[kind]} {cpu['peer']:.3f} s -> "
                  f"{row['ratio_cpu']:.2f}x ({row['ratio_wall']:.2f}x wall); maps equal to {difference:.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
