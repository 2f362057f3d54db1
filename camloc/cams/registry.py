"""The method registry: `@register_method("name", ...)` fills it once; everything else reads it."""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Callable

import torch

from camloc.errors import OptionError

if TYPE_CHECKING:
    from camloc.cams.context import CamContext


@dataclass(frozen=True)
class MethodSpec:
    name: str
    compute: Callable[["CamContext"], torch.Tensor]
    """Returns the map for every prompt, (P, h, w) on the model's device, before post-processing."""
    families: frozenset[str] = frozenset({"rn", "vit", "vit-avg", "timm-vit", "convnext"})
    uses_gradients: bool = False
    """Needs d s_p / d A (shared by every gradient method: one batched backward per image)."""
    masked_forwards: bool = False
    """Scores masked copies of the image (the score family)."""
    postprocess: str = "grid"
    """`grid`: the spec's two-stage relu/min-max around the resize to raw size (docs/protocol.md §3)."""
    description: str = ""
    prompt_coupled: bool = False
    """A prompt's map depends on the image's other prompts (a softmax or a contrast over them): runs
    always score all of the image's prompts together, so a resumed or partial image gets the same maps."""
    params: tuple[str, ...] = ()
    """The options that change this method's maps (`camloc.cams.options`, declared in the method's own
    module; also "seed" for RISE): part of its heatmap-cache keys."""
    segments: bool = False
    """One forward scores every query on the patch grid (the dense family): the method can run the
    open-vocabulary segmentation protocol (`--protocols ovseg`), whose cost is then one forward per
    window for all of a dataset's classes."""
    needs: str = ""
    """An option naming a second model the method needs (ProxyCLIP: --proxy-model): such a method is not
    part of `--method all`, which is every method the CLIP model alone can run."""
    poolings: frozenset[str] | None = None
    """The embedding poolings (`Family.pooling`: token, avg, map) the method is defined for; None = all."""
    weights: Callable[..., dict] | None = None
    """`weights(model, options) -> dict`: the identity of a second model the method loads (ProxyCLIP's proxy:
    name, seed, state_dict SHA-256), recorded in the run's weights under the method's name."""
    unbatched: bool = False
    """The map has hard cuts on values of the forward (SC-CLIP's outlier choice and similarity threshold), which
    a batched forward's float rounding can flip: the method then reads a forward of its image alone, so its
    maps never depend on `--image-batch` or on ovseg's window batching (one extra forward per image when
    batched)."""
    origin: dict | None = None
    """Where a method from outside camloc comes from (`camloc.plugins.origin_of`: module, file SHA-256,
    distribution); None for camloc's own. Part of the run identity and the heatmap-cache key."""
    shares_forward: bool = False
    """Reads the image's one encoder forward (target activations, embedding, ViT block inputs), which
    `share_batch` computes for several images in one batch (eval's `--image-batch`)."""
    block_inputs_only: bool = False
    """Of that forward, reads only the ViT blocks' inputs (`CamContext.block_inputs` without the embedding):
    when every method of an image says so, its forward stops at the last block's input (the last block, the
    head and the projection would run for nothing; `CamContext.blocks_only`)."""


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, **spec_fields) -> Callable:
    """Decorator: register `fn(ctx) -> (P, h, w)` as method `name`."""

    def decorate(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        if not name or name != name.strip() or "," in name or name == "all":
            raise ValueError(f"method name {name!r}: a non-empty name without commas or spaces around it, not 'all'")
        doc = (fn.__doc__ or "").strip()
        description = spec_fields.pop("description", None) or (doc.splitlines()[0] if doc else name)
        from camloc.plugins import origin_of

        METHODS[name] = MethodSpec(name=name, compute=fn, description=description, origin=origin_of(fn),
                                   **spec_fields)
        return fn

    return decorate


CANONICAL_ORDER = ["gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "gscorecam", "gscorecam-abs",
                   "groupcam", "hilacam", "clip-es", "grad-eclip", "legrad", "attnlrp", "maskclip", "sclip", "clearclip", "naclip", "cliptrase", "scclip", "cliper", "resclip", "proxyclip", "gem", "clipsurgery", "rise"]
"""The order of listings, `--method all` and tables, whatever order the method modules were imported in."""


def _ordered() -> list[MethodSpec]:
    _load_builtin_methods()
    rank = {name: i for i, name in enumerate(CANONICAL_ORDER)}
    return sorted(METHODS.values(), key=lambda spec: (rank.get(spec.name, len(rank)), spec.name))


def list_methods(pattern: str = "*", family: str | None = None) -> list[str]:
    return [s.name for s in _ordered() if fnmatch(s.name, pattern) and (family is None or family in s.families)]


POOLING_LABELS = {"token": "a class token", "avg": "the mean of its tokens", "map": "an attention-pool query"}


def resolve_methods(names: str | list[str], family, model_name: str = "the model") -> list[MethodSpec]:
    """`"gradcam,layercam"`, a list, or `"all"` (every method valid for `family`) -> specs, in order.
    `family`: a family name, or a loaded model's `Family`, whose pooling also rules out the methods not
    defined for it (`MethodSpec.poolings`)."""
    _load_builtin_methods()
    pooling = getattr(family, "pooling", None)
    family = getattr(family, "name", family)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise OptionError(f"--method is empty; valid methods: {', '.join(list_methods())}")

    def pools(spec: MethodSpec) -> bool:
        return pooling is None or spec.poolings is None or pooling in spec.poolings

    if names == ["all"]:
        return [s for s in _ordered() if family in s.families and not s.needs and pools(s)]
    specs = []
    for name in dict.fromkeys(names):
        spec = METHODS.get(name.lower())
        if spec is None:
            raise OptionError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}, or all")
        if family not in spec.families:
            from camloc.models.families import FAMILY_LABELS, FAMILY_NAMES

            labels = [FAMILY_LABELS[f] for f in FAMILY_NAMES if f in spec.families]
            only = labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} or {labels[-1]}"
            label = FAMILY_LABELS.get(family, family)
            article = "an" if label[:1].lower() in "aeiou" else "a"
            raise OptionError(
                f"method {spec.name!r} works only on {only} CLIP models, and {model_name} is {article} "
                f"{label}; pick such a model or another method"
            )
        if not pools(spec):
            reads = " or ".join(POOLING_LABELS[p] for p in sorted(spec.poolings))
            raise OptionError(f"method {spec.name!r} needs an embedding that reads {reads}, and {model_name}'s reads "
                              f"{POOLING_LABELS.get(pooling, pooling)}; pick another model or method")
        specs.append(spec)
    return specs


def default_topk(model) -> int:
    """gScoreCAM's k when --topk is auto: 300 (the paper's, docs/protocol.md §3) for OpenAI models and for the
    2048-3072-channel ResNets and ConvNeXts; 100 for open_clip transformers (the gScoreCAM authors'
    advice for 768-channel ViTs, gScoreCAM issue #4)."""
    if model.backend.name == "openai" or model.family.name in ("rn", "convnext"):
        return 300
    return 100


def resolve_options(model, options: dict) -> dict:
    """The options with "auto" values resolved for this model (what runs record)."""
    if options.get("topk") == "auto":
        return {**options, "topk": default_topk(model)}
    return dict(options)


def run_weights(model, methods: list[str], options: dict) -> dict:
    """The weights a run records (part of its identity): the CLIP model's (`Backend.info`) and, under
    "methods", those of any second model a method loads (`MethodSpec.weights`)."""
    extra = {name: METHODS[name].weights(model, options) for name in methods
             if name in METHODS and METHODS[name].weights is not None}
    return {**model.backend.info, **({"methods": extra} if extra else {})}


def check_method_options(model, methods: list[str], options: dict) -> None:
    """Options that depend on the loaded model, checked before any work: HilaCAM's --start-layer must
    name one of the encoder's blocks (negative values count from the last)."""
    for name in methods:
        needs = METHODS[name].needs if name in METHODS else ""
        if needs and not options.get(needs.lstrip("-").replace("-", "_")):
            raise OptionError(f"method {name!r} needs {needs} (see `camloc explain --help`)")
    if "hilacam" in methods:
        from camloc.methods.hila import attention_blocks

        depth = len(attention_blocks(model.visual))
        start = int(options.get("start_layer", 0))
        if not -depth <= start < depth:
            raise OptionError(f"--start-layer {start} is outside {model.name}'s {depth} blocks: use 0..{depth - 1}, "
                              f"or -1..-{depth} to count from the last block")


def _load_builtin_methods() -> None:
    """Import every module of `camloc.methods` (running their @register_method and method_option declarations):
    a new built-in method is one new module there, listed nowhere else. The engine (`camloc.cams`) holds no
    method."""
    import importlib
    import pkgutil

    import camloc.methods

    for info in pkgutil.iter_modules(camloc.methods.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"camloc.methods.{info.name}")
