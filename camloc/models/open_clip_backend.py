"""The open_clip backend: `--model open_clip:ARCH:TAG|FILE|random` and `open_clip:hf-hub:ORG/REPO`.

- TAG: one of open_clip's pretrained tags for ARCH (`camloc list models --backend open_clip`), fetched
  by open_clip's own download into its Hugging Face hub cache (`--cache-dir`, `HF_HUB_OFFLINE`
  honoured); when it cannot be had, one line names the hub repository and file.
- FILE: a local checkpoint, what `open_clip.create_model(ARCH, pretrained=FILE)` loads.
- `random`: seeded random init (`random@SEED`, default seed 0), for tests and benchmarks.
- `hf-hub:ORG/REPO`: a model published with its open_clip config on the hub.

OpenAI weights on an architecture without QuickGELU build the wrong activation (open_clip only
warns): such a request is mapped to the `-quickgelu` architecture, and the mapping is recorded.
camloc's own tiny configs (`camloc-tiny-*`, registered here with tiny timm trunks) exist for tests
and benchmarks; they are random-init only.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from camloc.errors import ModelError, OptionError

PREFIX = "open_clip:"
HF_PREFIX = "hf-hub:"


def is_open_clip(name: str) -> bool:
    return name.startswith(PREFIX)


def import_open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise ModelError("the open_clip backend needs open-clip-torch: pip install 'camloc[open-clip]'") from exc
    register_tiny_configs(open_clip)
    return open_clip


def parse(name: str) -> tuple[str, str]:
    """`open_clip:ARCH:WEIGHTS` -> (ARCH, WEIGHTS); `open_clip:hf-hub:ORG/REPO` -> (that, "hf-hub")."""
    rest = name[len(PREFIX):]
    if rest.startswith(HF_PREFIX):
        if len(rest) == len(HF_PREFIX):
            raise OptionError(f"--model {name!r}: give the hub repository, open_clip:hf-hub:ORG/REPO")
        return rest, "hf-hub"
    arch, sep, weights = rest.partition(":")
    if not sep or not arch or not weights:
        raise OptionError(f"--model {name!r} must look like open_clip:ARCH:TAG, open_clip:ARCH:/path/ckpt.pt, "
                          "open_clip:ARCH:random or open_clip:hf-hub:ORG/REPO (see `camloc list models --backend "
                          "open_clip`)")
    return arch, weights


def list_pretrained(pattern: str = "*") -> list[tuple[str, str]]:
    from fnmatch import fnmatch

    open_clip = import_open_clip()
    return [(a, t) for a, t in open_clip.list_pretrained() if fnmatch(a, pattern) or fnmatch(f"{a}:{t}", pattern)]


def file_sha256(path: Path) -> str:
    """A weights file's SHA-256: from the Hugging Face cache's content-addressed blob name where the
    file is one (no read), else computed."""
    target = Path(os.path.realpath(path))
    if len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name) and target.parent.name == "blobs":
        return target.name
    from camloc.run.files import file_sha256 as computed

    return computed(target)


def _is_file_spec(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))


def load(name: str, cache_dir: str | Path | None = None):
    """Build an open_clip model in fp32 on the CPU. Returns (model, canonical name, tokenizer factory,
    (mean, std), info), where info records backend, architecture, weights and their SHA-256."""
    open_clip = import_open_clip()
    arch, weights = parse(name)
    cache = str(cache_dir) if cache_dir else None
    info: dict = {"backend": "open_clip", "arch": arch, "weights": weights}
    if weights == "hf-hub":
        hub_offline()
        try:
            model = open_clip.create_model(arch, cache_dir=cache)
        except Exception as exc:
            raise ModelError(f"could not get open_clip model {arch!r} from the Hugging Face hub ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160]}); with HF_HUB_OFFLINE=1 it must be in the hub cache "
                             f"({cache or 'the default ~/.cache/huggingface'})") from exc
    else:
        if arch not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if arch.lower() in m.lower()][:6]
            raise ModelError(f"open_clip has no architecture {arch!r}" + (f"; close: {', '.join(close)}" if close else "")
                             + " (see `camloc list models --backend open_clip`)")
        if weights == "random" or weights.startswith("random@"):
            seed = int(weights.partition("@")[2] or 0)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = _quietly(open_clip.create_model, arch, pretrained=None)
            info.update(weights="random", seed=seed, sha256=None)
        elif _is_file_spec(weights):
            path = Path(weights)
            if not path.is_file():
                raise ModelError(f"open_clip checkpoint {path} does not exist: give an existing file after "
                                 f"open_clip:{arch}:")
            try:
                model = open_clip.create_model(arch, pretrained=str(path))
            except Exception as exc:
                raise ModelError(f"{path} could not be loaded as open_clip {arch} weights ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200]})") from exc
            info.update(weights=str(path.resolve()), sha256=file_sha256(path))
        else:
            arch, model, info = _pretrained(open_clip, arch, weights, cache, info)
    model = model.float().eval()
    mean, std = _normalisation(open_clip, info["arch"] if weights != "hf-hub" else None, info.get("tag"), model)
    info.update(mean=list(mean), std=list(std))
    canonical = f"{PREFIX}{arch}:{info['weights']}" if weights != "hf-hub" else name
    return model, canonical, lambda: _tokenizer(open_clip, arch), (mean, std), info


def _quietly(fn, *args, **kwargs):
    import logging

    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # "No pretrained weights loaded ... initialized randomly": that is the point
    try:
        return fn(*args, **kwargs)
    finally:
        logger.setLevel(level)


def _pretrained(open_clip, arch: str, tag: str, cache: str | None, info: dict):
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        raise ModelError(f"open_clip {arch} has no pretrained tag {tag!r}; it has {', '.join(tags) or 'none'} (or give "
                         "a checkpoint file or random)")
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if cfg.get("quick_gelu") and not arch.endswith("-quickgelu"):
        quick = f"{arch}-quickgelu"
        if quick not in open_clip.list_models():
            raise ModelError(f"open_clip:{arch}:{tag} are QuickGELU weights on an architecture without QuickGELU, "
                             "which builds the wrong activation; no -quickgelu variant exists to map it to")
        info["mapped_from"] = arch
        arch = quick
        info["arch"] = arch
    repo = cfg.get("hf_hub") or cfg.get("url") or "?"
    offline = hub_offline()
    try:
        if offline and not cfg.get("hf_hub"):
            raise OSError("offline, and this tag is downloaded from a URL, not the hub")
        path = open_clip.download_pretrained(cfg, cache_dir=cache)
        model = open_clip.create_model(arch, pretrained=path)
    except Exception as exc:
        offline = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise ModelError(f"could not get open_clip weights {arch}:{tag}: hub repository {repo} "
                         f"(open_clip_model.safetensors or open_clip_pytorch_model.bin) is not in the cache "
                         f"{cache or '~/.cache/huggingface'} and could not be downloaded{offline} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); download it on a machine with "
                         f"internet access into that cache, or pass the file: open_clip:{arch}:/path/to/file") from exc
    info.update(tag=tag, weights=tag, file=str(path), sha256=file_sha256(Path(path)))
    return arch, model, info


def hub_offline() -> bool:  # also used by ProxyCLIP's proxy loading
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now. huggingface_hub reads it once, at
    import: set later (a notebook, a test), it would be ignored and the download would wait on the
    network; camloc passes the current value on."""
    on = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if on:
        try:
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = True
        except ImportError:
            pass
    return on


def _normalisation(open_clip, arch: str | None, tag: str | None, model) -> tuple[tuple, tuple]:
    """The image mean and std the weights were trained with: the pretrained tag's; for a file or
    random weights, the one all of the architecture's tags share (SigLIP's 0.5 for every SigLIP tag);
    for a hub model, its config's; else CLIP's."""
    from camloc.models.preprocess import CLIP_MEAN, CLIP_STD

    if arch is not None:
        tags = [tag] if tag else open_clip.list_pretrained_tags_by_model(arch)
        found = {(tuple(c["mean"]), tuple(c["std"])) for t in tags
                 if "mean" in (c := open_clip.get_pretrained_cfg(arch, t)) and "std" in c}
        if len(found) == 1:
            return found.pop()
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))


def _tokenizer(open_clip, arch: str):
    try:
        return open_clip.get_tokenizer(arch)
    except Exception as exc:
        raise ModelError(f"the tokenizer of open_clip {arch} could not be loaded ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120]}); SigLIP-style tokenizers come from the Hugging Face hub "
                         "and need it once (or its cache); in Python, give precomputed text embeddings with "
                         "ClipModel.set_text_features") from exc


# --- tiny configs for tests and benchmarks ---------------------------------------------------------

_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}


def _timm_tiny(trunk: str, pool: str, proj: str, **extra) -> dict:
    """A tiny open_clip config on one of the tiny timm trunks registered below (64 px, 64-d embedding)."""
    return {"embed_dim": 64, "vision_cfg": {"image_size": 64, "timm_model_name": trunk, "timm_model_pretrained": False,
                                            "timm_pool": pool, "timm_proj": proj}, "text_cfg": _TEXT, **extra}


TINY_CONFIGS = {
    # open_clip's own ViT, class-token pooled, and average pooled
    "camloc-tiny-vit": {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                                        "head_width": 32}, "text_cfg": _TEXT},
    "camloc-tiny-vit-avg": {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                                            "head_width": 32, "pool_type": "avg"}, "text_cfg": _TEXT},
    # OpenAI's ModifiedResNet layout as open_clip builds it
    "camloc-tiny-rn": {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
                       "text_cfg": _TEXT},
    # timm trunks: SigLIP-style (no class token, attention-pool "map" head; not named siglip, whose
    # tokenizer open_clip fetches from the hub), EVA02-style (class token, rotary), ConvNeXt
    "camloc-tiny-mapvit": _timm_tiny("camloc_tiny_mapvit", "map", "none"),
    # the same trunk with SigLIP's learnt logit bias (open_clip's init_logit_bias; SigLIP initialises it to -10;
    # not named siglip either)
    "camloc-tiny-mapvit-bias": _timm_tiny("camloc_tiny_mapvit", "map", "none", init_logit_bias=-10.0),
    "camloc-tiny-eva": _timm_tiny("camloc_tiny_eva", "token", "linear"),
    # EVA02-CLIP's block layout (timm's eva02_*_clip_*: separate q/k/v, sub-LayerNorm in the attention, SwiGLU MLP
    # with its LayerNorm), and the tiny EVA trunk averaging its tokens
    "camloc-tiny-eva02": _timm_tiny("camloc_tiny_eva02", "token", "linear"),
    "camloc-tiny-eva-avg": _timm_tiny("camloc_tiny_eva", "avg", "linear"),
    "camloc-tiny-convnext": _timm_tiny("camloc_tiny_convnext", "avg", "linear"),
}
_registered = False


def _trunk_kwargs(kwargs: dict, pool: str) -> dict:
    """The timm arguments open_clip passes that a tiny trunk takes (not timm's factory-only ones)."""
    keep = {k: kwargs[k] for k in ("num_classes", "drop_path_rate") if k in kwargs}
    return {**keep, "global_pool": kwargs.get("global_pool") or pool}


def _with_cfg(model):
    model.pretrained_cfg = model.default_cfg = {}  # what timm's factory would attach (open_clip reads it)
    return model


def register_tiny_configs(open_clip) -> None:
    """Add camloc's tiny configs to open_clip, and their tiny trunks to timm (once per process)."""
    global _registered
    if _registered:
        return
    _registered = True
    from open_clip import factory

    for name, cfg in TINY_CONFIGS.items():
        factory._MODEL_CONFIGS.setdefault(name, cfg)
    try:
        import timm
        from timm.models import register_model
    except ImportError:
        return
    if "camloc_tiny_mapvit" in timm.list_models("camloc_tiny_*"):
        return

    @register_model
    def camloc_tiny_mapvit(pretrained=False, **kwargs):
        from timm.models.vision_transformer import VisionTransformer

        return _with_cfg(VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                           class_token=False, **_trunk_kwargs(kwargs, "map")))

    @register_model
    def camloc_tiny_eva(pretrained=False, **kwargs):
        from timm.models.eva import Eva

        return _with_cfg(Eva(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, use_rot_pos_emb=True,
                             ref_feat_shape=(4, 4), **_trunk_kwargs(kwargs, "token")))

    @register_model
    def camloc_tiny_eva02(pretrained=False, **kwargs):
        from timm.models.eva import Eva

        return _with_cfg(Eva(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3,
                             qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                             use_rot_pos_emb=True, ref_feat_shape=(4, 4), **_trunk_kwargs(kwargs, "token")))

    @register_model
    def camloc_tiny_convnext(pretrained=False, **kwargs):
        from timm.models.convnext import ConvNeXt

        return _with_cfg(ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), **_trunk_kwargs(kwargs, "avg")))
