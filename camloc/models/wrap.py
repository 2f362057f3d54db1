"""Models already in memory (`camloc.wrap_model`): an open_clip model, a Hugging Face `CLIPModel`, or the `clip`
package's `CLIP`, made into a `ClipModel` without a file or a name.

What camloc needs besides the towers, and where it comes from:
- the tokenizer: the `clip` package's BPE for `clip.model.CLIP` and `CLIPModel` (the same vocabulary), open_clip's
  for its `CLIP` class (OpenAI's BPE at the model's context length); anything else (SigLIP's `CustomTextCLIP` and
  its Hugging Face tokenizer) must be given: `tokenizer=open_clip.get_tokenizer(ARCH)`;
- the normalisation: open_clip's `visual.preprocess_cfg`, else CLIP's constants (OpenAI's, and
  `CLIPImageProcessor`'s defaults), unless `mean` and `std` are given;
- the input size: the tower's own (`input_resolution`, `image_size`, the config's `image_size`).

The object is copied (camloc moves it to its device and precision, and folds a ResNet's BatchNorm into its
convolutions), so the caller's model is never changed. A run made from it records its class and the SHA-256 of
its state_dict (`weights`), and its name is `in-memory:<class>-<first 12 hex digits of that SHA-256>`, so two
objects holding other weights never share a run folder or a heatmap cache.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from camloc.errors import ModelError


def _class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _kind(obj) -> str | None:
    """openai, open_clip, hf or None, by the object's class (never importing a library the caller did not)."""
    import sys

    module = type(obj).__module__
    if module.startswith("clip.") and "clip" in sys.modules and isinstance(obj, sys.modules["clip"].model.CLIP):
        return "openai"
    if module.startswith("open_clip.") and hasattr(obj, "visual") and hasattr(obj, "encode_text"):
        return "open_clip"
    if module.startswith("transformers.") and type(obj).__name__ == "CLIPModel":
        return "hf"
    return None


def wrap_model(obj: Any, *, tokenizer: Callable | None = None, mean=None, std=None, name: str | None = None,
               device: str = "auto", precision: str = "auto"):
    """A `ClipModel` of an in-memory CLIP model (see the module's docstring); a `ClipModel` is returned as it is."""
    from camloc.models.clip_model import Backend, ClipModel, resolve_device, resolve_precision
    from camloc.models.loading import state_dict_sha256
    from camloc.models.preprocess import CLIP_MEAN, CLIP_STD

    if isinstance(obj, ClipModel):
        return obj
    if not isinstance(obj, torch.nn.Module):
        raise ModelError(f"a model must be a name, a path, a camloc ClipModel or a CLIP model object (torch.nn.Module); "
                         f"got {type(obj).__name__}")
    if (mean is None) != (std is None):
        raise ModelError("give both mean and std (the image normalisation the weights were trained with), or neither")
    kind = _kind(obj)
    sha = state_dict_sha256(obj.state_dict())
    info = {"backend": kind or "object", "arch": "in-memory", "class": _class_name(obj), "weights": "in-memory",
            "sha256": sha}
    if kind == "hf":
        model = _from_hf(obj)
    else:
        missing = [a for a in ("visual", "encode_image", "encode_text", "logit_scale") if not hasattr(obj, a)]
        if missing:
            raise ModelError(f"{_class_name(obj)} is not a CLIP model camloc can read: it has no "
                             f"{', '.join(missing)} (camloc reads the clip package's CLIP, open_clip models and "
                             "transformers' CLIPModel)")
        model = copy.deepcopy(obj).float()
    if tokenizer is not None:
        make = lambda: tokenizer  # noqa: E731
    elif kind in ("openai", "hf"):
        from camloc.models.clip_model import _OpenAITokenizer
        from camloc.models.loading import import_clip

        make = lambda: _OpenAITokenizer(import_clip().tokenize)  # noqa: E731  (the clip package's BPE)
    elif kind == "open_clip" and type(obj).__name__ == "CLIP":
        import open_clip

        context = int(getattr(obj, "context_length", 77))
        make = lambda: open_clip.tokenizer.SimpleTokenizer(context_length=context)  # noqa: E731
    else:
        raise ModelError(f"camloc cannot find the tokenizer of a {_class_name(obj)} object: pass tokenizer=... "
                         "(for open_clip, open_clip.get_tokenizer(ARCH))")
    if mean is None:
        cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ModelError(f"mean and std must be 3 numbers each (std positive), got {mean} and {std}")
    info.update(mean=list(mean), std=list(std))
    backend = Backend("open_clip" if kind == "open_clip" else "openai", make, mean, std, info)
    dev = resolve_device(device)
    try:
        return ClipModel(model, name or f"in-memory:{type(obj).__name__}-{sha[:12]}", dev,
                         resolve_precision(precision, dev), backend)
    except ModelError:
        raise
    except Exception as exc:  # a tower camloc has no adapter for
        raise ModelError(f"{_class_name(obj)}: camloc has no adapter for its image tower "
                         f"{type(getattr(obj, 'visual', obj)).__name__} ({type(exc).__name__}: {exc})") from None


def _from_hf(obj) -> torch.nn.Module:
    """A transformers `CLIPModel` rebuilt as the clip package's `CLIP` from its renamed state_dict (the path of
    a Hugging Face folder; `camloc.models.hf_clip`), after the same checks of its config."""
    from pathlib import Path

    from camloc.models.hf_clip import _check_config, to_openai_layout
    from camloc.models.loading import build_from_state_dict

    config = obj.config.to_dict()
    where = Path(f"<{_class_name(obj)} object>")
    _check_config(config, where)
    state = {k: v.detach().float().cpu() for k, v in obj.state_dict().items()}
    try:
        return build_from_state_dict(to_openai_layout(state), str(where))
    except KeyError as exc:
        raise ModelError(f"{where} is not a CLIPModel (no {exc.args[0]})") from None
