"""Semantic segmentation datasets for the open-vocabulary protocol (`--protocols ovseg`): images with a
label map each, read in their official (or mmsegmentation-converted) layouts, and the class names the
predictions index (`camloc/segment/classes/`).

Each label map is turned into class indices 0..K-1 with 255 = ignore, as mmsegmentation reads it:
- `ade20k-150`: ADEChallengeData2016 `annotations/<split>/*.png` (0 = unlabelled, 1..150): label - 1, 0 -> 255
  (`reduce_zero_label=True`).
- `voc21` / `voc20`: VOC2012 `SegmentationClass/*.png` (palette indices 0 = background, 1..20, 255 = border)
  listed by `ImageSets/Segmentation/<split>.txt`; VOC20 drops the background (0 -> 255, label - 1).
- `context60` / `context59`: PASCAL-Context as mmsegmentation converts it (VOC2010
  `SegmentationClassContext/*.png`, 0 = background, 1..59, listed by `ImageSets/SegmentationContext/<split>.txt`);
  Context59 drops the background.
- `cityscapes`: `gtFine/<split>/<city>/*_gtFine_labelTrainIds.png` (the 19 train ids, 255 = ignore; made by the
  cityscapesScripts' createTrainIdLabelImgs) beside `leftImg8bit/<split>/<city>/*_leftImg8bit.png`.
- `coco-stuff-171`: COCO-Stuff 164k's official `stuffthingmaps_trainval2017/<split>/*.png` (value = COCO-Stuff id
  - 1, 255 unlabelled) mapped to the 171 train ids in id order (the 80 things, then the 91 stuff classes; the
  mapping of mmseg's coco_stuff.py), or mmseg's converted `annotations/<split>/*_labelTrainIds.png` as they are.
- `demo-seg`: the demo photos (`camloc/datasets/demo/`) with label maps painted from their masks as coco-object's
  are: background 0, the 11 demo classes 1..11 in category id order.
- `coco-object`: the 80 COCO things + background made from the instances JSON (`annotations/instances_<split>.json`
  beside `<split>/`): background 0 where no instance is, each non-crowd instance's mask painted with its class
  (1..80 in the JSON's category order) in annotation order, crowd regions 255.
- `ade847` and `context459`, the large-vocabulary sets, as CAT-Seg prepares them for detectron2 (cvlab-kaist/CAT-Seg
  `cat_seg/data/datasets/register_ade20k_847.py` and `register_pascal_context.py` at dc295ee; `datasets/prepare_*.py`
  make the files): 16-bit TIFF label maps of class indices, `ADE20K_2021_17_01/annotations_detectron2/validation/*.tif`
  beside `images_detectron2/validation/*.jpg` (847 classes, ignore 65535) and `VOCdevkit/VOC2010/annotations_detectron2/
  pc459_val/*.tif` beside `JPEGImages/` (459 classes, ignore 459, a value that never occurs: `unknown` is scored as a
  class). Their class files are CAT-Seg's `ade847.json` and `pc459.json` in index order. These label maps keep their
  16-bit values and their own ignore index (`SegDatasetSpec.ignore_index`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from camloc.errors import DataError, OptionError

CLASSES_DIR = Path(__file__).resolve().parent.parent / "segment" / "classes"
IGNORE = 255


@dataclass(frozen=True)
class SegImage:
    image_id: str
    path: str
    label: Callable[[], np.ndarray]
    """The label map (H, W) of class indices (uint8 with 255 = ignore; uint16 with the dataset's own ignore index
    for the large-vocabulary sets), read on demand."""
    label_path: str = ""
    """The file the label map is read from (coco-object: the instances JSON all its maps come from)."""


@dataclass(frozen=True)
class SegDatasetSpec:
    name: str
    classes_file: str
    description: str
    layout: str
    default_split: str
    build: Callable = field(repr=False, default=None)
    background: bool = False
    """Class 0 is a background class (the protocol's background threshold applies)."""
    ignore_index: int = IGNORE
    """The label value that is not scored (255, or 65535 / 459 for ade847 / context459)."""

    def classes(self) -> list[list[str]]:
        from camloc.segment.infer import read_classes

        return read_classes(CLASSES_DIR / self.classes_file)


SEG_DATASETS: dict[str, SegDatasetSpec] = {}


def register_seg_dataset(name: str, classes_file: str, description: str, layout: str, default_split: str,
                         background: bool = False, ignore_index: int = IGNORE) -> Callable:
    def decorate(fn):
        SEG_DATASETS[name] = SegDatasetSpec(name, classes_file, description, layout, default_split, fn, background,
                                            ignore_index)
        return fn

    return decorate


def _one_channel(path: Path, kind: str) -> np.ndarray:
    """A label file's values as they are (one class index per pixel), or one line naming the file."""
    if not path.is_file():
        raise DataError(f"label map {path} does not exist")
    values = np.asarray(Image.open(path))
    if values.ndim != 2:
        raise DataError(f"label map {path} has {values.shape[-1]} channels: camloc reads one class index per pixel "
                        f"({kind})")
    return values


def _png(path: Path) -> np.ndarray:
    """A label map's values as they are in the file (8-bit, palette or 16-bit), refused beyond 0..255: a
    16-bit map's 263 read as uint8 would be class 7, silently."""
    values = _one_channel(path, "an 8-bit or palette PNG, not a colour image")
    if values.dtype != np.uint8:
        high = values[(values < 0) | (values > 255)]
        if high.size:
            raise DataError(f"label map {path} holds values {sorted(set(high.tolist()))[:5]} outside 0..255 (a "
                            f"{values.dtype.itemsize * 8}-bit PNG): camloc reads 8-bit class indices, 255 = ignore; "
                            "convert it to the dataset's 8-bit layout")
        values = values.astype(np.uint8)
    return values


def check_image_ids(images: list[SegImage], where: str) -> list[SegImage]:
    """Image ids name files (the images, labels and `--save-predictions`' PNGs): each must be a plain file
    stem (no folder, `..` or absolute path) and appear once."""
    seen: set = set()
    for item in images:
        text = str(item.image_id)
        if (not text or text in (".", "..") or "/" in text or "\\" in text or text.startswith("~")
                or Path(text).is_absolute() or "\x00" in text):
            raise DataError(f"{where}: image id {text!r} is not a plain file name (no folders, '..' or absolute "
                            "paths): fix the list")
        if text in seen:
            raise DataError(f"{where}: image id {text!r} is listed twice: each image must appear once (its "
                            "pixels would count twice)")
        seen.add(text)
    return images


def _reduce_zero(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 -> 255, every other value - 1 (255 stays 255)."""
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE
    out[label == IGNORE] = IGNORE
    return out.astype(np.uint8)


def _listed(list_file: Path, image_dir: Path, label_dir: Path, image_ext: str, reduce: bool) -> list[SegImage]:
    if not list_file.is_file():
        raise DataError(f"image list {list_file} does not exist; check --data-root (or pass --ann-file)")
    images = []
    for stem in (line.strip() for line in list_file.read_text().splitlines()):
        if not stem:
            continue
        label_path = label_dir / f"{stem}.png"

        def read(label_path=label_path):
            label = _png(label_path)
            return _reduce_zero(label) if reduce else label

        images.append(SegImage(stem, str(image_dir / f"{stem}{image_ext}"), read, str(label_path)))
    return check_image_ids(images, f"image list {list_file}")


@register_seg_dataset("ade20k-150", "ade20k-150.txt", "ADE20K SceneParsing (ADEChallengeData2016), 150 classes",
                      "<data-root>/ADEChallengeData2016/images/<split>/*.jpg, annotations/<split>/*.png", "validation")
def ade20k_150(root: Path, split: str, image_dir: Path | None, ann_file: Path | None) -> list[SegImage]:
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    images_dir = image_dir or base / "images" / split
    labels_dir = base / "annotations" / split
    if not images_dir.is_dir():
        raise DataError(f"image folder {images_dir} does not exist; pass --data-root (the folder holding "
                        "ADEChallengeData2016) or --image-dir (`camloc data download ade20k-sceneparsing`)")
    out = []
    for path in sorted(images_dir.glob("*.jpg")):
        label_path = labels_dir / f"{path.stem}.png"
        out.append(SegImage(path.stem, str(path), lambda p=label_path: _reduce_zero(_png(p)), str(label_path)))
    return out


def _pascal(year: str, lists: str, labels: str, reduce: bool) -> Callable:
    """A builder for a PASCAL layout (VOCdevkit/VOC<year>: JPEGImages, `labels`, ImageSets/`lists`/<split>.txt);
    `reduce` drops the background class (mmseg's reduce_zero_label)."""

    def build(root: Path, split: str, image_dir, ann_file) -> list[SegImage]:
        candidates = (root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}", root)
        base = next((p for p in candidates if (p / "JPEGImages").is_dir()), candidates[0])
        return _listed(ann_file or base / "ImageSets" / lists / f"{split}.txt", image_dir or base / "JPEGImages",
                       base / labels, ".jpg", reduce)

    return build


for _name, _year, _lists, _labels, _description in (
        ("voc", "2012", "Segmentation", "SegmentationClass", "PASCAL VOC 2012 val"),
        ("context", "2010", "SegmentationContext", "SegmentationClassContext", "PASCAL-Context val (mmseg's conversion)")):
    _full, _reduced = (("voc21", "voc20") if _name == "voc" else ("context60", "context59"))
    _layout = f"<data-root>/VOCdevkit/VOC{_year}/JPEGImages, {_labels}, ImageSets/{_lists}/<split>.txt"
    _n = 20 if _name == "voc" else 59
    register_seg_dataset(_full, f"{_full}.txt", f"{_description}, background + {_n} classes", _layout, "val",
                         background=True)(_pascal(_year, _lists, _labels, reduce=False))
    register_seg_dataset(_reduced, f"{_reduced}.txt", f"{_description}, the {_n} classes (background ignored)",
                         _layout, "val")(_pascal(_year, _lists, _labels, reduce=True))


@register_seg_dataset("cityscapes", "cityscapes.txt", "Cityscapes val, the 19 train ids",
                      "<data-root>/cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png, "
                      "gtFine/<split>/<city>/*_gtFine_labelTrainIds.png", "val")
def cityscapes(root, split, image_dir, ann_file):
    base = root / "cityscapes" if (root / "cityscapes").is_dir() else root
    images_dir = image_dir or base / "leftImg8bit" / split
    if not images_dir.is_dir():
        raise DataError(f"image folder {images_dir} does not exist; pass --data-root (the folder holding cityscapes/)")
    out = []
    for path in sorted(images_dir.rglob("*_leftImg8bit.png")):
        stem = path.name[: -len("_leftImg8bit.png")]
        label = base / "gtFine" / split / path.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        out.append(SegImage(stem, str(path), lambda p=label: _png(p), str(label)))
    return out


UNUSED_THING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
"""COCO's thing ids (1..90) that no category uses; COCO-Stuff's stuff ids are 92..182."""
STUFF_TRAIN_IDS = np.full(256, IGNORE, np.uint8)
STUFF_TRAIN_IDS[[k - 1 for k in range(1, 91) if k not in UNUSED_THING_IDS] + list(range(91, 182))] = np.arange(171)
"""stuffthingmaps value (COCO-Stuff id - 1) -> the 171 train ids in id order (mmseg's coco_stuff.py mapping); 255."""


COCO_STUFF_LAYOUT = ("<data-root>/stuffthingmaps_trainval2017/<split>/*.png beside <data-root>/<split>/*.jpg (the "
                     "official stuffthingmaps), or mmseg's conversion <data-root>/coco_stuff164k/images/<split>/, "
                     "annotations/<split>/*_labelTrainIds.png")
COCO80_FROM_STUFF = np.full(256, IGNORE, np.uint8)
"""CLIPtrase's COCO-Object ("COCO80") read from the 171 COCO-Stuff train ids (clip_self_correlation.py at 8fb4d74 scores
them with 81 classes: label 255 and label 80, the first stuff class, become its background, the other stuff ids
81..170 fall outside its 81 classes and are not scored): things 0..79 -> 1..80, 80 and 255 -> 0, the rest ignored."""
COCO80_FROM_STUFF[:80] = np.arange(1, 81)
COCO80_FROM_STUFF[[80, 255]] = 0


@register_seg_dataset("coco80-cliptrase", "cliptrase-coco80.txt", "COCO-Object as CLIPtrase's script reads it from "
                      "COCO-Stuff 164k's labels (background + 80 things, stuff but 'banner' ignored)",
                      COCO_STUFF_LAYOUT, "val2017", background=True)
def coco80_cliptrase(root, split, image_dir, ann_file):
    from dataclasses import replace

    return [replace(item, label=lambda item=item: COCO80_FROM_STUFF[item.label()])
            for item in coco_stuff(root, split, image_dir, ann_file)]


@register_seg_dataset("coco-stuff-171", "coco-stuff-171.txt", "COCO-Stuff 164k val2017, 171 classes", COCO_STUFF_LAYOUT,
                      "val2017")
def coco_stuff(root, split, image_dir, ann_file):
    raw = root / "stuffthingmaps_trainval2017" / split
    if raw.is_dir():  # the official label maps: values are COCO-Stuff ids - 1, mapped to the 171 train ids
        images_dir = image_dir or root / split
        return [SegImage(p.stem, str(images_dir / f"{p.stem}.jpg"), lambda p=p: STUFF_TRAIN_IDS[_png(p)], str(p))
                for p in sorted(raw.glob("*.png"))]
    base = root / "coco_stuff164k" if (root / "coco_stuff164k").is_dir() else root
    images_dir = image_dir or base / "images" / split
    if not images_dir.is_dir():
        raise DataError(f"neither {raw} (the official stuffthingmaps) nor {images_dir} (mmseg's conversion) exists; "
                        "pass --data-root")
    out = []
    for path in sorted(images_dir.glob("*.jpg")):
        label = base / "annotations" / split / f"{path.stem}_labelTrainIds.png"
        out.append(SegImage(path.stem, str(path), lambda p=label: _png(p), str(label)))
    return out


@register_seg_dataset("coco-object", "coco-object.txt", "COCO val2017 objects: the 80 things + background, from the "
                      "instances JSON", "<data-root>/annotations/instances_<split>.json beside <data-root>/<split>/",
                      "val2017", background=True)
def coco_object(root, split, image_dir, ann_file):
    from camloc.datasets.coco_format import open_coco

    ann = ann_file or root / "annotations" / f"instances_{split}.json"
    coco = open_coco(ann)
    categories = sorted(coco.getCatIds())
    if len(categories) != 80:
        raise DataError(f"coco-object numbers the 80 COCO thing categories 1..80 in id order, and {ann} lists "
                        f"{len(categories)} categories; use the official instances_<split>.json")
    return _painted(coco, ann, image_dir or root / split)


def _painted(coco, ann: Path, folder: Path) -> list[SegImage]:
    """Label maps painted from a COCO instances file: 0 where no instance is, each non-crowd instance's mask
    with its category's place in id order (1..K), crowd regions 255, in annotation order."""
    order = {c: i + 1 for i, c in enumerate(sorted(coco.getCatIds()))}

    def label(image_id):
        info = coco.imgs[image_id]
        out = np.zeros((info["height"], info["width"]), np.uint8)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            mask = coco.annToMask(a).astype(bool)
            out[mask] = IGNORE if a.get("iscrowd", 0) else order[a["category_id"]]
        return out

    return [SegImage(str(i), str(folder / coco.imgs[i]["file_name"]), lambda i=i: label(i), str(ann))
            for i in sorted(coco.imgs)]


def _tif16(path: Path) -> np.ndarray:
    """A 16-bit TIFF label map (CAT-Seg's detectron2 layout) as uint16 values, as they are in the file."""
    values = _one_channel(path, "a 16-bit TIFF as CAT-Seg's prepare scripts write it")
    if values.dtype.kind not in "iu" or (values.size and (values.min() < 0 or values.max() > 65535)):
        raise DataError(f"label map {path} holds {values.dtype} values: expected 16-bit class indices")
    return values.astype(np.uint16)


def _detectron2(images_dir: Path, labels_dir: Path, hint: str) -> list[SegImage]:
    """detectron2's `load_sem_seg` pairing: every label file (*.tif) with the image of the same stem (*.jpg)."""
    if not labels_dir.is_dir():
        raise DataError(f"label folder {labels_dir} does not exist; {hint}")
    return [SegImage(p.stem, str(images_dir / f"{p.stem}.jpg"), lambda p=p: _tif16(p), str(p))
            for p in sorted(labels_dir.glob("*.tif"))]


@register_seg_dataset("ade847", "ade847.txt", "ADE20K full release, 847 classes (CAT-Seg's conversion)",
                      "<data-root>/ADE20K_2021_17_01/images_detectron2/<split>/*.jpg, "
                      "annotations_detectron2/<split>/*.tif (16-bit, 65535 = ignore)", "validation",
                      ignore_index=65535)
def ade847(root, split, image_dir, ann_file):
    base = root / "ADE20K_2021_17_01" if (root / "ADE20K_2021_17_01").is_dir() else root
    return _detectron2(image_dir or base / "images_detectron2" / split, base / "annotations_detectron2" / split,
                       "make it with CAT-Seg's datasets/prepare_ade20k_full.py from the ADE20K_2021_17_01 release, "
                       "and pass --data-root (the folder holding ADE20K_2021_17_01)")


@register_seg_dataset("context459", "context459.txt", "PASCAL-Context val, 459 classes (CAT-Seg's conversion)",
                      "<data-root>/VOCdevkit/VOC2010/JPEGImages, annotations_detectron2/pc459_<split>/*.tif "
                      "(16-bit, 0..458)", "val", ignore_index=459)
def context459(root, split, image_dir, ann_file):
    candidates = (root / "VOCdevkit" / "VOC2010", root / "VOC2010", root)
    base = next((p for p in candidates if (p / "JPEGImages").is_dir()), candidates[0])
    return _detectron2(image_dir or base / "JPEGImages", base / "annotations_detectron2" / f"pc459_{split}",
                       "make it with CAT-Seg's datasets/prepare_pascal_context_459.py from VOC2010's trainval "
                       ".mat files, and pass --data-root (the folder holding VOCdevkit)")


@register_seg_dataset("demo-seg", "demo-seg.txt", "the demo set's 10 photos as a segmentation set: background + its "
                      "11 classes, painted from its masks (ships with camloc)", "inside the package: "
                      "camloc/datasets/demo/", "", background=True)
def demo_seg(root, split, image_dir, ann_file):
    from camloc.datasets.coco_format import open_coco
    from camloc.datasets.registry import DEMO_DIR

    ann = ann_file or DEMO_DIR / "instances_demo.json"
    return _painted(open_coco(ann), ann, image_dir or DEMO_DIR / "images")


FOLDER_OPTIONS = {"reduce_zero_label": False, "ignore_index": None, "background": False}
"""`seg-folder`'s reading options (`--seg-reduce-zero-label`, `--seg-ignore-index`, `--seg-background`), as
mmsegmentation's custom datasets have them; recorded in the run's `ovseg` settings."""


def _folder_labels(path: Path, reduce_zero_label: bool, ignore_index: int | None) -> np.ndarray:
    label = _png(path)
    if ignore_index is not None and ignore_index != IGNORE:
        label = np.where(label == ignore_index, IGNORE, label).astype(np.uint8)
    return _reduce_zero(label) if reduce_zero_label else label


@register_seg_dataset("seg-folder", "classes.txt", "your own segmentation folder: images/, labels/ (8-bit class "
                      "index PNGs) and classes.txt; tables name it seg-folder:<folder name>",
                      "<data-root>/images/*.jpg|png, <data-root>/labels/<stem>.png, <data-root>/classes.txt (one class "
                      "per line, synonyms separated by ', ')", "")
def seg_folder(root: Path, split: str, image_dir: Path | None, ann_file: Path | None, reduce_zero_label: bool = False,
               ignore_index: int | None = None) -> list[SegImage]:
    images_dir = image_dir or root / "images"
    labels_dir = root / "labels"
    for what, where in (("image folder", images_dir), ("label folder", labels_dir)):
        if not where.is_dir():
            raise DataError(f"seg-folder: the {what} {where} does not exist; --data-root is a folder holding images/, "
                            "labels/ and classes.txt")
    if not (ann_file or root / "classes.txt").is_file():
        raise DataError(f"seg-folder: {ann_file or root / 'classes.txt'} does not exist: one class name per line, in "
                        "the order of the label values (synonyms separated by ', ')")
    paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [SegImage(p.stem, str(p), lambda q=labels_dir / f"{p.stem}.png": _folder_labels(q, reduce_zero_label,
                                                                                          ignore_index),
                     str(labels_dir / f"{p.stem}.png")) for p in paths]


def load_seg_dataset(name: str, data_root: str | Path | None = None, split: str | None = None,
                     image_dir: str | Path | None = None, ann_file: str | Path | None = None,
                     limit: int | None = None, **folder: object) -> tuple[SegDatasetSpec, list[SegImage]]:
    """A segmentation dataset's spec and images. `seg-folder` takes `FOLDER_OPTIONS` (refused elsewhere), and
    its spec's class file and background flag come from the folder and the options."""
    from dataclasses import replace

    from camloc.datasets.registry import data_root as default_root

    spec = SEG_DATASETS.get(name)
    if spec is None:
        raise OptionError(f"--protocols ovseg needs a segmentation dataset: {', '.join(SEG_DATASETS)} (got {name!r})")
    given = {k: v for k, v in folder.items() if v != FOLDER_OPTIONS.get(k)}
    unknown = sorted(set(folder) - set(FOLDER_OPTIONS))
    if unknown or (given and name != "seg-folder"):
        flags = ", ".join("--seg-" + k.replace("_", "-") for k in (unknown or given))
        raise OptionError(f"{flags} read your own segmentation folder (--dataset seg-folder), not {name}")
    root = default_root(data_root)
    if name == "seg-folder":
        ignore = folder.get("ignore_index")
        if ignore is not None and not (isinstance(ignore, int) and 0 <= ignore <= 255):
            raise OptionError(f"--seg-ignore-index must be a label value 0..255, got {ignore!r}")
        spec = replace(spec, classes_file=str(Path(ann_file or root / "classes.txt").resolve()),
                       background=bool(folder.get("background", False)))
        images = spec.build(root, split, Path(image_dir) if image_dir else None, Path(ann_file) if ann_file else None,
                            bool(folder.get("reduce_zero_label", False)), ignore)
    else:
        images = spec.build(root, split or spec.default_split,
                            Path(image_dir) if image_dir else None, Path(ann_file) if ann_file else None)
    if limit is not None:
        if limit < 1:
            raise OptionError(f"--limit must be at least 1, got {limit}")
        images = images[:limit]
    if not images:
        raise DataError(f"dataset {name} gives 0 images under {default_root(data_root)}; expected {spec.layout}")
    return spec, check_image_ids(images, f"dataset {name}")
