"""`ClipModel`: a loaded CLIP on a device, with its family adapter, preprocessing and a text cache."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from camloc.errors import ModelError, OptionError
from camloc.models.encoder import MaskedEncoder
from camloc.models.families import Family, family_of
from camloc.models.loading import import_clip, load_clip
from camloc.models.preprocess import CLIP_MEAN, CLIP_STD, preprocess


@dataclass
class Backend:
    """What differs between CLIP implementations besides the vision tower (which `Family` covers):
    the tokenizer, the normalisation, the input size, how weights go to reduced precision, and what
    the results record about the weights."""

    name: str
    make_tokenizer: Callable[[], Callable]
    """Returns the tokenizer (a callable list[str] -> LongTensor); called on first use only."""
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    info: dict = field(default_factory=dict)
    """backend, architecture, weights (name, tag or file) and their SHA-256: recorded with results."""
    _tokenizer: Callable | None = None

    @property
    def tokenizer(self) -> Callable:
        if self._tokenizer is None:
            self._tokenizer = self.make_tokenizer()
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` with the start and end tokens (what the context length bounds)."""
        inner = getattr(self.tokenizer, "encode", None)
        if inner is not None:
            return len(inner(text)) + 2
        return int(self.tokenizer([text]).ne(0).sum())  # padded with 0: the non-pad tokens


def openai_backend(name: str) -> Backend:
    """The `clip` package's tokenizer and CLIP's normalisation."""
    from camloc.models.specs import ALL_SPECS

    spec = ALL_SPECS.get(name)
    info = {"backend": "openai", "arch": name if spec else "checkpoint", "weights": name}
    if spec is not None and spec.official:
        url = import_clip().clip._MODELS[name]
        info["sha256"] = url.split("/")[-2]  # the clip package checks every load against it
    elif spec is not None:
        info.update(weights="random", seed=spec.seed, sha256=None)
    else:
        from camloc.models.hf_clip import WEIGHT_FILES, is_hf_clip_dir
        from camloc.models.open_clip_backend import file_sha256

        path = Path(name)
        if is_hf_clip_dir(path):  # a Hugging Face CLIPModel folder, converted to this layout
            info["arch"] = "hf-clip"
            path = next(path / f for f in WEIGHT_FILES if (path / f).is_file())
        info.update(weights=str(path.resolve()), sha256=file_sha256(path))
    tokenize = import_clip().tokenize
    return Backend("openai", lambda: _OpenAITokenizer(tokenize), info=info)


class _OpenAITokenizer:
    def __init__(self, tokenize):
        self.tokenize = tokenize
        self.encode = import_clip().clip._tokenizer.encode

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenize(texts, truncate=True)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise OptionError(f"--device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {device} asked for CUDA, but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise OptionError(f"--precision {precision!r} is not one of auto, {', '.join(PRECISIONS)}")
    if device.type == "cpu" and precision != "fp32":
        raise OptionError(f"--precision {precision} is for CUDA; on the CPU camloc runs fp32")
    return precision


def input_size_of(visual: torch.nn.Module) -> int:
    """The square input side of a vision tower (OpenAI's `input_resolution`, open_clip's `image_size`)."""
    size = getattr(visual, "input_resolution", None) or getattr(visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ModelError(f"non-square model input {tuple(size)} is not supported")
        size = size[0]
    return int(size)


def to_precision(model: torch.nn.Module, dtype: torch.dtype, backend: str = "openai") -> torch.nn.Module:
    """Reduced precision the way each library runs its released weights on CUDA: the `clip` package's
    `convert_weights` (convolutions, linear layers, attention and projections in `dtype`; LayerNorm and
    BatchNorm stay fp32), open_clip's `convert_weights_to_lp` for open_clip models."""
    if dtype == torch.float32:
        return model.float()
    if backend == "open_clip":
        from open_clip.model import convert_weights_to_lp

        convert_weights_to_lp(model, dtype)
        return model
    import_clip().model.convert_weights(model)  # -> fp16
    if dtype != torch.float16:
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.dtype == torch.float16:
                tensor.data = tensor.data.to(dtype)
    return model


def fold_batchnorm(visual: torch.nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d of a CLIP ModifiedResNet into the convolution before it
    (`torch.nn.utils.fusion.fuse_conv_bn_eval`); the BatchNorm becomes Identity. Same outputs up to
    fp32 rounding (~1e-7 relative), one pass over memory less per convolution. The pairs are CLIP's own
    layout: `convN` -> `bnN` in the stem and bottlenecks, `0` -> `1` in the downsample Sequentials.
    Returns the number folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for module in visual.modules():
        children = dict(module.named_children())
        for name, bn in children.items():
            if not isinstance(bn, torch.nn.BatchNorm2d):
                continue
            conv_name = "conv" + name[2:] if name.startswith("bn") else (
                str(int(name) - 1) if isinstance(module, torch.nn.Sequential) and name.isdigit() else None)
            conv = children.get(conv_name)
            if isinstance(conv, torch.nn.Conv2d) and not bn.training:
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, name, torch.nn.Identity())
                folded += 1
    return folded


class ClipModel:
    """A CLIP model ready for CAMs: encoders on `device` in `precision`, scores always in fp32.

    Score of image x for prompt p (docs/protocol.md §1): `s_p(x) = exp(logit_scale) * cos(f(x), t_p) + logit_bias`, the
    model's own logit: `logit_bias` is SigLIP's learnt bias of its sigmoid loss (0 for CLIP models, which
    have none). Gradient methods and softmaxes over channels or prompts do not see a constant bias;
    gScoreCAM (its top-k scores beside zeros), GroupCAM and RISE do, so it is part of the score and, where
    a model has one, recorded in the run identity (`weights.logit_bias`).
    """

    def __init__(self, model: torch.nn.Module, name: str, device: torch.device, precision: str = "fp32",
                 backend: Backend | None = None):
        self.name = name
        self.device = device
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.backend = backend or openai_backend(name)
        self.model = to_precision(model.to(device), self.dtype, self.backend.name).eval().requires_grad_(False)
        if device.type == "cuda" and precision == "fp32":
            # fp32 means fp32: TF32 convolutions move heatmaps by ~5e-4 (measured on an H200)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.family: Family = family_of(model)
        # ResNets run channels_last (tensor cores on CUDA; oneDNN without layout reorders on the CPU),
        # and on the CPU with BatchNorm folded into the convolutions: together 1.6x faster per image
        # for RN50 on 2 cores (benchmarks/README.md). Not done on CUDA, where it is not measured yet.
        self.batchnorms_folded = fold_batchnorm(self.model.visual) if (
            device.type == "cpu" and self.family.name == "rn") else 0
        self.memory_format = torch.channels_last if self.family.name == "rn" else torch.contiguous_format
        self.model.visual.to(memory_format=self.memory_format)
        self.input_size: int = input_size_of(model.visual)
        self.logit_scale = self.model.logit_scale.detach().float().exp()
        bias = getattr(self.model, "logit_bias", None)
        self.logit_bias = float(bias.detach().float()) if bias is not None else 0.0
        if bias is not None:
            self.backend.info["logit_bias"] = self.logit_bias
        self._text_cache: dict[str, torch.Tensor] = {}
        self.auto_chunk_size: int | None = None  # measured once on CUDA (camloc.cams.context)
        self.encoder = MaskedEncoder(self.model.visual, device)  # masked batches: eager or --compile on

    @classmethod
    def load(
        cls,
        name_or_path: str,
        device: str = "auto",
        precision: str = "auto",
        cache_dir: str | Path | None = None,
    ) -> "ClipModel":
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        from camloc.models.open_clip_backend import is_open_clip

        if is_open_clip(name_or_path):
            from camloc.models import open_clip_backend

            model, name, tokenizer, (mean, std), info = open_clip_backend.load(name_or_path, cache_dir)
            return cls(model, name, dev, prec, Backend("open_clip", tokenizer, mean, std, info))
        model, name = load_clip(name_or_path, cache_dir)
        return cls(model, name, dev, prec)

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    def as_input(self, images: torch.Tensor) -> torch.Tensor:
        """A batch (B, 3, n, n) on the model's device in its dtype and memory format (an asynchronous
        copy when `images` is in pinned host memory)."""
        pinned = images.device.type == "cpu" and self.device.type == "cuda" and images.is_pinned()
        return images.to(self.device, self.dtype, non_blocking=pinned).contiguous(memory_format=self.memory_format)

    def host_input(self, image: Image.Image) -> torch.Tensor:
        """The preprocessed image (1, 3, n, n) on the host, in pinned memory when the model is on CUDA:
        eval's loader threads make it while the device works on the previous image."""
        x = preprocess(image, self.input_size, self.backend.mean, self.backend.std)
        return x.pin_memory() if self.device.type == "cuda" else x

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.as_input(preprocess(image, self.input_size, self.backend.mean, self.backend.std))

    def prompt_problems(self, prompts: list[str]) -> dict[str, list[str]]:
        """Prompts that cannot mean what they say, with a warning (once per call, i.e. once per run):
        empty or whitespace-only ones (their map says nothing about any class) and ones longer than the
        text encoder's context, which CLIP truncates. Returns {"empty_prompts": [...],
        "truncated_prompts": [...]} for the run's record."""
        import warnings

        context = int(getattr(self.model, "context_length", 77))
        empty = [p for p in prompts if not p.strip()]
        long = [p for p in prompts if p.strip() and p not in self._text_cache and self.backend.count_tokens(p) > context]
        if empty:
            warnings.warn(f"{len(empty)} empty or whitespace-only prompt(s): their maps cannot show any class",
                          stacklevel=2)
        if long:
            warnings.warn(f"{len(long)} prompt(s) exceed CLIP's {context}-token context and are truncated, e.g. "
                          f"{long[0][:60]!r}...", stacklevel=2)
        return {"empty_prompts": empty, "truncated_prompts": long}

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised fp32 text embeddings (P, E); each (model, prompt) is encoded once."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            tokens = self.backend.tokenizer(new).to(self.device)
            feats = self.model.encode_text(tokens).float()
            feats = feats / feats.norm(dim=-1, keepdim=True)
            self._text_cache.update(zip(new, feats))
        return torch.stack([self._text_cache[p] for p in prompts])

    def set_text_features(self, features: dict[str, torch.Tensor]) -> None:
        """Give precomputed text embeddings (prompt -> (E,)), e.g. where the tokenizer needs a network:
        those prompts are never tokenized."""
        for prompt, feat in features.items():
            feat = torch.as_tensor(feat, dtype=torch.float32, device=self.device).reshape(-1)
            self._text_cache[prompt] = feat / feat.norm()

    def scores(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(B, E) image embeddings x (P, E) normalised text -> (B, P) fp32 scaled cosines, NaN -> 0."""
        img = image_features.float()
        img = img / img.norm(dim=-1, keepdim=True)
        return torch.nan_to_num(self.logit_scale * img @ text_features.T + self.logit_bias, nan=0.0)
