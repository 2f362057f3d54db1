"""Faults handled as documented: unreadable images, bad ground truth, CUDA out-of-memory in masked
scoring, NaN and constant heatmaps."""
import json

import numpy as np
import pytest
import torch
from test_datasets import write_coco
from typer.testing import CliRunner

from camloc.cams import CamContext, compute_heatmaps
from camloc.cams.postprocess import native_to_raw, to_native
from camloc.cli.app import app
from camloc.datasets import ImagePairs, Pair
from camloc.datasets.records import sanitize_boxes
from camloc.evaluators import best_iou, box_from_heatmap

runner = CliRunner()


def test_unreadable_image_is_skipped_counted_and_retried_on_rerun(tmp_path):
    write_coco(tmp_path / "data")
    image = tmp_path / "data" / "val2017" / "000000000007.jpg"
    good = image.read_bytes()
    image.write_bytes(good[:20])  # truncated
    args = ["eval", "--method", "gradcam", "--model", "tiny-rn", "--dataset", "coco", "--data-root",
            str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "skipped image 7 (2 pairs)" in result.output and "could not be read as an image" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["image_id"] for s in summary["faults"]["skipped_images"]] == [7]
    assert summary["methods"]["gradcam"]["n_pairs"] == 1 and summary["complete"] is False
    image.write_bytes(good)  # fixed: the rerun evaluates exactly the skipped pairs
    again = runner.invoke(app, args)
    assert again.exit_code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["timings"]["records_this_invocation"] == 2 and summary["complete"] is True
    assert summary["faults"]["skipped_images"] == []


def test_ground_truth_outside_or_empty():
    pairs = [Pair(1, "a.jpg", (10, 8), 1, "a", "a", [[-3, 2, 5, 12], [4, 4, 4, 7], [20, 20, 30, 30]]),
             Pair(1, "a.jpg", (10, 8), 2, "b", "b", [[0, 0, 0, 0]]),
             Pair(1, "a.jpg", (10, 8), 3, "c", "c", [[1, 1, 3, 3]])]
    clean, counts = sanitize_boxes([ImagePairs("a.jpg", 1, pairs)])
    assert counts == {"clipped_boxes": 1, "dropped_boxes": 3, "skipped_pairs": 1}
    assert [p.category for p in clean[0].pairs] == ["a", "c"]
    assert clean[0].pairs[0].gt_boxes == [[0, 2, 5, 8]]
    assert clean[0].pairs[1] is pairs[2]  # untouched pairs are kept as they are


def test_cuda_out_of_memory_halves_the_chunk_and_gives_the_same_maps(tiny_rn, chelsea, monkeypatch):
    expected = compute_heatmaps(tiny_rn, chelsea, ["cat"], ["scorecam", "groupcam"], {"chunk_size": 16})
    original = type(tiny_rn.visual).forward

    def small_memory(self, x):
        if x.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, x)

    monkeypatch.setattr(type(tiny_rn.visual), "forward", small_memory)
    ctx = CamContext(tiny_rn, chelsea, ["cat"], {"chunk_size": 16}, methods=["scorecam", "groupcam"])
    got = compute_heatmaps(tiny_rn, chelsea, ["cat"], ["scorecam", "groupcam"], context=ctx)
    assert ctx.oom_retries >= 1 and ctx.chunk_size <= 4  # later chunks use the smaller size
    for method in expected:
        np.testing.assert_allclose(got[method], expected[method], atol=1e-6)


def test_nan_and_constant_heatmaps_give_deterministic_finite_results():
    nan_maps = torch.full((2, 4, 4), float("nan"))
    nan_maps[1, 0, 0] = 1.0
    for kind in ("grid", "resize_minmax", "resize"):
        raw = native_to_raw(kind, to_native(kind, nan_maps), (30, 20))
        assert np.isfinite(raw).all()
        assert box_from_heatmap(raw[0]) == [0, 0, 1, 1]  # all-NaN -> all zero -> no contour
    constant = native_to_raw("grid", to_native("grid", torch.ones(1, 4, 4)), (30, 20))[0]
    assert not constant.any() and box_from_heatmap(constant) == [0, 0, 1, 1]
    assert best_iou([0, 0, 1, 1], [[0, 0, 30, 20]]) == pytest.approx(4 / (31 * 21 + 1e-6))


def test_faults_are_reported_on_the_command_line(tmp_path, monkeypatch):
    """Out-of-image ground truth and CUDA out-of-memory: exit code 0 and a note saying what happened."""
    from clip.model import ModifiedResNet

    write_coco(tmp_path / "data")
    ann = tmp_path / "data" / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][3]["bbox"] = [2, 2, 30, 12]  # the dining table reaches past the 16 px image
    ann.write_text(json.dumps(data))
    original = ModifiedResNet.forward

    def small_memory(self, x):
        if x.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, x)

    monkeypatch.setattr(ModifiedResNet, "forward", small_memory)
    result = runner.invoke(app, ["eval", "--method", "scorecam", "--model", "tiny-rn", "--dataset", "coco",
                                 "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                 "--no-progress", "--chunk-size", "16"])
    assert result.exit_code == 0, result.output
    assert "1 ground-truth boxes clipped to the image, 0 empty boxes dropped, 0 pairs without boxes skipped" in \
        result.output
    assert "CUDA out-of-memory batches split and retried" in result.output
    faults = json.loads((tmp_path / "run" / "summary.json").read_text())["faults"]
    assert faults["clipped_boxes"] == 1 and faults["oom_retries"] >= 1
    records = [json.loads(line) for line in (tmp_path / "run" / "pairs.jsonl").read_text().splitlines()]
    table = next(r for r in records if r["category"] == "dining table")
    assert table["gt_boxes"] == [[2, 2, 16, 14]]
