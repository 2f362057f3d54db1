"""Open-vocabulary semantic segmentation with a dense method: every pixel gets the class whose queries
score highest, as the reference wrapper computes it (wangf3014/SCLIP `clip_segmentor.py` at d84d4ab,
the harness ~10 later methods copy), but with all of an image's windows in ONE batched encoder forward.

Per image: resize (short side S), windows (`windows.py`), each window's patch-query cosine grid from
the method (the dense methods score `CamContext.text_features`, here the class queries), stitched and
resized bilinearly to the label's size, optional PAMR (`pamr.py`), x logit scale, softmax over all
queries, max over each class's queries (synonyms), optional area threshold (classes whose predicted
area is below `area_threshold` x the foreground area are suppressed, background excepted), argmax, and
pixels whose top probability is below `bg_threshold` become class 0 (background).

Query embeddings: each name of each class in every template, L2-normalised, averaged over the
templates and normalised again (SCLIP's and CLIP's ImageNet recipe).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from camloc.errors import OptionError
from camloc.segment.windows import crops, rescaled_size, stitch, window_boxes

HERE = Path(__file__).parent
TEMPLATE_SETS = ("single", "imagenet80")


def templates(name: str) -> list[str]:
    """`single`: the class name as it is; `imagenet80`: CLIP's 80 ImageNet templates."""
    if name == "single":
        return ["{}"]
    if name == "imagenet80":
        return (HERE / "templates_imagenet80.txt").read_text().splitlines()
    raise OptionError(f"--ovseg-templates {name!r} is not one of {', '.join(TEMPLATE_SETS)}")


ONE_PROMPT = "# one prompt a line"
"""A class file's first line that keeps each line whole: one prompt per class, its commas part of the prompt
("building, edifice"), as CLIPtrase's ADE-847 list is written."""


def read_classes(path: Path) -> list[list[str]]:
    """A class-name file: one class per line, synonyms separated by ", " (or, after a first line `ONE_PROMPT`, each
    line one prompt as it is)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    if lines and lines[0] == ONE_PROMPT:
        return [[line] for line in lines[1:] if line]
    return [[n.strip() for n in line.split(", ") if n.strip()] for line in lines if line]


@dataclass(frozen=True)
class OvsegSettings:
    preset: str
    short_side: int
    crop: int
    stride: int
    logit_scale: float
    bg_threshold: float
    area_threshold: float | None
    pamr_steps: int
    pamr_dilations: tuple[int, ...]
    templates: str
    normalisation: str = "model"
    """`harness`: SCLIP's data preprocessor's constants, CLIP's mean and std x 255 rounded to 3 decimals on
    the 0-255 image (every SCLIP-derived harness copies them; used where the model's own constants round to
    them, i.e. OpenAI-normalised models); `model`: the model's exact constants."""
    position_resize: str = "size"
    """How a ViT's position embeddings are resized for crops other than its input size: `sclip` (the
    SCLIP/NACLIP harness's `interpolate_pos_encoding`: bicubic by scale factor (n + 0.1) / g per side, DINO's
    recipe) or `size` (bicubic to exactly n x n)."""
    geometry: str = "slide"
    """`slide`: the image resized to the short side (OpenCV bilinear, long side at most 2048) and segmented by
    sliding windows (the mmseg harnesses); `centre-crop`: the image resized to the short side (PIL bicubic, as
    torchvision's `Resize(S)`), its centre crop x crop square kept and segmented in one window, and the label map
    likewise (nearest) so only the crop is scored (CLIPtrase's script). Recorded only when not `slide`."""
    cluster_vote: tuple | None = None
    """(eps, min_samples): CLIPtrase's DBSCAN cluster vote over the class map (`camloc.segment.cluster_vote`), for the
    `centre-crop` geometry's one window; None (not recorded) = off."""
    ignore_as_background: bool = False
    """The label's ignore value scored as the background class (CLIPtrase's detectron2 labels on VOC21, Context60:
    label 255 is background there, VOC's boundary pixels included); recorded only when on."""
    classes: str | None = None
    """The class-name file: None = the dataset's own (camloc/segment/classes, SCLIP's lists); else a file of
    camloc/segment/classes by name (a harness's own list, e.g. ClearCLIP's VOC21 names) or a path to one's own
    (`--ovseg-classes`). Recorded only when given, with its SHA-256, so runs before the setting keep their
    identity."""

    def to_json(self) -> dict:
        out = {**asdict(self), "pamr_dilations": list(self.pamr_dilations)}
        if self.cluster_vote is not None:
            out["cluster_vote"] = list(self.cluster_vote)  # as config.json reads back
        return {k: v for k, v in out.items() if k not in RECORDED_WHEN_SET or v != RECORDED_WHEN_SET[k]}


RECORDED_WHEN_SET = {"geometry": "slide", "cluster_vote": None, "ignore_as_background": False, "classes": None}
"""Settings added after runs were recorded, written to `config.json` only when not these defaults, so those runs keep
their identity."""


def class_file(name: str) -> Path:
    """The file an ovseg `classes` setting names: a file of camloc/segment/classes by its bare name, else a path."""
    from camloc.datasets.segmentation import CLASSES_DIR

    bundled = CLASSES_DIR / name
    if "/" not in name and "\\" not in name and bundled.is_file():
        return bundled
    path = Path(name).expanduser()
    if not path.is_file():
        raise OptionError(f"--ovseg-classes {name}: no such file (one class a line in the dataset's label order, "
                          "synonyms separated by ', '; or a file of camloc/segment/classes by name)")
    return path


def class_names(settings: "OvsegSettings", dataset_classes: list[list[str]], dataset: str) -> tuple[list, str | None]:
    """(the class names an ovseg run scores, the SHA-256 of the file's text when `settings.classes` names one):
    the dataset's own list, or the file given, which must have as many classes as the dataset."""
    import hashlib

    if settings.classes is None:
        return dataset_classes, None
    path = class_file(settings.classes)
    given = read_classes(path)
    if len(given) != len(dataset_classes):
        raise OptionError(f"--ovseg-classes {settings.classes}: {path} has {len(given)} classes, {dataset} has "
                          f"{len(dataset_classes)} (one line per class, in the dataset's label order)")
    return given, hashlib.sha256(path.read_bytes()).hexdigest()


SCLIP_WRAPPER = {"short_side": 336, "crop": 224, "stride": 112, "logit_scale": 40.0, "bg_threshold": 0.0,
                 "area_threshold": None, "pamr_steps": 0, "pamr_dilations": (8, 16), "templates": "imagenet80",
                 "normalisation": "harness", "position_resize": "sclip"}
"""SCLIP's harness (wangf3014/SCLIP, clip_segmentor.py defaults and configs/cfg_*.py at 57fa9aa): short side 336,
crop 224, stride 112, logit scale 40, no background threshold, PAMR off, 80 templates, its pixel constants and +0.1
position interpolation. The later harnesses copy its wrapper and change some of these."""
PRESETS = {
    "sclip": SCLIP_WRAPPER,  # its per-dataset exceptions below
    # NACLIP's harness (sinahmr/NACLIP naclip.py at 8865082: SCLIP's wrapper with PAMR on by default, 10 steps at
    # dilations 8 and 16; its eval.py `--pamr off` gives 0: set --ovseg-pamr 0 for the paper's "without PAMR").
    "naclip": {**SCLIP_WRAPPER, "pamr_steps": 10},
    # SC-CLIP's harness (SuleBai/SC-CLIP scclip_segmentor.py SCCLIPForSegmentation defaults and configs/cfg_*.py at
    # 74471da): SCLIP's wrapper and defaults, short side 336 on every dataset but Cityscapes (COCO-Stuff too, where
    # SCLIP uses 448); its own per-dataset thresholds below.
    "scclip": SCLIP_WRAPPER,
    # ClearCLIP's harness (mc-lan/ClearCLIP clearclip_segmentor.py ClearCLIPSegmentation defaults at afe06b8 and
    # configs/cfg_*.py at fd05ce4): SCLIP's wrapper at short side 448, crop 448, stride 224, logit scale 50;
    # per-dataset values below (incl. its own VOC21 class names).
    "clearclip": {**SCLIP_WRAPPER, "short_side": 448, "crop": 448, "stride": 224, "logit_scale": 50.0},
    # ResCLIP's harness (yvhangyang/ResCLIP resclip_segmentor.py ResCLIPSegmentation defaults and configs/cfg_*.py at
    # 6b082d9): SCLIP's wrapper and defaults, short side 336 on every dataset but Cityscapes (COCO-Stuff 336 too),
    # no area threshold; VOC21 and VOC20 are segmented whole (slide_crop=0), which camloc does not run (below).
    "resclip": SCLIP_WRAPPER,
    # ProxyCLIP's harness (mc-lan/ProxyCLIP proxyclip_segmentor.py ProxyCLIPSegmentation defaults and configs/cfg_*.py
    # at 05c3c18): SCLIP's wrapper at crop 336 (its DINO proxy's positions resized the same way); its own VOC21 and
    # COCO-Object class names; per-dataset values below.
    "proxyclip": {**SCLIP_WRAPPER, "crop": 336},
    # CLIPtrase's script (leaves162/CLIPtrase clip_self_correlation.py at 8fb4d74, its 336 px run): the centre
    # 336 x 336 crop of the image resized to short side 336 (bicubic), one forward, CLIP's own pixel constants, the
    # +0.1 position interpolation, the argmax of the logits (no thresholds), then its DBSCAN cluster vote (eps 1.1,
    # min 7; 0.7 and 3 at 224 px); its own class lists (camloc/segment/classes/cliptrase-*.txt) below.
    "cliptrase": {**SCLIP_WRAPPER, "geometry": "centre-crop", "crop": 336, "stride": 336, "normalisation": "model",
                  "cluster_vote": (1.1, 7)},
    # TCL / CLIP-DINOiser's protocol (img_scale (2048, 448), slide crop 448, stride 224;
    # wysoczanska/clip_dinoiser segmentation/configs/_base_/datasets/*.py); logit scale and templates as sclip's
    # (they change only thresholds and the synonym merge, not an argmax over single names).
    "tcl": {**SCLIP_WRAPPER, "short_side": 448, "crop": 448, "stride": 224, "normalisation": "model",
            "position_resize": "size"},
}
SCLIP_EXCEPTIONS = {  # configs/cfg_<dataset>.py of SCLIP at 57fa9aa
    "voc21": {"logit_scale": 65.0, "bg_threshold": 0.1, "area_threshold": 0.1},
    "context60": {"logit_scale": 50.0, "bg_threshold": 0.1},
    "coco-object": {"logit_scale": 50.0, "bg_threshold": 0.1},
    "coco-stuff-171": {"short_side": 448},
    "cityscapes": {"short_side": 560},
}
NACLIP_EXCEPTIONS = {  # configs/cfg_<dataset>.py of NACLIP (voc21 at 8865082, the others at cbb720d): no area
    "voc21": {"bg_threshold": 0.1},  # threshold and logit scale 40 everywhere, unlike SCLIP's voc21/context60/coco-object
    "context60": {"bg_threshold": 0.1},
    "coco-object": {"bg_threshold": 0.1},
    "coco-stuff-171": {"short_side": 448},
    "cityscapes": {"short_side": 560},
}
SCCLIP_EXCEPTIONS = {  # configs/cfg_<dataset>.py of SC-CLIP at 74471da (voc21 and coco-object also at 0417ba9, the same
    "voc21": {"logit_scale": 50.0, "bg_threshold": 0.15, "area_threshold": 0.1},  # values): ViT-B/16's lines
    "context60": {"bg_threshold": 0.15},
    "coco-object": {"logit_scale": 55.0, "bg_threshold": 0.35},
    "cityscapes": {"short_side": 560},
}
CLEARCLIP_EXCEPTIONS = {  # configs/cfg_<dataset>.py of ClearCLIP at fd05ce4 (prob_thd, Cityscapes' slide_crop 224 at
    "voc21": {"bg_threshold": 0.5, "classes": "voc21-clearclip.txt"},  # the default stride 224); VOC21's cls file is
    "context60": {"bg_threshold": 0.15},                                # its own ("background", single names)
    "coco-object": {"bg_threshold": 0.4},
    "cityscapes": {"crop": 224, "stride": 224},
}
RESCLIP_EXCEPTIONS = {  # configs/cfg_<dataset>.py of ResCLIP at 6b082d9 (prob_thd; Resize (2048, 560) on Cityscapes)
    "context60": {"bg_threshold": 0.1},
    "coco-object": {"bg_threshold": 0.1},
    "cityscapes": {"short_side": 560},
}
PROXYCLIP_EXCEPTIONS = {  # configs/cfg_<dataset>.py of ProxyCLIP at 05c3c18 (prob_thd, Resize scale, Cityscapes'
    "voc21": {"bg_threshold": 0.2, "classes": "voc21-proxyclip.txt"},              # slide_crop / slide_stride) and
    "context60": {"bg_threshold": 0.15},                                           # its cls_voc21.txt and
    "coco-object": {"bg_threshold": 0.25, "classes": "coco-object-proxyclip.txt"},  # cls_coco_object.txt
    "cityscapes": {"short_side": 448, "crop": 224, "stride": 112},
    "ade20k-150": {"short_side": 448},
}
CLIPTRASE_EXCEPTIONS = {d: {"classes": f"cliptrase-{d}.txt"} for d in (  # configs/dataset_cfg.py's lists;
    "voc20", "context59", "coco-stuff-171", "ade20k-150", "context459", "ade847")}  # on VOC21 and Context60 its
CLIPTRASE_EXCEPTIONS.update({d: {"classes": f"cliptrase-{d}.txt", "ignore_as_background": True}  # detectron2 label
                             for d in ("voc21", "context60")})                                  # 255 is background
CLIPTRASE_EXCEPTIONS["coco80-cliptrase"] = {"classes": "cliptrase-coco80.txt"}  # its reading of COCO-Stuff's labels
EXCEPTIONS = {"cliptrase": CLIPTRASE_EXCEPTIONS, "sclip": SCLIP_EXCEPTIONS, "naclip": NACLIP_EXCEPTIONS, "scclip": SCCLIP_EXCEPTIONS,
              "clearclip": CLEARCLIP_EXCEPTIONS, "resclip": RESCLIP_EXCEPTIONS, "proxyclip": PROXYCLIP_EXCEPTIONS}
WHOLE_IMAGE = {("resclip", "voc21"), ("resclip", "voc20")}
"""(preset, dataset) pairs whose harness segments the whole resized image in one forward (slide_crop=0): a
non-square patch grid camloc's window engine does not run. The preset refuses them unless a crop is given."""


def resolve_settings(dataset: str, preset: str = "sclip", **given) -> OvsegSettings:
    """A preset's values for `dataset` (with the preset's per-dataset exceptions), then the options given
    (None = not given)."""
    if preset not in PRESETS:
        raise OptionError(f"--ovseg-preset {preset!r} is not one of {', '.join(PRESETS)}")
    if (preset, dataset) in WHOLE_IMAGE and given.get("crop") is None:
        raise OptionError(f"--ovseg-preset {preset} on {dataset}: the {preset} harness segments this dataset's images "
                          "whole (slide_crop=0, a non-square patch grid), which camloc does not run yet; give "
                          "--ovseg-crop and --ovseg-stride to run sliding windows instead (not the harness's setting)")
    values = dict(PRESETS[preset])
    values.update(EXCEPTIONS.get(preset, {}).get(dataset, {}))
    values.update({k: v for k, v in given.items() if v is not None})
    vote = values.get("cluster_vote")
    if vote is not None:  # checked as given: a count of 7.5 is an error, not 7
        numbers = len(vote) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vote)
        if not (numbers and vote[0] > 0 and vote[1] >= 1 and float(vote[1]).is_integer()
                and values.get("geometry") == "centre-crop"):
            raise OptionError(f"ovseg cluster_vote {list(vote)!r}: (eps > 0, min_samples a whole number >= 1), with the "
                              "centre-crop geometry (one window an image, as CLIPtrase votes over a whole image)")
        vote = (float(vote[0]), int(vote[1]))
    settings = OvsegSettings(preset=preset, **{**values, "pamr_dilations": tuple(values["pamr_dilations"]),
                                               "cluster_vote": vote})
    for name in ("short_side", "crop", "stride"):
        if getattr(settings, name) < 1:
            raise OptionError(f"--ovseg-{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    if settings.geometry not in GEOMETRIES:
        raise OptionError(f"--ovseg-geometry {settings.geometry!r} is not one of {', '.join(GEOMETRIES)}")
    if settings.geometry == "centre-crop" and settings.crop > settings.short_side:
        raise OptionError(f"--ovseg-geometry centre-crop: the crop ({settings.crop}) is cut from the image resized to "
                          f"short side {settings.short_side}; give a crop of at most the short side")
    if settings.stride > settings.crop:
        raise OptionError(f"--ovseg-stride {settings.stride} is larger than --ovseg-crop {settings.crop}: pixels "
                          "between the windows would get no logits")
    if not 0 <= settings.bg_threshold <= 1:
        raise OptionError(f"--ovseg-bg-threshold must lie in [0, 1], got {settings.bg_threshold}")
    if not 0 < settings.logit_scale <= 1000:
        raise OptionError(f"--ovseg-logit-scale must be in (0, 1000] (the presets' 40 or 50; CLIP's own 100), got "
                          f"{settings.logit_scale}")
    if settings.area_threshold is not None and not 0 <= settings.area_threshold <= 1:
        raise OptionError(f"--ovseg-area-threshold is a fraction of the foreground in [0, 1], got "
                          f"{settings.area_threshold}")
    if settings.pamr_steps < 0:
        raise OptionError(f"--ovseg-pamr must be 0 or more steps, got {settings.pamr_steps}")
    if settings.normalisation not in ("harness", "model"):
        raise OptionError(f"ovseg normalisation {settings.normalisation!r} is not one of harness, model")
    if settings.position_resize not in POSITION_RESIZES:
        raise OptionError(f"ovseg position_resize {settings.position_resize!r} is not one of "
                          f"{', '.join(POSITION_RESIZES)}")
    templates(settings.templates)
    if settings.classes is not None:
        class_file(settings.classes)
    return settings


HARNESS_MEAN = (122.771, 116.746, 104.094)
HARNESS_STD = (68.501, 66.632, 70.323)
"""SCLIP's `SegDataPreProcessor(mean=..., std=..., rgb_to_bgr=True)` (wangf3014/SCLIP clip_segmentor.py at
d84d4ab; NACLIP's naclip.py at 8865082 the same): OpenAI CLIP's constants x 255, rounded to 3 decimals."""
POSITION_RESIZES = ("sclip", "size")
GEOMETRIES = ("slide", "centre-crop")


def centre_cropped(image: Image.Image, label: np.ndarray, short_side: int, crop: int) -> tuple[Image.Image, np.ndarray]:
    """`centre-crop` geometry: the image resized so its short side is `short_side` (PIL bicubic, torchvision's
    `Resize(short_side)` and its rounding of the long side) and its centre crop x crop square (torchvision's
    `CenterCrop`); the label map likewise with nearest-neighbour resizing, its values kept (16-bit too)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import center_crop, resize

    rgb = center_crop(resize(image.convert("RGB"), short_side, interpolation=InterpolationMode.BICUBIC), [crop])
    top = int(label.max(initial=0))
    if top > 65535 or label.min(initial=0) < 0:
        raise OptionError(f"--ovseg-geometry centre-crop: label values {label.min()}..{top} do not fit a 16-bit map")
    wide = label.dtype == np.uint16 or top > 255
    plain = Image.fromarray(label.astype(np.uint16 if wide else np.uint8))  # "I;16" or "L"
    cut = center_crop(resize(plain, short_side, interpolation=InterpolationMode.NEAREST), [crop])
    return rgb, np.asarray(cut).astype(label.dtype)


def pixel_constants(model, normalisation: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on the 0-255 image: the harness's rounded constants where the model's own round to
    them, else the model's exact constants x 255."""
    mean = tuple(255 * v for v in model.backend.mean)
    std = tuple(255 * v for v in model.backend.std)
    if normalisation == "harness" and (tuple(round(v, 3) for v in mean), tuple(round(v, 3) for v in std)) == (
            HARNESS_MEAN, HARNESS_STD):
        return HARNESS_MEAN, HARNESS_STD
    return mean, std


def query_features(model, classes: list[list[str]], template_set: str) -> tuple[torch.Tensor, list[int], list[str]]:
    """(Q, E) normalised query embeddings (one per name of each class, averaged over the templates), the
    class of each query, and the query names."""
    texts = templates(template_set)
    features, owner, names = [], [], []
    for index, synonyms in enumerate(classes):
        for name in synonyms:
            per_template = model.text_features([t.format(name) for t in texts])
            mean = per_template.mean(dim=0)
            features.append(mean / mean.norm())
            owner.append(index)
            names.append(name)
    return torch.stack(features), owner, names


def resized_positions(table: torch.Tensor, grid: int, rows: int, cols: int, how: str) -> torch.Tensor:
    """A (1 + g*g, D) position table (class token first) for a rows x cols patch grid: `sclip` scales by
    ((rows + 0.1) / g, (cols + 0.1) / g) as the SCLIP/NACLIP harness does (the sampling positions follow the
    scale factor, not the size), `size` resizes to exactly rows x cols; both bicubic, corners not aligned."""
    patches = table[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    if how == "sclip":
        patches = F.interpolate(patches, scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid), mode="bicubic",
                                align_corners=False)
    else:
        patches = F.interpolate(patches, size=(rows, cols), mode="bicubic", align_corners=False)
    if patches.shape[-2:] != (rows, cols):
        raise ValueError(f"position grid {tuple(patches.shape[-2:])}, expected {(rows, cols)}")
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(rows * cols, -1)])


@contextlib.contextmanager
def at_input_size(model, size: int, how: str = "size"):
    """Run the image tower on size x size inputs: a ViT's position embeddings interpolated bicubically to
    the new patch grid for the duration (the class token's kept), as the sliding-window harnesses do for
    crops larger than the model's input. The model's own size needs nothing."""
    if size == model.input_size:
        yield
        return
    visual = model.visual
    if not hasattr(visual, "positional_embedding") or not hasattr(visual, "conv1") or model.family.prefix != 1:
        raise OptionError(f"--ovseg-crop {size}: {model.name} takes {model.input_size} px inputs and camloc can "
                          f"resize the position embeddings of class-token ViTs only; use --ovseg-crop "
                          f"{model.input_size}")
    patch = visual.conv1.kernel_size[0]
    if size % patch:
        raise OptionError(f"--ovseg-crop {size} is not a multiple of {model.name}'s patch size {patch}")
    original = visual.positional_embedding
    grid = int(round((original.shape[0] - 1) ** 0.5))
    new = size // patch
    resized = resized_positions(original.detach().float(), grid, new, new, how).to(original.dtype)
    visual.positional_embedding = torch.nn.Parameter(resized, requires_grad=False)
    input_size = model.input_size
    model.input_size = size
    model.position_resize = how  # a second model resized with it (ProxyCLIP's proxy) reads this
    try:
        yield
    finally:
        visual.positional_embedding = original
        model.input_size = input_size
        model.position_resize = "size"


def resized_input(model, image: Image.Image, short_side: int, normalisation: str = "model") -> torch.Tensor:
    """(3, H', W') normalised image at the protocol's scale (OpenCV bilinear on the 8-bit RGB, as mmcv), then
    (x - mean) / std on the 0-255 values in float32 (`pixel_constants`), as mmseg's data preprocessor."""
    width, height = rescaled_size(*image.size, short_side)
    rgb = cv2.resize(np.asarray(image.convert("RGB")), (width, height), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()
    mean, std = pixel_constants(model, normalisation)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def window_grids(model, methods: list, options: dict, windows: torch.Tensor, queries: torch.Tensor,
                 names: list[str], timings: dict | None = None, similarity: list | None = None) -> dict[str, torch.Tensor]:
    """{method: (n, Q, g, g) patch-query cosine grids} of the windows (n, 3, C, C): their encoder forwards in
    one batch (`share_batch`), then each method on each window's own context. With `timings`, the seconds
    of the shared forward ("forward") and of each method's own work are put there."""
    import time

    from camloc.cams.context import CamContext, share_batch, synchronize
    from camloc.cams.engine import run_method

    stand_in = Image.new("RGB", (windows.shape[-1], windows.shape[-2]))
    started = time.perf_counter()
    contexts = []
    for window in windows:
        ctx = CamContext(model, stand_in, names, options, methods=[s.name for s in methods], host_input=window[None])
        ctx.__dict__["text_features"] = queries  # the class queries (template-averaged), not the names' own
        contexts.append(ctx)
    share_batch(contexts)
    if len(contexts) == 1:
        contexts[0].forward()  # a lone window's own forward, so it is timed as the shared one
    synchronize(model.device)
    if timings is not None:
        timings["forward"] = time.perf_counter() - started
    grids = {}
    for spec in methods:
        t0 = time.perf_counter()
        grids[spec.name] = torch.stack([run_method(spec, ctx).float() for ctx in contexts])
        synchronize(model.device)
        if timings is not None:
            timings[spec.name] = time.perf_counter() - t0
    if similarity is not None:  # the cluster vote's token self-similarity of each window (the encoder's, not a method's)
        from camloc.segment.cluster_vote import token_self_similarity

        similarity += [token_self_similarity(ctx, ctx.depth - 2) for ctx in contexts]
    return grids


TIE = 1e-6
"""`predict`'s fast path: classes whose best cosines at a pixel lie within this of each other are decided by the
harness's own softmax there (cosines lie in [-1, 1]; 1e-6 apart, the scaled softmax keeps their order with a
relative margin of 1e-6 x the logit scale, far above float32 rounding)."""


def predict(logits: torch.Tensor, owner: list[int], settings: OvsegSettings) -> torch.Tensor:
    """(Q, H, W) stitched cosines -> (H, W) int64 class map: x logit scale, softmax over the queries, max
    over each class's queries, area threshold, argmax, background threshold (class 0).

    With neither threshold (the sclip/naclip/tcl presets on ADE-150, VOC20, Context59, COCO-Stuff, Cityscapes)
    the softmax changes nothing: at each pixel it is monotone in the cosines (one denominator, a positive
    scale), so the class is the argmax of the cosines themselves, found in one pass without the scale, the
    exponentials or the division. Only pixels where two classes are within `TIE` take the full path, so that
    a tie the softmax's rounding makes is broken as the harness breaks it. The label maps are the full path's."""
    n_classes = max(owner) + 1
    if settings.area_threshold is not None or settings.bg_threshold > 0:
        return _predict_softmax(logits, owner, settings)
    per_class = _per_class(logits, owner, n_classes)
    if n_classes < 2:
        return torch.zeros(per_class.shape[1:], dtype=torch.int64, device=per_class.device)
    values, indices = per_class.topk(2, dim=0)  # the best two classes: one pass over the queries
    pred = indices[0].clone()
    near = values[0] - values[1] < TIE
    if near.any():
        pred[near] = _predict_softmax(logits[:, near], owner, settings)
    return pred


def _per_class(scores: torch.Tensor, owner: list[int], n_classes: int) -> torch.Tensor:
    """(Q, ...) -> (K, ...): each class's best query (its synonyms' maximum)."""
    if n_classes == len(owner):
        return scores
    rows: dict[int, list[int]] = {}
    for query, cls in enumerate(owner):
        rows.setdefault(cls, []).append(query)
    return torch.stack([scores[rows[c]].amax(dim=0) for c in range(n_classes)])


def _predict_softmax(logits: torch.Tensor, owner: list[int], settings: OvsegSettings) -> torch.Tensor:
    """`predict` as the harness computes it, on (Q, ...) cosines (the area threshold on (Q, H, W) only)."""
    probs = torch.softmax(logits * settings.logit_scale, dim=0)
    n_classes = max(owner) + 1
    per_class = _per_class(probs, owner, n_classes)
    if settings.area_threshold is not None:
        hard = F.one_hot(per_class.argmax(0), n_classes)  # (H, W, K)
        area = hard[..., 1:].sum(dim=(0, 1)).float()
        keep = (area > settings.area_threshold * area.sum()).to(per_class.dtype)
        per_class = per_class.clone()
        per_class[1:] *= keep[:, None, None]
    pred = per_class.argmax(0)
    pred[per_class.max(0).values < settings.bg_threshold] = 0
    return pred


def image_windows(model, image: Image.Image, settings: OvsegSettings) -> tuple:
    """(the resized normalised image (3, H', W'), its windows (n, 3, C, C), their boxes)."""
    x = resized_input(model, image, settings.short_side, settings.normalisation)
    height, width = x.shape[-2:]
    if min(height, width) < settings.crop:
        raise OptionError(f"--ovseg-short-side {settings.short_side} gives a {width}x{height} image, smaller than "
                          f"--ovseg-crop {settings.crop}: windows would be cut; use a short side of at least the crop")
    boxes = window_boxes(height, width, settings.crop, settings.stride)
    return x, crops(x, boxes), boxes


def finish_logits(grids: torch.Tensor, boxes: list, x: torch.Tensor, label_size: tuple[int, int], owner: list[int],
                  settings: OvsegSettings) -> torch.Tensor:
    """The windows' (n, Q, g, g) grids of one image -> its (H, W) class map at the label's size (W, H):
    stitched, resized bilinearly, PAMR, `predict`."""
    from camloc.segment.pamr import pamr

    canvas = stitch(grids.float().cpu(), boxes, x.shape[-2], x.shape[-1])
    label_w, label_h = label_size
    logits = F.interpolate(canvas[None], size=(label_h, label_w), mode="bilinear", align_corners=False)[0]
    if settings.pamr_steps:
        small = F.interpolate(x[None], size=(label_h, label_w), mode="bilinear", align_corners=False)
        logits = pamr(small, logits[None], settings.pamr_steps, settings.pamr_dilations)[0]
    return predict(logits, owner, settings)
