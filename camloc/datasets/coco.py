"""COCO 2017 (docs/protocol.md §6): val2017 for evaluation, and a class-balanced train2017 subset for the
threshold search (100 images per category drawn with a fixed, recorded seed)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from camloc.datasets.coco_format import coco_pairs, load_coco_pairs, open_coco
from camloc.datasets.records import ImagePairs
from camloc.datasets.registry import DataOptions, register_dataset

COCO_LAYOUT = ("<data-root>/annotations/instances_<split>.json beside <data-root>/<split>/ "
               "(annotations_trainval2017.zip and <split>.zip extracted into the data root)")
COCO_OBTAIN = "`camloc data download coco [--split val2017|train2017]`, or http://images.cocodataset.org"


def _paths(opts: DataOptions):
    split = opts.split
    ann = opts.ann_file or opts.root / "annotations" / f"instances_{split}.json"
    images = opts.image_dir or opts.root / split
    opts.reads(ann, images)
    return ann, images


@register_dataset("coco", "COCO 2017 instances (val2017 by default, --split): every (image, class) with a "
                  "non-crowd box", layout=COCO_LAYOUT, obtain=COCO_OBTAIN, default_split="val2017")
def coco(opts: DataOptions) -> list[ImagePairs]:
    ann, images = _paths(opts)
    return load_coco_pairs(ann, images, opts.prompt_template, refuse_stuff=not opts.include_stuff, stats=opts.stats)


@register_dataset("coco-format", "your own boxes: any COCO-format JSON (--ann-file) and its images (--image-dir), "
                  "every category id (stuff ids too); tables name it coco-format:<file name>",
                  layout="--ann-file FILE.json --image-dir FOLDER (file_name relative to it)",
                  obtain="your own data, in COCO's detection format")
def coco_format(opts: DataOptions) -> list[ImagePairs]:
    from camloc.errors import OptionError

    if opts.ann_file is None or opts.image_dir is None:
        raise OptionError("--dataset coco-format reads your own data: give --ann-file (the COCO-format JSON) and "
                          "--image-dir (the folder its file_name entries are relative to)")
    opts.reads(opts.ann_file, opts.image_dir)
    return load_coco_pairs(opts.ann_file, opts.image_dir, opts.prompt_template, refuse_stuff=False, stats=opts.stats)


def balanced_draw(image_ids_per_category: dict[int, list[int]], per_class: int, seed: int) -> dict[int, set[int]]:
    """Draw `per_class` images per category (all of them when fewer), each category from its own
    generator seeded with (seed, category id): adding or removing a category changes no other draw.
    Returns image id -> the categories it was drawn for."""
    drawn: dict[int, set[int]] = defaultdict(set)
    for cat, ids in sorted(image_ids_per_category.items()):
        ids = sorted(ids)
        take = ids if len(ids) <= per_class else np.random.default_rng([seed, cat]).choice(ids, per_class, replace=False)
        for image_id in take:
            drawn[int(image_id)].add(cat)
    return drawn


@register_dataset("coco-train-balanced", "class-balanced COCO train2017 subset (--per-class images per class, "
                  "--subset-seed, default 0): one pair per (drawn image, its class)", layout=COCO_LAYOUT,
                  obtain=COCO_OBTAIN.replace("[--split val2017|train2017]", "--split train2017"),
                  default_split="train2017")
def coco_train_balanced(opts: DataOptions) -> list[ImagePairs]:
    ann, images = _paths(opts)
    coco_api = open_coco(ann, refuse_stuff=not opts.include_stuff, stats=opts.stats)
    per_category = defaultdict(set)
    for a in coco_api.dataset["annotations"]:
        if not a.get("iscrowd", 0):
            per_category[a["category_id"]].add(a["image_id"])
    drawn = balanced_draw({c: list(v) for c, v in per_category.items()}, opts.per_class, opts.subset_seed or 0)
    return coco_pairs(coco_api, images, opts.prompt_template, image_ids=sorted(drawn), categories_per_image=drawn,
                      stats=opts.stats)
