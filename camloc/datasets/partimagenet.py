"""PartImageNet (docs/protocol.md §6): the official COCO-style split JSON (category ids start at 0, part names
such as "Quadruped Head" as prompts), images under images/<split>/<wnid>/<file>."""
from __future__ import annotations

from pathlib import Path

from camloc.datasets.coco_format import load_coco_pairs
from camloc.datasets.records import ImagePairs
from camloc.datasets.registry import DataOptions, register_dataset

ROOT = "PartImageNet"


def _ann_file(opts: DataOptions, split: str) -> Path:
    if opts.ann_file:
        return opts.ann_file
    base = opts.root / ROOT / "annotations"
    nested = base / split / f"{split}.json"
    return nested if nested.is_file() else base / f"{split}.json"


def _locate(folder: Path, info: dict) -> Path:
    """<folder>/<wnid>/<file> (the release's layout), or <folder>/<file> when that is where it is."""
    name = info["file_name"]
    if "/" in name:
        return folder / name
    nested = folder / name.split("_")[0] / name
    return nested if nested.exists() or not (folder / name).exists() else folder / name


OOD_CLASSES = 40
PAPER_TEST = (4590, 14260)  # images, pairs of the paper's own test metadata (gScoreCAM appendix)


def _note(images: list[ImagePairs]) -> str:
    classes = {p.category_id for item in images for p in item.pairs}
    n_pairs = sum(len(item.pairs) for item in images)
    which = ("the PartImageNet_OOD release's part classes, as the gScoreCAM paper used" if len(classes) == OOD_CLASSES
             else f"not the {OOD_CLASSES} part classes of PartImageNet_OOD (the split the gScoreCAM paper used): "
                  "is this PartImageNet_Seg?")
    return (f"{len(classes)} part classes: {which}; the paper's test metadata has {PAPER_TEST[0]:,} images / "
            f"{PAPER_TEST[1]:,} pairs, this data {len(images):,} / {n_pairs:,}")


@register_dataset(
    "partimagenet", "PartImageNet parts (test split by default, --split): every (image, part class) with a box",
    layout="<data-root>/PartImageNet/annotations/<split>.json (or annotations/<split>/<split>.json) and "
           "<data-root>/PartImageNet/images/<split>/<wnid>/<file>.JPEG",
    obtain="not downloadable automatically: get PartImageNet from https://github.com/TACJu/PartImageNet. Two archives "
           "exist: PartImageNet_OOD.zip (used by the gScoreCAM paper: 40 part classes, COCO-style JSON per split, "
           "the layout above) and PartImageNet_Seg.zip (the segmentation release, other splits and classes); "
           "extract PartImageNet_OOD into the data root",
    default_split="test",
    folders=(ROOT,),
    note=_note,
)
def partimagenet(opts: DataOptions) -> list[ImagePairs]:
    split = opts.split
    images, ann = opts.image_dir or opts.root / ROOT / "images" / split, _ann_file(opts, split)
    opts.reads(ann, images)
    return load_coco_pairs(ann, images, opts.prompt_template, image_path=_locate, stats=opts.stats)
