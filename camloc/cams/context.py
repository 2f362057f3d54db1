"""`CamContext`: what the methods share for one image and P prompts, each computed at most once.

One forward pass of the image encoder records the target-layer output (and, on ViT towers, every
block's input, which the dense methods, CLIP-ES and Grad-ECLIP recombine); the P gradients
d s_p / d A come from ONE backward through the part of the encoder after the target layer, with the
activations repeated P times (the backbone before the target layer needs no backward at all).

`share_batch` gives several images' contexts that forward from one batched forward (eval's image
batching for the one-forward methods); every method then runs on its own image's context as before.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from PIL import Image

from camloc.cams.masked import MaskedEmbeddings
from camloc.errors import OptionError
from camloc.models.clip_model import ClipModel
from camloc.models.families import (BlockAccess, block_access, check_block_access, dense_tokens, encoder_pass,
                                    has_blocks, tokens_to_grid, vit_blocks)

class Ledger:
    """Where an image's device time went, when timing is asked for (`compute_raw(..., seconds=)`): each
    shared value's own computing time (exclusive of the shared values it reads in turn; summed when a value
    grows in several steps, as a masked-embedding store does), the shared values it was computed from, and
    the methods that read it (directly or through another shared value), so that shared work is split
    evenly between its readers instead of charged to the first one (`method_seconds`)."""

    def __init__(self) -> None:
        self.method: str | None = None
        self.costs: dict[str, float] = {}
        self.readers: dict[str, set] = defaultdict(set)
        self.sources: dict[str, set] = defaultdict(set)
        self.spent = 0.0
        """Seconds spent computing shared values (outermost computations only): a method's own time is its
        wall time less what this grew by while it ran."""
        self._frames: list[list] = []  # [name, time of inner shared values] of the values being computed

    def compute(self, name: str, fn, device):
        self._frames.append([name, 0.0])
        started = time.perf_counter()
        try:
            value = fn()
            synchronize(device)
        finally:
            elapsed = time.perf_counter() - started
            _, inner = self._frames.pop()
        self.costs[name] = self.costs.get(name, 0.0) + elapsed - inner
        if self._frames:
            self._frames[-1][1] += elapsed
        else:
            self.spent += elapsed
        return value

    def read(self, name: str) -> None:
        if self._frames and self._frames[-1][0] != name:
            self.sources[self._frames[-1][0]].add(name)
        if self.method is None:
            return
        todo = [name]
        while todo:  # the value and everything it was computed from
            current = todo.pop()
            if self.method not in self.readers[current]:
                self.readers[current].add(self.method)
                todo.extend(self.sources.get(current, ()))

    def method_seconds(self, own: dict[str, float]) -> dict[str, float]:
        """Each method's seconds: its own (shared computing taken out) plus an even share of every shared
        value it read; a shared value no method read (computed ahead, e.g. a batched forward) is split over
        all of them."""
        out = dict(own)
        for name, cost in self.costs.items():
            readers = [m for m in self.readers.get(name, ()) if m in out] or list(out)
            for m in readers:
                out[m] += cost / len(readers)
        return out


def synchronize(device) -> None:
    """Wait for the device's queued work (a clock read after a CUDA launch measures nothing otherwise)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class shared:
    """A value of one image computed at most once and shared by the methods (a cached property; a data
    descriptor, so that every read is seen: with a `Ledger` on the context, the computing is timed and
    the reading method noted)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, ctx, owner=None):
        if ctx is None:
            return self
        values, ledger = ctx.__dict__, ctx.__dict__.get("ledger")
        if self.name not in values:
            values[self.name] = (self.fn(ctx) if ledger is None
                                 else ledger.compute(self.name, lambda: self.fn(ctx), ctx.model.device))
        if ledger is not None:
            ledger.read(self.name)
        return values[self.name]

    def __set__(self, ctx, value) -> None:
        ctx.__dict__[self.name] = value


CPU_CHUNK = 16  # the fastest per image on 2 cores for 224-288 px inputs
CPU_CHUNK_LARGE = 8  # 336-448 px inputs (RN50x16, RN50x64, ViT-L/14@336px): keeps a CAM's extra memory < 1 GB


def resolve_chunk_size(value: int | str, model: ClipModel) -> int:
    """Masked images per encoder batch: an int, or `auto` (CPU: 16, or 8 for inputs above 288 px;
    CUDA: from free memory)."""
    if value != "auto":
        size = int(value)
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        return size
    if model.device.type != "cuda":
        return CPU_CHUNK if model.input_size <= 288 else CPU_CHUNK_LARGE
    return _cuda_auto_chunk(model)


def _cuda_auto_chunk(model: ClipModel) -> int:
    """Probe one batch of 8 to measure memory per image, then use half of the free memory (8..512)."""
    if model.auto_chunk_size is not None:
        return model.auto_chunk_size
    device = model.device
    n = model.input_size
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        model.visual(model.as_input(torch.zeros(8, 3, n, n)))
    per_image = max((torch.cuda.max_memory_allocated(device) - base) / 8, 1)
    free, _ = torch.cuda.mem_get_info(device)
    chunk = int(min(512, max(8, 0.5 * free / per_image)))
    model.auto_chunk_size = chunk
    return chunk


@dataclass(frozen=True)
class GradientTarget:
    """A configuration of the gradient engine: where A is read and which score is differentiated.

    The default is the spec's (the family's target layer, the model's own head, s_p = scaled cosine).
    `layer="last-ln1"` (ViT families): A = the last block's ln_1 output, whose patch tokens form the
    grid (CLIP-ES's target); the head re-runs that block's attention, residual and FFN, then
    `pooling="patch-mean"`: ln_post on every token, the mean of the patch tokens, proj, and the score of
    prompt p is softmax_p over [the P prompts, the `background` texts] of the scaled cosines (CLIP-ES's
    softmax with background categories)."""

    layer: str = "family"
    pooling: str = "family"
    background: tuple[str, ...] = ()


class CamContext:
    def __init__(
        self,
        model: ClipModel,
        image: Image.Image,
        prompts: list[str],
        options: dict | None = None,
        methods: list[str] | None = None,
        host_input: torch.Tensor | None = None,
    ):
        """`host_input`: `model.host_input(image)` when already made (eval prepares it in a thread)."""
        if not prompts:
            raise ValueError("at least one prompt is needed")
        self.model = model
        self.prompts = list(prompts)
        self.raw_size = image.size  # (W, H)
        # (1, 3, n, n); pinning pays only when the copy overlaps other work, as in eval's loader threads
        self.input = model.preprocess(image) if host_input is None else model.as_input(host_input)
        self.options = dict(options or {})
        self.methods = set(methods or [])  # the methods sharing this context (lets them reuse each other's work)
        self.chunk_size = resolve_chunk_size(self.options.get("chunk_size", "auto"), model)
        self._masked: dict[float | None, MaskedEmbeddings] = {}
        self._gradient_passes: dict[GradientTarget, tuple[torch.Tensor, torch.Tensor]] = {}
        self.oom_retries = 0  # CUDA out-of-memory batches split and retried (camloc.cams.masked.encode_images)
        self.rise_forwards = 0  # masked images RISE encoded for this image (tests, benchmarks)

    def masked(self, eps: float | None) -> MaskedEmbeddings:
        """The masked-embedding store of this image for one mask variant (ScoreCAM: None, gScoreCAM: 1e-6),
        shared by the methods that ask for it (with a `Ledger`, its encoding time is split between them)."""
        if eps not in self._masked:
            self._masked[eps] = MaskedEmbeddings(self, eps)
        ledger = self.__dict__.get("ledger")
        if ledger is not None:
            ledger.read(self._masked[eps].name)
        return self._masked[eps]

    @property
    def masked_forwards(self) -> int:
        """Masked images encoded so far for this image."""
        return sum(store.forwards for store in self._masked.values())

    @shared
    def text_features(self) -> torch.Tensor:
        """(P, E) normalised fp32."""
        return self.model.text_features(self.prompts)

    @shared
    def _pass(self) -> tuple:
        """`encoder_pass` of this image: (raw target output, embedding (1, E), block inputs or None)."""
        return encoder_pass(self.model.visual, self.model.family, self.input)

    @property
    def target_output(self) -> torch.Tensor:
        """The target layer's output from the image's one forward, as the tower lays it out (a ResNet's
        (1, C, h, w); a timm trunk's last block output (1, N, D)). Free: the forward is shared."""
        return self._pass[0]

    @shared
    def _block_pass(self) -> list:
        """The block inputs of this image's forward stopped at the last block's input (`blocks_only`)."""
        return encoder_pass(self.model.visual, self.model.family, self.input, until=-1)[2]

    @property
    def blocks_only(self) -> bool:
        """Whether every method of this image reads only the ViT blocks' inputs of its forward
        (`MethodSpec.block_inputs_only`): the forward then stops at the last block's input."""
        from camloc.cams.registry import METHODS

        return (bool(self.methods) and all(m in METHODS and METHODS[m].block_inputs_only for m in self.methods)
                and bool(vit_blocks(self.model.visual)))

    @property
    def forward_name(self) -> str:
        """The shared value that holds this image's forward: `_block_pass` where it stops early, else `_pass`."""
        return "_block_pass" if self.blocks_only and "_pass" not in self.__dict__ else "_pass"

    def forward(self) -> None:
        """Run this image's forward now (what `block_inputs` or the other readers would start)."""
        getattr(self, self.forward_name)

    @property
    def has_forward(self) -> bool:
        """Whether this image's forward (either form) has run or been adopted."""
        return "_pass" in self.__dict__ or "_block_pass" in self.__dict__

    def owns_forward(self, method: str) -> bool:
        """Whether `method` is this image's only method and no forward has run: it may then run the tower only
        up to where its own work begins (`encoder_pass(until=...)`), as nothing else would read the rest."""
        return not self.has_forward and self.methods <= {method}

    def adopt_pass(self, raw: torch.Tensor | None, features: torch.Tensor | None, block_inputs: list | None) -> None:
        """Take this image's share of a batched `encoder_pass` (`share_batch`; without the raw output and the
        embedding: of one stopped at the last block, `blocks_only`)."""
        if raw is None:
            self.__dict__["_block_pass"] = block_inputs
        else:
            self.__dict__["_pass"] = (raw, features, block_inputs)
        self.batched = True

    batched = False
    """Whether the forward is this image's share of a batched one (`share_batch`)."""

    def alone(self) -> "CamContext":
        """This context, or, when its forward came from a batch, a context of the same image, prompts (and
        text features) and options with a forward of its own (`MethodSpec.unbatched`); made once."""
        if not self.batched:
            return self
        if "_alone" not in self.__dict__:
            own = CamContext.__new__(CamContext)
            own.__dict__.update({k: v for k, v in self.__dict__.items()
                                 if k in ("model", "prompts", "raw_size", "input", "options", "methods", "chunk_size",
                                          "text_features")})
            own._masked, own._gradient_passes, own.oom_retries, own.rise_forwards = {}, {}, 0, 0
            self.__dict__["_alone"] = own
        return self.__dict__["_alone"]

    def block_inputs(self, first: int, embedding: bool = False):
        """A ViT tower's blocks and the batch-first (1, N, D) input of every block from `first` on, from the
        image's one forward; with `embedding`, also the model's own image embedding (1, E)."""
        if embedding or self.forward_name == "_pass":
            _, features, inputs = self._pass
        else:
            inputs = self._block_pass
        if inputs is None:
            raise ValueError(f"{type(self.model.visual).__name__} has no transformer blocks")
        blocks = vit_blocks(self.model.visual)
        return (blocks, inputs[first:], features) if embedding else (blocks, inputs[first:])

    @property
    def depth(self) -> int:
        """The number of transformer blocks of the image tower."""
        return len(vit_blocks(self.model.visual))

    def block_access(self, index: int) -> BlockAccess:
        """`BlockAccess` of block `index` (negative from the end), its rotary embedding included. The first
        use on a model checks that it reproduces the last block's own forward (`check_block_access`)."""
        if not getattr(self.model, "_block_access_checked", False):
            _, inputs, features = self.block_inputs(self.depth - 1, embedding=True)
            check_block_access(self.model.visual, self.model.family, inputs[-1], features=features)
            self.model._block_access_checked = True
        return block_access(self.model.visual, index % self.depth)

    @shared
    def activations(self) -> torch.Tensor:
        """A: target activations (C, h, w), fp32."""
        raw, _, _ = self._pass
        return self.model.family.to_grid(raw)[0].float()

    @shared
    def image_scores(self) -> torch.Tensor:
        """s_p(x) of the unmasked image, (P,) fp32."""
        _, features, _ = self._pass
        return self.model.scores(features, self.text_features)[0]

    @shared
    def gradients(self) -> torch.Tensor:
        """G = d s_p / d A for all P prompts: (P, C, h, w), or (P, C, 1, 1) on ViT (class token), fp32."""
        raw, _, _ = self._pass
        family = self.model.family
        sizes = [-1] * raw.dim()
        sizes[family.batch_dim] = len(self.prompts)
        repeated = raw.expand(*sizes).clone().requires_grad_(True)
        with torch.enable_grad():
            features = family.head(self.model.visual, repeated).float()
            features = features / features.norm(dim=-1, keepdim=True)
            scores = (self.model.logit_scale * (features * self.text_features).sum(dim=-1)
                      + self.model.logit_bias)  # s_p of copy p
            (grad,) = torch.autograd.grad(scores.sum(), repeated)
        return family.grad_to_grid(grad).float()

    def gradient_pass(self, target: GradientTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (C, h, w), G (P, C, h, w)) for a gradient-engine configuration, each computed once per image;
        the default configuration is `activations` and `gradients`. All P prompts: one batched backward."""
        if target == GradientTarget():
            return self.activations, self.gradients
        ledger, name = self.__dict__.get("ledger"), f"gradient_pass {target}"
        if target not in self._gradient_passes:
            if (target.layer, target.pooling) != ("last-ln1", "patch-mean"):
                raise ValueError(f"unsupported gradient target {target}")
            compute = lambda: self._last_ln1_pass(target.background)  # noqa: E731
            self._gradient_passes[target] = compute() if ledger is None else ledger.compute(name, compute,
                                                                                            self.model.device)
        if ledger is not None:
            ledger.read(name)
        return self._gradient_passes[target]

    def _last_ln1_pass(self, background: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.model.visual
        blocks, inputs = self.block_inputs(self.depth - 1)
        x = inputs[-1]  # batch-first (1, N, D) input of the last block
        access = self.block_access(-1)
        prefix = self.model.family.prefix
        with torch.no_grad():
            y = access.ln_1(x)
        n_prompts = len(self.prompts)
        texts = self.text_features
        if n_prompts + len(background) < 2:
            raise OptionError("CLIP-ES: one prompt and no background word left (--background words equal to the "
                              "prompt are left out): the softmax is constant; give other --background words")
        if background:
            texts = torch.cat([texts, self.model.text_features(list(background))])
        leaf = y.expand(n_prompts, -1, -1).clone().requires_grad_(True)
        with torch.enable_grad():
            q, k, v = access.qkv(leaf)
            attn = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
            h = x + access.ls_1(access.merge(attn @ v))
            h = h + access.ffn(h)
            if has_blocks(visual):  # ln_post on every token, the patch mean, proj
                pooled = visual.ln_post(h)[:, prefix:].mean(dim=1)
                pooled = pooled @ visual.proj if visual.proj is not None else pooled
            else:  # timm trunks: the patch tokens' mean of their embeddings (`dense_tokens`)
                pooled = dense_tokens(visual, h)[:, prefix:].mean(dim=1)
            features = pooled.float() / pooled.float().norm(dim=-1, keepdim=True)
            logits = self.model.logit_scale * features @ texts.T + self.model.logit_bias  # (P copies, P + B)
            scores = logits.softmax(dim=-1)
            (grad,) = torch.autograd.grad(scores.diagonal().sum(), leaf)  # copy p's score of prompt p
        return tokens_to_grid(y, prefix)[0].float(), tokens_to_grid(grad, prefix).float()


def share_batch(contexts: list["CamContext"]) -> None:
    """Give several images' contexts (one model) their one encoder forward from ONE batched `encoder_pass`,
    where one of a context's methods reads it (`MethodSpec.shares_forward`); everything after it (the
    gradients' backward through the head, each method's own work) stays per image, on exactly the
    tensors the image alone would have, so the maps are those of one image at a time. Out of CUDA memory,
    no context adopts anything (each runs its own forward) and the first counts a retry. (A backward over
    all images' prompts together would change the head's matrix shapes, and GradCAM++'s ratio of
    gradient powers turns that float rounding into 5e-4 relative differences on tiny-vit.)"""
    from camloc.cams.registry import METHODS

    group = [ctx for ctx in contexts if not ctx.has_forward
             and any(METHODS[m].shares_forward for m in ctx.methods if m in METHODS)]
    if len(group) < 2:
        return
    family = group[0].model.family
    blocks_only = all(ctx.blocks_only for ctx in group)  # else the stopped forwards run in the full one
    try:
        raw, features, inputs = encoder_pass(group[0].model.visual, family, torch.cat([ctx.input for ctx in group]),
                                             until=-1 if blocks_only else None)
        shares = [(None if raw is None else raw.narrow(family.batch_dim, i, 1).clone(),  # own copies, laid out
                   None if features is None else features[i:i + 1].clone(),  # as one image's forward's
                   None if inputs is None else [x[i:i + 1].clone() for x in inputs])
                  for i in range(len(group))]
    except torch.cuda.OutOfMemoryError:  # each image then runs its own forward, as with --image-batch 1
        torch.cuda.empty_cache()
        group[0].oom_retries += 1
        return
    for ctx, share in zip(group, shares):
        ctx.adopt_pass(*share)
