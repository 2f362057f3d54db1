"""How batches of masked images go through the image tower: eagerly, or compiled with static shapes.

ScoreCAM, gScoreCAM, GroupCAM and RISE spend nearly all their time in image-encoder forwards of
masked copies of one image. `--compile on` runs those forwards through `torch.compile` (inductor).
Compiled code is specialised to a batch shape, so the chunks are planned with few distinct sizes: full
chunks, and the remainder as pieces of power-of-two sizes (`plan_pieces`), the last piece padded with
zero images whose embeddings are dropped. On CUDA the static shapes also let cuDNN pick its fastest
algorithms once (`cudnn.benchmark`).

The attention of the ViT blocks and of the ResNet attention pool already runs fused: the clip
package and open_clip call `nn.MultiheadAttention`/`F.multi_head_attention_forward` with
`need_weights=False`, which dispatches to `F.scaled_dot_product_attention` (tests/test_throughput.py
checks it), so nothing is swapped there.
"""
from __future__ import annotations

import time

import torch

from camloc.errors import OptionError

COMPILE_CHOICES = ("auto", "on", "off")
# What `--compile auto` means per device type, from measurements (benchmarks/README.md). 2-core CPU:
# inductor was 6-13% faster per masked RN50 image after 20-45 s of compiling per model and batch shape,
# which a run of a few images never earns back: off. CUDA: not measured on a GPU yet (no device lent to
# the session that built it): off until `bash benchmarks/gpu_run.sh` shows the compiled path faster.
AUTO_COMPILE = {"cpu": False, "cuda": False}
# inductor's default mode: fuses the element-wise work (BatchNorm, ReLU, residual adds, pooling) around
# the convolutions and GEMMs, which stay cuDNN/cuBLAS (oneDNN on the CPU). CUDA graphs are left out:
# at chunk sizes of 16-512 images a forward is tens of milliseconds, and launch overhead is nothing.
COMPILE_MODE = "default"
MIN_PIECE = 8  # the smallest padded piece: a remainder of 1-7 images costs one 8-image forward


def check_compile(value: str) -> str:
    """`--compile`'s value, refused in one line unless it is one of COMPILE_CHOICES."""
    if value not in COMPILE_CHOICES:
        raise OptionError(f"--compile {value!r} is not one of {', '.join(COMPILE_CHOICES)}")
    return value


def resolve_compile(value: str, device: torch.device) -> bool:
    if check_compile(value) == "auto":
        return AUTO_COMPILE.get(device.type, False)
    return value == "on"


def plan_pieces(n: int, chunk: int, static: bool) -> list[tuple[int, int, int]]:
    """Encoder batches for n images: (start, stop, padded size) each. Eager: chunks of `chunk`, the last
    shorter. Static: full chunks, then the remainder r in pieces whose sizes are `chunk` or powers of two
    (>= MIN_PIECE), choosing between one padded piece and the largest piece that fits plus the rest by
    the fewest images encoded (then the fewest forwards): r = 44 of chunk 64 -> 32 + 12 padded to 16."""
    pieces = []
    start = 0
    while n - start >= chunk or (not static and start < n):
        stop = min(start + chunk, n)
        pieces.append((start, stop, stop - start))
        start = stop
    if static and start < n:
        sizes = sorted({chunk} | {1 << j for j in range(MIN_PIECE.bit_length() - 1, chunk.bit_length())
                                  if (1 << j) < chunk})
        for size in _remainder(n - start, tuple(sizes)):
            rows = min(size, n - start)
            pieces.append((start, start + rows, size))
            start += rows
    return pieces


def _remainder(r: int, sizes: tuple[int, ...]) -> list[int]:
    one = [min(s for s in sizes if s >= r)]
    fits = [s for s in sizes if s <= r]
    if not fits or fits[-1] == r:
        return one if not fits else [r]
    split = [fits[-1]] + _remainder(r - fits[-1], sizes)
    return split if (sum(split), len(split)) < (sum(one), len(one)) else one


class MaskedEncoder:
    """The image tower for masked batches: `encoder(x)` -> (B, E) fp32 embeddings of the model-ready
    batch x. `static` says whether callers should pad to planned sizes (`plan_pieces`)."""

    def __init__(self, visual: torch.nn.Module, device: torch.device):
        self.visual = visual
        self.device = device
        self.static = False
        self.compiled = None
        self.shapes: dict[int, float] = {}  # batch size -> seconds of its first (compiling) call

    def configure(self, compile_value: str) -> bool:
        """Switch the compiled path on or off (`--compile auto|on|off`); returns whether it is on."""
        on = resolve_compile(compile_value, self.device)
        if on and self.compiled is None:
            import torch._inductor.config as inductor_config

            # the weights are constants of the compiled forward (it runs under no_grad only): inductor folds
            # them, BatchNorm into the convolutions included
            inductor_config.freezing = True
            self.compiled = torch.compile(self.visual, mode=COMPILE_MODE, dynamic=False)
        if on and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: the fastest algorithm, chosen once per shape
        self.static = on
        return on

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if not self.static:
                return self.visual(x).float()
            size = x.shape[0]
            if size in self.shapes:
                return self.compiled(x).float()
            started = time.perf_counter()
            try:
                out = self.compiled(x).float()
            except torch.cuda.OutOfMemoryError:  # split and retried by the caller
                raise
            except Exception as exc:  # inductor needs a C++ compiler (CPU) or Triton (CUDA)
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                raise OptionError(f"--compile on: torch.compile failed ({type(exc).__name__}: {first}); "
                                  "run with --compile off") from exc
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.shapes[size] = time.perf_counter() - started
            return out

    def info(self) -> dict:
        """What a run records: whether the masked forwards were compiled, the shapes and the seconds their
        first calls took (compilation included)."""
        if not self.static:
            return {"compiled": False}
        return {"compiled": True, "mode": COMPILE_MODE, "shapes": sorted(self.shapes),
                "compile_seconds": round(sum(self.shapes.values()), 3)}
