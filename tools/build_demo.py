"""How camloc's demo set (camloc/datasets/demo/) was made: the photos, downscaled; the masks; the boxes.

Run once by a developer (`python tools/build_demo.py [--check FIGURE.png]`); its output is committed, and the
tests read the committed files, not this script. It needs scikit-image and matplotlib (their sample photos) and
OpenCV.

- The six original photos keep their hand-drawn boxes. Their masks are traced by OpenCV's GrabCut started from the
  hand-drawn box (five iterations, deterministic), cut to the largest connected part, simplified to polygons of at
  most 1.5 px error, and checked by eye on the figure `--check` draws. Where GrabCut was wrong, a polygon drawn by
  hand (HAND below) replaces it. The dining table is the whole photo less the cup and the spoon.
- The four new images: scikit-image's horse silhouette (its own exact mask); coins (each coin an instance: brighter
  by 10 than the mean of its 101 px neighbourhood, as Otsu's level takes the lit backdrop at the top in; holes
  filled, parts under 150 px or not round dropped); the cell (Otsu's threshold, largest part); the rocket (a
  polygon drawn by hand). Their boxes are the masks' tight boxes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

DEMO = Path(__file__).resolve().parent.parent / "camloc" / "datasets" / "demo"
SIDE = 320

NEW_CATEGORIES = [{"id": 19, "name": "horse", "supercategory": ""},
                  {"id": 12, "name": "coin", "supercategory": ""},
                  {"id": 26, "name": "cell", "supercategory": ""},
                  {"id": 29, "name": "rocket", "supercategory": ""}]
"""Horse has COCO's id; coin, cell and rocket are not COCO classes and take ids COCO leaves unused (ids above 90
would read as a panoptic file's stuff classes)."""
ROCKET = [[155, 75, 156, 68, 159, 64, 163, 63, 166, 67, 168, 75, 168, 205, 154, 205]]
"""The rocket, drawn by hand on a 4x zoom (GrabCut loses its dark nose): from the fairing's tip to the pad."""

HAND: dict[int, list[list[float]]] = {
    4: [[93, 45, 97, 28, 110, 17, 130, 11, 150, 10, 175, 11, 198, 16, 212, 26, 219, 40, 219, 60, 214, 85, 208, 105,
         200, 118, 185, 127, 165, 132, 140, 132, 135, 130, 133, 137, 128, 150, 122, 160, 112, 163, 106, 158, 105, 145,
         110, 130, 118, 124, 108, 112, 100, 95, 95, 75]],
    5: [[170, 135, 178, 127, 190, 125, 200, 115, 205, 105, 208, 108, 205, 125, 212, 140, 216, 155, 212, 168, 200, 173,
         185, 172, 175, 162, 172, 150],
        [207, 38, 218, 35, 226, 38, 224, 46, 218, 52, 212, 50]],
    8: [[8, 320, 10, 285, 15, 240, 22, 215, 45, 200, 75, 190, 100, 178, 90, 160, 84, 130, 82, 100, 80, 75, 82, 50,
         90, 35, 105, 22, 125, 13, 150, 12, 175, 17, 192, 30, 200, 45, 198, 70, 195, 95, 192, 130, 185, 155, 180, 170,
         200, 185, 235, 200, 255, 205, 265, 215, 273, 230, 273, 320]],
}
"""Annotation id -> polygons drawn by hand on a 10 px grid where GrabCut failed: the cup (its dark lower body
and handle were lost), the spoon (only its bowl was found) and Grace Hopper (the blue backdrop was taken in).
The clock (7), motion-blurred, is the ellipse inscribed in its hand-drawn box."""
ELLIPSES = (7,)


def _downscaled(array: np.ndarray) -> Image.Image:
    image = Image.fromarray(array).convert("RGB")
    scale = SIDE / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)


def _grabcut(image: np.ndarray, box: list[int]) -> np.ndarray:
    cv2.setRNGSeed(0)
    mask = np.zeros(image.shape[:2], np.uint8)
    x, y, w, h = box
    w, h = min(w, image.shape[1] - x), min(h, image.shape[0] - y)
    bg, fg = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    if w >= image.shape[1] - 1 and h >= image.shape[0] - 1:  # a full-image box: GrabCut needs some background
        x, y, w, h = 1, 1, image.shape[1] - 2, image.shape[0] - 2
    cv2.grabCut(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), mask, (x, y, w, h), bg, fg, 5, cv2.GC_INIT_WITH_RECT)
    return np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD))


def _largest(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _filled(mask: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(out, contours, -1, 1, thickness=cv2.FILLED)
    return out.astype(bool)


def polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (outer contours, holes not kept) of a mask, simplified to 1.5 px."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = []
    for contour in contours:
        simple = cv2.approxPolyDP(contour, 1.5, True).reshape(-1, 2)
        if len(simple) >= 3 and cv2.contourArea(simple.astype(np.float32)) >= 4:
            out.append([float(v) for point in simple for v in point])
    return out


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _poly_mask(polys: list[list[float]], height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, height, width))).astype(bool)


def _round(stat: np.ndarray) -> bool:
    """A coin-like part: at least 150 px, about as wide as high, filling most of its box (the lit background
    at the top of the coins photo is not)."""
    w, h, area = stat[cv2.CC_STAT_WIDTH], stat[cv2.CC_STAT_HEIGHT], stat[cv2.CC_STAT_AREA]
    return area >= 150 and 0.7 <= w / h <= 1.4 and area >= 0.6 * w * h


def _mask(ann: dict, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    return mask_utils.decode(seg).astype(bool) if isinstance(seg, dict) else _poly_mask(seg, height, width)


def _tight_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def build(check: Path | None) -> None:
    import skimage.data as sk

    data = json.loads((DEMO / "instances_demo.json").read_text())
    data["images"] = [im for im in data["images"] if im["id"] <= 6]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] <= 6]
    data["categories"] = [c for c in data["categories"] if c["id"] not in {n["id"] for n in NEW_CATEGORIES}] + NEW_CATEGORIES
    arrays = {im["id"]: np.asarray(Image.open(DEMO / "images" / im["file_name"]).convert("RGB"))
              for im in data["images"]}

    new = {7: ("horse.jpg", np.where(sk.horse(), 255, 0).astype(np.uint8)),  # True = background: a black horse
           8: ("coins.jpg", sk.coins()), 9: ("cell.jpg", sk.cell()), 10: ("rocket.jpg", sk.rocket())}
    for image_id, (name, array) in new.items():
        image = _downscaled(array)
        image.save(DEMO / "images" / name, quality=90)
        image = Image.open(DEMO / "images" / name).convert("RGB")  # the masks are made on what the file holds
        data["images"].append({"id": image_id, "file_name": name, "width": image.width, "height": image.height})
        arrays[image_id] = np.asarray(image)

    masks: dict[int, list[np.ndarray]] = {}
    for ann in data["annotations"]:
        image = arrays[ann["image_id"]]
        masks[ann["id"]] = [_largest(_grabcut(image, ann["bbox"]))]

    grey = {i: cv2.cvtColor(arrays[i], cv2.COLOR_RGB2GRAY) for i in (7, 8, 9)}
    horse = grey[7] < 128
    coins = cv2.adaptiveThreshold(grey[8], 1, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 101, -10)
    coins = _filled(cv2.morphologyEx(coins.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(coins.astype(np.uint8), connectivity=8)
    coin_masks = [labels == k for k in range(1, n) if _round(stats[k])]
    cell = _filled(_largest(grey[9] > cv2.threshold(grey[9], 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]))
    rocket = _poly_mask(ROCKET, *arrays[10].shape[:2])

    next_id = max(a["id"] for a in data["annotations"]) + 1
    for image_id, category, parts in ((7, 19, [horse]), (8, 12, coin_masks), (9, 26, [cell]),
                                      (10, 29, [rocket])):
        for part in parts:
            data["annotations"].append({"id": next_id, "image_id": image_id, "category_id": category,
                                        "bbox": _tight_box(part), "iscrowd": 0})
            masks[next_id] = [part]
            next_id += 1

    heights = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    table = next(a for a in data["annotations"] if a["category_id"] == 67)
    for ann in sorted(data["annotations"], key=lambda a: a is table):  # the table last: it is what the others leave
        if ann is table:
            others = [_poly_mask(a["segmentation"], *heights[a["image_id"]]) for a in data["annotations"]
                      if a["image_id"] == table["image_id"] and a is not table]
            table["segmentation"] = _rle(~np.logical_or.reduce(others))  # a polygon cannot hold the holes
            table["area"] = int((~np.logical_or.reduce(others)).sum())
            continue
        if ann["id"] in ELLIPSES:
            x, y, w, h = ann["bbox"]
            t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
            HAND[ann["id"]] = [[float(round(v, 1)) for pt in zip(x + w / 2 + w / 2 * np.cos(t),
                                                                   y + h / 2 + h / 2 * np.sin(t)) for v in pt]]
        polys = HAND.get(ann["id"]) or [p for m in masks[ann["id"]] for p in polygons(m)]
        ann["segmentation"] = polys
        ann["area"] = int(_poly_mask(polys, *heights[ann["image_id"]]).sum())
    data["info"] = {"description": "camloc demo set: 10 public-domain/CC0 images with hand-drawn boxes and masks "
                                   "checked by eye (tools/build_demo.py)", "version": "2.0"}
    (DEMO / "instances_demo.json").write_text(json.dumps(data, indent=1) + "\n")
    if check:
        _check_figure(data, arrays, check)


def _check_figure(data: dict, arrays: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {c["id"]: c["name"] for c in data["categories"]}
    fig, axes = plt.subplots(3, 4, figsize=(16, 10.5))
    for ax, im in zip(axes.flat, data["images"]):
        ax.imshow(arrays[im["id"]])
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        colours = plt.cm.tab10(np.arange(len(anns)) % 10)
        for ann, colour in zip(anns, colours):
            mask = _mask(ann, im["height"], im["width"])
            overlay = np.zeros((*mask.shape, 4))
            overlay[mask] = (*colour[:3], 0.45)
            ax.imshow(overlay)
            x, y, w, h = ann["bbox"]
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color=colour, lw=1.5))
        ax.set_title(f"{im['file_name']}: " + ", ".join(sorted({names[a['category_id']] for a in anns})), fontsize=9)
        ax.axis("off")
    for ax in axes.flat[len(data["images"]):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, help="draw every image with its masks and boxes to this file")
    args = parser.parse_args()
    build(args.check)
