"""ProxyCLIP (Lan et al., ECCV 2024, "ProxyCLIP: proxy attention improves CLIP for open-vocabulary
segmentation"; mc-lan/ProxyCLIP `proxyclip_segmentor.py` at 05c3c18 and `open_clip/transformer.py` at f2919bb,
read, not copied: no LICENSE file, its README names the NTU S-Lab License 1.0): CLIP's last block is replaced by an attention whose
weights come from a vision foundation model (`--proxy-model`, a timm ViT such as DINO's
`vit_base_patch8_224.dino` or DINOv2's `vit_base_patch14_reg4_dinov2.lvd142m`):

- the proxy sees the same input, re-normalised from CLIP's mean and std to its own (timm's pretrained
  config), at the CLIP model's input size; its patch features F (the last block's tokens after its final
  norm, prefix tokens dropped: what DINO's `get_intermediate_layers` gives) on its own grid H x W. Under an ovseg
  harness preset (windows larger than the model's input, `position_resize` sclip) a pretrained proxy's position
  embeddings are resized as DINO's `interpolate_pos_encoding` does, as the reference's torch-hub DINO is; on CUDA
  the proxy runs in the CLIP model's precision (the reference halves it);
- S = normalise(F)^T normalise(F), S <- (S - beta mean(S)) gamma (`--proxy-beta` 1.2, `--proxy-gamma` 3,
  the reference's defaults), entries below 0 set to -inf, softmax over each row: one attention for
  every head;
- CLIP's last-block values v (of ln_1 of its input, patch tokens only) are resized bilinearly from
  CLIP's grid to H x W, attended per head, out_proj; no residual, no FFN; then the rest of CLIP's tower
  per token (`dense_tokens`) and the cosine with the prompts on the proxy's grid.

The proxy's name is part of the method's options (run identity, cache key); `NAME:random[@SEED]` builds
it from that seed, and the SHA-256 of its state_dict is recorded in the run's weights (identity). It needs a
second model, so `--method all` leaves it out; `camloc list methods` shows it. The reference slides
336 px windows and averages 80 templates; camloc scores the given prompts on the model's input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from camloc.cams.context import CamContext
from camloc.methods.dense import similarity_attention, square_grid
from camloc.cams.options import between, method_option
from camloc.cams.registry import register_method
from camloc.errors import ModelError, OptionError
from camloc.models.families import dense_tokens


def _name(value: str) -> str:
    value = str(value).strip()
    arch, _, weights = value.partition(":")
    if value and (not arch or not (weights in ("", "random") or _random_seed(weights) is not None)):
        raise OptionError(f"--proxy-model {value!r} must be a timm model name, or NAME:random[@SEED] for seeded "
                          "random weights (seed 0 when none is given)")
    return value


def _random_seed(weights: str) -> int | None:
    """The seed of `random` (0) or `random@SEED` (a whole number 0..2**32-1); None for anything else."""
    if weights == "random":
        return 0
    head, _, seed = weights.partition("@")
    if head == "random" and seed.isdigit() and int(seed) < 2**32:
        return int(seed)
    return None


PROXY_MODEL = method_option("proxy_model", str, "", "ProxyCLIP: the vision foundation model whose patch features "
                            "weigh CLIP's values, a timm ViT name (e.g. vit_base_patch8_224.dino, "
                            "vit_base_patch14_reg4_dinov2.lvd142m; NAME:random[@SEED] for seeded random weights). "
                            "Required for proxyclip; its weights' SHA-256 is recorded in the run.", _name)
PROXY_BETA = method_option("proxy_beta", float, 1.2, "ProxyCLIP: the proxy similarity's mean is subtracted "
                           "beta times (the reference's 1.2).", between("--proxy-beta", 0, 1000, low_open=True))
PROXY_GAMMA = method_option("proxy_gamma", float, 3.0, "ProxyCLIP: the proxy similarity's temperature gamma (the "
                            "reference's 3.0).", between("--proxy-gamma", 0, 1000, low_open=True))

_LOADED: dict[tuple, tuple] = {}


def load_proxy(name: str, size: int, device: torch.device, how: str = "size", dtype: torch.dtype = torch.float32):
    """(the timm model in eval mode on `device` in `dtype`, its mean, its std), built once per process.

    At an input size other than the one it was trained at, a pretrained proxy's position embeddings are resized
    `how` the ovseg harness resizes CLIP's (`camloc.segment.infer.resized_positions`): `sclip` is DINO's own
    `interpolate_pos_encoding` (bicubic by the scale factor (n + 0.1) / g, what the ProxyCLIP harness runs through
    torch hub), for proxies whose position table holds one class token; otherwise timm resizes them to exactly
    n x n when it loads the weights. Random weights (`NAME:random`) are drawn at the size itself."""
    key = (name, size, str(device), how, str(dtype))
    if key in _LOADED:
        return _LOADED[key]
    try:
        import timm
    except ImportError:
        raise OptionError("proxyclip needs timm: pip install 'camloc[open-clip]'") from None
    arch, _, weights = name.partition(":")
    seed = _random_seed(weights)
    if not timm.is_model(arch):
        raise OptionError(f"--proxy-model {name}: timm has no model {arch!r} (see timm.list_models('*dino*'))")
    if seed is None:
        from camloc.models.open_clip_backend import hub_offline

        hub_offline()  # HF_HUB_OFFLINE set after huggingface_hub was imported still counts
    try:
        with torch.random.fork_rng(devices=[]):  # random weights: drawn from the seed, never from the run's RNG
            torch.manual_seed(seed or 0)
            if seed is None and how == "sclip":
                proxy = _harness_resized(timm, arch, size)
            else:
                proxy = timm.create_model(arch, pretrained=seed is None, num_classes=0, img_size=size)
    except TypeError as exc:  # not a ViT that takes an input size
        raise OptionError(f"--proxy-model {name}: {exc}; give a timm ViT") from None
    except (OSError, RuntimeError, ValueError) as exc:
        cfg = timm.models.get_pretrained_cfg(arch)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        where = f"the Hugging Face repository {repo} (its model.safetensors)" if repo else "its pretrained weights"
        raise ModelError(f"--proxy-model {name}: timm could not load {where} ({type(exc).__name__}); timm reads it "
                         "from the Hugging Face cache (HF_HOME, filled on a machine with network), or use "
                         f"{arch}:random for random weights") from None
    if not (hasattr(proxy, "forward_features") and hasattr(proxy, "num_prefix_tokens")
            and hasattr(proxy, "patch_embed")):
        raise OptionError(f"--proxy-model {name}: not a timm vision transformer")
    cfg = getattr(proxy, "pretrained_cfg", {}) or {}
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32, device=device).view(1, 3, 1, 1)
    _LOADED[key] = (proxy.eval().to(device=device, dtype=dtype), mean, std)
    return _LOADED[key]


def _harness_resized(timm, arch: str, size: int):
    """The pretrained proxy at `size`, its position embeddings resized as DINO's `interpolate_pos_encoding` does
    (one class token in the table); a proxy of another layout, or at its own size, as timm loads it."""
    from camloc.segment.infer import resized_positions

    trained = timm.create_model(arch, pretrained=True, num_classes=0)
    embed = getattr(trained, "patch_embed", None)
    if embed is None or embed.img_size[0] == size:
        return trained  # not a ViT (refused by the caller), or at its own size
    grid = embed.grid_size
    if not (getattr(trained, "pos_embed", None) is not None and getattr(trained, "num_prefix_tokens", 0) == 1
            and not getattr(trained, "no_embed_class", False) and grid[0] == grid[1]):
        return timm.create_model(arch, pretrained=True, num_classes=0, img_size=size)  # timm's own resize
    proxy = timm.create_model(arch, pretrained=False, num_classes=0, img_size=size)
    state = trained.state_dict()
    rows, cols = proxy.patch_embed.grid_size
    state["pos_embed"] = resized_positions(state["pos_embed"][0].float(), grid[0], rows, cols, "sclip")[None].to(
        state["pos_embed"].dtype)
    proxy.load_state_dict(state)
    return proxy


def proxy_weights(model, options: dict) -> dict:
    """What config.json records of the proxy: its name, the seed of random weights, and the SHA-256 of its
    state_dict (names, dtypes, shapes and bytes in order), whether timm built or fetched it."""
    from camloc.models.loading import state_dict_sha256

    name = options.get("proxy_model", PROXY_MODEL.default)
    proxy, _, _ = load_proxy(name, model.input_size, model.device)
    seed = _random_seed(name.partition(":")[2])
    return {"proxy_model": name, **({"seed": seed} if seed is not None else {}),
            "sha256": state_dict_sha256(proxy.state_dict())}


def proxy_features(ctx: CamContext, name: str) -> torch.Tensor:
    """The proxy's patch features of the image on its own grid: (C, H, W), fp32."""
    model = ctx.model
    proxy, mean, std = load_proxy(name, model.input_size, ctx.input.device, getattr(model, "position_resize", "size"),
                                  getattr(model, "dtype", torch.float32) if ctx.input.device.type == "cuda" else torch.float32)
    clip_mean = torch.tensor(model.backend.mean, dtype=torch.float32, device=ctx.input.device).view(1, 3, 1, 1)
    clip_std = torch.tensor(model.backend.std, dtype=torch.float32, device=ctx.input.device).view(1, 3, 1, 1)
    image = ctx.input.float() * clip_std + clip_mean
    dtype = next(proxy.parameters()).dtype  # the CLIP model's precision on CUDA, as the harness halves its proxy
    tokens = proxy.forward_features(((image - mean) / std).to(dtype))[:, proxy.num_prefix_tokens:]
    grid = proxy.patch_embed.grid_size
    return tokens[0].T.reshape(-1, *grid).float()


def proxy_attention(features: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """softmax rows of (S - beta mean(S)) gamma with negatives -inf, S the cosine between patch features: (HW, HW)."""
    f = F.normalize(features.flatten(1), dim=0)
    return similarity_attention(f.T @ f, beta, gamma)


@register_method("proxyclip", segments=True, shares_forward=True, block_inputs_only=True, needs="--proxy-model",
                 families=frozenset({"vit", "vit-avg", "timm-vit"}), postprocess="resize_minmax",
                 params=("proxy_model", "proxy_beta", "proxy_gamma"), weights=proxy_weights,
                 description="ProxyCLIP (Lan et al. 2024): CLIP's last-block values attended with a vision foundation "
                             "model's patch-feature similarity (--proxy-model, timm DINO/DINOv2); one forward each.")
def proxyclip(ctx: CamContext) -> torch.Tensor:
    name = ctx.options.get("proxy_model", PROXY_MODEL.default)
    if not name:
        raise OptionError("proxyclip needs --proxy-model (a timm ViT, e.g. vit_base_patch8_224.dino)")
    beta = float(ctx.options.get("proxy_beta", PROXY_BETA.default))
    gamma = float(ctx.options.get("proxy_gamma", PROXY_GAMMA.default))
    with torch.no_grad():
        features = proxy_features(ctx, name)
        attn = proxy_attention(features, beta, gamma)
        _, inputs = ctx.block_inputs(ctx.depth - 1)
        access = ctx.block_access(-1)
        _, _, v = access.qkv(access.ln_1(inputs[-1]))  # (1, heads, N, d)
        prefix = ctx.model.family.prefix
        grid = int(round((v.shape[-2] - prefix) ** 0.5))
        heads, d = v.shape[1], v.shape[-1]
        v = v[0, :, prefix:].transpose(1, 2).reshape(heads, d, grid, grid)
        v = F.interpolate(v.float(), size=features.shape[-2:], mode="bilinear", align_corners=False)
        v = v.flatten(2).transpose(1, 2)  # (heads, HW, d)
        out = access.merge((attn.to(v.dtype) @ v)[None].to(inputs[-1].dtype))
        dense = dense_tokens(ctx.model.visual, out).float()[0]
        return square_grid(F.normalize(dense, dim=-1) @ ctx.text_features.T)
