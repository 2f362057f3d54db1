"""Load CLIP: official names through the `clip` package's download-and-cache, checkpoint files
(TorchScript archives as published, or plain state_dicts), and seeded random-init models.

Every route ends in `clip.model.build_model(state_dict)`, so a tiny test model and a released
checkpoint are built by the same code.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from camloc.errors import ModelError
from camloc.models.specs import ALL_SPECS, OFFICIAL_SPECS, ModelSpec

CACHE_ENV = "CAMLOC_CACHE_DIR"


def import_clip():
    """The `clip` package (clip-anytorch or openai-clip), imported lazily without its
    pkg_resources deprecation warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        import clip
    return clip


def default_cache_dir() -> Path:
    """`$CAMLOC_CACHE_DIR`, else the `clip` package's own default `~/.cache/clip`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clip")


def list_models(pattern: str = "*") -> list[str]:
    """Model names camloc can build (official, tiny test models, real-size random models)."""
    from fnmatch import fnmatch

    return [name for name in ALL_SPECS if fnmatch(name, pattern)]


def state_dict_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a CLIP checkpoint: a published TorchScript archive or a (possibly wrapped) state_dict."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint file {path} does not exist: pass an existing .pt file to --model")
    try:
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception:  # not TorchScript: try a pickled state_dict next
        pass
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"checkpoint file {path} could not be read as a TorchScript archive or a torch state_dict "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); pass a CLIP .pt file"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint file {path} does not hold a state_dict of tensors; pass a CLIP .pt file")
    return obj


def build_from_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """`clip.model.build_model`, with a clear error for checkpoints that are not CLIP."""
    required = ("visual.conv1.weight", "text_projection", "token_embedding.weight", "logit_scale")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ModelError(
            f"{source} is not a CLIP checkpoint (missing {', '.join(missing)}); "
            "pass an OpenAI CLIP checkpoint or an official model name (see `camloc list models`)"
        )
    try:
        model = import_clip().model.build_model(dict(state_dict))
    except Exception as exc:
        raise ModelError(f"{source} could not be built as a CLIP model ({type(exc).__name__}: {exc})") from exc
    return model.float().eval()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """The SHA-256 of a state_dict's content: each entry's name, dtype, shape and bytes (on the CPU), in
    order. Two models hash alike exactly when they hold the same tensors under the same names."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in state.items():
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def random_state_dict(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Seeded random-init weights, the golden fixtures' recipe (golden README §2):
    `torch.manual_seed(seed)`, `clip.model.CLIP(*clip_args)`, `logit_scale = ln(100)`, every other
    floating tensor rounded to fp16 and stored as fp16, like the released checkpoints (so fp16 and
    fp32 runs share the same weights, and a real-size model needs half the memory while it is built)."""
    clip = import_clip()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = clip.model.CLIP(*spec.clip_args)
    finally:
        torch.random.set_rng_state(state)
    sd = model.state_dict()
    del model  # each fp32 tensor is freed as its fp16 copy replaces it
    for key, value in sd.items():
        if key == "logit_scale":
            sd[key] = torch.tensor(math.log(100.0), dtype=torch.float32)
        elif value.is_floating_point():
            sd[key] = value.half()
    return sd


def _download_official(name: str, cache_dir: Path) -> Path:
    clip = import_clip()
    url = clip.clip._MODELS[name]
    target = cache_dir / os.path.basename(url)
    try:
        return Path(clip.clip._download(url, str(cache_dir)))
    except Exception as exc:
        found = "did not find it"
        if target.is_file():  # the clip package checks the file against the SHA-256 in its URL first
            from camloc.run.files import file_sha256

            expected = url.split("/")[-2]
            actual = file_sha256(target)
            if actual != expected:
                found = (f"the file there failed the clip package's SHA-256 check (it has {actual[:12]}..., "
                         f"the release {expected[:12]}...: truncated or corrupt; delete it)")
            else:
                found = "the file there passed the SHA-256 check"
        raise ModelError(
            f"could not get CLIP weights for {name!r}: looked for {target} (cache folder from --cache-dir or "
            f"${CACHE_ENV}) and {found}, then downloading {url} failed ({type(exc).__name__}: {str(exc)[:160]}); "
            f"download that file on a machine with internet access and put it at {target}, "
            f"or pass its path to --model"
        ) from exc


def canonical_model_name(name_or_path: str) -> str:
    """The name a loaded model gets: the spec name, the resolved checkpoint path, or for open_clip
    `open_clip:ARCH:TAG` (a checkpoint file resolved)."""
    if name_or_path.startswith("open_clip:"):
        from camloc.models.open_clip_backend import _is_file_spec, parse

        arch, weights = parse(name_or_path)
        if weights != "hf-hub" and _is_file_spec(weights):
            return f"open_clip:{arch}:{Path(weights).resolve()}"
        return name_or_path
    return name_or_path if name_or_path in ALL_SPECS else str(Path(name_or_path).resolve())


def release_freed_memory() -> None:
    """Hand memory freed while building a model back to the OS (glibc keeps large freed blocks on its
    heap otherwise: building a real-size model would leave ~1 GB of dead RSS behind)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def load_clip(name_or_path: str, cache_dir: str | Path | None = None) -> tuple[torch.nn.Module, str]:
    """Build a CLIP model on the CPU in fp32. Returns (model, canonical name).

    `name_or_path` is an official name (`RN50`, `ViT-B/32`, ...), `tiny-rn` / `tiny-vit`,
    `random-<official name>`, or a path to a checkpoint file.
    """
    try:
        return _load_clip(name_or_path, cache_dir)
    finally:
        release_freed_memory()


def _load_clip(name_or_path: str, cache_dir: str | Path | None) -> tuple[torch.nn.Module, str]:
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    spec = ALL_SPECS.get(name_or_path)
    if spec is not None and spec.official:
        path = _download_official(spec.name, cache)
        return build_from_state_dict(state_dict_from_file(path), str(path)), spec.name
    if spec is not None:
        return build_from_state_dict(random_state_dict(spec), spec.name), spec.name
    from camloc.models.hf_clip import is_hf_clip_dir, load_hf_clip

    if is_hf_clip_dir(name_or_path):  # a Hugging Face CLIPModel folder: renamed to OpenAI's layout
        sd, weights = load_hf_clip(name_or_path)
        return build_from_state_dict(sd, str(weights)), canonical_model_name(name_or_path)
    looks_like_path = any(sep in name_or_path for sep in ("/", "\\")) or name_or_path.endswith((".pt", ".pth"))
    if looks_like_path or Path(name_or_path).exists():
        sd = state_dict_from_file(name_or_path)
        return build_from_state_dict(sd, name_or_path), canonical_model_name(name_or_path)
    raise ModelError(
        f"unknown model {name_or_path!r}; valid names: {', '.join(ALL_SPECS)}; or pass a path to a checkpoint file"
    )


__all__ = ["load_clip", "list_models", "default_cache_dir", "OFFICIAL_SPECS"]
