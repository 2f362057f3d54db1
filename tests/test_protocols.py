"""Localization protocols beyond one Otsu box (mask IoU, pointing game, energy pointing, MaxBoxAccV2,
PxAP): hand-computed cases, wsolevaluation's published formulas recomputed independently, and
`camloc rescore` from saved heatmaps against the live values."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from typer.testing import CliRunner

from camloc.cli.app import app
from camloc.datasets.registry import DEMO_DIR
from camloc.errors import CamlocError
from camloc.evaluators.protocols import (ProtocolSums, energy_pointing, mask_iou, maxboxacc_state, pair_values,
                                         parse_protocols, pointing_hit, pxap_from_histograms, pxap_state)

runner = CliRunner()
ALL = "box,mask-iou,pointing,maxboxacc,pxap"


def block(shape, rows, cols, value=1.0):
    m = np.zeros(shape, np.float32)
    m[rows, cols] = value
    return m


# --- per pair, by hand -------------------------------------------------------------------------------

def test_mask_iou_by_hand():
    heatmap = block((10, 10), slice(2, 6), slice(2, 6))           # 16 px
    mask = block((10, 10), slice(4, 8), slice(4, 8)) > 0          # 16 px, 4 shared
    assert mask_iou(heatmap, mask) == pytest.approx(4 / 28)
    assert mask_iou(heatmap, mask, threshold=0.5) == pytest.approx(4 / 28)
    assert mask_iou(heatmap, np.zeros((10, 10), bool)) == 0.0     # empty mask
    assert mask_iou(np.zeros((10, 10), np.float32), mask) == 0.0  # all-zero map: nothing is foreground
    assert mask_iou(np.zeros((10, 10), np.float32), np.zeros((10, 10), bool)) == 0.0


def test_pointing_by_hand_ties_border_tolerance_and_constant_maps():
    mask = block((10, 10), slice(4, 8), slice(4, 8)) > 0
    heatmap = np.zeros((10, 10), np.float32)
    heatmap[4, 4] = 1.0                                  # the mask's corner pixel: on the border, a hit
    assert pointing_hit(heatmap, mask, [], tolerance=0)
    heatmap = np.zeros((10, 10), np.float32)
    heatmap[1, 4] = 1.0                                  # 3 px above the mask
    assert pointing_hit(heatmap, mask, [], tolerance=3) and not pointing_hit(heatmap, mask, [], tolerance=2.9)
    tie = np.zeros((10, 10), np.float32)
    tie[0, 9] = tie[5, 5] = 1.0                          # two maxima: the first in row-major order, (0, 9), counts
    assert not pointing_hit(tie, mask, [], tolerance=0)
    tie[0, 9] = 0.5
    assert pointing_hit(tie, mask, [], tolerance=0)
    assert not pointing_hit(np.zeros((10, 10), np.float32), mask, [], tolerance=100)  # constant: points nowhere
    assert not pointing_hit(np.ones((10, 10), np.float32), mask, [], tolerance=100)
    heatmap = np.zeros((10, 10), np.float32)
    heatmap[3, 3] = 1.0
    assert pointing_hit(heatmap, None, [[2, 2, 5, 5]], tolerance=0)      # no mask: the boxes [x1, x2)
    assert not pointing_hit(heatmap, None, [[4, 4, 6, 6]], tolerance=0)
    assert pointing_hit(heatmap, None, [[4, 4, 6, 6]], tolerance=1.5)    # (3, 3) to (4, 4): sqrt(2)
    assert not pointing_hit(heatmap, np.zeros((10, 10), bool), [], tolerance=5)  # empty mask


def test_energy_pointing_by_hand():
    heatmap = np.zeros((4, 4), np.float32)
    heatmap[0, 0], heatmap[1, 1], heatmap[3, 3] = 0.5, 0.25, 0.25
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    assert energy_pointing(heatmap, mask, []) == pytest.approx(0.75)
    assert energy_pointing(heatmap, None, [[3, 3, 4, 4]]) == pytest.approx(0.25)
    assert energy_pointing(np.zeros((4, 4), np.float32), mask, []) == 0.0


# --- dataset level, against wsolevaluation's formulas -------------------------------------------------

def reference_best_ious(scoremap, gt_boxes, thresholds):
    """wsolevaluation's MaxBoxAccV2 per-threshold best IoU, written out independently with plain loops:
    min-max to [0, 1], uint8(x * 255), cv2.threshold at int(t * max), every contour of RETR_TREE,
    boxes [x, y, min(x + w, W - 1), min(y + h, H - 1)], inclusive IoU without epsilon."""
    span = scoremap.max() - scoremap.min()
    norm = (scoremap - scoremap.min()) / span if span > 0 else np.zeros_like(scoremap)
    gray = (norm * 255).astype(np.uint8)
    height, width = gray.shape
    out = []
    for t in thresholds:
        _, thr = cv2.threshold(gray, int(t * gray.max()), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(thr, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        boxes = []
        for c in contours:
            x, y, w, h = cv2.boundingRect(c)
            boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
        if not boxes:
            boxes = [(0, 0, 0, 0)]
        best = 0.0
        for a in boxes:
            for b in gt_boxes:
                iw = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
                ih = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
                inter = iw * ih
                union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
                best = max(best, inter / union if union > 0 else 0.0)
        out.append(best)
    return np.array(out)


def test_maxboxacc_v2_equals_wsolevaluations_formula():
    rng = np.random.default_rng(3)
    thresholds = np.arange(0, 1, 0.01)
    pairs = []
    for _ in range(6):
        small = rng.random((5, 7)).astype(np.float32)
        heatmap = cv2.resize(small, (56, 40), interpolation=cv2.INTER_LINEAR)
        x0, y0 = rng.integers(0, 30), rng.integers(0, 20)
        pairs.append((heatmap, [[int(x0), int(y0), int(x0) + 20, int(y0) + 15]]))
    sums = ProtocolSums()
    hits = {d: np.zeros(len(thresholds)) for d in (0.3, 0.5, 0.7)}
    for heatmap, gt in pairs:
        sums.add({"maxboxacc_state": maxboxacc_state(heatmap, gt)})
        best = reference_best_ious(heatmap, gt, thresholds)
        for d in hits:
            hits[d] += best >= d
    expected = {d: hits[d].max() / len(pairs) for d in hits}  # BoxAcc(d) = max over t
    result = sums.result()
    for d, value in expected.items():
        assert result[f"boxacc@{d}"] == pytest.approx(value)
    assert result["maxboxacc_v2"] == pytest.approx(np.mean(list(expected.values())))


def test_maxboxacc_by_hand():
    """One square blob exactly on its box: every threshold below the blob's value finds the blob, so
    BoxAcc is 1 at every IoU threshold; a blob elsewhere never overlaps: 0."""
    heatmap = block((20, 20), slice(5, 10), slice(5, 10))
    on = maxboxacc_state(heatmap, [[5, 5, 10, 10]])       # contour box [5, 5, 10, 10], inclusive IoU 1
    off = maxboxacc_state(heatmap, [[15, 15, 19, 19]])
    sums = ProtocolSums()
    sums.add({"maxboxacc_state": on})
    assert sums.result()["maxboxacc_v2"] == 1.0
    sums.add({"maxboxacc_state": off})
    assert sums.result() == {"boxacc@0.3": 0.5, "boxacc@0.5": 0.5, "boxacc@0.7": 0.5, "maxboxacc_v2": 0.5}
    # an all-zero map has no foreground at any threshold: wsolevaluation's [0, 0, 0, 0] box, no hit
    zero = maxboxacc_state(np.zeros((20, 20), np.float32), [[5, 5, 10, 10]])
    assert zero == {"n": 100, "0.3": "0x0", "0.5": "0x0", "0.7": "0x0"}


def test_pxap_by_hand_and_against_wsolevaluations_formula():
    # four pixels, sorted by score: positive, negative, positive, negative -> AP = 1 * 1/2 + 2/3 * 1/2
    heatmap = np.array([[0.9, 0.6], [0.3, 0.0]], np.float32)
    mask = np.array([[True, False], [True, False]])
    state = pxap_state(heatmap, mask)
    assert pxap_from_histograms(state["fg"], state["bg"]) == pytest.approx(5 / 6)
    # an all-zero map ranks nothing: every pixel is predicted at threshold 0, precision = the mask's share
    zero = pxap_state(np.zeros((2, 2), np.float32), mask)
    assert pxap_from_histograms(zero["fg"], zero["bg"]) == pytest.approx(0.5)
    empty = pxap_state(heatmap, np.zeros((2, 2), bool))  # no positive pixel: undefined, not 0
    assert pxap_from_histograms(empty["fg"], empty["bg"]) is None
    # random maps: wsolevaluation's MaskEvaluator steps, written out here with explicit loops
    rng = np.random.default_rng(0)
    fg_total, bg_total = np.zeros(102), np.zeros(102)
    sums = ProtocolSums()
    edges = np.append(np.arange(0, 1, 0.01), [1.0, 2.0, 3.0])
    for _ in range(4):
        heatmap = rng.random((12, 9)).astype(np.float32)
        mask = rng.random((12, 9)) > 0.6
        sums.add({"pxap_state": pxap_state(heatmap, mask)})
        norm = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min())
        for value, positive in zip(norm.ravel(), mask.ravel()):
            b = np.searchsorted(edges, value, side="right") - 1
            (fg_total if positive else bg_total)[min(b, 101)] += 1
    tp = fp = 0.0
    counts = []  # (tp, fp) from the highest bin down
    for i in reversed(range(102)):
        tp, fp = tp + fg_total[i], fp + bg_total[i]
        counts.append((tp, fp))
    ap = 0.0
    for k in range(1, 102):
        tp_k, fp_k = counts[k]
        if tp_k + fp_k:  # only thresholds with a positive prediction
            ap += tp_k / (tp_k + fp_k) * (tp_k - counts[k - 1][0]) / fg_total.sum()
    assert sums.result()["pxap"] == pytest.approx(ap)
    assert sums.result()["n_mask"] == 4


def test_pairs_without_masks_and_unknown_protocols():
    values = pair_values(parse_protocols(ALL), block((8, 8), slice(2, 4), slice(2, 4)), None, [[2, 2, 4, 4]], "otsu")
    assert values["mask_iou"] is None and values["pxap_state"] is None
    assert values["pointing_hit"] is True and values["energy_pointing"] == 1.0  # the boxes stand in for the mask
    assert parse_protocols("pointing") == ["box", "pointing"]
    with pytest.raises(CamlocError, match="unknown pointing-game"):
        parse_protocols("box,pointing-game")


# --- properties ---------------------------------------------------------------------------------------

dyadic = st.integers(0, 1024).map(lambda v: v / 1024)  # exact under x2 and x4 in float
maps = arrays(np.float64, st.tuples(st.integers(2, 16), st.integers(2, 16)), elements=dyadic)


@settings(max_examples=60, deadline=None)
@given(maps, st.integers(0, 15), st.integers(0, 15), st.integers(1, 8), st.integers(1, 8), st.floats(0, 10))
def test_protocols_stay_in_range_and_are_invariant_where_they_say(heatmap, x, y, w, h, tolerance):
    height, width = heatmap.shape
    box = [[min(x, width - 1), min(y, height - 1), min(x + w, width), min(y + h, height)]]
    mask = np.zeros(heatmap.shape, bool)
    mask[box[0][1]:box[0][3], box[0][0]:box[0][2]] = True
    values = pair_values(parse_protocols(ALL), heatmap, mask, box, "otsu", tolerance)
    assert 0 <= values["mask_iou"] <= 1 and 0 <= values["energy_pointing"] <= 1 + 1e-12
    sums = ProtocolSums()
    sums.add(values)
    result = sums.result()
    assert 0 <= result["maxboxacc_v2"] <= 1 and (result["pxap"] is None or 0 <= result["pxap"] <= 1 + 1e-12)
    # pointing: any strictly increasing map of the values; MaxBoxAccV2: a positive rescaling (exact here)
    for transformed in (heatmap * 4 + 1, heatmap ** 3 * 2, np.exp(heatmap)):
        if len(np.unique(transformed)) == len(np.unique(heatmap)):  # no two values merged by rounding
            assert pointing_hit(transformed, mask, box, tolerance) == values["pointing_hit"]
    assert maxboxacc_state(heatmap * 4, box) == values["maxboxacc_state"]


# --- masks from the datasets --------------------------------------------------------------------------

def test_class_masks_of_each_layout(tmp_path):
    from test_datasets import write_ade_full, write_scene_parsing

    from camloc.datasets import load_dataset

    write_ade_full(tmp_path / "full")
    [item] = load_dataset("ade20k-scenes", data_root_dir=tmp_path / "full")
    masks = item.masks()
    sky = masks[5]                                    # SCENES index of sky + 1
    assert sky.shape == (10, 20) and sky.sum() == 20 and sky[:4, :5].all()   # the visible half only
    [amodal] = load_dataset("ade20k-scenes", data_root_dir=tmp_path / "full", ade_extent="amodal")
    assert amodal.masks()[5].sum() == 40
    write_scene_parsing(tmp_path / "sp")
    with pytest.warns(UserWarning, match="no snow"):
        [item] = load_dataset("ade20k-scenes", data_root_dir=tmp_path / "sp")
    assert item.masks()[10].sum() == 8                # road
    ann, images = coco_with_polygons(tmp_path / "coco")
    first = load_dataset("coco", ann_file=ann, image_dir=images)[0]
    (cat, mask), = first.masks().items()
    assert mask.dtype == bool and mask.shape == (320, 320) and mask.mean() == pytest.approx(first.pairs[0].coverage)


def coco_with_polygons(folder: Path):
    """The demo set with a polygon per annotation (its box, the bottom-right corner cut off)."""
    folder.mkdir(parents=True)
    shutil.copytree(DEMO_DIR / "images", folder / "images")
    data = json.loads((DEMO_DIR / "instances_demo.json").read_text())
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h * 0.6, x, y + h]]
    (folder / "ann.json").write_text(json.dumps(data))
    return folder / "ann.json", folder / "images"


# --- eval and rescore -------------------------------------------------------------------------------

def _eval(out, ann, images, *extra):
    return runner.invoke(app, ["eval", "--method", "gradcam,layercam", "--model", "tiny-rn", "--ann-file", str(ann),
                               "--image-dir", str(images), "--out", str(out), "--no-progress", "--device", "cpu",
                               *extra])


def _records(run_dir):
    rows = [json.loads(line) for p in sorted(Path(run_dir).glob("pairs*.jsonl")) for line in p.read_text().splitlines()]
    for row in rows:
        row.pop("seconds", None)  # wall time: the one field two runs never share
    return sorted(rows, key=lambda r: (r["image_id"], r["category_id"], r["method"]))


def test_rescore_reproduces_the_live_values_without_the_model(tmp_path, monkeypatch):
    ann, images = coco_with_polygons(tmp_path / "data")
    live = tmp_path / "live"
    result = _eval(live, ann, images, "--protocols", ALL, "--save-heatmaps")
    assert result.exit_code == 0, result.output
    assert json.loads((live / "config.json").read_text())["protocols"] == ALL.split(",")

    import camloc.models.clip_model

    def no_model(*args, **kwargs):
        raise AssertionError("rescore loaded a model")

    monkeypatch.setattr(camloc.models.clip_model.ClipModel, "load", classmethod(no_model))
    out = tmp_path / "re"
    result = runner.invoke(app, ["rescore", str(live), "--protocols", ALL, "--out", str(out), "--ann-file", str(ann),
                                 "--image-dir", str(images), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert _records(out) == _records(live)                      # every field of every record, exactly
    assert (out / "table.csv").read_text() == (live / "table.csv").read_text()
    assert (out / "heatmaps").resolve() == (live / "heatmaps").resolve()
    # a box-only run with saved maps, rescored with every protocol: the live box values unchanged
    boxes = tmp_path / "boxes"
    monkeypatch.undo()
    assert _eval(boxes, ann, images, "--save-heatmaps").exit_code == 0
    monkeypatch.setattr(camloc.models.clip_model.ClipModel, "load", classmethod(no_model))
    more = tmp_path / "more"
    assert runner.invoke(app, ["rescore", str(boxes), "--protocols", ALL, "--out", str(more), "--ann-file", str(ann),
                               "--image-dir", str(images), "--no-progress"]).exit_code == 0
    assert [r["iou"] for r in _records(more)] == [r["iou"] for r in _records(boxes)]
    assert _records(more) == _records(live)


def test_two_rescored_shards_merge_to_one_process(tmp_path):
    ann, images = coco_with_polygons(tmp_path / "data")
    live = tmp_path / "live"
    assert _eval(live, ann, images, "--save-heatmaps").exit_code == 0
    args = ["rescore", str(live), "--protocols", ALL, "--ann-file", str(ann), "--image-dir", str(images),
            "--no-progress"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "one")]).exit_code == 0
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "two"), "--shard", "0/2"])
    assert first.exit_code == 0 and "shard 0/2 done" in first.output
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "two"), "--shard", "1/2"]).exit_code == 0
    assert (tmp_path / "two" / "table.csv").read_text() == (tmp_path / "one" / "table.csv").read_text()
    merged = runner.invoke(app, ["report", str(tmp_path / "two"), "--format", "csv"])
    single = runner.invoke(app, ["report", str(tmp_path / "one"), "--format", "csv"])
    assert merged.stdout == single.stdout and "maxboxacc_v2" in single.stdout


def test_rescore_refuses_runs_without_maps_and_other_data(tmp_path):
    ann, images = coco_with_polygons(tmp_path / "data")
    plain = tmp_path / "plain"
    assert _eval(plain, ann, images).exit_code == 0
    result = runner.invoke(app, ["rescore", str(plain), "--protocols", "pointing", "--out", str(tmp_path / "x"),
                                 "--ann-file", str(ann), "--image-dir", str(images)])
    assert result.exit_code == 2 and "without --save-heatmaps" in result.stderr
    saved = tmp_path / "saved"
    assert _eval(saved, ann, images, "--save-heatmaps").exit_code == 0
    data = json.loads(ann.read_text())
    data["annotations"] = data["annotations"][1:]  # another annotation file of the same images
    (tmp_path / "fewer.json").write_text(json.dumps(data))
    other = runner.invoke(app, ["rescore", str(saved), "--protocols", "pointing", "--out", str(tmp_path / "y"),
                                "--ann-file", str(tmp_path / "fewer.json"), "--image-dir", str(images)])
    assert other.exit_code == 2 and "is not the data" in other.stderr and "--ann-file" in other.stderr


def test_rescore_of_float16_maps_says_so_and_old_float16_runs_are_not_resumed(tmp_path):
    ann, images = coco_with_polygons(tmp_path / "data")
    half = tmp_path / "half"
    assert _eval(half, ann, images, "--save-heatmaps", "--heatmap-dtype", "float16").exit_code == 0
    assert _records(half) == _records(_eval_ok(tmp_path / "plain", ann, images))  # the records: the live maps
    result = runner.invoke(app, ["rescore", str(half), "--protocols", "box", "--out", str(tmp_path / "r"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "from its float16 maps" in result.stdout and "can differ from the source's own" in result.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["faults"]["heatmap_dtype"] == "float16"
    bad = _eval(tmp_path / "x", ann, images, "--save-heatmaps", "--heatmap-dtype", "bfloat16")
    assert bad.exit_code == 2 and "--heatmap-dtype 'bfloat16'" in bad.stderr
    # a run of camloc before 2026-12 scored its stored float16 maps: resuming it now would mix two kinds of records
    config = json.loads((half / "config.json").read_text())
    (half / "config.json").write_text(json.dumps({**config, "heatmaps": "float16"}))
    again = _eval(half, ann, images, "--save-heatmaps", "--heatmap-dtype", "float16")
    assert again.exit_code == 2 and "differs in: heatmaps" in again.stderr


def _eval_ok(out, ann, images, *extra):
    result = _eval(out, ann, images, *extra)
    assert result.exit_code == 0, result.output
    return out


def _summary_values(run_dir):
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    methods = {m: {k: v for k, v in values.items() if k != "pairs_per_second"}  # wall time (none when rescored)
               for m, values in summary["methods"].items()}
    return methods, summary["n_pairs"], summary["config"]["data"]


def test_rescore_and_resume_read_the_data_where_the_run_read_it(tmp_path, monkeypatch):
    """Eval with --data-root X from one working folder; rescore (and resume) from another with no data
    options read X again, as the run's config.json records it; with X moved, one line naming it."""
    from test_datasets import real_ade_full

    data = tmp_path / "X"
    real_ade_full(data)  # the real full-release ADE20K files
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    args = ["eval", "--dataset", "ade20k-scenes", "--split", "training", "--model", "tiny-rn", "--method", "gradcam",
            "--protocols", "box,mask-iou", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--data-root", str(data), "--save-heatmaps"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    image_dir = data / "ADE20K_2021_17_01" / "images" / "ADE" / "training"
    assert config["data_sources"] == {"data_root": str(data), "split": "training", "ann_file": None,
                                      "image_dir": str(image_dir)}
    methods, n_pairs, _ = _summary_values(tmp_path / "run")
    assert n_pairs == 2 and set(methods["gradcam"]) >= {"mean_iou", "mask_iou"}

    monkeypatch.chdir(tmp_path / "second")  # no ./data here, and no data option given
    result = runner.invoke(app, ["rescore", str(tmp_path / "run"), "--protocols", "box,mask-iou", "--out", "new",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert _summary_values("new") == _summary_values(tmp_path / "run")
    assert _records("new") == _records(tmp_path / "run")
    assert json.loads(Path("new/config.json").read_text())["data_sources"] == config["data_sources"]
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "data_sources": {"data_root": "/elsewhere"}}))
    report = runner.invoke(app, ["report", str(tmp_path / "run"), "new", "--format", "csv"])
    assert report.exit_code == 0 and len(report.stdout.strip().splitlines()) == 2, report.output  # one identity
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    # a resumed eval from here, with no data option: the recorded data, nothing recomputed
    result = runner.invoke(app, [*args, "--save-heatmaps"])
    assert result.exit_code == 0, result.output
    assert "0 new records, 2 resumed" in result.output

    data.rename(tmp_path / "Y")  # the data moved
    for command in (["rescore", str(tmp_path / "run"), "--protocols", "box,mask-iou", "--out", "newer"],
                    [*args, "--save-heatmaps"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2
        [line] = result.stderr.strip().splitlines()
        assert str(image_dir) in line and "does not exist now" in line and "--data-root" in line, line
    assert not Path("newer").exists()
    # an option given overrides what the run recorded
    result = runner.invoke(app, ["rescore", str(tmp_path / "run"), "--protocols", "box,mask-iou", "--out", "newer",
                                 "--data-root", str(tmp_path / "Y"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert _summary_values("newer")[0] == _summary_values(tmp_path / "run")[0]
    assert json.loads(Path("newer/config.json").read_text())["data_sources"]["data_root"] == str(tmp_path / "Y")
