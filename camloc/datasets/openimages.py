"""OpenImages V7 point-level labels (the p-mIoU benchmark of GEM and LeGrad): dataset `openimages-v7-points`.

Files, as Open Images V7 publishes them (storage.googleapis.com/openimages/v7/):
- `oidv7-val-annotations-point-labels.csv`: one row per point, with a header; camloc reads the columns ImageId,
  X, Y (the point's position as a fraction of the image's width and height), Label (the class's MID, e.g.
  /m/01xc8d) and EstimatedYesNo (yes, no or unsure: whether the class is at that point). The other columns
  (Source, YesVotes, NoVotes, UnsureVotes, TextLabel, as FiftyOne's Open Images loader lists them) are not read.
- `oidv7-class-descriptions.csv`: MID, display name per row (a first row `LabelName,DisplayName` is a header).
- The images, `validation/<ImageId>.jpg`.

Pairs: one per (image, class with at least one yes point), its points the class's yes and no points in that image
(unsure points are dropped), in pixels of the raw image (x = X * W, y = Y * H). This is how the only public
reconstruction of the protocol builds them (no official script exists); it groups by the class's text label, camloc
by its MID, which names it without ambiguity. The pair's class id is the MID's row in the class descriptions file
(1-based), its name the display name, its prompt the name through --prompt-template (the reconstruction lowercases
the name and uses "a photo of a {}"). The pairs have no boxes: the box protocol does not score them (`iou` None);
`--protocols points` does.

Annotated images that are not in the image folder (a partial download) are left out and counted in the run's faults
(`images_not_found`), never silently."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from camloc.datasets.records import ImagePairs, Pair
from camloc.datasets.registry import DataOptions, register_dataset
from camloc.errors import DataError

ROOT = "openimages-v7"
POINTS_FILE = "oidv7-val-annotations-point-labels.csv"
CLASSES_FILE = "oidv7-class-descriptions.csv"
COLUMNS = ("ImageId", "X", "Y", "Label", "EstimatedYesNo")
ANSWERS = {"yes": 1, "no": 0}


def read_point_labels(path: Path):
    """The point-label CSV as a DataFrame of ImageId, X, Y, Label, yes (1 / 0), unsure points dropped; any row
    with a point outside the image or an answer other than yes/no/unsure is a `DataError` naming the file and row."""
    import pandas as pd

    if not path.is_file():
        raise DataError(f"OpenImages V7's point labels are expected at {path}: `camloc data download "
                        "openimages-v7-points` fetches them (or pass the file as --ann-file)")
    try:
        header = pd.read_csv(path, nrows=0).columns
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path} has no column {', '.join(missing)}: it is not an Open Images V7 point-label CSV "
                            f"(expected the columns {', '.join(COLUMNS)}, ...)")
        table = pd.read_csv(path, usecols=list(COLUMNS), dtype={"ImageId": str, "Label": str, "EstimatedYesNo": str,
                                                                 "X": "float64", "Y": "float64"},
                            keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} could not be read as a point-label CSV ({exc})") from None
    answer = table["EstimatedYesNo"].str.strip().str.lower()
    bad = ~answer.isin([*ANSWERS, "unsure"])
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise DataError(f"{path} row {row + 2}: EstimatedYesNo is {table['EstimatedYesNo'].iloc[row]!r}, not yes, no "
                        "or unsure")
    outside = ~(table["X"].between(0, 1) & table["Y"].between(0, 1))  # NaN is outside too
    if outside.any():
        row = int(outside.to_numpy().argmax())
        raise DataError(f"{path} row {row + 2}: the point ({table['X'].iloc[row]}, {table['Y'].iloc[row]}) of image "
                        f"{table['ImageId'].iloc[row]} lies outside the image (X and Y are fractions in [0, 1])")
    kept = table[answer != "unsure"].assign(yes=answer[answer != "unsure"].map(ANSWERS))
    return kept.drop(columns="EstimatedYesNo")


def images_with_yes_points(table) -> list[str]:
    """The image ids that have a pair (a class with a yes point), sorted: what a run reads, and what `camloc data
    download openimages-v7-points` fetches."""
    return sorted(table.loc[table["yes"] == 1, "ImageId"].unique().tolist())


def read_class_descriptions(path: Path) -> dict[str, tuple[int, str]]:
    """MID -> (class id: its 1-based row, display name)."""
    import csv

    if not path.is_file():
        raise DataError(f"OpenImages V7's class names are expected at {path}: `camloc data download "
                        "openimages-v7-points` fetches them")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and rows[0][:2] == ["LabelName", "DisplayName"]:
        rows = rows[1:]
    if not rows or any(len(r) < 2 or not r[0].startswith("/") for r in rows):
        raise DataError(f"{path} is not Open Images' class descriptions file: expected rows `MID,display name` (e.g. "
                        "/m/011k07,Tortoise)")
    return {mid: (i + 1, name) for i, (mid, name, *_) in enumerate(rows)}


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"image {path} could not be read ({exc}); delete it and run `camloc data download "
                        "openimages-v7-points` again to fetch it afresh") from None


@register_dataset(
    "openimages-v7-points",
    "Open Images V7 validation point labels (p-mIoU, as GEM and LeGrad report it): one pair per (image, class with a "
    "yes point), no boxes",
    layout=f"<data-root>/{ROOT}/{POINTS_FILE} (or --ann-file), <data-root>/{ROOT}/{CLASSES_FILE} (beside it), images "
           f"in <data-root>/{ROOT}/validation/<ImageId>.jpg (or --image-dir)",
    obtain="`camloc data download openimages-v7-points [--limit N]` fetches both CSV files and the images the labels "
           "name (the first N of them with --limit)",
    default_split="validation",
    folders=(ROOT,),
)
def openimages_v7_points(opts: DataOptions) -> list[ImagePairs]:
    base = opts.root / ROOT
    points_file = opts.ann_file or base / POINTS_FILE
    classes_file = points_file.parent / CLASSES_FILE
    if not classes_file.is_file():
        classes_file = base / CLASSES_FILE
    image_dir = opts.image_dir or base / opts.split
    opts.reads(points_file, image_dir)
    table = read_point_labels(points_file)
    classes = read_class_descriptions(classes_file)
    unknown = sorted(set(table["Label"]) - set(classes))
    if unknown:
        raise DataError(f"{points_file} labels classes that {classes_file} does not name ({', '.join(unknown[:3])}): "
                        "use the class descriptions file of the same Open Images release")
    if not image_dir.is_dir():
        raise DataError(f"OpenImages V7's images are expected in {image_dir}: `camloc data download "
                        "openimages-v7-points [--limit N]` fetches them (or pass --image-dir)")
    on_disk = {name[:-4] for name in os.listdir(image_dir) if name.endswith(".jpg")}
    wanted = images_with_yes_points(table)
    present = set(w for w in wanted if w in on_disk)
    rows = table[table["ImageId"].isin(present)]
    rows = rows.iloc[np.lexsort((np.arange(len(rows)), rows["Label"].to_numpy(), rows["ImageId"].to_numpy()))]
    # plain lists, walked once: a pandas groupby per image costs ~2 ms, minutes over the 36,702 validation images
    ids, labels = rows["ImageId"].tolist(), rows["Label"].tolist()
    xs, ys, answers = rows["X"].tolist(), rows["Y"].tolist(), rows["yes"].tolist()
    images, start = [], 0
    while start < len(ids):
        end = start
        while end < len(ids) and ids[end] == ids[start]:
            end += 1
        image_id = ids[start]
        path = str(image_dir / f"{image_id}.jpg")
        width, height = _image_size(path)
        pairs, first = [], start
        while first < end:  # one run of rows per class (rows sorted by label, then file order)
            last = first
            while last < end and labels[last] == labels[first]:
                last += 1
            if any(answers[first:last]):  # only no points: the class is not in the image, no pair
                category_id, name = classes[labels[first]]
                pairs.append(Pair(image_id, f"{image_id}.jpg", (width, height), category_id, name,
                                  opts.prompt_template.format(name), [], None,
                                  [[float(xs[i]) * width, float(ys[i]) * height, int(answers[i])]
                                   for i in range(first, last)]))
            first = last
        images.append(ImagePairs(path, image_id, sorted(pairs, key=lambda p: p.category_id)))
        start = end
    if opts.stats is not None:
        opts.stats.update({"source": str(points_file), "images": len(wanted),
                           "images_not_found": len(wanted) - len(present)})
    return images
