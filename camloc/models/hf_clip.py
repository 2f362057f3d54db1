"""Hugging Face `CLIPModel` checkpoints (a folder with `config.json` and `model.safetensors` or
`pytorch_model.bin`, as fine-tuned domain CLIPs are published): the weights are renamed to OpenAI's
layout and built by the `clip` package, so every OpenAI-path method and fixture applies. No
`transformers` dependency: safetensors files are read directly.

OpenAI's `build_model` infers the architecture from the weights with QuickGELU activations and
width / 64 attention heads; a checkpoint that differs (GELU, other head counts) would build silently
wrong, so it is refused with the reason.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from camloc.errors import ModelError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf_clip_dir(path: str | Path) -> bool:
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "clip"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path)), path
            return torch.load(str(path), map_location="cpu", weights_only=True), path
    raise ModelError(f"{folder} has a CLIP config.json but no {' or '.join(WEIGHT_FILES)}")


def _check_config(config: dict, folder: Path) -> None:
    for part in ("vision_config", "text_config"):
        cfg = config.get(part) or {}
        act = cfg.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ModelError(f"{folder}: {part}.hidden_act is {act!r}; the OpenAI layout builds QuickGELU, so this "
                             "checkpoint would run with the wrong activation; load it with open_clip instead")
        width, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
        if width and heads and width // 64 != heads:
            raise ModelError(f"{folder}: {part} has {heads} attention heads of width {width}; the OpenAI layout "
                             f"assumes width / 64 = {width // 64} heads, so it would split them wrongly")


def to_openai_layout(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a `CLIPModel` state dict to `clip.model.CLIP`'s (q, k, v projections concatenated into
    `in_proj_*`; the projections transposed: HF stores them as Linear weights)."""
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].T.contiguous(),
        "logit_scale": hf["logit_scale"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],  # sic: HF's name
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].T.contiguous(),
    }
    for tower, prefix in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
        i = 0
        while f"{tower}.encoder.layers.{i}.self_attn.q_proj.weight" in hf:
            src, dst = f"{tower}.encoder.layers.{i}", f"{prefix}.resblocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{dst}.attn.in_proj_{kind}"] = torch.cat([hf[f"{src}.self_attn.{p}_proj.{kind}"]
                                                                for p in ("q", "k", "v")])
                out[f"{dst}.attn.out_proj.{kind}"] = hf[f"{src}.self_attn.out_proj.{kind}"]
                out[f"{dst}.ln_1.{kind}"] = hf[f"{src}.layer_norm1.{kind}"]
                out[f"{dst}.ln_2.{kind}"] = hf[f"{src}.layer_norm2.{kind}"]
                out[f"{dst}.mlp.c_fc.{kind}"] = hf[f"{src}.mlp.fc1.{kind}"]
                out[f"{dst}.mlp.c_proj.{kind}"] = hf[f"{src}.mlp.fc2.{kind}"]
            i += 1
    return out


def load_hf_clip(folder: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The OpenAI-layout state dict of a Hugging Face CLIP folder, and its weights file. The layer
    counts must be the config's: OpenAI's `build_model` counts the layers it finds, so a missing one
    would build a shallower model without a word."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    _check_config(config, folder)
    weights, path = read_weights(folder)
    try:
        sd = to_openai_layout(weights)
    except KeyError as exc:
        raise ModelError(f"{path} is not a CLIPModel checkpoint (no {exc.args[0]})") from None
    for part, prefix in (("text_config", "transformer.resblocks."), ("vision_config", "visual.transformer.resblocks.")):
        expected = (config.get(part) or {}).get("num_hidden_layers")
        found = sum(1 for k in sd if k.startswith(prefix) and k.endswith(".attn.in_proj_weight"))
        if expected is not None and expected != found:
            raise ModelError(f"{path}: {part}.num_hidden_layers is {expected}, the weights have {found}; the "
                             "checkpoint is truncated or not this config's")
    return sd, path
