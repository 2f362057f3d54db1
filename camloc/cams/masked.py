"""Masked scoring shared by the score family: embeddings of masked copies of one image, computed
once per (image, mask variant) in chunks on the model's device, scored against every prompt with one
matrix product (the image encoder does not depend on the prompt)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from camloc.models.encoder import plan_pieces

if TYPE_CHECKING:
    from camloc.cams.context import CamContext

# gScoreCAM's masks divide by (range + 1e-6), ScoreCAM's by the range. For a channel whose activation
# range is at least this, the two masks differ by at most 1e-6 relative (fp32 rounding level), so when
# both methods run on one image gScoreCAM reuses ScoreCAM's embedding for that channel.
REUSE_MIN_RANGE = 1.0


def channel_masks(acts: torch.Tensor, size: int, eps: float | None) -> torch.Tensor:
    """ScoreCAM-style masks for channels (B, h, w) -> (B, n, n): bilinear upsampling with
    align_corners=True, then per-channel min-max; `eps=None` divides by the bare range (a constant
    channel gives NaN, as in the original), else by range + eps."""
    up = F.interpolate(acts[None].float(), size=(size, size), mode="bilinear", align_corners=True)[0]
    flat = up.flatten(1)
    low = flat.amin(dim=1)[:, None, None]
    span = flat.amax(dim=1)[:, None, None] - low
    return (up - low) / (span if eps is None else span + eps)


class MaskedEmbeddings:
    """Image embeddings of `x * mask_c` for channels c of one image (one mask variant), filled lazily.

    Rows are L2-normalised fp32; a NaN mask (constant channel under ScoreCAM) gives a NaN row without
    running the encoder, and its score becomes 0 (docs/protocol.md §3).
    """

    def __init__(self, ctx: "CamContext", eps: float | None):
        self.ctx = ctx
        self.eps = eps
        channels = ctx.activations.shape[0]
        self.rows = torch.full((channels, ctx.text_features.shape[1]), float("nan"), device=ctx.model.device)
        self.have = torch.zeros(channels, dtype=torch.bool, device=ctx.model.device)
        self.forwards = 0  # masked images encoded, for tests and benchmarks

    def adopt(self, other: "MaskedEmbeddings", where: torch.Tensor) -> None:
        """Take `other`'s rows for the channels in the boolean mask `where` (where it has them)."""
        take = where & other.have & ~self.have
        self.rows[take] = other.rows[take]
        self.have |= take

    def get(self, channels: torch.Tensor) -> torch.Tensor:
        """(len(channels), E) embeddings, encoding only the channels not seen before."""
        missing = channels[~self.have[channels]].unique()
        if missing.numel():
            ledger = self.ctx.__dict__.get("ledger")
            if ledger is None:
                self._encode(missing)
            else:  # the store's encoding is shared work (`Ledger`)
                ledger.compute(self.name, lambda: self._encode(missing), self.ctx.model.device)
        return self.rows[channels]

    @property
    def name(self) -> str:
        return f"masked {self.eps}"

    def scores(self, channels: torch.Tensor) -> torch.Tensor:
        """(len(channels), P) fp32 scores s_p(x * mask_c), NaN -> 0."""
        return self.ctx.model.scores(self.get(channels), self.ctx.text_features)

    def _encode(self, channels: torch.Tensor) -> None:
        ctx = self.ctx
        size = ctx.model.input_size
        x = ctx.input.float()
        todo = channels
        if self.eps is None:
            # ScoreCAM divides by the bare range: a constant channel's mask is NaN and skips the
            # encoder (its row stays NaN, score 0). Decided for all channels first, so the chunked
            # encoding below never waits on the device (one host sync per image, not one per chunk),
            # and the chunks it encodes are full.
            valid = torch.cat([~torch.isnan(channel_masks(ctx.activations[channels[i : i + ctx.chunk_size]],
                                                          size, None).flatten(1)).any(dim=1)
                               for i in range(0, channels.numel(), ctx.chunk_size)])
            todo = channels[valid]
        if todo.numel():
            feats = encode_in_chunks(ctx, todo.numel(), lambda rows: x * channel_masks(
                ctx.activations[todo[rows]], size, self.eps)[:, None])
            self.rows[todo] = feats / feats.norm(dim=-1, keepdim=True)
            self.forwards += todo.numel()
        self.have[channels] = True


def encode_images(ctx: "CamContext", batch: torch.Tensor) -> torch.Tensor:
    """Image embeddings (B, E) fp32 of a batch. On CUDA out-of-memory the batch is split in half and
    retried; the context's chunk size shrinks for the rest of the image (and `auto` for the model),
    and `ctx.oom_retries` counts it."""
    try:
        with torch.no_grad():
            return ctx.model.encoder(ctx.model.as_input(batch))
    except torch.cuda.OutOfMemoryError:
        if batch.shape[0] == 1:
            raise
        if ctx.model.device.type == "cuda":
            torch.cuda.empty_cache()
        half = batch.shape[0] // 2
        ctx.chunk_size = min(ctx.chunk_size, half)
        if ctx.model.auto_chunk_size is not None:
            ctx.model.auto_chunk_size = min(ctx.model.auto_chunk_size, half)
        ctx.oom_retries += 1
        return torch.cat([encode_images(ctx, batch[:half]), encode_images(ctx, batch[half:])])


def encode_in_chunks(ctx: "CamContext", n: int, make_batch: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """Embeddings (n, E) of n images built chunk by chunk by `make_batch(slice)` (never all at once); with
    the compiled encoder, in the few static sizes of `plan_pieces`, padded with zero images."""
    out = []
    start = 0
    while start < n:  # planned again after each piece: an out-of-memory split shrinks ctx.chunk_size
        _, rows, size = plan_pieces(n - start, ctx.chunk_size, ctx.model.encoder.static)[0]
        batch = make_batch(slice(start, start + rows))
        if size > rows:
            batch = torch.cat([batch, batch.new_zeros((size - rows, *batch.shape[1:]))])
        out.append(encode_images(ctx, batch)[:rows])
        start += rows
    return torch.cat(out)
