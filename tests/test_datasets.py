"""Dataset loaders on small fixtures written here in the official formats, `camloc data verify`,
and `camloc data download` against a local HTTP server (resume, checksums, extraction)."""
import hashlib
import io
import json
import shutil
import threading
import zipfile
from http.server import ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from conftest import RangeHandler

from camloc.cli.app import app
from camloc.datasets import count_pairs, load_dataset
from camloc.datasets.coco import balanced_draw
from camloc.datasets.download import Archive, fetch_dataset
from camloc.errors import CamlocError

runner = CliRunner()


def _image(path, w, h, color=(120, 80, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def write_coco(root, split="val2017"):
    """3 images; polygon, compressed-RLE and crowd (uncompressed RLE) annotations."""
    images = [{"id": 7, "file_name": "000000000007.jpg", "width": 20, "height": 10},
              {"id": 3, "file_name": "000000000003.jpg", "width": 16, "height": 16},
              {"id": 9, "file_name": "000000000009.jpg", "width": 8, "height": 8}]
    cats = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 67, "name": "dining table", "supercategory": "furniture"}]
    m1 = np.zeros((10, 20), np.uint8)
    m1[2:6, 3:11] = 1  # 32 px
    m2 = np.zeros((10, 20), np.uint8)
    m2[4:8, 8:14] = 1  # 24 px, overlapping m1 in rows 4-5 x cols 8-10 = 6 px -> union 50 px
    crowd = np.zeros((16, 16), np.uint8)
    crowd[:4, :4] = 1
    anns = [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [3, 2, 8, 4], "area": 32, "iscrowd": 0, "segmentation": _rle(m1)},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [8, 4, 6, 4], "area": 24, "iscrowd": 0, "segmentation": _rle(m2)},
        {"id": 3, "image_id": 7, "category_id": 18, "bbox": [0.5, 0.5, 4, 3], "area": 12, "iscrowd": 0,
         "segmentation": [[0.5, 0.5, 4.5, 0.5, 4.5, 3.5, 0.5, 3.5]]},
        {"id": 4, "image_id": 3, "category_id": 67, "bbox": [2, 2, 10, 12], "area": 120, "iscrowd": 0,
         "segmentation": [[2, 2, 12, 2, 12, 14, 2, 14]]},
        # a crowd region in uncompressed RLE: not a pair, and not ground truth
        {"id": 5, "image_id": 3, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 1,
         "segmentation": {"counts": _uncompressed(crowd), "size": [16, 16]}},
        # image 9 has only a crowd annotation: no pair at all
        {"id": 6, "image_id": 9, "category_id": 18, "bbox": [0, 0, 8, 8], "area": 64, "iscrowd": 1,
         "segmentation": {"counts": [0, 64], "size": [8, 8]}},
    ]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}))
    for info in images:
        _image(root / split / info["file_name"], info["width"], info["height"])


def _uncompressed(mask):
    """COCO's uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts


def test_coco_pairs_boxes_and_coverage(tmp_path):
    write_coco(tmp_path)
    images = load_dataset("coco", data_root_dir=tmp_path)
    assert [i.image_id for i in images] == [3, 7]  # image 9 has only a crowd box
    by_key = {(p.image_id, p.category): p for i in images for p in i.pairs}
    assert set(by_key) == {(3, "dining table"), (7, "person"), (7, "dog")}
    person = by_key[(7, "person")]
    assert person.category_id == 1 and person.prompt == "person"
    assert person.gt_boxes == [[3, 2, 11, 6], [8, 4, 14, 8]]  # xywh -> xyxy
    assert person.coverage == pytest.approx(50 / 200)  # union of the two instance masks
    assert by_key[(7, "dog")].gt_boxes == [[0.5, 0.5, 4.5, 3.5]]
    assert by_key[(3, "dining table")].gt_boxes == [[2, 2, 12, 14]]  # the crowd person is not a pair
    assert images[0].path == str(tmp_path / "val2017" / "000000000003.jpg")
    templated = load_dataset("coco", data_root_dir=tmp_path, prompt_template="a photo of a {}.")
    assert templated[1].pairs[0].prompt == "a photo of a person."


def test_coco_overrides_limit_subset_and_env(tmp_path, monkeypatch):
    write_coco(tmp_path / "elsewhere", split="val2017")
    ann = tmp_path / "elsewhere" / "annotations" / "instances_val2017.json"
    images = load_dataset("coco", ann_file=ann, image_dir=tmp_path / "elsewhere" / "val2017")
    assert count_pairs(images) == 3
    monkeypatch.setenv("CAMLOC_DATA", str(tmp_path / "elsewhere"))
    assert count_pairs(load_dataset("coco")) == 3
    assert [i.image_id for i in load_dataset("coco", limit=1)] == [3]
    seeded = [i.image_id for i in load_dataset("coco", limit=1, subset_seed=5)]
    assert seeded == [i.image_id for i in load_dataset("coco", limit=1, subset_seed=5)]
    assert [p.category for i in load_dataset("coco", classes=["dog"]) for p in i.pairs] == ["dog"]
    with pytest.raises(CamlocError, match="annotation file .*instances_val2017.json does not exist"):
        load_dataset("coco", data_root_dir=tmp_path / "nothing")


def test_balanced_draw_is_seeded_and_per_category():
    ids = {1: list(range(100, 400)), 2: list(range(50)), 3: list(range(380, 600))}
    a = balanced_draw(ids, per_class=100, seed=0)
    assert sum(len(c) for c in a.values()) == 250  # 100 + all 50 + 100 pairs
    assert sum(1 for cats in a.values() if 2 in cats) == 50
    assert a == balanced_draw(ids, per_class=100, seed=0)
    assert a != balanced_draw(ids, per_class=100, seed=1)
    # each category has its own generator: dropping category 3 leaves category 1's draw unchanged
    b = balanced_draw({1: ids[1], 2: ids[2]}, per_class=100, seed=0)
    assert {i for i, c in a.items() if 1 in c} == {i for i, c in b.items() if 1 in c}


def test_coco_train_balanced(tmp_path):
    write_coco(tmp_path, split="train2017")
    images = load_dataset("coco-train-balanced", data_root_dir=tmp_path, per_class=1, subset_seed=0)
    pairs = [p for i in images for p in i.pairs]
    assert sorted(p.category for p in pairs) == ["dining table", "dog", "person"]  # one image per class
    assert all(i.path.startswith(str(tmp_path / "train2017")) for i in images)


def write_partimagenet(root):
    base = root / "PartImageNet"
    images = [{"id": 0, "file_name": "n02085620_123.JPEG", "width": 12, "height": 10},
              {"id": 1, "file_name": "n04285008_77.JPEG", "width": 10, "height": 10}]
    cats = [{"id": 0, "name": "Quadruped Head", "supercategory": "Quadruped"},
            {"id": 1, "name": "Quadruped Body", "supercategory": "Quadruped"},
            {"id": 2, "name": "Car Tier", "supercategory": "Car"}]
    anns = [{"id": 1, "image_id": 0, "category_id": 0, "bbox": [1, 1, 4, 3], "area": 12, "iscrowd": 0,
             "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]},
            {"id": 2, "image_id": 0, "category_id": 1, "bbox": [4, 3, 7, 6], "area": 42, "iscrowd": 0,
             "segmentation": [[4, 3, 11, 3, 11, 9, 4, 9]]},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 6, 3, 3], "area": 9, "iscrowd": 0,
             "segmentation": [[0, 6, 3, 6, 3, 9, 0, 9]]},
            {"id": 4, "image_id": 1, "category_id": 2, "bbox": [6, 6, 3, 3], "area": 9, "iscrowd": 0,
             "segmentation": [[6, 6, 9, 6, 9, 9, 6, 9]]}]
    (base / "annotations").mkdir(parents=True)
    (base / "annotations" / "test.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                                "categories": cats}))
    for info in images:
        _image(base / "images" / "test" / info["file_name"].split("_")[0] / info["file_name"], info["width"],
               info["height"])


def test_partimagenet_category_zero_and_wnid_folders(tmp_path):
    write_partimagenet(tmp_path)
    images = load_dataset("partimagenet", data_root_dir=tmp_path)
    pairs = {(p.image_id, p.category_id): p for i in images for p in i.pairs}
    assert set(pairs) == {(0, 0), (0, 1), (1, 2)}
    head = pairs[(0, 0)]
    assert head.category == "Quadruped Head" and head.prompt == "Quadruped Head" and head.gt_boxes == [[1, 1, 5, 4]]
    assert pairs[(1, 2)].gt_boxes == [[0, 6, 3, 9], [6, 6, 9, 9]]
    assert images[0].path == str(tmp_path / "PartImageNet" / "images" / "test" / "n02085620" / "n02085620_123.JPEG")


def write_ade_full(root):
    folder = root / "ADE20K_2021_17_01" / "images" / "ADE" / "validation" / "natural" / "coast"
    folder.mkdir(parents=True)

    ndx = {"sky": 2420, "grass": 1125, "road, route": 2131, "wall": 2977}  # sky and road as in the real release

    def obj(i, name, xs, ys, part_level=0):
        return {"id": i, "name": name, "name_ndx": ndx[name], "hypernym": [], "raw_name": name, "attributes": [],
                "depth_ordering_rank": i, "occluded": "no", "crop": "0",
                "parts": {"is_part_of": [], "part_level": part_level, "has_parts": []},
                "polygon": {"x": xs, "y": ys, "click_date": []}, "saved_date": "2020-01-01",
                "instance_mask": f"ADE_val_00000001/instance_{i:03d}_ADE_val_00000001.png"}

    objects = [obj(0, "sky", [0, 9, 9, 0], [0, 0, 3, 3]),                # 10 x 4 = 40 px
               obj(1, "grass", [0, 4, 4, 0], [6, 6, 9, 9]),              # 5 x 4 = 20 px
               obj(2, "grass", [12, 19, 19, 12], [7, 7, 9, 9]),          # 8 x 3 = 24 px
               obj(3, "road, route", [10, 14, 14, 10], [4, 4, 5, 5]),    # 5 x 2 = 10 px
               obj(4, "sky", [2, 3, 3, 2], [1, 1, 2, 2], part_level=1),  # a part: ignored
               obj(5, "wall", [15, 19, 19, 15], [0, 0, 3, 3])]           # not a scene class
    (folder / "ADE_val_00000001.json").write_text(json.dumps({"annotation": {
        "filename": "ADE_val_00000001.jpg", "folder": "ADE20K_2021_17_01/images/ADE/validation/natural/coast",
        "imsize": [10, 20, 3], "source": {}, "scene": ["outdoor", "coast"], "object": objects}}))
    _image(folder / "ADE_val_00000001.jpg", 20, 10)
    # _seg.png, the visible pixels: class code (R // 10) * 256 + G = name_ndx (as in the real release,
    # tests/real-formats/ade20k-full-2021), instance in B. A second wall (instance 9) stands in front of the
    # sky's right half. No instance PNGs are written: the loader falls back to _seg.png.
    seg = np.zeros((10, 20, 3), np.uint8)

    def paint(name, instance, rows, cols):
        code = ndx[name]
        seg[rows, cols] = [(code // 256) * 10, code % 256, instance]

    paint("sky", 1, slice(0, 4), slice(0, 10))
    paint("wall", 9, slice(0, 4), slice(5, 10))
    paint("grass", 2, slice(6, 10), slice(0, 5))
    paint("grass", 3, slice(7, 10), slice(12, 20))
    paint("road, route", 4, slice(4, 6), slice(10, 15))
    paint("wall", 6, slice(0, 4), slice(15, 20))
    Image.fromarray(seg).save(folder / "ADE_val_00000001_seg.png")


def test_ade20k_full_release_visible_extent_by_default(tmp_path):
    write_ade_full(tmp_path)
    images = load_dataset("ade20k-scenes", data_root_dir=tmp_path)
    pairs = {p.category: p for p in images[0].pairs}
    assert list(pairs) == ["grass", "sky", "road"]
    # the sky's polygon is 10 x 4, but the wall in front hides its right half
    assert pairs["sky"].gt_boxes == [[0, 0, 5, 4]] and pairs["sky"].coverage == pytest.approx(20 / 200)
    assert pairs["grass"].gt_boxes == [[0, 6, 5, 10], [12, 7, 20, 10]]
    assert pairs["grass"].coverage == pytest.approx(44 / 200)
    assert pairs["road"].gt_boxes == [[10, 4, 15, 6]] and pairs["road"].category_id == 10


def test_ade20k_full_release_seg_not_matching_its_json_is_refused(tmp_path):
    write_ade_full(tmp_path)
    seg = next(tmp_path.rglob("*_seg.png"))
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(seg)
    with pytest.raises(CamlocError, match="has none of the class codes .*name_ndx.*--ade-extent amodal"):
        load_dataset("ade20k-scenes", data_root_dir=tmp_path)


def test_ade20k_full_release_seg_off_by_one_is_refused(tmp_path):
    """The convention camloc once guessed (code = name_ndx + 1) matches none of the objects: refused."""
    write_ade_full(tmp_path)
    path = next(tmp_path.rglob("*_seg.png"))
    seg = np.asarray(Image.open(path)).copy()
    code = (seg[..., 0].astype(int) // 10) * 256 + seg[..., 1] + 1
    labelled = code > 1
    seg[..., 0] = np.where(labelled, (code // 256) * 10, 0)
    seg[..., 1] = np.where(labelled, code % 256, 0)
    Image.fromarray(seg).save(path)
    with pytest.raises(CamlocError, match="has none of the class codes"):
        load_dataset("ade20k-scenes", data_root_dir=tmp_path)


def test_ade20k_full_release_amodal_polygons(tmp_path):
    write_ade_full(tmp_path)
    images = load_dataset("ade20k-scenes", data_root_dir=tmp_path, ade_extent="amodal")
    assert len(images) == 1 and images[0].image_id == "ADE_val_00000001"
    pairs = {p.category: p for p in images[0].pairs}
    assert list(pairs) == ["grass", "sky", "road"]  # in SCENES order
    assert pairs["sky"].gt_boxes == [[0, 0, 9, 3]] and pairs["sky"].coverage == pytest.approx(40 / 200)
    assert pairs["grass"].gt_boxes == [[0, 6, 4, 9], [12, 7, 19, 9]]
    assert pairs["grass"].coverage == pytest.approx(44 / 200)
    assert pairs["road"].coverage == pytest.approx(10 / 200) and pairs["road"].category_id == 10


REAL = Path(__file__).parent / "real-formats"
REAL_ADE_IMAGE = "ADE_train_00016900"
REAL_ADE_FOLDER = Path("ADE20K_2021_17_01/images/ADE/training/urban/street")


def real_ade_full(root):
    """The real full-release annotation files of one training image (tests/real-formats) under `root`, with
    a placeholder photo of the image's size (the release's photo is not redistributed)."""
    shutil.copytree(REAL / "ade20k-full-2021" / "ADE20K_2021_17_01", root / "ADE20K_2021_17_01")
    _image(root / REAL_ADE_FOLDER / f"{REAL_ADE_IMAGE}.jpg", 2200, 1650)
    return root / REAL_ADE_FOLDER


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _real_ade_expected(folder):
    """An independent reading of the real files with numpy: per scene class of the image, its objects'
    boxes from _seg.png (code (R // 10) * 256 + G == name_ndx, one box per B value) and from each object's
    instance PNG (255 = visible), and the class's visible pixels."""
    annotation = json.loads((folder / f"{REAL_ADE_IMAGE}.json").read_text())["annotation"]
    seg = np.asarray(Image.open(folder / f"{REAL_ADE_IMAGE}_seg.png")).astype(int)
    code, instance = (seg[..., 0] // 10) * 256 + seg[..., 1], seg[..., 2]
    scenes = {"sky": 5, "road": 10}  # the ten scene classes present in this street image, with their category ids
    expected = {}
    for obj in annotation["object"]:
        names = [n.strip() for n in obj["name"].split(",")]
        scene = next((n for n in names if n in scenes), None)
        if scene is None or obj["parts"]["part_level"] != 0:
            continue
        entry = expected.setdefault(scene, {"png_boxes": [], "ndx": obj["name_ndx"]})
        png = np.asarray(Image.open(folder / obj["instance_mask"]))
        entry["png_boxes"].append(_bbox(png == 255))
    for scene, entry in expected.items():
        pixels = code == entry["ndx"]
        entry["seg_boxes"] = sorted(_bbox(pixels & (instance == b)) for b in np.unique(instance[pixels]))
        entry["mask"] = pixels
        entry["category_id"] = scenes[scene]
    return expected


def test_ade20k_full_release_real_files_visible_extent(tmp_path):
    """The release's own files, default extent: the pairs, boxes, coverage and masks equal the numpy reading."""
    folder = real_ade_full(tmp_path)
    expected = _real_ade_expected(folder)
    assert set(expected) == {"sky", "road"}
    [item] = load_dataset("ade20k-scenes", data_root_dir=tmp_path, split="training")
    assert item.image_id == REAL_ADE_IMAGE and item.path == str(folder / f"{REAL_ADE_IMAGE}.jpg")
    pairs = {p.category: p for p in item.pairs}
    assert list(pairs) == ["sky", "road"]  # SCENES order
    masks = item.masks()
    for scene, want in expected.items():
        pair = pairs[scene]
        assert pair.category_id == want["category_id"] and pair.image_size == (2200, 1650)
        assert sorted(pair.gt_boxes) == sorted(want["png_boxes"]) == want["seg_boxes"]
        assert pair.coverage == pytest.approx(want["mask"].mean(), abs=0)
        assert np.array_equal(masks[want["category_id"]], want["mask"])
    # the numbers themselves, for the record: one sky and one road object
    assert pairs["sky"].gt_boxes == [[1786, 3, 1937, 313]] and pairs["road"].gt_boxes == [[3, 932, 1198, 1454]]


def test_ade20k_full_release_real_files_without_instance_pngs_use_seg(tmp_path):
    """Without the per-object PNGs the same ground truth comes from _seg.png's codes."""
    folder = real_ade_full(tmp_path)
    [with_pngs] = load_dataset("ade20k-scenes", data_root_dir=tmp_path, split="training")
    a = with_pngs.masks()
    shutil.rmtree(folder / REAL_ADE_IMAGE)
    [from_seg] = load_dataset("ade20k-scenes", data_root_dir=tmp_path, split="training")
    assert from_seg.pairs == with_pngs.pairs
    b = from_seg.masks()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_ade20k_full_release_real_files_amodal(tmp_path):
    folder = real_ade_full(tmp_path)
    annotation = json.loads((folder / f"{REAL_ADE_IMAGE}.json").read_text())["annotation"]
    polygons = {"sky": [], "road": []}
    for obj in annotation["object"]:
        scene = next((n for n in (x.strip() for x in obj["name"].split(",")) if n in polygons), None)
        if scene and obj["parts"]["part_level"] == 0:
            polygons[scene].append(obj["polygon"])
    [item] = load_dataset("ade20k-scenes", data_root_dir=tmp_path, split="training", ade_extent="amodal")
    pairs = {p.category: p for p in item.pairs}
    masks = item.masks()
    for scene, polys in polygons.items():
        assert pairs[scene].gt_boxes == [[min(p["x"]), min(p["y"]), max(p["x"]), max(p["y"])] for p in polys]
        filled = np.zeros((1650, 2200), np.uint8)
        cv2.fillPoly(filled, [np.round(np.stack([p["x"], p["y"]], 1)).astype(np.int32) for p in polys], 1)
        assert np.array_equal(masks[pairs[scene].category_id], filled.astype(bool))
    # the amodal sky reaches behind the building and tree: larger than its visible pixels
    [visible] = load_dataset("ade20k-scenes", data_root_dir=tmp_path, split="training")
    assert pairs["sky"].coverage > {p.category: p for p in visible.pairs}["sky"].coverage


def write_scene_parsing(root, info_file="objectInfo150.txt"):
    """The real objectInfo150 file (tests/real-formats, copied from the ADEChallengeData2016 devkit)
    beside small label PNGs using its labels: 1 wall, 3 sky, 7 road, 10 grass."""
    base = root / "ADEChallengeData2016"
    (base / "annotations" / "validation").mkdir(parents=True)
    shutil.copy(REAL / "ade20k-sceneparsing" / info_file, base / info_file)
    label = np.zeros((10, 20), np.uint8)
    label[0:3, :] = 3          # sky: 60 px, one region
    label[5:7, 0:4] = 10       # grass: two regions, 8 + 6 px
    label[8:10, 10:13] = 10
    label[4, 15:20] = 1        # wall
    label[6:8, 15:19] = 7      # road ("road, route" in the real file): 8 px
    Image.fromarray(label).save(base / "annotations" / "validation" / "ADE_val_00000001.png")
    _image(base / "images" / "validation" / "ADE_val_00000001.jpg", 20, 10)
    Image.fromarray(np.ones((4, 4), np.uint8)).save(base / "annotations" / "validation" / "ADE_val_00000002.png")
    _image(base / "images" / "validation" / "ADE_val_00000002.jpg", 4, 4)  # only wall: no pair


@pytest.mark.parametrize("info_file", ["objectInfo150.txt", "objectInfo150.csv"])
def test_ade20k_scene_parsing_warns_about_snow(tmp_path, info_file):
    write_scene_parsing(tmp_path, info_file)
    with pytest.warns(UserWarning, match="has no snow class: ade20k-scenes uses the other 9"):
        images = load_dataset("ade20k-scenes", data_root_dir=tmp_path,
                              ann_file=tmp_path / "ADEChallengeData2016" / info_file)
    assert len(images) == 1
    pairs = {p.category: p for p in images[0].pairs}
    assert list(pairs) == ["grass", "sky", "road"]
    assert pairs["road"].gt_boxes == [[15, 6, 19, 8]] and pairs["road"].coverage == pytest.approx(8 / 200)
    assert pairs["sky"].gt_boxes == [[0, 0, 20, 3]] and pairs["sky"].coverage == pytest.approx(60 / 200)
    assert pairs["grass"].gt_boxes == [[0, 5, 4, 7], [10, 8, 13, 10]]  # connected regions
    assert pairs["grass"].coverage == pytest.approx(14 / 200)


def test_ade20k_missing_says_where_it_looked(tmp_path):
    with pytest.raises(CamlocError, match="no ADE20K under .*ADE20K_2021_17_01.*ADEChallengeData2016"):
        load_dataset("ade20k-scenes", data_root_dir=tmp_path)


def test_data_verify_counts_and_missing_files(tmp_path):
    write_coco(tmp_path)
    ok = runner.invoke(app, ["data", "verify", "coco", "--data-root", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "images 2, pairs 3, missing image files 0, mean class coverage" in ok.output
    (tmp_path / "val2017" / "000000000003.jpg").unlink()
    bad = runner.invoke(app, ["data", "verify", "coco", "--data-root", str(tmp_path)])
    assert bad.exit_code == 2 and "missing image files 1" in bad.output and "camloc data download coco" in bad.output
    absent = runner.invoke(app, ["data", "verify", "partimagenet", "--data-root", str(tmp_path)])
    assert absent.exit_code == 2 and "github.com/TACJu/PartImageNet" in absent.output


def _zip_bytes(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()


def test_download_resumes_checks_and_extracts(tmp_path, http_server):
    base, handler = http_server
    payload = _zip_bytes({"val2017/a.jpg": b"x" * 5000, "annotations/instances_val2017.json": b"{}"})
    handler.files = {"/val.zip": payload}
    handler.ranges = []
    archive = Archive(f"{base}/val.zip", len(payload), hashlib.sha1(payload).hexdigest())
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "val.zip.part").write_bytes(payload[:1000])  # an interrupted earlier run
    paths = fetch_dataset("toy", tmp_path, sources={"toy": {"val2017": [archive]}}, progress=False)
    assert handler.ranges == ["bytes=1000-"]  # resumed, not restarted
    assert paths[0].read_bytes() == payload
    assert (tmp_path / "val2017" / "a.jpg").read_bytes() == b"x" * 5000
    assert (downloads / "val.zip.sha256").read_text().split()[0] == hashlib.sha256(payload).hexdigest()
    fetch_dataset("toy", tmp_path, sources={"toy": {"val2017": [archive]}}, progress=False)
    assert len(handler.ranges) == 1  # already there: nothing fetched again


def test_download_of_a_complete_part_without_a_known_size_finishes(tmp_path, http_server):
    """A .part that already holds the whole file (the run was cut after the last byte, before the
    rename) and no published size (the ADE archive): the server answers the resume with 416 and
    `Content-Range: bytes */N`; that means complete, not an error that repeats on every run."""
    base, handler = http_server
    payload = _zip_bytes({"ADEChallengeData2016/objectInfo150.txt": b"Idx\tName\n"})
    handler.files = {"/ade.zip": payload}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "ade.zip.part").write_bytes(payload)
    archive = Archive(f"{base}/ade.zip", None, hashlib.sha1(payload).hexdigest())
    [path] = fetch_dataset("ade", tmp_path, sources={"ade": {"validation": [archive]}}, progress=False)
    assert path.read_bytes() == payload and (tmp_path / "ADEChallengeData2016" / "objectInfo150.txt").is_file()
    # a .part longer than the server's file is not silently accepted
    (downloads / "big.zip.part").write_bytes(payload + b"extra")
    handler.files["/big.zip"] = payload
    with pytest.raises(CamlocError, match=r"big.zip.part has .* bytes, but the server's file has .*; delete it"):
        fetch_dataset("big", tmp_path, sources={"big": {"v": [Archive(f"{base}/big.zip")]}}, progress=False)


def test_download_checksum_mismatch_and_unknown(tmp_path, http_server):
    base, handler = http_server
    handler.files = {"/x.zip": _zip_bytes({"a": b"1"})}
    wrong = Archive(f"{base}/x.zip", None, "0" * 40)
    with pytest.raises(CamlocError, match="SHA-1 .* differs from the published 0000"):
        fetch_dataset("toy", tmp_path, sources={"toy": {"s": [wrong]}}, progress=False)
    assert (tmp_path / "downloads" / "x.zip.part.corrupt").exists()
    with pytest.raises(CamlocError, match="no public direct URL"):
        fetch_dataset("partimagenet", tmp_path)
    with pytest.raises(CamlocError, match="--split 'test2017' is not one of val2017, train2017"):
        fetch_dataset("coco", tmp_path, split="test2017")
    missing = Archive(f"{base}/nothing.zip")
    with pytest.raises(CamlocError, match="HTTP 404"):
        fetch_dataset("toy", tmp_path, sources={"toy": {"s": [missing]}}, progress=False)


def test_eval_on_a_coco_layout_from_the_cli(tmp_path):
    write_coco(tmp_path / "data")
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--method", "gradcam", "--model", "tiny-rn", "--dataset", "coco",
                                 "--data-root", str(tmp_path / "data"), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert sorted((r["image_id"], r["category"]) for r in records) == [(3, "dining table"), (7, "dog"), (7, "person")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_coverage"] == pytest.approx(np.mean([r["coverage"] for r in records]))
    assert json.loads((out / "config.json").read_text())["dataset"] == "coco"


@pytest.mark.parametrize("dataset,writer", [("partimagenet", write_partimagenet), ("ade20k-scenes", write_ade_full),
                                            ("ade20k-scenes", write_scene_parsing)])
def test_eval_end_to_end_on_each_layout(dataset, writer, tmp_path):
    writer(tmp_path / "data")
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--method", "gradcam", "--model", "tiny-rn", "--dataset", dataset,
                                 "--data-root", str(tmp_path / "data"), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["methods"]["gradcam"]["n_pairs"] == summary["n_pairs"] > 0
    if dataset == "ade20k-scenes":
        assert 0 < summary["mean_coverage"] < 1


def test_missing_images_stop_the_run_or_are_skipped_and_reported(tmp_path):
    write_coco(tmp_path / "data")
    (tmp_path / "data" / "val2017" / "000000000007.jpg").unlink()
    args = ["eval", "--method", "gradcam", "--model", "tiny-rn", "--dataset", "coco", "--data-root",
            str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--no-progress"]
    stop = runner.invoke(app, args)
    assert stop.exit_code == 2
    assert "1 of 2 images are missing" in stop.output and "000000000007.jpg does not exist" in stop.output
    skip = runner.invoke(app, args + ["--skip-missing"])
    assert skip.exit_code == 0, skip.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["image_id"] for s in summary["faults"]["skipped_images"]] == [7]
    shutil_dir = tmp_path / "data" / "val2017"
    for f in shutil_dir.iterdir():
        f.unlink()
    shutil_dir.rmdir()
    gone = runner.invoke(app, args[:-1] + ["--no-progress", "--force-new"])
    assert gone.exit_code == 2 and f"the image folder {shutil_dir} does not exist" in gone.output


def test_file_name_escaping_the_image_folder_is_refused(tmp_path):
    write_coco(tmp_path)
    ann = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = "../../etc/passwd"
    ann.write_text(json.dumps(data))
    with pytest.raises(CamlocError, match="points outside the image folder"):
        load_dataset("coco", data_root_dir=tmp_path)


class _CutHandler(RangeHandler):
    """Sends the headers for the whole file, then only half of it and hangs up, on the first request."""

    cuts: list = []

    def do_GET(self):
        data = self.files[self.path]
        if not self.cuts:
            self.cuts.append(1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


def test_download_resumes_after_a_cut_connection(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CutHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        payload = _zip_bytes({"val2017/b.jpg": b"y" * 20000})
        _CutHandler.files, _CutHandler.ranges, _CutHandler.cuts = {"/cut.zip": payload}, [], []
        archive = Archive(f"http://127.0.0.1:{server.server_address[1]}/cut.zip", len(payload),
                          hashlib.sha1(payload).hexdigest())
        sources = {"toy": {"val2017": [archive]}}
        with pytest.raises(CamlocError, match="connection was cut .* run the same command again to resume"):
            fetch_dataset("toy", tmp_path, sources=sources, progress=False)
        assert (tmp_path / "downloads" / "cut.zip.part").stat().st_size == len(payload) // 2
        fetch_dataset("toy", tmp_path, sources=sources, progress=False)
        assert _CutHandler.ranges == [f"bytes={len(payload) // 2}-"]
        assert (tmp_path / "val2017" / "b.jpg").read_bytes() == b"y" * 20000
    finally:
        server.shutdown()


def test_download_without_network_says_so(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    archive = Archive(f"http://127.0.0.1:{port}/val2017.zip", 10)
    with pytest.raises(CamlocError, match="downloading .* failed .*check the network and run the same command again"):
        fetch_dataset("toy", tmp_path, sources={"toy": {"val2017": [archive]}}, progress=False)


def test_ade_extent_is_recorded_and_another_extent_is_another_run(tmp_path):
    write_ade_full(tmp_path / "data")
    out = tmp_path / "run"
    args = ["eval", "--method", "gradcam", "--model", "tiny-rn", "--dataset", "ade20k-scenes", "--data-root",
            str(tmp_path / "data"), "--out", str(out), "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["ade_extent"] == "visible"
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert {r["category"]: r["gt_boxes"] for r in records}["sky"] == [[0, 0, 5, 4]]  # the visible half
    amodal = runner.invoke(app, args + ["--ade-extent", "amodal"])
    assert amodal.exit_code == 2 and "differs in: ade_extent, data" in amodal.stderr
    assert runner.invoke(app, args + ["--ade-extent", "amodal", "--force-new"]).exit_code == 0
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert {r["category"]: r["gt_boxes"] for r in records}["sky"] == [[0, 0, 9, 3]]  # the polygon


def test_download_unpacks_a_tar_archive(tmp_path, http_server):
    """The VOC2012 archive is a tar: unpacked into the data root, a member pointing outside it refused."""
    import tarfile

    base, handler = http_server

    def tar_bytes(members):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    payload = tar_bytes({"VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt": b"2007_000033\n"})
    handler.files = {"/voc.tar": payload}
    archive = Archive(f"{base}/voc.tar", len(payload), hashlib.sha1(payload).hexdigest())
    fetch_dataset("voc", tmp_path, sources={"voc": {"val": [archive]}}, progress=False)
    assert (tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text() == "2007_000033\n"
    evil = tar_bytes({"../outside.txt": b"x"})
    handler.files["/evil.tar"] = evil
    with pytest.raises(CamlocError, match="could not be unpacked"):
        fetch_dataset("evil", tmp_path / "root", sources={"evil": {"v": [Archive(f"{base}/evil.tar")]}},
                      progress=False)
    assert not (tmp_path / "outside.txt").exists()
