"""ADE20K scenes (docs/protocol.md §6, appendix Table S3): the ten scene classes, from either release.

Ground truth is the class's VISIBLE extent in both releases by default, so the two agree:
- Full ADE20K (ADE20K_2021_17_01): per-image JSON (`annotation.imsize` = [H, W, C], `object[].name`
  comma-separated synonyms, `parts.part_level` 0 = whole object, `name_ndx`, `instance_mask`) and
  `<image>_seg.png`, whose pixels encode the object class as (R // 10) * 256 + G and the instance in B
  (the release's own utils_ade20k.py). Read off the release's files (tests/real-formats/ade20k-full-2021):
  the class code IS the object's `name_ndx` (0 = unlabelled), and each object's `instance_mask` PNG holds
  255 on its visible pixels and 128 on its occluded part. Visible (default): one box per instance from
  its instance PNG's 255 pixels (no code convention needed, and no 8-bit instance numbers to wrap),
  or, for a class whose instances lack their PNGs, from the `_seg.png` pixels of its codes, one box per
  instance value; coverage = the union of those pixels. A `_seg.png` whose codes match none of its
  JSON's whole objects is refused. Amodal (`--ade-extent amodal`): the JSON polygons, which include
  occluded parts, boxes of the polygons, coverage = their filled union.
- SceneParsing (ADEChallengeData2016): label PNGs (0 = unlabelled, 1..150 = objectInfo150 classes);
  ground truth = the bounding boxes of the class's connected regions (8-connectivity); coverage =
  the class's pixels. It has no "snow": a warning says so and the other nine are used.

Validation images; one pair per (image, scene class present). Category ids are 1..10 in SCENES order.
"""
from __future__ import annotations

import csv
import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from camloc.datasets.records import ImagePairs, Pair
from camloc.datasets.registry import DataOptions, register_dataset
from camloc.errors import DataError

SCENES = ["field", "hill", "river", "grass", "sky", "sand", "sea", "snow", "water", "road"]
NOT_IN_SCENE_PARSING = {"snow"}  # ADEChallengeData2016's 150 classes have no snow (documented above)
FULL_ROOT = "ADE20K_2021_17_01"
SCENE_PARSING_ROOT = "ADEChallengeData2016"
EXTENTS = ("visible", "amodal")
VISIBLE = 255  # instance_mask PNGs: 255 = the object's visible pixels, 128 = its occluded part, 0 = elsewhere


def _names(raw: str, sep: str) -> list[str]:
    return [n.strip() for n in raw.split(sep) if n.strip()]


def _pair(image_id: str, path: Path, size: tuple[int, int], scene: str, boxes, coverage, template) -> Pair:
    return Pair(image_id=image_id, file_name=path.name, image_size=size, category_id=SCENES.index(scene) + 1,
                category=scene, prompt=template.format(scene), gt_boxes=boxes, coverage=coverage)


def seg_classes(seg_path: Path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(class code, instance code) per pixel of a full-release `_seg.png` (see the module docstring)."""
    if not seg_path.is_file():
        raise DataError(f"{seg_path} does not exist: the visible extent needs the release's _seg.png beside each "
                        "image (or pass --ade-extent amodal to use the JSON polygons)")
    seg = np.asarray(Image.open(seg_path).convert("RGB")).astype(np.int32)
    if seg.shape[:2] != (size[1], size[0]):
        raise DataError(f"{seg_path} is {seg.shape[1]}x{seg.shape[0]}, but its JSON's imsize says {size[0]}x{size[1]}")
    return (seg[..., 0] // 10) * 256 + seg[..., 1], seg[..., 2]


def instance_visible(mask_path: Path, size: tuple[int, int]) -> np.ndarray:
    """An object's visible pixels from its `instance_mask` PNG: 255 = visible, 128 = its occluded part."""
    try:
        mask = np.asarray(Image.open(mask_path))
    except OSError as exc:
        raise DataError(f"ADE20K instance mask {mask_path} cannot be read ({exc})") from None
    if mask.shape[:2] != (size[1], size[0]):
        raise DataError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]}, but its JSON's imsize says "
                        f"{size[0]}x{size[1]}")
    return (mask if mask.ndim == 2 else mask[..., 0]) == VISIBLE


@dataclass(frozen=True)
class VisibleSource:
    """Where one scene class's visible pixels come from in one image: its objects' instance PNGs when
    every one of them has its PNG, otherwise the `_seg.png` pixels of its class codes."""

    instance_masks: tuple[Path, ...] = ()
    codes: tuple[int, ...] = ()

    def instances(self, seg: tuple[np.ndarray, np.ndarray] | None, size: tuple[int, int]) -> list[np.ndarray]:
        """Each instance's visible pixels (hidden instances are empty masks)."""
        if self.instance_masks:
            return [instance_visible(path, size) for path in self.instance_masks]
        classes, instances = seg
        mask = np.isin(classes, self.codes)
        return [mask & (instances == value) for value in np.unique(instances[mask])]


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def visible_masks(seg_path: Path, size: tuple[int, int], sources: dict[int, VisibleSource]) -> dict:
    """{category id: its visible pixels} of a full-release image."""
    seg = seg_classes(seg_path, size) if any(not s.instance_masks for s in sources.values()) else None
    out = {}
    for cat, source in sources.items():
        masks = source.instances(seg, size)
        out[cat] = np.logical_or.reduce(masks) if masks else np.zeros((size[1], size[0]), bool)
    return out


def polygon_masks(size: tuple[int, int], polygons: dict[int, list[np.ndarray]]) -> dict:
    """{category id: the filled union of its (amodal) polygons}."""
    width, height = size
    out = {}
    for cat, polys in polygons.items():
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [np.round(p).astype(np.int32) for p in polys], 1)
        out[cat] = mask.astype(bool)
    return out


def label_masks(label_path: Path, labels: dict[int, int]) -> dict:
    """{category id: pixels of its SceneParsing label}."""
    label = np.asarray(Image.open(label_path))
    return {cat: label == value for cat, value in labels.items()}


def _read_annotation(json_path: Path) -> tuple[int, int, list, dict]:
    try:
        annotation = json.loads(json_path.read_text(encoding="utf-8", errors="replace"))["annotation"]
        height, width = int(annotation["imsize"][0]), int(annotation["imsize"][1])
        objects = annotation["object"]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise DataError(f"ADE20K annotation {json_path} is not in the full release's format ({exc})") from exc
    return width, height, objects, annotation


def _check_seg_encoding(seg_path: Path, classes: np.ndarray, objects: list) -> None:
    """The class codes of `_seg.png` are the `name_ndx` of the JSON's whole objects: refuse a seg image
    that matches none of them (another encoding, or another image's file)."""
    expected = {int(o["name_ndx"]) for o in objects
                if "name_ndx" in o and o.get("parts", {}).get("part_level", 0) == 0}
    present = set(np.unique(classes).tolist()) - {0}
    if expected and not expected & present:
        raise DataError(f"{seg_path} has none of the class codes ((R // 10) * 256 + G = name_ndx) of its JSON's "
                        f"{len(expected)} whole objects: it is not encoded as the ADE20K release encodes it; pass "
                        "--ade-extent amodal to use the polygons")


def full_release_pairs(folder: Path, template: str, extent: str = "visible", stats: dict | None = None) -> list[ImagePairs]:
    """Pairs from the full release's per-image JSON files found under `folder`."""
    images = []
    for json_path in sorted(folder.rglob("ADE_*.json")):
        width, height, objects, annotation = _read_annotation(json_path)
        size = (width, height)
        polygons: dict[str, list[np.ndarray]] = {}
        codes: dict[str, set[int]] = {}
        instance_pngs: dict[str, list[Path | None]] = {}
        for obj in objects:
            if obj.get("parts", {}).get("part_level", 0) != 0:
                continue
            scene = next((n for n in _names(obj.get("name", ""), ",") if n in SCENES), None)
            poly = obj.get("polygon", {})
            if scene is None or not poly.get("x"):
                continue
            polygons.setdefault(scene, []).append(np.stack([poly["x"], poly["y"]], axis=1).astype(np.float64))
            if "name_ndx" in obj:
                codes.setdefault(scene, set()).add(int(obj["name_ndx"]))
            png = json_path.parent / obj["instance_mask"] if obj.get("instance_mask") else None
            instance_pngs.setdefault(scene, []).append(png if png is not None and png.is_file() else None)
        image_path = json_path.parent / annotation.get("filename", json_path.with_suffix(".jpg").name)
        seg_path = json_path.with_name(json_path.stem + "_seg.png")
        pairs, sources = [], {}
        if extent == "visible" and polygons:
            seg = seg_classes(seg_path, size)
            _check_seg_encoding(seg_path, seg[0], objects)
            for scene in sorted(polygons, key=SCENES.index):
                pngs = instance_pngs[scene]
                source = (VisibleSource(instance_masks=tuple(pngs)) if all(pngs)
                          else VisibleSource(codes=tuple(sorted(codes.get(scene, ())))))
                masks = source.instances(seg, size)
                boxes = [_box(m) for m in masks if m.any()]
                if stats is not None and len(boxes) < len(polygons[scene]):  # instances hidden behind others
                    stats["occluded_instances"] = (stats.get("occluded_instances", 0)
                                                   + max(len(polygons[scene]) - len(boxes), 0))
                if not boxes:
                    continue
                sources[SCENES.index(scene) + 1] = source
                coverage = float(np.logical_or.reduce(masks).mean())
                pairs.append(_pair(json_path.stem, image_path, size, scene, boxes, coverage, template))
        elif polygons:
            for scene in sorted(polygons, key=SCENES.index):
                boxes = [[float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())]
                         for p in polygons[scene]]
                mask = np.zeros((height, width), np.uint8)
                cv2.fillPoly(mask, [np.round(p).astype(np.int32) for p in polygons[scene]], 1)
                pairs.append(_pair(json_path.stem, image_path, size, scene, boxes, float(mask.mean()), template))
        if pairs:
            if extent == "visible":
                masks = functools.partial(visible_masks, seg_path, size, sources)
            else:
                cats = {p.category_id: p.category for p in pairs}
                masks = functools.partial(polygon_masks, size, {c: polygons[s] for c, s in cats.items()})
            images.append(ImagePairs(str(image_path), json_path.stem, pairs, masks=masks))
    return images


def read_object_info(path: Path) -> dict[str, int]:
    """The SceneParsing class list -> {scene: label}. Reads both official files: objectInfo150.txt
    (tab-separated Idx, Ratio, Train, Val, Name; synonyms joined by ", "; some Idx fields carry a
    trailing space) and objectInfo150.csv (comma-separated with a Stuff column; synonyms joined by
    ";"). A scene class that matches no class is an error, except "snow" (not among the 150)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass --ann-file or fix --data-root (see `camloc data verify "
                        "ade20k-scenes`)")
    text = path.read_text(encoding="utf-8-sig")
    delimiter = "\t" if "\t" in text.splitlines()[0] else ","
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    header = [h.strip() for h in rows[0]] if rows else []
    if "Idx" not in header or "Name" not in header:
        raise DataError(f"{path} is not an objectInfo150 file (expected a header with Idx and Name, got "
                        f"{', '.join(header) or 'nothing'})")
    idx, name = header.index("Idx"), header.index("Name")
    synonym_sep = ";" if delimiter == "," else ","
    labels: dict[str, int] = {}
    for line, fields in enumerate(rows[1:], start=2):
        if not any(f.strip() for f in fields):
            continue
        try:
            label = int(fields[idx].strip())
            names = _names(fields[name], synonym_sep)
        except (ValueError, IndexError):
            raise DataError(f"{path} line {line} is not an objectInfo150 row: {delimiter.join(fields)!r}") from None
        for n in names:
            if n in SCENES:
                labels.setdefault(n, label)
    unmatched = [s for s in SCENES if s not in labels and s not in NOT_IN_SCENE_PARSING]
    if unmatched:
        raise DataError(f"{path}: scene class(es) {', '.join(unmatched)} match no class name; the file is not the "
                        "official objectInfo150 list")
    return labels


def scene_parsing_pairs(image_dir: Path, label_dir: Path, info_file: Path, template: str) -> list[ImagePairs]:
    labels = read_object_info(info_file)
    missing = [s for s in SCENES if s not in labels]  # only "snow" (read_object_info refuses others)
    if missing:
        warnings.warn(f"ADEChallengeData2016 has no {', '.join(missing)} class: ade20k-scenes uses the other "
                      f"{len(labels)} scene classes there", stacklevel=2)
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist; pass --image-dir or fix --data-root")
    images = []
    for image_path in sorted(image_dir.glob("*.jpg")):
        label_path = label_dir / f"{image_path.stem}.png"
        if not label_path.is_file():
            raise DataError(f"label PNG {label_path} for {image_path.name} does not exist")
        label = np.asarray(Image.open(label_path))
        height, width = label.shape[:2]
        pairs = []
        for scene in sorted(labels, key=SCENES.index):
            mask = (label == labels[scene]).astype(np.uint8)
            if not mask.any():
                continue
            count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            boxes = [[int(x), int(y), int(x + w), int(y + h)] for x, y, w, h, _ in stats[1:count]]
            pairs.append(_pair(image_path.stem, image_path, (width, height), scene, boxes, float(mask.mean()), template))
        if pairs:
            masks = functools.partial(label_masks, label_path, {p.category_id: labels[p.category] for p in pairs})
            images.append(ImagePairs(str(image_path), image_path.stem, pairs, masks=masks))
    return images


@register_dataset(
    "ade20k-scenes", "ADE20K validation, the 10 scene classes of Table S3 (full release or ADEChallengeData2016)",
    layout=f"<data-root>/{FULL_ROOT}/images/ADE/validation/**/ADE_val_*.jpg + .json (full release), or "
           f"<data-root>/{SCENE_PARSING_ROOT}/images/validation/, annotations/validation/, objectInfo150.txt",
    obtain="SceneParsing: `camloc data download ade20k-sceneparsing`; the full release (needed for 'snow') is not "
           "downloadable automatically: register at https://ade20k.csail.mit.edu and extract "
           f"{FULL_ROOT}.zip into the data root",
    default_split="validation",
    folders=(FULL_ROOT, SCENE_PARSING_ROOT),
)
def ade20k_scenes(opts: DataOptions) -> list[ImagePairs]:
    full = opts.root / FULL_ROOT
    parsing = opts.root / SCENE_PARSING_ROOT
    split = opts.split
    if opts.ann_file is not None and opts.ann_file.name.startswith("objectInfo150"):
        parsing = opts.ann_file.parent
    elif opts.image_dir is not None and any(opts.image_dir.rglob("ADE_*.json")):
        opts.reads(image_dir=opts.image_dir)
        return full_release_pairs(opts.image_dir, opts.prompt_template, opts.ade_extent, opts.stats)
    elif full.is_dir():
        opts.reads(image_dir=full / "images" / "ADE" / split)
        return full_release_pairs(full / "images" / "ADE" / split, opts.prompt_template, opts.ade_extent, opts.stats)
    if parsing.is_dir() or opts.ann_file is not None:
        image_dir = opts.image_dir or parsing / "images" / split
        opts.reads(opts.ann_file or parsing / "objectInfo150.txt", image_dir)
        return scene_parsing_pairs(image_dir, image_dir.parent.parent / "annotations" / image_dir.name,
                                   opts.ann_file or parsing / "objectInfo150.txt", opts.prompt_template)
    raise DataError(f"no ADE20K under {opts.root}: expected {full} (full release) or {parsing} (SceneParsing); "
                    "pass --data-root, or get the data with `camloc data download ade20k-sceneparsing`")
