"""camloc from Python: the same engine, options and run folders as the command line.

    import camloc
    model = camloc.load_model("tiny-rn")                 # any --model form: RN50, open_clip:..., a path
    ex = camloc.explain(model, "cat.jpg", ["a cat", "a dog"], methods=["gradcam", "layercam"])
    ex.maps["gradcam"]                                   # (P, H, W) float32 at the image's size
    ex.boxes["gradcam"][0], ex.scores                    # Algorithm 1 boxes, the prompts' scores
    fig = ex.plot()                                      # the explain figure (a matplotlib Figure)
    summary = camloc.evaluate(model, "demo", ["gradcam"], out="runs/demo")   # = camloc eval
    check = camloc.sanity(model, "demo", ["gradcam"], out="runs/sanity")    # = camloc sanity

The command line is a thin layer over these functions: every check and every number comes from here.
Errors are `camloc.errors` kinds (OptionError, DataError, ImageError, ModelError, RunFolderError),
each with the one-line message the command line prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts: busy-waiting threads crawl on small machines

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from camloc.cams.options import check_seed, count_or_auto, parse_method_options, whole_number  # noqa: E402
from camloc.errors import ImageError, OptionError  # noqa: E402
from camloc.evaluators.boxes import box_from_heatmap, check_threshold  # noqa: E402
from camloc.models.clip_model import ClipModel  # noqa: E402
from camloc.plugins import load_plugin, load_plugins  # noqa: E402,F401  (load_plugin: camloc.load_plugin)

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


def load_model(name: str, device: str = "auto", precision: str = "auto",
               cache_dir: str | Path | None = None) -> ClipModel:
    """A CLIP model by any `--model` form (`camloc list models`): an official OpenAI name, `tiny-rn`,
    `random-RN50`, `open_clip:ARCH:TAG|FILE|random`, `open_clip:hf-hub:ORG/REPO`, a checkpoint or a
    Hugging Face folder. `device`: auto, cpu, cuda, cuda:N; `precision`: auto, fp32, fp16, bf16."""
    return ClipModel.load(str(name), device=device, precision=precision, cache_dir=cache_dir)


def _model(model, device: str = "auto", precision: str = "auto") -> ClipModel:
    """A ClipModel of any model argument: a name or path is loaded, a model object wrapped (`wrap_model`)."""
    if isinstance(model, ClipModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model, device, precision)
    return wrap_model(model, device=device, precision=precision)


def wrap_model(obj, *, tokenizer=None, mean=None, std=None, name: str | None = None, device: str = "auto",
               precision: str = "auto") -> ClipModel:
    """A CLIP model already in memory (an open_clip model, a transformers `CLIPModel`, the clip package's `CLIP`)
    as a ClipModel: its tokenizer and normalisation found from the object where the library allows, else given
    (`tokenizer`: list[str] -> token ids; `mean`, `std`: the image normalisation). The object is copied, never
    changed; runs record its class and state_dict SHA-256. Every function taking a model also takes the
    object itself (wrapped with the defaults)."""
    from camloc.models.wrap import wrap_model as wrap

    return wrap(obj, tokenizer=tokenizer, mean=mean, std=std, name=name, device=device, precision=precision)


def _prompts(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise OptionError("prompts must be a text or a non-empty list of texts")
    return prompts


def _methods(methods: str | Sequence[str]) -> str | list[str]:
    if isinstance(methods, str):
        return methods
    if not isinstance(methods, (list, tuple)) or not methods or not all(isinstance(m, str) for m in methods):
        raise OptionError(f"methods must be a method name, a comma list, 'all' or a list of names, got {methods!r}")
    return list(methods)


def _shard(shard) -> tuple[int, int]:
    if not (isinstance(shard, (list, tuple)) and len(shard) == 2):
        raise OptionError(f"shard must be (rank, world), got {shard!r}")
    world = whole_number(shard[1], "the shard's world size", 1)
    return whole_number(shard[0], "the shard's rank", 0, world - 1), world


def _input_image(model: ClipModel, tensor: torch.Tensor) -> tuple[Image.Image, torch.Tensor]:
    """A preprocessed input (3, n, n) or (1, 3, n, n), normalised with the model's mean and std: the PIL
    image it shows (for the figure and the maps' size, n x n) and the model input itself."""
    x = tensor.detach().float().cpu()
    x = x[None] if x.ndim == 3 else x
    n = model.input_size
    if tuple(x.shape) != (1, 3, n, n):
        raise ImageError(f"a preprocessed image must be a (3, {n}, {n}) or (1, 3, {n}, {n}) tensor for "
                         f"{model.name}, got {tuple(tensor.shape)}; pass a path, PIL image or array to let camloc "
                         "preprocess it")
    mean = torch.tensor(model.backend.mean).view(3, 1, 1)
    std = torch.tensor(model.backend.std).view(3, 1, 1)
    rgb = ((x[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(rgb), x


def as_image(model: ClipModel, image: ImageLike, exif_transpose: bool = False) -> tuple[Image.Image, torch.Tensor | None]:
    """(the RGB image at its own size, the model input when `image` already is one)."""
    from camloc.models.preprocess import load_image, to_rgb

    if isinstance(image, (str, Path)):
        loaded = load_image(image, exif_transpose=exif_transpose)
        if not exif_transpose:
            _note_exif(image)
        return loaded, None
    if isinstance(image, Image.Image):
        return to_rgb(image), None
    if isinstance(image, torch.Tensor):
        return _input_image(model, image)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 4:
            array = array[..., :3]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3) or array.size == 0:
            raise ImageError(f"an image array must be (H, W) or (H, W, 3), got shape {image.shape}")
        if array.dtype.kind in "iu" and array.dtype != np.uint8:  # integers: 0..255 as uint8 holds them
            if array.min() < 0 or array.max() > 255:
                raise ImageError(f"an integer image array must hold values in 0..255, got {array.min()}.."
                                 f"{array.max()} ({array.dtype})")
            array = array.astype(np.uint8)
        if array.dtype == bool or array.dtype.kind not in "iuf":
            raise ImageError(f"an image array must hold uint8 0..255 or floats in [0, 1], got {array.dtype}")
        if array.dtype != np.uint8:
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise ImageError("a float image array must hold values in [0, 1] (or pass uint8 0..255)")
            array = np.round(array * 255).astype(np.uint8)
        return to_rgb(Image.fromarray(array)), None
    raise ImageError(f"image must be a path, PIL image, numpy array or preprocessed tensor, got {type(image).__name__}")


def _note_exif(path: str | Path) -> None:
    """A photo with an EXIF orientation is processed as stored: say so, once per call."""
    import warnings

    from camloc.models.preprocess import exif_rotated

    with Image.open(path) as raw:
        if exif_rotated(raw):
            warnings.warn(f"{path} has an EXIF orientation: it is processed as stored (the frame datasets' boxes "
                          "use), which differs from how viewers show it; pass --exif-transpose (exif_transpose=True) "
                          "to process it as displayed", stacklevel=3)


@dataclass
class Explanation:
    """One image's maps for P prompts and several methods."""

    image: Image.Image
    """The image as processed (RGB, its stored frame unless `exif_transpose`)."""
    prompts: list[str]
    maps: dict[str, np.ndarray]
    """{method: (P, H, W) float32 heatmaps at the image's size}, exactly what `camloc explain --save-heatmap` saves."""
    native: dict[str, np.ndarray]
    """{method: (P, h, w) float32 maps as the method computes them, before any post-processing (`--native`)."""
    boxes: dict[str, list[list[int]]]
    """{method: one [x1, y1, x2, y2] box per prompt} from Algorithm 1 at `threshold`."""
    scores: np.ndarray
    """(P,) the model's score of each prompt for the image (its logit-scaled cosine)."""
    threshold: str | float = "otsu"
    model: str = ""
    options: dict = field(default_factory=dict)
    """The method options the maps were computed with (resolved for the model)."""

    def plot(self, kind: str | None = None, gt_boxes: list[list[float]] | None = None, path: str | Path | None = None):
        """The explain figure: `pipeline` (appendix Fig. S1, one row per (prompt, method)) or `compare`
        (methods side by side); by default pipeline for one method, compare for several. Returns a
        matplotlib Figure, or writes it to `path` (PNG, JPEG, PDF, SVG) and returns None."""
        from camloc.report.figures import comparison_figure, pipeline_figure

        kind = kind or ("pipeline" if len(self.maps) == 1 else "compare")
        if kind not in ("pipeline", "compare"):
            raise OptionError(f"figure kind {kind!r} is not one of pipeline, compare")
        if kind == "pipeline":
            rows = [(f"{m}\n'{text}'", self.maps[m][i]) for i, text in enumerate(self.prompts) for m in self.maps]
            return pipeline_figure(self.image, rows, path, threshold=self.threshold, gt_boxes=gt_boxes)
        return comparison_figure(self.image, self.prompts, self.maps, path, threshold=self.threshold,
                                 gt_boxes=gt_boxes, scores=[float(s) for s in self.scores])

    def to_dict(self) -> list[dict]:
        """Boxes and scores per prompt (what `camloc explain --json` prints under `results`)."""
        return [{"prompt": text, "score": float(self.scores[i]),
                 "methods": {m: {"box": boxes[i]} for m, boxes in self.boxes.items()}}
                for i, text in enumerate(self.prompts)]


def explain(model: ClipModel | str, image: ImageLike | Sequence[ImageLike], prompts: str | Sequence[str],
            methods: str | Sequence[str] = ("gradcam",), *, threshold: str | float = "otsu", seed: int = 0,
            chunk_size: int | str = "auto", compile: str = "auto", exif_transpose: bool = False,
            plugins: Sequence[str] | None = None, **method_options) -> Explanation | list[Explanation]:
    """Maps of `image` for each prompt and method (`camloc list methods`, a comma list, or "all").

    `image`: a path, a PIL image, an (H, W, 3) array (uint8, or float in [0, 1]), or a tensor the model
    takes as it is (3, n, n), preprocessed with its mean and std. A list of images returns a list of
    Explanations; their encoder forwards run as one batch for the one-forward methods, as
    `camloc eval --image-batch` does (each image's maps those of the image alone, up to float rounding).
    `method_options`: the methods' options by name (topk=100, start_layer=-1, ...); `seed`: RISE's masks;
    `chunk_size`: masked images per encoder batch; `compile`: on, off or auto (`--compile`)."""
    from camloc.cams import CamContext, resolve_methods
    from camloc.cams.context import share_batch
    from camloc.cams.engine import compute_raw
    from camloc.cams.postprocess import native_to_raw, to_native
    from camloc.cams.registry import check_method_options, resolve_options
    from camloc.models.encoder import check_compile

    load_plugins(plugins)
    many = isinstance(image, (list, tuple))
    images = list(image) if many else [image]
    if not images:
        raise OptionError("image is an empty list")
    prompts = _prompts(prompts)
    methods = _methods(methods)
    threshold = check_threshold(threshold)
    options = {**parse_method_options(method_options), "chunk_size": count_or_auto(chunk_size, "--chunk-size"),
               "seed": check_seed(seed)}
    compile = check_compile(compile)
    model = _model(model)
    specs = resolve_methods(list(methods) if not isinstance(methods, str) else methods, model.family, model.name)
    names = [s.name for s in specs]
    options = resolve_options(model, options)
    check_method_options(model, names, options)
    model.encoder.configure(compile)
    model.prompt_problems(prompts)
    loaded = [as_image(model, item, exif_transpose) for item in images]
    contexts = [CamContext(model, pil, prompts, options, methods=names, host_input=host) for pil, host in loaded]
    share_batch(contexts)
    out = []
    for (pil, _), ctx in zip(loaded, contexts):
        scores = ctx.image_scores.detach().float().cpu().numpy()  # first: the methods then share its forward
        raw = compute_raw(model, pil, prompts, specs, context=ctx)
        maps = {m: native_to_raw(kind, to_native(kind, t), pil.size) for m, (kind, t) in raw.items()}
        out.append(Explanation(
            image=pil, prompts=prompts, maps=maps,
            native={m: t.detach().float().cpu().numpy() for m, (_, t) in raw.items()},
            boxes={m: [box_from_heatmap(h[i], threshold) for i in range(len(prompts))] for m, h in maps.items()},
            scores=scores, threshold=threshold, model=model.name,
            options={k: v for k, v in options.items() if k != "chunk_size"}))
    return out if many else out[0]


def evaluate(model: ClipModel | str, dataset: str = "demo", methods: str | Sequence[str] = ("gradcam",), *,
             out: str | Path, protocols: str | Sequence[str] = ("box",), threshold: str | float = "otsu",
             iou: str = "gscorecam", limit: int | None = None, classes: Sequence[str] | None = None,
             split: str | None = None, prompt_template: str = "{}", subset_seed: int | None = None,
             per_class: int = 100, include_stuff: bool = False, ade_extent: str | None = None,
             data_root: str | Path | None = None, ann_file: str | Path | None = None,
             image_dir: str | Path | None = None, seed: int = 0, device: str = "auto", precision: str = "auto",
             cache_dir: str | Path | None = None, chunk_size: int | str = "auto", image_batch: int | str = "auto",
             compile: str = "auto", save_heatmaps: bool = False, heatmap_dtype: str = "float32", save_vis: int = 0,
             force_new: bool = False, progress: bool = False, skip_missing: bool = False, skip_bad_records: bool = False,
             pointing_tolerance: float = 15.0, cam_curve_interval: float = 0.01,
             shard: tuple[int, int] = (0, 1), ovseg: dict | None = None, save_predictions: bool = False,
             faith_steps: int = 224, faith_baseline: str | None = None, faith_score: str = "softmax",
             road_percentiles: str | Sequence[float] | None = None, faith_batch: int = 64,
             plugins: Sequence[str] | None = None, **method_options) -> dict:
    """`camloc eval`: evaluate `methods` on `dataset` into the run folder `out` (resumable: a second call
    computes only what is missing; another config is refused). Returns the run's summary (summary.json).
    A loaded `ClipModel` is used as it is (its device and precision); a name is loaded like `load_model`.

    `protocols="ovseg"` (alone) runs open-vocabulary semantic segmentation on a segmentation dataset
    (`camloc.datasets.segmentation`: ade20k-150, voc21, voc20, context60, context59, coco-stuff-171,
    coco-object, cityscapes) with the dense methods; `ovseg` holds its settings (preset, short_side, crop,
    stride, logit_scale, bg_threshold, area_threshold, pamr_steps, templates, classes, geometry: `--ovseg-*`), and
    `save_predictions` writes each image's class map under out/predictions/<method>/.

    The faithfulness protocols (deletion-rise, insertion-rise, deletion-eclip, road;
    `camloc.evaluators.faithfulness`) take `faith_steps`, `faith_baseline` (both curves; default RISE's
    zero for deletion, blur for insertion), `faith_score` (softmax or cosine) and `road_percentiles`;
    `faith_batch` is the number of perturbed images per forward (not part of the results).

    `save_heatmaps` keeps each pair's native map under out/heatmaps for `rescore`, stored as `heatmap_dtype`
    (float32, exactly the maps the records come from; float16 at half the size, rescored to within its
    rounding). The records are the same with or without it."""
    from camloc.cams.options import SEED_MAX
    from camloc.evaluators.iou import CONVENTIONS
    from camloc.evaluators.protocols import parse_protocols
    from camloc.models.encoder import check_compile
    from camloc.run.eval import run_eval
    from camloc.run.identity import EvalConfig

    load_plugins(plugins)
    if iou not in CONVENTIONS:
        raise OptionError(f"--iou {iou!r} is not one of {', '.join(CONVENTIONS)}")
    methods, seed, shard = _methods(methods), check_seed(seed), _shard(shard)
    limit = whole_number(limit, "--limit", 1, optional=True)
    subset_seed = whole_number(subset_seed, "--subset-seed", 0, SEED_MAX, optional=True)
    per_class = whole_number(per_class, "--per-class", 1)
    names = [p.strip() for p in (protocols.split(",") if isinstance(protocols, str) else protocols) if p.strip()]
    if "ovseg" in names:
        if set(names) - {"ovseg", "box"}:
            raise OptionError("--protocols ovseg runs on its own (a segmentation dataset scored per pixel over all "
                              "its classes); run the pair protocols in another run")
        unused = _given(evaluate, dict(
            classes=classes, subset_seed=subset_seed, prompt_template=prompt_template, threshold=threshold, iou=iou,
            per_class=per_class, include_stuff=include_stuff, ade_extent=ade_extent,
            pointing_tolerance=pointing_tolerance, cam_curve_interval=cam_curve_interval, faith_steps=faith_steps,
            faith_baseline=faith_baseline, faith_score=faith_score, road_percentiles=road_percentiles,
            save_heatmaps=save_heatmaps, heatmap_dtype=heatmap_dtype, save_vis=save_vis, skip_missing=skip_missing))
        if unused:
            raise OptionError(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect under --protocols "
                              "ovseg (every class of the dataset is scored at every pixel, its names as the --ovseg-* "
                              "settings say); drop " + ("it" if len(unused) == 1 else "them"))
        return _evaluate_ovseg(model, dataset, methods, out, limit=limit, split=split, data_root=data_root,
                               ann_file=ann_file, image_dir=image_dir, seed=seed, device=device, precision=precision,
                               cache_dir=cache_dir, image_batch=image_batch, force_new=force_new, progress=progress,
                               shard=shard, ovseg=ovseg or {}, save_predictions=save_predictions,
                               method_options=method_options)
    if ovseg or save_predictions:
        raise OptionError("the --ovseg-* options and --save-predictions belong to --protocols ovseg")
    if save_vis < 0:
        raise OptionError(f"--save-vis must be 0 or more pairs per group, got {save_vis}")
    loaded = None if isinstance(model, (str, Path)) else _model(model, device, precision)
    config = EvalConfig(
        model=loaded.name if loaded else str(model), methods=[methods] if isinstance(methods, str) else list(methods),
        dataset=dataset, limit=limit, classes=list(classes) if classes else None, subset_seed=subset_seed,
        split=split, per_class=per_class, prompt_template=prompt_template, threshold=check_threshold(threshold),
        iou_convention=iou, precision=loaded.precision if loaded else precision, seed=seed,
        options=parse_method_options(method_options), include_stuff=include_stuff, ade_extent=ade_extent,
        protocols=parse_protocols(protocols), pointing_tolerance=pointing_tolerance,
        cam_curve_interval=cam_curve_interval)
    config.faith = _faith_settings(config.protocols, faith_steps, faith_baseline, faith_score, road_percentiles)
    if not (isinstance(faith_batch, int) and faith_batch >= 1):
        raise OptionError(f"--faith-batch must be a whole number of 1 or more, got {faith_batch!r}")
    out = Path(out)
    return run_eval(config, out, faith_batch=faith_batch, device=device, cache_dir=str(cache_dir) if cache_dir else None, force_new=force_new,
                    progress=progress, chunk_size=count_or_auto(chunk_size, "--chunk-size"),
                    image_batch=count_or_auto(image_batch, "--image-batch"), compile=check_compile(compile),
                    data_options={"data_root_dir": data_root, "ann_file": ann_file, "image_dir": image_dir},
                    save_heatmaps=out / "heatmaps" if save_heatmaps else None, heatmap_dtype=heatmap_dtype,
                    shard=shard, save_vis=save_vis,
                    skip_missing=skip_missing, skip_bad_records=skip_bad_records, model=loaded)


def _given(fn, values: dict) -> list[str]:
    """The command-line flags of the keyword arguments in `values` that differ from `fn`'s own defaults (options
    given where they have no effect are refused, never ignored)."""
    import inspect

    defaults = inspect.signature(fn).parameters
    return ["--" + name.replace("_", "-") for name, value in values.items() if value != defaults[name].default]


def _faith_settings(protocols: list[str], steps, baseline, score, percentiles) -> dict | None:
    """The recorded faithfulness settings, or None without a faithfulness protocol (where a faithfulness
    option given is an error: it would be silently unused)."""
    from camloc.evaluators.faithfulness import FaithSettings
    from camloc.run.faithfulness import wants_faithfulness

    if wants_faithfulness(protocols):
        return FaithSettings.resolve(steps, baseline, score, percentiles).to_dict()
    given = _given(evaluate, dict(faith_steps=steps, faith_baseline=baseline, faith_score=score,
                                  road_percentiles=percentiles))
    if given:
        raise OptionError(f"{', '.join(given)} belong to the faithfulness protocols (deletion-rise, insertion-rise, "
                          "deletion-eclip, road); add one to --protocols or drop the option")
    return None


def sanity(model: ClipModel | str, dataset: str = "demo", methods: str | Sequence[str] = ("gradcam",), *,
           out: str | Path, limit: int | None = None, classes: Sequence[str] | None = None, split: str | None = None,
           prompt_template: str = "{}", subset_seed: int | None = None, data_root: str | Path | None = None,
           ann_file: str | Path | None = None, image_dir: str | Path | None = None, seed: int = 0,
           flag_spearman: float | None = None, chunk_size: int | str = "auto", compile: str = "auto",
           force_new: bool = False, progress: bool = False, plugins: Sequence[str] | None = None,
           **method_options) -> dict:
    """`camloc sanity`: the model-randomisation check (Adebayo et al. 2018) of `methods` on `dataset`'s
    pairs, into the folder `out` (sanity.json, sanity.csv, sanity.md). The image tower is re-drawn stage
    by stage (head, blocks top-down, stem; `camloc.models.cascade`, seeded by `seed`) and each map is
    compared with the trained model's (Spearman, SSIM); methods whose mean Spearman with every stage
    re-drawn is at least `flag_spearman` (default 0.5) are listed in the result's "flagged". The model's
    weights are restored afterwards. Returns what sanity.json holds."""
    from camloc.evaluators.sanity import DEFAULT_FLAG_SPEARMAN
    from camloc.models.encoder import check_compile
    from camloc.run.sanity import run_sanity

    load_plugins(plugins)
    methods, seed = _methods(methods), check_seed(seed)
    limit = whole_number(limit, "--limit", 1, optional=True)
    subset_seed = whole_number(subset_seed, "--subset-seed", 0, 2**32 - 1, optional=True)
    model = _model(model)
    model.encoder.configure(check_compile(compile))
    options = {**parse_method_options(method_options), "chunk_size": count_or_auto(chunk_size, "--chunk-size")}
    return run_sanity(model, dataset, methods if isinstance(methods, str) else list(methods), out, limit=limit,
                      classes=list(classes) if classes else None, prompt_template=prompt_template,
                      subset_seed=subset_seed, seed=seed,
                      data_options={"data_root_dir": data_root, "ann_file": ann_file, "image_dir": image_dir,
                                    "split": split},
                      flag_spearman=DEFAULT_FLAG_SPEARMAN if flag_spearman is None else float(flag_spearman),
                      options=options, force_new=force_new, progress=progress)


def rescore(run: str | Path, protocols: str | Sequence[str], out: str | Path, *,
            pointing_tolerance: float | None = None, cam_curve_interval: float | None = None,
            data_root: str | Path | None = None, ann_file: str | Path | None = None,
            image_dir: str | Path | None = None, shard: tuple[int, int] = (0, 1), force_new: bool = False,
            progress: bool = False, skip_bad_records: bool = False) -> dict:
    """`camloc rescore`: score a run made with `save_heatmaps=True` with other protocols into the new run
    folder `out`, without any model; the data is read where the run read it unless a data option is
    given. Returns the new run's summary."""
    from camloc.run.rescore import run_rescore

    return run_rescore(run, out, protocols, pointing_tolerance=pointing_tolerance,
                       cam_curve_interval=cam_curve_interval,
                       data_options={"data_root_dir": data_root, "ann_file": ann_file, "image_dir": image_dir},
                       shard=shard, force_new=force_new, progress=progress, skip_bad_records=skip_bad_records)


def report_table(runs: Sequence[str | Path], layout: str = "long", compare_paper: bool = False,
                 skip_bad_records: bool = False, allow_incomplete: bool = False):
    """`camloc report` as a pandas DataFrame: runs merged by identity (shards and resumed copies combine
    exactly), one row per (identity, method) in the long layout; `s3` and `s1` are the appendix's tables."""
    from camloc.report.tables import build_report

    return build_report(list(runs), layout, compare_paper, skip_bad_records, None, allow_incomplete)


def _evaluate_ovseg(model, dataset, methods, out, *, limit, split, data_root, ann_file, image_dir, seed, device,
                    precision, cache_dir, image_batch, force_new, progress, shard, ovseg, save_predictions,
                    method_options) -> dict:
    from camloc.run.identity import EvalConfig
    from camloc.run.ovseg import run_ovseg

    loaded = None if isinstance(model, (str, Path)) else _model(model, device, precision)
    known = {"preset", "short_side", "crop", "stride", "logit_scale", "bg_threshold", "area_threshold",
             "normalisation", "position_resize", "reduce_zero_label", "ignore_index", "background",
             "pamr_steps", "pamr_dilations", "templates", "classes", "geometry", "cluster_vote",
             "ignore_as_background"}
    unknown = sorted(set(ovseg) - known)
    if unknown:
        raise OptionError(f"unknown ovseg setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    config = EvalConfig(model=loaded.name if loaded else str(model),
                        methods=[methods] if isinstance(methods, str) else list(methods), dataset=dataset,
                        limit=limit, split=split, precision=loaded.precision if loaded else precision, seed=seed,
                        options=parse_method_options(method_options), protocols=["ovseg"],
                        ovseg={k: v for k, v in ovseg.items() if v is not None})
    return run_ovseg(config, Path(out), device=device, cache_dir=str(cache_dir) if cache_dir else None,
                     force_new=force_new, progress=progress,
                     data_options={"data_root_dir": data_root, "ann_file": ann_file, "image_dir": image_dir},
                     image_batch=count_or_auto(image_batch, "--image-batch"), shard=shard,
                     save_predictions=save_predictions, model=loaded)


def list_methods(family: str | None = None) -> list[str]:
    """Method names in canonical order (those valid for `family` when given: rn, vit, vit-avg, timm-vit, convnext)."""
    from camloc.cams.registry import list_methods as methods

    return methods(family=family)


def list_models(backend: str = "openai", pattern: str = "*") -> list[str]:
    """Model names `load_model` takes: the clip package's (backend openai: official and test models) or
    open_clip's pretrained pairs and tiny test models (backend open_clip)."""
    from fnmatch import fnmatch

    if backend == "open_clip":
        from camloc.models.open_clip_backend import TINY_CONFIGS, list_pretrained

        return ([f"open_clip:{arch}:{tag}" for arch, tag in list_pretrained(pattern)]
                + [f"open_clip:{arch}:random" for arch in TINY_CONFIGS if fnmatch(arch, pattern)])
    if backend != "openai":
        raise OptionError(f"--backend {backend!r} is not one of openai, open_clip")
    from camloc.models.specs import ALL_SPECS

    return [name for name in ALL_SPECS if fnmatch(name, pattern)]


def list_datasets() -> list[str]:
    """The pair datasets (`evaluate`'s box, mask and point protocols), then the segmentation datasets
    (`protocols="ovseg"`)."""
    from camloc.datasets import list_datasets as datasets
    from camloc.datasets.segmentation import SEG_DATASETS

    return [*datasets(), *SEG_DATASETS]


__all__ = ["Explanation", "as_image", "evaluate", "explain", "list_datasets", "list_methods", "list_models",
           "load_model", "report_table", "rescore", "sanity"]
