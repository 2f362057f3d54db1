"""Open-vocabulary semantic segmentation: the mmseg metric, sliding windows, PAMR, prediction, and
end-to-end runs of the dense methods."""
import hashlib
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from camloc.cli.app import app
from camloc.errors import OptionError
from camloc.evaluators.segmentation import SegmentationState
from camloc.segment.infer import OvsegSettings, centre_cropped, predict, resolve_settings
from camloc.segment.pamr import pamr
from camloc.segment.windows import rescaled_size, stitch, window_boxes

runner = CliRunner()
REAL = Path(__file__).parent / "real-formats"
DENSE = ["maskclip", "sclip", "clearclip", "naclip", "cliptrase", "scclip", "cliper", "resclip", "gem", "clipsurgery"]


# --- the metric ----------------------------------------------------------------------------------

def mmseg_miou(preds, labels, k, ignore=255):
    """mmsegmentation's IoUMetric written out: per-class histograms summed over the dataset, nanmean."""
    inter, union, pred_area, label_area = (np.zeros(k) for _ in range(4))
    for p, t in zip(preds, labels):
        keep = t != ignore
        p, t = p[keep], t[keep]
        i = p[p == t]
        ai = np.histogram(i, bins=k, range=(0, k - 1))[0]
        ap = np.histogram(p, bins=k, range=(0, k - 1))[0]
        at = np.histogram(t, bins=k, range=(0, k - 1))[0]
        inter += ai
        pred_area += ap
        label_area += at
        union += ap + at - ai
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / label_area
    return np.nanmean(iou), np.nanmean(acc), inter.sum() / label_area.sum(), iou


def test_metric_by_hand():
    # 2 x 3 image, classes 0..3; class 3 absent from both: left out of the mean; one pixel ignored
    label = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    state = SegmentationState.empty(4).add(pred, label)
    # the ignored pixel (1, 1) is dropped with its prediction 2; class 0: I 1 (0,0), P 2 ((0,0), (1,2)), L 2, U 3;
    # class 1: I 2, P 3 ((0,1), (0,2), (1,0)), L 2, U 3; class 2: I 0, P 0, L 1, U 1; class 3: nothing
    assert state.intersect.tolist() == [1, 2, 0, 0] and state.label.tolist() == [2, 2, 1, 0]
    assert state.pred.tolist() == [2, 3, 0, 0] and state.union.tolist() == [3, 3, 1, 0]
    result = state.result()
    assert result["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert result["macc"] == pytest.approx((1 / 2 + 2 / 2 + 0) / 3)
    assert result["aacc"] == pytest.approx(3 / 5) and result["classes_counted"] == 3


def test_metric_accumulates_over_the_dataset_not_per_image():
    rng = np.random.default_rng(3)
    labels = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    labels[1][0, :] = 255
    preds = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    preds[2][:] = 0  # one image predicts a single class
    state = SegmentationState.empty(6)  # class 5 absent everywhere
    for p, t in zip(preds, labels):
        state.add(p, t)
    miou, macc, aacc, iou = mmseg_miou(preds, labels, 6)
    result = state.result()
    assert result["miou"] == pytest.approx(miou) and result["macc"] == pytest.approx(macc)
    assert result["aacc"] == pytest.approx(aacc) and result["classes_counted"] == 5
    per_image = np.mean([SegmentationState.empty(6).add(p, t).result()["miou"] for p, t in zip(preds, labels)])
    assert abs(per_image - miou) > 1e-4  # the dataset-level number is not the mean of per-image ones
    halves = SegmentationState.empty(6).add(preds[0], labels[0]).add(preds[1], labels[1])
    rest = SegmentationState.empty(6).add(preds[2], labels[2]).add(preds[3], labels[3])
    assert (halves + rest).result() == result
    assert SegmentationState.from_record(json.loads(json.dumps(state.to_record()))).result() == result


def test_metric_refuses_out_of_range_values():
    with pytest.raises(ValueError, match="label values must lie in 0..2 or be 255"):
        SegmentationState.empty(3).add(np.zeros((2, 2), int), np.full((2, 2), 7))
    with pytest.raises(ValueError, match="predicted class indices"):
        SegmentationState.empty(3).add(np.full((2, 2), 3), np.zeros((2, 2), int))


def test_background_threshold_and_synonyms_by_hand():
    # 3 queries: class 0 (background) has one, class 1 has two synonyms; 1 x 2 pixels
    logits = torch.tensor([[[0.0, 0.0]], [[1.0, 0.1]], [[0.9, 0.0]]])  # (Q, 1, 2)
    settings = OvsegSettings("test", 336, 224, 112, 1.0, 0.0, None, 0, (8, 16), "single")
    probs = torch.softmax(logits, dim=0)
    assert predict(logits, [0, 1, 1], settings).tolist() == [[1, 1]]  # class 1 = max of its two synonyms
    # the second pixel's top probability (class 1's best synonym) is probs[1, 0, 1] ~ 0.356: below 0.4 -> 0
    assert probs[1, 0, 1] < 0.4 < probs[1, 0, 0]
    high = OvsegSettings("test", 336, 224, 112, 1.0, 0.4, None, 0, (8, 16), "single")
    assert predict(logits, [0, 1, 1], high).tolist() == [[1, 0]]


# --- windows and stitching -----------------------------------------------------------------------

def test_window_grid_matches_the_reference_formula():
    assert rescaled_size(500, 375, 336) == (448, 336)  # VOC: 6 crops at 224 / 112
    assert len(window_boxes(336, 448, 224, 112)) == 2 * 3
    assert rescaled_size(2048, 1024, 560) == (1120, 560) and len(window_boxes(560, 1120, 224, 112)) == 4 * 9
    boxes = window_boxes(300, 400, 224, 112)
    assert boxes[0] == (0, 224, 0, 224) and boxes[-1] == (76, 300, 176, 400)  # the last crops end at the border
    assert all(y2 - y1 == 224 and x2 - x1 == 224 for y1, y2, x1, x2 in boxes)


def test_stitching_averages_overlaps_with_known_window_logits():
    """A stub method whose logits are known: window w's grid holds (w + 1) * [1, x, y] on a 2 x 2 grid."""
    height, width, crop, stride = 10, 14, 6, 4
    boxes = window_boxes(height, width, crop, stride)
    grids = torch.stack([(w + 1) * torch.stack([torch.ones(2, 2), torch.tensor([[0., 1], [0, 1]]),
                                                torch.tensor([[0., 0], [1, 1]])]) for w in range(len(boxes))])
    out = stitch(grids, boxes, height, width)
    # direct computation: every window upsampled alone into a full-size zero canvas, then the mean where covered
    total, count = np.zeros((3, height, width)), np.zeros((height, width))
    for w, (y1, y2, x1, x2) in enumerate(boxes):
        up = F.interpolate(grids[w][None], size=(crop, crop), mode="bilinear", align_corners=False)[0].numpy()
        padded = np.zeros((3, height, width))
        padded[:, y1:y2, x1:x2] = up
        total += padded
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1 and count.max() == 4
    assert np.allclose(out.numpy(), total / count, atol=1e-6)
    # the constant channel is the mean of the covering windows' (w + 1)
    corner = out[0, 0, 0].item()
    assert corner == 1.0 and out[0, height - 1, width - 1].item() == len(boxes)


# --- PAMR ----------------------------------------------------------------------------------------

def pamr_reference(x, mask, steps, dilations):
    """PAMR as visinf/1-stage-wseg builds it: 3 x 3 kernels, replicate padding, conv2d with dilation."""
    def kernels(kind):
        w = torch.zeros(9, 1, 3, 3)
        for i in range(9):
            w[i, 0, i // 3, i % 3] = 1
        if kind == "std":
            return w
        keep = [0, 1, 2, 3, 5, 6, 7, 8]
        w = w[keep]
        if kind == "diff":
            w = -w
            w[:, 0, 1, 1] = 1
        return w

    def apply(t, kind):
        b, k, h, wd = t.shape
        t = t.reshape(b * k, 1, h, wd)
        out = torch.cat([F.conv2d(F.pad(t, [d] * 4, mode="replicate"), kernels(kind), dilation=d) for d in dilations], 1)
        return out.reshape(b, k, -1, h, wd)

    std = apply(x, "std").std(2, keepdim=True)
    a = (-apply(x, "diff").abs() / (1e-8 + 0.1 * std)).mean(1, keepdim=True).softmax(2)
    for _ in range(steps):
        mask = (apply(mask, "copy") * a).sum(2)
    return mask


def test_pamr_equals_the_reference_construction():
    torch.manual_seed(0)
    image, mask = torch.randn(1, 3, 40, 50), torch.rand(1, 4, 40, 50)
    assert torch.allclose(pamr(image, mask, 10, (8, 16)), pamr_reference(image, mask, 10, (8, 16)), atol=1e-5)
    assert torch.allclose(pamr(image, mask, 3, (1,)), pamr_reference(image, mask, 3, (1,)), atol=1e-6)


# --- presets -------------------------------------------------------------------------------------

def test_presets_and_their_dataset_exceptions():
    ade = resolve_settings("ade20k-150")
    assert (ade.short_side, ade.crop, ade.stride, ade.logit_scale, ade.bg_threshold) == (336, 224, 112, 40.0, 0.0)
    voc = resolve_settings("voc21")
    assert (voc.logit_scale, voc.bg_threshold, voc.area_threshold) == (65.0, 0.1, 0.1)
    assert resolve_settings("cityscapes").short_side == 560 and resolve_settings("coco-stuff-171").short_side == 448
    tcl = resolve_settings("cityscapes", "tcl")
    assert (tcl.short_side, tcl.crop, tcl.stride) == (448, 448, 224)
    assert resolve_settings("voc21", logit_scale=30.0).logit_scale == 30.0
    with pytest.raises(OptionError, match="--ovseg-stride 300 is larger than --ovseg-crop 224"):
        resolve_settings("ade20k-150", stride=300)
    with pytest.raises(OptionError, match="--ovseg-preset 'x' is not one of sclip, naclip, scclip, clearclip, resclip, proxyclip, cliptrase, tcl"):
        resolve_settings("ade20k-150", "x")


# NACLIP's configs (sinahmr/NACLIP configs/cfg_*.py: voc21 at 8865082, the rest at cbb720d; naclip.py defaults at
# 8865082), recorded here as read, per dataset: (short side, logit scale, prob_thd, area_thd, PAMR steps)
NACLIP_CONFIGS = {"voc21": (336, 40.0, 0.1, None, 10), "voc20": (336, 40.0, 0.0, None, 10),
                  "context60": (336, 40.0, 0.1, None, 10), "context59": (336, 40.0, 0.0, None, 10),
                  "coco-object": (336, 40.0, 0.1, None, 10), "coco-stuff-171": (448, 40.0, 0.0, None, 10),
                  "cityscapes": (560, 40.0, 0.0, None, 10), "ade20k-150": (336, 40.0, 0.0, None, 10)}


@pytest.mark.parametrize("dataset", sorted(NACLIP_CONFIGS))
def test_the_naclip_preset_holds_naclips_own_configs(dataset):
    s = resolve_settings(dataset, "naclip")
    assert (s.short_side, s.logit_scale, s.bg_threshold, s.area_threshold, s.pamr_steps) == NACLIP_CONFIGS[dataset]
    assert (s.crop, s.stride, s.pamr_dilations, s.normalisation, s.position_resize) == (224, 112, (8, 16), "harness",
                                                                                        "sclip")


# ClearCLIP's configs (mc-lan/ClearCLIP configs/cfg_*.py at fd05ce4; ClearCLIPSegmentation defaults at afe06b8:
# slide_crop 448, slide_stride 224, logit_scale 50, prob_thd 0), recorded here as read: (short side, crop, stride,
# prob_thd, class file). Its cls_voc21.txt has a bare "background" and one name a class.
CLEARCLIP_CONFIGS = {"voc21": (448, 448, 224, 0.5, "voc21-clearclip.txt"), "context60": (448, 448, 224, 0.15, None),
                     "coco-object": (448, 448, 224, 0.4, None), "voc20": (448, 448, 224, 0.0, None),
                     "context59": (448, 448, 224, 0.0, None), "cityscapes": (448, 224, 224, 0.0, None)}


# ProxyCLIP's configs (mc-lan/ProxyCLIP configs/cfg_*.py at 05c3c18; ProxyCLIPSegmentation defaults: slide_crop 336,
# slide_stride 112, logit_scale 40, prob_thd 0), recorded here as read: (short side, crop, stride, prob_thd, class file).
PROXYCLIP_CONFIGS = {"voc21": (336, 336, 112, 0.2, "voc21-proxyclip.txt"), "context60": (336, 336, 112, 0.15, None),
                     "coco-object": (336, 336, 112, 0.25, "coco-object-proxyclip.txt"),
                     "coco-stuff-171": (336, 336, 112, 0.0, None), "cityscapes": (448, 224, 112, 0.0, None),
                     "ade20k-150": (448, 336, 112, 0.0, None)}


HARNESS_CONFIGS = {("clearclip", d): (v, 50.0) for d, v in CLEARCLIP_CONFIGS.items()}
HARNESS_CONFIGS.update({("proxyclip", d): (v, 40.0) for d, v in PROXYCLIP_CONFIGS.items()})


@pytest.mark.parametrize("preset, dataset", sorted(HARNESS_CONFIGS))
def test_the_clearclip_and_proxyclip_presets_hold_their_own_configs(preset, dataset):
    s = resolve_settings(dataset, preset)
    want, logit_scale = HARNESS_CONFIGS[(preset, dataset)]
    assert (s.short_side, s.crop, s.stride, s.bg_threshold, s.classes) == want
    assert (s.logit_scale, s.area_threshold, s.pamr_steps, s.templates, s.normalisation, s.position_resize) == (
        logit_scale, None, 0, "imagenet80", "harness", "sclip")
    if preset == "proxyclip":
        assert s.crop % 56 == 0  # the harness pads windows to multiples of 56: these never need it


def test_proxyclips_class_files_are_its_own():
    """ProxyCLIP's cls_voc21.txt and cls_coco_object.txt (at 05c3c18), "; " between synonyms, as read."""
    from camloc.segment.infer import class_file, read_classes

    voc = read_classes(class_file("voc21-proxyclip.txt"))
    assert voc[0] == ("sky; wall; tree; wood; grass; road; sea; river; mountain; sands; desk; bed; building; cloud; lamp; "
                      "door; window; wardrobe; ceiling; shelf; curtain; stair; floor; hill; rail; fence").split("; ")
    assert [n for [n] in voc[1:]][13:] == ["motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    coco = read_classes(class_file("coco-object-proxyclip.txt"))
    assert coco[0] == ("sky; wall; tree; wood; grass; road; sea; river; mountain; sands; desk; bed; building; cloud; "
                       "floor; hill; rail").split("; ")
    assert coco[1] == ["person"] and coco[2:] == read_classes(class_file("coco-object.txt"))[2:] and len(coco) == 81


def test_clearclips_voc21_names_are_its_own_file():
    from camloc.segment.infer import class_file, read_classes

    names = read_classes(class_file("voc21-clearclip.txt"))
    assert [n for [n] in names] == ["background", "aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat",
                                    "chair", "cow", "table", "dog", "horse", "motorbike", "person", "pottedplant",
                                    "sheep", "sofa", "train", "tvmonitor"]


# --- end to end ----------------------------------------------------------------------------------

def write_ade150(root, sizes=((96, 72), (80, 120), (100, 100))):
    """ADEChallengeData2016 in its released layout (labels 0 = unlabelled, 1..150), photos made here."""
    rng = np.random.default_rng(0)
    base = root / "ADEChallengeData2016"
    (base / "images" / "validation").mkdir(parents=True)
    (base / "annotations" / "validation").mkdir(parents=True)
    shutil.copy(REAL / "ade20k-sceneparsing" / "objectInfo150.txt", base / "objectInfo150.txt")
    for i, (w, h) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(
            base / "images" / "validation" / f"ADE_val_{i + 1:08d}.jpg")
        label = np.zeros((h, w), np.uint8)
        label[: h // 2] = 3
        label[h // 2:, : w // 2] = 5
        label[:5, :5] = 150
        Image.fromarray(label).save(base / "annotations" / "validation" / f"ADE_val_{i + 1:08d}.png")
    return base


SMALL = ["--ovseg-short-side", "64", "--ovseg-crop", "64", "--ovseg-stride", "32"]


def _ovseg(data, out, *extra, methods=",".join(DENSE), model="tiny-vit"):
    return runner.invoke(app, ["eval", "--dataset", "ade20k-150", "--data-root", str(data), "--protocols", "ovseg",
                               "--method", methods, "--model", model, "--out", str(out), "--no-progress", *extra])


def test_ade150_runs_every_dense_method_and_the_table_equals_the_saved_predictions(tmp_path):
    base = write_ade150(tmp_path / "data")
    first = _ovseg(tmp_path / "data", tmp_path / "first", *SMALL, "--save-predictions")
    assert first.exit_code == 0, first.output
    # make the ground truth agree with the predictions in part, so the IoUs are not all zero
    for i, path in enumerate(sorted((tmp_path / "first" / "predictions" / "sclip").glob("*.png"))):
        pred = np.asarray(Image.open(path)).astype(np.int64)
        label = np.where(np.arange(pred.shape[1])[None, :] < pred.shape[1] * (i + 1) // 4, pred + 1, 7)
        label[0, :] = 0  # unlabelled: ignored
        Image.fromarray(label.astype(np.uint8)).save(base / "annotations" / "validation" / f"{path.stem}.png")
    out = tmp_path / "run"
    result = _ovseg(tmp_path / "data", out, *SMALL, "--save-predictions")
    assert result.exit_code == 0, result.output
    table = {row["method"]: row for row in _csv(out / "table.csv")}
    assert list(table) == DENSE
    labels = {p.stem: np.asarray(Image.open(p)) for p in (base / "annotations" / "validation").glob("*.png")}
    for method in DENSE:
        preds, gts = [], []
        for stem, raw in sorted(labels.items()):
            gt = raw.astype(np.int64) - 1
            gt[raw == 0] = 255
            preds.append(np.asarray(Image.open(out / "predictions" / method / f"{stem}.png")).astype(np.int64))
            gts.append(gt)
        miou, macc, aacc, _ = mmseg_miou(preds, gts, 150)
        assert float(table[method]["miou"]) == pytest.approx(miou, abs=1e-6), method
        assert float(table[method]["aacc"]) == pytest.approx(aacc, abs=1e-6)
        assert float(table[method]["images_per_second"]) > 0
    assert float(table["sclip"]["miou"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "ovseg" and summary["config"]["ovseg"]["crop"] == 64
    classes = _csv(out / "ovseg_classes.csv")
    assert len(classes) == 150 * len(DENSE) and classes[0]["class"] == "wall"
    again = _ovseg(tmp_path / "data", out, *SMALL)
    assert again.exit_code == 0 and f"0 new records, {3 * len(DENSE)} resumed" in again.output
    other = _ovseg(tmp_path / "data", out, "--ovseg-short-side", "72", "--ovseg-crop", "64", "--ovseg-stride", "32")
    assert other.exit_code == 2 and "different config" in other.stderr and "ovseg" in other.stderr


def _csv(path):
    import csv

    return list(csv.DictReader(path.open()))


def test_shards_merge_to_the_single_process_numbers(tmp_path):
    write_ade150(tmp_path / "data", sizes=((96, 72), (80, 120), (100, 100), (70, 90)))
    assert _ovseg(tmp_path / "data", tmp_path / "one", *SMALL, methods="sclip,maskclip").exit_code == 0
    for rank in (0, 1):
        result = _ovseg(tmp_path / "data", tmp_path / "two", *SMALL, "--shard", f"{rank}/2", methods="sclip,maskclip")
        assert result.exit_code == 0, result.output
    batched = _ovseg(tmp_path / "data", tmp_path / "batched", *SMALL, "--image-batch", "3", methods="sclip,maskclip")
    assert batched.exit_code == 0, batched.output  # several images' windows in one forward
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["methods"]
    for other in ("two", "batched"):
        two = json.loads((tmp_path / other / "summary.json").read_text())["methods"]
        for method in one:
            assert {k: one[method][k] for k in ("miou", "macc", "aacc", "n_images", "windows")} == \
                   {k: two[method][k] for k in ("miou", "macc", "aacc", "n_images", "windows")}, other
    rescore = runner.invoke(app, ["rescore", str(tmp_path / "one"), "--protocols", "box", "--out", str(tmp_path / "r")])
    assert rescore.exit_code == 2 and "is an ovseg run" in rescore.stderr


def test_batched_windows_equal_one_window_at_a_time():
    from camloc.cams.registry import resolve_methods
    from camloc.models import ClipModel
    from camloc.segment.infer import image_windows, query_features, window_grids

    model = ClipModel.load("tiny-vit")
    specs = resolve_methods(DENSE, "vit")
    classes = [["wall"], ["sky", "cloud"], ["road"]]
    queries, owner, names = query_features(model, classes, "single")
    image = Image.fromarray((np.random.default_rng(1).random((90, 130, 3)) * 255).astype(np.uint8))
    settings = resolve_settings("ade20k-150", short_side=96, crop=64, stride=32)
    _, windows, boxes = image_windows(model, image, settings)
    assert len(windows) == len(boxes) == 2 * 4  # 139 x 96
    together = window_grids(model, specs, {}, windows, queries, names)
    for i in range(len(windows)):
        alone = window_grids(model, specs, {}, windows[i:i + 1], queries, names)
        for method in together:
            assert torch.allclose(together[method][i], alone[method][0], atol=1e-6), method
    # the queries: each name's template-averaged embedding; a class's synonyms are separate queries
    assert names == ["wall", "sky", "cloud", "road"] and owner == [0, 1, 1, 2]


def test_crops_other_than_the_input_size_resize_the_position_embeddings(tmp_path):
    write_ade150(tmp_path / "data", sizes=((120, 100),))
    big = _ovseg(tmp_path / "data", tmp_path / "big", "--ovseg-short-side", "96", "--ovseg-crop", "96",
                 "--ovseg-stride", "48", methods="sclip")
    assert big.exit_code == 0, big.output
    from camloc.models import ClipModel

    model = ClipModel.load("tiny-vit")
    before = model.visual.positional_embedding.detach().clone()
    from camloc.segment.infer import at_input_size

    with at_input_size(model, 96):
        assert model.visual.positional_embedding.shape[0] == 1 + 6 * 6 and model.input_size == 96
    assert torch.equal(model.visual.positional_embedding, before) and model.input_size == 64
    rn = _ovseg(tmp_path / "data", tmp_path / "rn", "--ovseg-short-side", "96", "--ovseg-crop", "96",
                "--ovseg-stride", "48", methods="maskclip", model="tiny-rn")
    assert rn.exit_code == 2 and "class-token ViTs only" in rn.stderr


def test_methods_that_cost_a_pass_per_class_are_refused(tmp_path):
    write_ade150(tmp_path / "data", sizes=((64, 64),))
    result = _ovseg(tmp_path / "data", tmp_path / "x", *SMALL, methods="sclip,gradcam")
    assert result.exit_code == 2 and "gradcam would cost one pass per class" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    label = next((tmp_path / "data").rglob("annotations/validation/*.png"))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(label)
    wrong = _ovseg(tmp_path / "data", tmp_path / "w", *SMALL, methods="sclip")
    assert wrong.exit_code == 2 and "is 10x10, but its image" in wrong.stderr
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(label)
    beyond = _ovseg(tmp_path / "data", tmp_path / "v", *SMALL, methods="sclip")
    assert beyond.exit_code == 2 and "label values must lie in 0..149" in beyond.stderr
    no_bg = _ovseg(tmp_path / "data", tmp_path / "z", *SMALL, "--ovseg-bg-threshold", "0.2", methods="sclip")
    assert no_bg.exit_code == 2 and "has no background class (its class 0 is 'wall')" in no_bg.stderr
    mixed = runner.invoke(app, ["eval", "--dataset", "ade20k-150", "--protocols", "ovseg,mask-iou", "--method",
                                "sclip", "--model", "tiny-vit", "--out", str(tmp_path / "y")])
    assert mixed.exit_code == 2 and "runs on its own" in mixed.stderr


def test_report_shows_the_ovseg_table(tmp_path):
    write_ade150(tmp_path / "data")
    for preset_dir in ("a", "b"):
        assert _ovseg(tmp_path / "data", tmp_path / preset_dir, *SMALL, methods="sclip,maskclip").exit_code == 0
    report = runner.invoke(app, ["report", str(tmp_path / "a"), "--format", "csv"])
    assert report.exit_code == 0, report.output
    lines = report.stdout.strip().splitlines()
    assert lines[0] == "model,method,ade20k-150" and len(lines) == 3
    table = {row["method"]: row for row in _csv(tmp_path / "a" / "table.csv")}
    assert lines[1].split(",")[:2] == ["tiny-vit", "sclip"]
    assert float(lines[1].split(",")[2]) == pytest.approx(float(table["sclip"]["miou"]), abs=1e-6)
    # two folders of one identity merge (each image once); another kind of run is refused beside them
    both = runner.invoke(app, ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--format", "csv"])
    assert both.stdout == report.stdout
    demo = tmp_path / "demo"
    assert runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam", "--out", str(demo),
                               "--no-progress"]).exit_code == 0
    # both kinds: a table of each, and the HTML page with both (issue 30 F14: the page was written, then exit 2)
    mixed = runner.invoke(app, ["report", str(tmp_path / "a"), str(demo), "--format", "csv", "--html",
                                str(tmp_path / "mixed.html")])
    assert mixed.exit_code == 0, mixed.output
    assert "pair protocols:\nmodel,dataset" in mixed.stdout and "\novseg:\nmodel,method,ade20k-150" in mixed.stdout
    assert "open-vocabulary segmentation (mIoU)" in (tmp_path / "mixed.html").read_text()
    # a layout that cannot hold both is refused before anything is written
    refused = runner.invoke(app, ["report", str(tmp_path / "a"), str(demo), "--layout", "s3", "--html",
                                  str(tmp_path / "s3.html")])
    assert refused.exit_code == 2 and "is an ovseg run" in refused.stderr and not (tmp_path / "s3.html").exists()
    page = runner.invoke(app, ["report", str(tmp_path / "a"), "--html", str(tmp_path / "r.html"), "--format", "csv"])
    assert page.exit_code == 0 and "open-vocabulary segmentation (mIoU)" in (tmp_path / "r.html").read_text()


def test_a_class_file_of_ones_own_replaces_the_datasets_and_joins_the_identity(tmp_path):
    """--ovseg-classes: the same names as the dataset's file score the same; other names score otherwise; the file
    and its SHA-256 are in the run's identity, so a folder never resumes with other names; a file with another
    class count, or none, is one line."""
    from camloc.datasets.segmentation import CLASSES_DIR

    write_ade150(tmp_path / "data")
    own = (CLASSES_DIR / "ade20k-150.txt").read_text()
    same, other = tmp_path / "same.txt", tmp_path / "other.txt"
    same.write_text(own)
    other.write_text("\n".join(f"a {line}" for line in own.splitlines()) + "\n")
    runs = {}
    for name, extra in (("plain", ()), ("same", ("--ovseg-classes", str(same))), ("other", ("--ovseg-classes", str(other)))):
        result = _ovseg(tmp_path / "data", tmp_path / name, *SMALL, *extra, methods="sclip", model="tiny-vit")
        assert result.exit_code == 0, result.output
        runs[name] = ({r["image_id"]: r["state"] for r in map(json.loads, (tmp_path / name / "ovseg.jsonl").open())},
                      json.loads((tmp_path / name / "config.json").read_text())["ovseg"])
    assert "classes" not in runs["plain"][1]  # runs without the setting keep their identity
    assert runs["same"][0] == runs["plain"][0] and runs["other"][0] != runs["plain"][0]
    assert runs["other"][1]["classes"] == str(other)
    assert runs["other"][1]["classes_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert _csv(tmp_path / "other" / "ovseg_classes.csv")[0]["class"] == "a wall"
    other.write_text(own)  # the same path, other names: the folder is not resumed
    again = _ovseg(tmp_path / "data", tmp_path / "other", *SMALL, "--ovseg-classes", str(other), methods="sclip")
    assert again.exit_code == 2 and "differs in: ovseg" in again.stderr
    other.write_text("wall\nfloor\n")
    short = _ovseg(tmp_path / "data", tmp_path / "short", *SMALL, "--ovseg-classes", str(other), methods="sclip")
    assert short.exit_code == 2 and f"has 2 classes, ade20k-150 has 150" in short.stderr
    assert len(short.stderr.strip().splitlines()) == 1
    missing = _ovseg(tmp_path / "data", tmp_path / "missing", *SMALL, "--ovseg-classes", str(tmp_path / "no.txt"),
                     methods="sclip")
    assert missing.exit_code == 2 and "no.txt: no such file" in missing.stderr


def test_centre_crop_geometry_by_hand():
    """`centre-crop`: a 40 x 30 image at short side 20 is 26 x 20 (torchvision's int(20 * 40 / 30)), its centre crop
    starts at column round(6 / 2) = 3; the label is resized nearest (pixel centres) and cropped alike."""
    from camloc.segment.infer import centre_cropped

    image = Image.fromarray((np.arange(30 * 40 * 3) % 251).astype(np.uint8).reshape(30, 40, 3))
    label = np.zeros((30, 40), np.uint8)
    label[:, 20:] = 7
    label[0, :] = 255
    rgb, cut = centre_cropped(image, label, 20, 20)
    assert np.array_equal(np.asarray(rgb), np.asarray(image.resize((26, 20), Image.BICUBIC).crop((3, 0, 23, 20))))
    want = np.zeros((20, 20), np.uint8)
    want[:, 10:] = 7  # resized column x' reads source column floor((x' + 0.5) * 40 / 26): 7 from x' = 13, i.e. 10
    want[0, :] = 255  # resized row 0 reads source row floor(0.5 * 30 / 20) = 0
    assert np.array_equal(cut, want) and cut.dtype == np.uint8
    wide = label.astype(np.uint16) * 200  # 16-bit maps keep their values
    assert np.array_equal(centre_cropped(image, wide, 20, 20)[1], want.astype(np.uint16) * 200)
    with pytest.raises(OptionError, match="crop .30. is cut from the image resized to short side 20"):
        resolve_settings("ade20k-150", geometry="centre-crop", short_side=20, crop=30, stride=30)
    with pytest.raises(OptionError, match="--ovseg-geometry 'middle' is not one of slide, centre-crop"):
        resolve_settings("ade20k-150", geometry="middle")


def test_a_centre_crop_run_scores_only_the_crop(tmp_path):
    """End to end: each image is one window, and its record counts exactly the labelled pixels of the centre crop of
    its label (computed here with PIL); the geometry is in the run's identity, a sliding run's identity is as before."""
    from camloc.datasets.segmentation import load_seg_dataset

    write_ade150(tmp_path / "data")
    crop = ["--ovseg-geometry", "centre-crop", "--ovseg-short-side", "48", "--ovseg-crop", "48", "--ovseg-stride", "48"]
    result = _ovseg(tmp_path / "data", tmp_path / "cc", *crop, methods="sclip,maskclip")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "cc" / "config.json").read_text())["ovseg"]
    assert config["geometry"] == "centre-crop"
    _, images = load_seg_dataset("ade20k-150", data_root=tmp_path / "data")
    records = [json.loads(line) for line in (tmp_path / "cc" / "ovseg.jsonl").open()]
    assert {r["windows"] for r in records} == {1} and len(records) == 2 * len(images)
    for item in images:
        label = item.label()
        h, w = label.shape
        size = (48, int(48 * h / w)) if w < h else (int(48 * w / h), 48)  # torchvision's Resize(48) of a PIL image
        left, top = int(round((size[0] - 48) / 2.0)), int(round((size[1] - 48) / 2.0))
        cut = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST).crop((left, top, left + 48, top + 48)))
        for r in (r for r in records if r["image_id"] == item.image_id):
            assert sum(r["state"]["label"]) == int((cut != 255).sum())
    plain = _ovseg(tmp_path / "data", tmp_path / "plain", *SMALL, methods="sclip")
    assert plain.exit_code == 0 and "geometry" not in json.loads((tmp_path / "plain" / "config.json").read_text())["ovseg"]


# --- the datasets' layouts -----------------------------------------------------------------------

def _palette_png(path, label):
    """A VOC-style palette PNG (mode P): the pixel values are the class indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.save(path)


def _photo(path, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(path)


def test_voc_context_cityscapes_and_coco_stuff_labels_as_mmseg_reads_them(tmp_path):
    from camloc.datasets.segmentation import load_seg_dataset

    label = np.array([[0, 0, 15, 15], [255, 3, 3, 20]], np.uint8)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    _palette_png(voc / "SegmentationClass" / "2007_000033.png", label)
    _photo(voc / "JPEGImages" / "2007_000033.jpg", 4, 2)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    spec, [item] = load_seg_dataset("voc21", data_root=tmp_path)
    assert spec.background and len(spec.classes()) == 21 and spec.classes()[15][0] == "person"
    assert item.label().tolist() == label.tolist()  # palette indices as they are, 255 the border
    _, [item20] = load_seg_dataset("voc20", data_root=tmp_path)
    assert item20.label().tolist() == [[255, 255, 14, 14], [255, 2, 2, 19]]  # background ignored, classes - 1

    ctx = tmp_path / "VOCdevkit" / "VOC2010"
    _palette_png(ctx / "SegmentationClassContext" / "2008_000002.png", np.array([[0, 59], [12, 1]]))
    _photo(ctx / "JPEGImages" / "2008_000002.jpg", 2, 2)
    (ctx / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (ctx / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    assert load_seg_dataset("context60", data_root=tmp_path)[1][0].label().tolist() == [[0, 59], [12, 1]]
    assert load_seg_dataset("context59", data_root=tmp_path)[1][0].label().tolist() == [[255, 58], [11, 0]]

    city = tmp_path / "cityscapes"
    _photo(city / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png", 3, 1)
    Image.fromarray(np.array([[0, 18, 255]], np.uint8)).save(
        (city / "gtFine" / "val" / "frankfurt").mkdir(parents=True) or
        city / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelTrainIds.png")
    [c] = load_seg_dataset("cityscapes", data_root=tmp_path)[1]
    assert c.image_id == "frankfurt_000000_000294" and c.label().tolist() == [[0, 18, 255]]

    stuff = tmp_path / "coco_stuff164k"
    _photo(stuff / "images" / "val2017" / "000000000139.jpg", 2, 1)
    (stuff / "annotations" / "val2017").mkdir(parents=True)
    Image.fromarray(np.array([[170, 255]], np.uint8)).save(stuff / "annotations" / "val2017" /
                                                          "000000000139_labelTrainIds.png")
    spec, [s] = load_seg_dataset("coco-stuff-171", data_root=tmp_path)
    assert len(spec.classes()) == 171 and s.label().tolist() == [[170, 255]]
    raw = tmp_path / "raw"
    _photo(raw / "val2017" / "000000000139.jpg", 6, 1)
    (raw / "stuffthingmaps_trainval2017" / "val2017").mkdir(parents=True)
    # person (id 1), toothbrush (id 90), banner (id 92, the first stuff class), wood (id 182), unused id 12, unlabelled
    Image.fromarray(np.array([[0, 89, 91, 181, 11, 255]], np.uint8)).save(
        raw / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png")
    spec, [r] = load_seg_dataset("coco-stuff-171", data_root=raw)
    assert r.label().tolist() == [[0, 79, 80, 170, 255, 255]]
    names = [c[0] for c in spec.classes()]
    assert (names[0], names[79], names[80], names[170]) == ("person", "toothbrush", "banner", "wood")
    verify = runner.invoke(app, ["data", "verify", "voc21", "--data-root", str(tmp_path)])
    assert verify.exit_code == 0 and "images 1, classes 21" in verify.stdout
    Image.fromarray(np.array([[0, 40, 0, 0], [0, 0, 0, 0]], np.uint8)).save(voc / "SegmentationClass" / "2007_000033.png")
    bad = runner.invoke(app, ["data", "verify", "voc21", "--data-root", str(tmp_path)])
    assert bad.exit_code == 2 and "holds values [40] outside 0..20 and 255" in bad.stderr


def test_coco_object_labels_from_the_instances_json(tmp_path):
    from pycocotools import mask as mask_utils

    from camloc.datasets.segmentation import load_seg_dataset

    categories = [{"id": i, "name": f"c{i}", "supercategory": "x"} for i in
                  [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                   32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                   58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                   88, 89, 90]]  # COCO's 80 thing ids
    crowd = mask_utils.encode(np.asfortranarray(np.pad(np.ones((2, 2), np.uint8), ((0, 2), (4, 0)))))
    crowd["counts"] = crowd["counts"].decode()
    data = {"images": [{"id": 7, "file_name": "000000000007.jpg", "width": 6, "height": 4}],
            "categories": categories,
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 4, "bbox": [0, 0, 2, 2],
                 "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
                {"id": 2, "image_id": 7, "category_id": 90, "iscrowd": 0, "area": 4, "bbox": [1, 1, 2, 2],
                 "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]},  # painted after: wins the overlap
                {"id": 3, "image_id": 7, "category_id": 3, "iscrowd": 1, "area": 4, "bbox": [4, 0, 2, 2],
                 "segmentation": crowd}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    _photo(tmp_path / "val2017" / "000000000007.jpg", 6, 4)
    spec, [item] = load_seg_dataset("coco-object", data_root=tmp_path)
    label = item.label()
    assert len(spec.classes()) == 81 and spec.classes()[1][0] == "person"
    assert label[0, 0] == 1 and label[2, 2] == 80 and label[0, 5] == 255 and label[3, 0] == 0
    data["categories"], data["annotations"] = categories[:5], data["annotations"][:1]
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="lists 5 categories"):
        load_seg_dataset("coco-object", data_root=tmp_path)


def test_ade150_class_file_follows_the_official_label_order():
    """The real objectInfo150.txt (ADEChallengeData2016's devkit): row Idx = label; the class file's line
    label - 1 is that row's first name with its spaces removed (SCLIP's spelling), except label 90, where
    SCLIP writes the second name ("television receiver")."""
    import csv

    from camloc.datasets.segmentation import SEG_DATASETS

    rows = list(csv.reader((REAL / "ade20k-sceneparsing" / "objectInfo150.txt").read_text().splitlines(),
                           delimiter="\t"))
    header = [h.strip() for h in rows[0]]
    official = {int(r[header.index("Idx")]): [n.strip() for n in r[header.index("Name")].split(",")]
                for r in rows[1:] if r}
    classes = SEG_DATASETS["ade20k-150"].classes()
    assert sorted(official) == list(range(1, 151)) and len(classes) == 150
    for label, names in official.items():
        expected = names[1] if label == 90 else names[0]
        assert classes[label - 1] == [expected.replace(" ", "")], label


def sclip_interpolate_pos_encoding(positional_embedding, patch_size, w, h):
    """The SCLIP/NACLIP harness's position resize, written out (wangf3014/SCLIP clip/model.py at 961a11a,
    `VisionTransformer.interpolate_pos_encoding`; sinahmr/NACLIP clip/model.py the same): w, h are the
    input's dims -2 and -1; the patch table is scaled bicubically by ((w // p + 0.1) / sqrt(N), ...)."""
    import math

    n = positional_embedding.shape[0] - 1
    g = int(math.sqrt(n))
    patches = positional_embedding[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    out = F.interpolate(patches, scale_factor=((w // patch_size + 0.1) / math.sqrt(n),
                                                (h // patch_size + 0.1) / math.sqrt(n)), mode="bicubic")
    out = out.permute(0, 2, 3, 1).reshape(-1, positional_embedding.shape[-1])
    return torch.cat([positional_embedding[:1], out])


@pytest.mark.parametrize("crop", [448, 336, 160])
def test_sclip_preset_resizes_positions_as_the_harness_does(crop):
    """On a random 14 x 14 table (ViT-B/16's) the harness's scale-factor resize differs from an exact-size
    resize by up to 7 % of the range at crop 448; the sclip preset follows the harness exactly."""
    from camloc.segment.infer import resized_positions

    table = torch.randn(1 + 14 * 14, 32, generator=torch.Generator().manual_seed(0))
    n = crop // 16
    reference = sclip_interpolate_pos_encoding(table, 16, crop, crop)
    torch.testing.assert_close(resized_positions(table, 14, n, n, "sclip"), reference, rtol=0, atol=1e-6)
    exact = resized_positions(table, 14, n, n, "size")
    assert (exact - reference).abs().max() > 0.01  # the two ways differ: the preset has to pick the harness's


def test_sclip_preset_normalises_with_the_harness_constants(tmp_path):
    """SCLIP's data preprocessor: CLIP's mean/std x 255 rounded to 3 decimals, on the 0-255 image."""
    from camloc.models import ClipModel
    from camloc.segment.infer import resized_input

    model = ClipModel.load("tiny-vit")
    image = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    rgb = cv2.resize(np.asarray(image), rescaled_size(50, 40, 34), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    expected = (rgb - np.array([122.771, 116.746, 104.094], np.float32)) / np.array([68.501, 66.632, 70.323],
                                                                                   np.float32)
    got = resized_input(model, image, 34, "harness").permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    full = resized_input(model, image, 34, "model").permute(1, 2, 0).numpy()
    assert np.abs(full - expected).max() > 1e-5  # the full constants differ in the 5th decimal
    write_ade150(tmp_path / "data", sizes=((64, 64),))
    assert _ovseg(tmp_path / "data", tmp_path / "run", *SMALL, methods="sclip").exit_code == 0
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["ovseg"]
    assert recorded["normalisation"] == "harness" and recorded["pixel_mean"] == [122.771, 116.746, 104.094]
    assert recorded["position_resize"] == "sclip"


def test_predict_without_thresholds_skips_the_softmax_and_keeps_the_harness_label_map():
    """No background or area threshold: the argmax of the cosines (one top-2 pass) gives the softmax path's label
    map, exact ties and near-ties included (those pixels take the softmax path), with synonyms merged too."""
    import camloc.segment.infer as infer

    settings = infer.OvsegSettings(preset="sclip", **infer.PRESETS["sclip"])
    generator = torch.Generator().manual_seed(0)
    for owner in (list(range(40)), [i // 2 for i in range(40)]):
        logits = torch.randn(40, 60, 80, generator=generator) * 0.05 + 0.2
        logits[:, :6, :6] = 0.3  # every class tied
        logits[3, 20:30, 20:30] = logits[8, 20:30, 20:30] + 1e-8  # closer than the float32 softmax can tell
        logits[5, 40:50, 40:50] = logits[9, 40:50, 40:50].max() + 2e-6  # just outside the tie band
        calls = []
        softmax = infer._predict_softmax
        infer._predict_softmax = lambda *a: calls.append(a[0].shape) or softmax(*a)
        try:
            fast = infer.predict(logits, owner, settings)
        finally:
            infer._predict_softmax = softmax
        assert torch.equal(fast, softmax(logits, owner, settings))
        assert calls and calls[0][1] < 60 * 80 / 4  # only the near-tie pixels went through the softmax
    with_threshold = infer.OvsegSettings(preset="sclip", **{**infer.PRESETS["sclip"], "bg_threshold": 0.1})
    assert torch.equal(infer.predict(logits, owner, with_threshold), softmax(logits, owner, with_threshold))


# --- the large-vocabulary sets: ADE-847 and PASCAL-Context-459 as CAT-Seg prepares them ---------------------

CATSEG = REAL / "cat-seg-classes"


@pytest.mark.parametrize("dataset,official", [("ade847", "ade847.json"), ("context459", "pc459.json")])
def test_large_vocabulary_class_files_follow_the_official_order(dataset, official):
    """Line i of the class file is class index i of CAT-Seg's list (the real files, unchanged), its
    comma-separated synonyms split as camloc splits every class file."""
    from camloc.datasets.segmentation import SEG_DATASETS

    names = json.loads((CATSEG / official).read_text())
    classes = SEG_DATASETS[dataset].classes()
    assert len(classes) == len(names) == {"ade847": 847, "context459": 459}[dataset]
    from camloc.datasets.segmentation import CLASSES_DIR

    assert (CLASSES_DIR / SEG_DATASETS[dataset].classes_file).read_text().splitlines() == names  # as published
    assert classes == [[n.strip() for n in name.split(", ") if n.strip()] for name in names]
    if dataset == "ade847":  # one name keeps the list's own stray space ("c p u , central processor"): stripped
        assert classes[782][:3] == ["central processing unit", "cpu", "c p u"]
        assert classes[0] == ["wall"] and classes[1] == ["building", "edifice"]
        assert classes[846] == ["adding machine", "totalizer", "totaliser"]
    else:
        assert classes[0] == ["accordion"] and classes[430] == ["unknown"] and classes[458] == ["wool"]


def _tif(path, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint16)).save(path)


def write_ade847(root, sizes=((40, 30), (32, 44))):
    """ADE20K_2021_17_01 as CAT-Seg's prepare_ade20k_full.py leaves it (register_ade20k_847.py at dc295ee):
    images_detectron2/validation/*.jpg, annotations_detectron2/validation/*.tif, 16-bit, 65535 = ignore."""
    base = root / "ADE20K_2021_17_01"
    for i, (w, h) in enumerate(sizes):
        stem = f"ADE_val_0000000{i + 1}"
        rng = np.random.default_rng(i)
        (base / "images_detectron2" / "validation").mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(
            base / "images_detectron2" / "validation" / f"{stem}.jpg")
        label = np.full((h, w), 2, np.uint16)  # sky
        label[h // 2:, : w // 2] = 846  # the last class: a value no 8-bit map can hold
        label[h // 2:, w // 2:] = 300
        label[:3, :3] = 65535
        _tif(base / "annotations_detectron2" / "validation" / f"{stem}.tif", label)
    return root


def test_ade847_and_context459_read_16_bit_labels_and_score_all_classes(tmp_path):
    from camloc.datasets.segmentation import load_seg_dataset

    write_ade847(tmp_path)
    spec, items = load_seg_dataset("ade847", data_root=tmp_path)
    label = items[0].label()
    assert spec.ignore_index == 65535 and label.dtype == np.uint16 and label.shape == (30, 40)
    assert set(np.unique(label).tolist()) == {2, 300, 846, 65535}
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    _photo(voc / "JPEGImages" / "2008_000002.jpg", 5, 2)
    _photo(voc / "JPEGImages" / "2008_000003.jpg", 5, 2)  # no label: not part of the set (detectron2's pairing)
    _tif(voc / "annotations_detectron2" / "pc459_val" / "2008_000002.tif", np.array([[0, 430, 458, 12, 12]] * 2))
    spec, [item] = load_seg_dataset("context459", data_root=tmp_path)
    assert spec.ignore_index == 459 and item.image_id == "2008_000002"
    assert item.label().tolist() == [[0, 430, 458, 12, 12]] * 2

    verify = runner.invoke(app, ["data", "verify", "ade847", "--data-root", str(tmp_path)])
    assert verify.exit_code == 0 and "images 2, classes 847" in verify.stdout
    result = runner.invoke(app, ["eval", "--dataset", "ade847", "--data-root", str(tmp_path), "--protocols", "ovseg",
                                 "--method", "sclip", "--model", "tiny-vit", "--out", str(tmp_path / "run"),
                                 "--no-progress", "--save-predictions", "--ovseg-templates", "single", *SMALL])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "ovseg.jsonl").read_text().splitlines()]
    for record in records:  # the counts are those of the saved 16-bit prediction against the label, ignore dropped
        pred = np.asarray(Image.open(tmp_path / "run" / "predictions" / "sclip" / f"{record['image_id']}.png"))
        label = next(i for i in items if i.image_id == record["image_id"]).label()
        assert len(record["state"]["label"]) == 847 and pred.max() < 847
        keep = label != 65535
        assert record["state"]["label"] == np.bincount(label[keep].astype(np.int64), minlength=847).tolist()
        assert record["state"]["pred"] == np.bincount(pred[keep].astype(np.int64), minlength=847).tolist()
    # CLIPtrase's harness on the 16-bit maps: the centre crop keeps their values, one prompt a line, the vote runs
    crop = runner.invoke(app, ["eval", "--dataset", "ade847", "--data-root", str(tmp_path), "--protocols", "ovseg",
                               "--method", "cliptrase", "--model", "tiny-vit", "--out", str(tmp_path / "trase"),
                               "--no-progress", "--ovseg-preset", "cliptrase", "--ovseg-templates", "single",
                               "--ovseg-short-side", "32", "--ovseg-crop", "32", "--ovseg-stride", "32"])
    assert crop.exit_code == 0, crop.output
    config = json.loads((tmp_path / "trase" / "config.json").read_text())["ovseg"]
    assert (config["classes"], config["geometry"], config["cluster_vote"]) == ("cliptrase-ade847.txt", "centre-crop",
                                                                              [1.1, 7])
    for record in map(json.loads, (tmp_path / "trase" / "ovseg.jsonl").read_text().splitlines()):
        cut = centre_cropped(Image.new("RGB", (40, 30)), next(i for i in items if i.image_id == record["image_id"]).label(),
                             32, 32)[1]
        assert record["state"]["label"] == np.bincount(cut[cut != 65535].astype(np.int64), minlength=847).tolist()

    _tif(tmp_path / "ADE20K_2021_17_01" / "annotations_detectron2" / "validation" / "ADE_val_00000001.tif",
         np.full((30, 40), 900))
    bad = runner.invoke(app, ["data", "verify", "ade847", "--data-root", str(tmp_path)])
    assert bad.exit_code == 2 and "holds values [900] outside 0..846 and 65535" in bad.stderr


# --- CLIPtrase's harness ---------------------------------------------------------------------------

def cliptrase_vote_reference(patch_preds, attn_weights, h, w, image_size, eps, min_samples):
    """clip_self_correlation.py's cluster vote at 8fb4d74 (leaves162/CLIPtrase, MIT), written out on its own tensors:
    attn_weights (hw + 1, hw + 1) with the class token first, patch_preds (n, n) in its class indices."""
    from scipy.ndimage import median_filter
    from sklearn.cluster import DBSCAN

    cls_weights = attn_weights[0:1, 1:]
    attn = attn_weights[1:, 1:] - cls_weights
    attn[attn < 0] = 0
    labels = torch.from_numpy(DBSCAN(eps=eps, min_samples=min_samples).fit_predict(attn.numpy()))
    label_set = torch.unique(labels)
    if label_set.shape[0] == 1 and label_set[0] == -1:
        return patch_preds
    if label_set[0] == -1:
        label_set = label_set[1:]
    maps = torch.stack([attn[labels == label_set[i]].mean(dim=0) for i in range(label_set.shape[0])])
    maps = maps.reshape(maps.shape[0], h, w)
    maps = F.interpolate(maps.unsqueeze(0), size=(4 * h, 4 * w), mode="bilinear", align_corners=False)[0].numpy()
    for i in range(maps.shape[0]):
        maps[i] = median_filter(maps[i], size=4 * 2 - 1)
    maps = F.interpolate(torch.from_numpy(maps).unsqueeze(0), size=(image_size, image_size), mode="bilinear",
                         align_corners=False)[0].argmax(dim=0)
    patch_preds = patch_preds.clone()
    for i in range(label_set.shape[0]):
        unique_val, counts = torch.unique(patch_preds[maps == label_set[i]], return_counts=True)
        if counts.shape[0] == 0:
            continue
        patch_preds[maps == label_set[i]] = unique_val[counts.argmax()]
    return patch_preds


@pytest.mark.parametrize("background", [False, True])
def test_cluster_vote_equals_cliptrases_written_out(background):
    """Three blocks of patches that resemble each other (plus noise) cluster; each cluster's pixels take its majority
    class. With a background class, camloc's class 0 is the reference's last class: the maps agree after renaming,
    ties included (the reference's background loses them)."""
    from camloc.segment.cluster_vote import cluster_vote

    rng = np.random.default_rng(3)
    h = w = 6
    groups = np.repeat([0, 1, 2], 12)  # 36 patches in three groups
    features = rng.normal(size=(3, 16))[groups] + 0.05 * rng.normal(size=(36, 16))
    tokens = np.vstack([features.mean(axis=0, keepdims=True) * 0.2, features])
    unit = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    similarity = torch.from_numpy((unit @ unit.T).astype(np.float32))
    pred = torch.from_numpy(rng.integers(0, 4, size=(24, 24)))
    pred[:8] = 2  # a clear majority in the first group's rows
    pred[8:10, :] = torch.tensor([0, 3] * 12)  # an exact tie between 0 and 3 somewhere
    ours = cluster_vote(pred, similarity, (h, w), eps=0.5, min_samples=3, background=background)
    if background:  # the reference's indices: classes 1..3 -> 0..2, background 0 -> 3
        theirs = cliptrase_vote_reference(torch.where(pred == 0, 3, pred - 1), similarity, h, w, 24, 0.5, 3)
        theirs = torch.where(theirs == 3, 0, theirs + 1)
    else:
        theirs = cliptrase_vote_reference(pred, similarity, h, w, 24, 0.5, 3)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, pred)  # the vote changed the map
    assert len(torch.unique(ours)) <= 3  # one class per cluster


def test_cliptrase_token_similarity_is_the_q_k_v_cosines_averaged():
    """Block 11's `self_out_weight` weights (attn2.py): per head (cos qq + cos kk + cos vv) / 3, averaged over heads."""
    from camloc.cams.context import CamContext
    from camloc.models import ClipModel
    from camloc.segment.cluster_vote import token_self_similarity

    model = ClipModel.load("tiny-vit", device="cpu")
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    ctx = CamContext(model, image, ["cat"], {}, methods=["cliptrase"])
    block = ctx.depth - 2
    _, inputs = ctx.block_inputs(block)
    access = ctx.block_access(block)
    q, k, v = access.qkv(access.ln_1(inputs[0]))
    want = 0
    for head in range(q.shape[1]):
        for t in (q, k, v):
            x = t[0, head]
            want = want + torch.cosine_similarity(x.unsqueeze(1), x.unsqueeze(0), dim=-1) / 3.0
    want = want / q.shape[1]
    got = token_self_similarity(ctx, block)
    assert got.shape == (q.shape[2], q.shape[2]) and torch.allclose(got, want, atol=1e-5)


def test_the_cliptrase_preset_equals_its_script_written_out_on_a_voc_image(tmp_path):
    """One VOC21 image through `--ovseg-preset cliptrase` and through clip_self_correlation.py's steps written out
    (leaves162/CLIPtrase at 8fb4d74) on the same tiny model: torchvision's Resize(336, bicubic) + CenterCrop on the
    image and (nearest) on its detectron2 label (background and border 255 -> its background class, last), CLIP's
    normalisation, the +0.1 position interpolation, vanilla blocks then the self_qk_weight block, the logits' argmax
    at 336 px, the cluster vote over the first block's q/k/v cosines, and its confusion histogram: the run's
    per-class counts are the script's, class for class."""
    import sys

    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    from camloc.datasets.segmentation import load_seg_dataset
    from camloc.models import ClipModel
    from camloc.segment.infer import query_features, read_classes, class_file

    sys.path.insert(0, str(Path(__file__).parent))
    from test_reproduce import write_eight

    write_eight(tmp_path / "data")
    from camloc.api import evaluate

    vote = (2.0, 3)  # where DBSCAN finds clusters in this random model's similarities (1.1 / 7 finds none)
    evaluate("tiny-vit", "voc21", ["cliptrase"], out=tmp_path / "run", protocols="ovseg", limit=1, device="cpu",
             data_root=tmp_path / "data", ovseg={"preset": "cliptrase", "cluster_vote": list(vote)}, progress=False)
    [record] = [json.loads(line) for line in (tmp_path / "run" / "ovseg.jsonl").open()]
    _, [item] = load_seg_dataset("voc21", data_root=tmp_path / "data", limit=1)

    n, model = 336, ClipModel.load("tiny-vit", device="cpu")
    visual = model.visual
    image = Compose([Resize(n, interpolation=InterpolationMode.BICUBIC), CenterCrop(n), ToTensor(),
                     Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])(
        Image.open(item.path).convert("RGB"))
    raw = item.label()
    d2 = np.where((raw == 0) | (raw == 255), 255, raw - 1).astype(np.uint8)  # detectron2's VOC: background 255
    gts = np.asarray(Compose([Resize(n, interpolation=InterpolationMode.NEAREST), CenterCrop(n)])(Image.fromarray(d2)))
    gts = np.where(gts == 255, 20, gts).astype(np.int64)  # gts[gts == 255] = C
    with torch.no_grad():
        x = visual.conv1(image[None]).flatten(2).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding.expand(1, 1, -1), x], dim=1)
        pos, g0 = visual.positional_embedding, int(math.sqrt(visual.positional_embedding.shape[0] - 1))
        w0 = n // 16 + 0.1
        grid_pos = F.interpolate(pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2), scale_factor=(w0 / g0, w0 / g0),
                                 mode="bicubic")
        x = visual.ln_pre(x + torch.cat([pos[[0]], grid_pos.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])])[None])
        x = x.permute(1, 0, 2)
        blocks = list(visual.transformer.resblocks)
        inputs = []
        for blk in blocks[:-1]:
            inputs.append(x)
            x = blk(x)
        heads, dim = blocks[0].attn.num_heads, x.shape[-1]
        hd = dim // heads

        def qkv(blk, tokens):
            return [t.contiguous().view(tokens.shape[0], heads, hd).transpose(0, 1)
                    for t in F.linear(blk.ln_1(tokens), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, -1)]
        q, k, v = qkv(blocks[-2], inputs[-1])  # attn_weights[-2]: the second-to-last block's self_out_weight
        cos = sum(torch.cosine_similarity(t.unsqueeze(2), t.unsqueeze(1), dim=-1) for t in (q, k, v)) / 3.0
        similarity = cos.sum(dim=0) / heads
        q, k, v = qkv(blocks[-1], x)
        weights = sum(torch.softmax(torch.bmm(t * hd ** -0.5, t.transpose(1, 2)), dim=-1) for t in (q, k, v))
        x = x + blocks[-1].attn.out_proj(torch.bmm(weights, v).transpose(0, 1).reshape(x.shape[0], 1, dim))
        x = x + blocks[-1].mlp(blocks[-1].ln_2(x))
        feats = visual.ln_post(x.permute(1, 0, 2)) @ visual.proj
        feats = feats / feats.norm(dim=-1, keepdim=True)
        classes = read_classes(class_file("cliptrase-voc21.txt"))
        queries, owner, _ = query_features(model, classes, "imagenet80")
        h = n // 16
        logits = (feats[0, 1:] @ queries.T * 100).T.reshape(len(owner), h, h)
        logits = F.interpolate(logits[None], size=(n, n), mode="bilinear", align_corners=False)[0]
        ours_to_theirs = torch.tensor([20] + list(range(20)))  # camloc's background 0 is the script's class C = 20
        preds = ours_to_theirs[torch.tensor(owner)[logits.argmax(dim=0)]]
    voted = cliptrase_vote_reference(preds, similarity, h, h, n, *vote)
    assert not torch.equal(voted, preds)  # the vote takes part
    preds = voted
    keep = (gts >= 0) & (gts < 21)
    hist = np.bincount(21 * gts[keep] + preds.numpy()[keep], minlength=21 ** 2).reshape(21, 21)
    state = {key: np.asarray(record["state"][key])[[*range(1, 21), 0]] for key in ("intersect", "label", "pred")}
    assert state["intersect"].tolist() == np.diag(hist).tolist()
    assert state["label"].tolist() == hist.sum(axis=1).tolist() and state["pred"].tolist() == hist.sum(axis=0).tolist()


@pytest.mark.parametrize("vote", [[1.1, 7.5], [1.1], [1.1, 7, 3], [0, 7], ["x", 7]])
def test_a_bad_cluster_vote_is_one_line_not_rounded(vote):
    with pytest.raises(OptionError, match="cluster_vote"):
        resolve_settings("voc20", "cliptrase", cluster_vote=vote)


def test_the_cluster_vote_needs_a_class_token_and_says_so():
    from camloc.segment.cluster_vote import cluster_vote

    with pytest.raises(OptionError, match="class token"):
        cluster_vote(torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4), (2, 2), 1.0, 1, prefix=0)


def test_cliptrases_coco_lists_and_its_coco80_reading_follow_the_official_coco_stuff_labels():
    """Against COCO-Stuff's own labels.txt (tests/real-formats/coco-stuff, nightrome/cocostuff): the 171 train ids
    camloc reads are its used labels in id order, CLIPtrase's COCO-Stuff list names them in that order, its COCO80
    things are train ids 0..79, and train id 80, which its COCO80 scores as background, is 'banner'."""
    from camloc.datasets.segmentation import COCO80_FROM_STUFF, STUFF_TRAIN_IDS
    from camloc.segment.infer import class_file, read_classes

    labels = dict(line.split(": ", 1) for line in (REAL / "coco-stuff" / "labels.txt").read_text().splitlines())
    by_train_id = {int(STUFF_TRAIN_IDS[png]): labels[str(png + 1)] for png in range(182) if STUFF_TRAIN_IDS[png] != 255}
    names = [by_train_id[t] for t in range(171)]
    assert [n for [n] in read_classes(class_file("cliptrase-coco-stuff-171.txt"))] == names
    assert [n for [n] in read_classes(class_file("cliptrase-coco80.txt"))[1:]] == names[:80]
    assert names[80] == "banner" and COCO80_FROM_STUFF[80] == 0 and COCO80_FROM_STUFF[79] == 80


def test_cliptrases_ade150_list_is_the_official_names_in_order():
    """Against ADE20K's own objectInfo150.txt (tests/real-formats/ade20k-sceneparsing): CLIPtrase's ADE-150 list is each
    class's first official name, in label order; class 90 takes its second ("television receiver")."""
    from camloc.segment.infer import class_file, read_classes

    rows = (REAL / "ade20k-sceneparsing" / "objectInfo150.txt").read_text().splitlines()[1:]
    official = [[n.strip() for n in row.split("\t")[-1].split(", ")] for row in rows]  # "bed " has its space there too
    ours = [n for [n] in read_classes(class_file("cliptrase-ade20k-150.txt"))]
    assert len(ours) == 150 and ours[89] == official[89][1]
    assert [o for i, o in enumerate(ours) if i != 89] == [names[0] for i, names in enumerate(official) if i != 89]
