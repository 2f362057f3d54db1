"""Algorithm 1 boxes and IoU against the golden fixtures; the meter's merge-by-addition."""
import json

import numpy as np
import pytest
from conftest import GOLDEN

from camloc.evaluators import (LocalizationMeter, best_iou, binarize, box_from_heatmap, box_iou, candidate_boxes,
                               heatmap_to_uint8)

BOXES = json.loads((GOLDEN / "boxes.json").read_text())
HEATMAPS = np.load(GOLDEN / "boxes.npz")
IOU = json.loads((GOLDEN / "iou_pairs.json").read_text())


def _threshold(key):
    return "otsu" if key == "otsu" else float(key)


@pytest.mark.parametrize("item", BOXES["items"], ids=[i["key"] for i in BOXES["items"]])
def test_boxes_match_golden(item):
    heatmap = HEATMAPS[item["key"]]
    assert heatmap.shape == tuple(item["shape_HW"])
    for key, expected in item["boxes_alpha1"].items():
        assert box_from_heatmap(heatmap, _threshold(key)) == expected, key
        # every contour's box, in OpenCV's order (the original lists [0, 0, 1, 1] when there is none)
        candidates = candidate_boxes(binarize(heatmap_to_uint8(heatmap), _threshold(key)))
        assert (candidates or [[0, 0, 1, 1]]) == item["candidates"][key], key


def test_otsu_threshold_values_match_golden():
    import cv2

    for item in BOXES["items"]:
        t, _ = cv2.threshold(heatmap_to_uint8(HEATMAPS[item["key"]]), 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        assert t == item["otsu_threshold_uint8"]


def test_box_from_heatmap_degenerate_and_bad_input():
    assert box_from_heatmap(np.full((5, 7), 0.5, np.float32)) == [0, 0, 1, 1]
    hot = np.zeros((30, 60), np.float32)
    hot[23, 57] = 1
    assert box_from_heatmap(hot) == [57, 23, 58, 24]
    nan = hot.copy()
    nan[0, 0] = np.nan
    assert box_from_heatmap(nan) == [57, 23, 58, 24]  # non-finite values count as 0
    with pytest.raises(ValueError, match="2-D"):
        box_from_heatmap(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        box_from_heatmap(hot, 1.5)
    with pytest.raises(ValueError, match="otsu"):
        box_from_heatmap(hot, "triangle")


@pytest.mark.parametrize("item", IOU["items"], ids=[f"{i['id']}-{i['category']}" for i in IOU["items"]])
def test_iou_matches_golden(item):
    a, b = item["box1_xyxy"], item["box2_xyxy"]
    assert box_iou(a, b) == pytest.approx(item["iou_plus1"], abs=1e-6)
    assert box_iou(a, b, convention="gscorecam") == pytest.approx(box_iou(b, a), abs=1e-12)
    assert box_iou(a, b, convention="coco") == pytest.approx(item["iou_coco"], abs=1e-6)


def test_iou_bad_convention_and_best_iou():
    with pytest.raises(ValueError, match="convention"):
        box_iou([0, 0, 1, 1], [0, 0, 1, 1], convention="voc")
    assert best_iou([0, 0, 10, 10], []) == 0.0
    gts = [[100, 100, 120, 120], [0, 0, 10, 10], [0, 0, 5, 5]]
    assert best_iou([0, 0, 10, 10], gts) == pytest.approx(121 / (121 + 1e-6))


def test_meter_values_by_hand():
    m = LocalizationMeter()
    for iou, cat in [(0.8, "cat"), (0.4, "cat"), (0.6, "dog"), (0.1, "dog")]:
        m.update(iou, cat)
    r = m.compute()
    assert r["n_pairs"] == 4
    assert r["mean_iou"] == pytest.approx(0.475)
    assert (r["acc@0.3"], r["acc@0.5"], r["acc@0.7"]) == (0.75, 0.5, 0.25)
    per = m.compute_per_class()
    assert per["cat"]["mean_iou"] == pytest.approx(0.6) and per["dog"]["acc@0.5"] == 0.5
    assert np.isnan(LocalizationMeter().compute()["mean_iou"])


def test_meter_merge_equals_meter_of_union():
    rng = np.random.default_rng(0)
    ious = rng.random(101)
    cats = rng.choice(["a", "b", "c"], 101)
    whole = LocalizationMeter()
    parts = [LocalizationMeter() for _ in range(3)]
    for i, (iou, cat) in enumerate(zip(ious, cats)):
        whole.update(iou, cat)
        parts[i % 3].update(iou, cat)
    merged = parts[2] + parts[0] + parts[1]
    assert merged.compute() == whole.compute()  # exactly, in any order
    assert merged.compute_per_class() == whole.compute_per_class()


def test_the_mean_ious_interval_by_hand_and_after_a_merge():
    from camloc.evaluators.meter import LocalizationMeter

    ious = [0.1, 0.5, 0.9, 0.3]
    one, a, b = LocalizationMeter(), LocalizationMeter(), LocalizationMeter()
    for i, v in enumerate(ious):
        one.update(v, "x")
        (a if i % 2 else b).update(v, "x")
    mean = sum(ious) / 4
    s = (sum((v - mean) ** 2 for v in ious) / 3) ** 0.5
    low, high = one.compute()["mean_iou_ci95"]
    assert low == pytest.approx(mean - 1.96 * s / 2) and high == pytest.approx(mean + 1.96 * s / 2)
    assert (a + b).compute()["mean_iou_ci95"] == one.compute()["mean_iou_ci95"]
    single = LocalizationMeter()
    single.update(0.4, "x")
    assert single.compute()["mean_iou_ci95"] is None
