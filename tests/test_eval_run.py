"""`camloc eval` on the shipped demo set: the run folder, resume after a crash, config guard."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from camloc.datasets import count_pairs, load_dataset
from camloc.errors import CamlocError
from camloc.run.eval import run_eval
from camloc.run.identity import EvalConfig

METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam"]


def _config(**kw):
    return EvalConfig(model=kw.pop("model", "tiny-rn"), methods=list(METHODS), dataset="demo", **kw)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "pairs.jsonl").read_text().splitlines()]


def _keys(records):
    return sorted((r["image_id"], r["category_id"], r["method"]) for r in records)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    summary = run_eval(_config(), run_dir, device="cpu", progress=False)
    return run_dir, summary


def test_demo_set_is_shipped():
    images = load_dataset("demo")
    assert len(images) == 10
    assert count_pairs(images) == 13
    assert all(os.path.exists(item.path) for item in images)
    coffee = next(i for i in images if i.path.endswith("coffee.jpg"))
    assert [p.category for p in coffee.pairs] == ["cup", "spoon", "dining table"]
    assert coffee.pairs[0].gt_boxes == [[92, 8, 218, 164]]


def test_run_folder_contents(reference_run):
    run_dir, summary = reference_run
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.json", "pairs.jsonl", "summary.json", "table.csv",
                                                          "table.md"]
    records = _records(run_dir)
    assert len(records) == 13 * len(METHODS) and len(set(map(tuple, _keys(records)))) == len(records)
    for key in ["image_id", "file_name", "category", "prompt", "model", "method", "box", "gt_boxes", "iou"]:
        assert key in records[0]
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ["config", "versions", "git_commit", "seed", "device", "timings", "methods"]:
        assert key in saved
    table = pd.read_csv(run_dir / "table.csv")
    assert list(table["method"]) == METHODS
    for method in METHODS:
        mine = [r["iou"] for r in records if r["method"] == method]
        row = table[table["method"] == method].iloc[0]
        assert row["n_pairs"] == 13 == saved["methods"][method]["n_pairs"]
        assert row["mean_iou"] == pytest.approx(sum(mine) / 13, abs=1e-6)
        assert row["acc@0.5"] == pytest.approx(sum(i >= 0.5 for i in mine) / 13)
    assert "| gradcam " in (run_dir / "table.md").read_text()


def test_records_are_recomputable(reference_run):
    """Each record's box and IoU are what the library computes for that pair."""
    from camloc.cams import compute_heatmaps
    from camloc.datasets.registry import DEMO_DIR
    from camloc.evaluators import best_iou, box_from_heatmap
    from camloc.models import ClipModel, load_image

    run_dir, _ = reference_run
    record = next(r for r in _records(run_dir) if r["category"] == "spoon" and r["method"] == "gradcam++")
    model = ClipModel.load("tiny-rn", device="cpu")
    heatmap = compute_heatmaps(model, load_image(DEMO_DIR / "images" / record["file_name"]), ["spoon"],
                               ["gradcam++"])["gradcam++"][0]
    assert record["box"] == box_from_heatmap(heatmap)
    assert record["iou"] == best_iou(record["box"], record["gt_boxes"])


def test_resume_after_torn_write_equals_uninterrupted(reference_run, tmp_path):
    ref_dir, _ = reference_run
    lines = (ref_dir / "pairs.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "config.json").write_text((ref_dir / "config.json").read_text())
    # a crash after 13 records, in the middle of writing the 14th
    (tmp_path / "pairs.jsonl").write_text("".join(lines[:13]) + lines[13][:40])
    summary = run_eval(_config(), tmp_path, device="cpu", progress=False)
    assert summary["timings"]["resumed_records"] == 13
    assert summary["timings"]["records_this_invocation"] == len(lines) - 13
    assert _keys(_records(tmp_path)) == _keys(_records(ref_dir))
    assert (tmp_path / "table.csv").read_text() == (ref_dir / "table.csv").read_text()


def test_killed_run_resumes_to_the_same_table(reference_run, tmp_path):
    ref_dir, _ = reference_run
    cmd = [sys.executable, "-m", "camloc", "eval", "--method", ",".join(METHODS), "--model", "tiny-rn",
           "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = tmp_path / "pairs.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and records.stat().st_size > 0:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    partial = len(records.read_text().splitlines())
    assert 0 < partial <= 36
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{partial} resumed" in done.stdout
    final = _records(tmp_path)
    assert _keys(final) == _keys(_records(ref_dir))  # every pair once: none lost, none duplicated
    assert (tmp_path / "table.csv").read_text() == (ref_dir / "table.csv").read_text()


def test_rerun_of_finished_run_computes_nothing(reference_run, tmp_path):
    ref_dir, _ = reference_run
    for name in ("config.json", "pairs.jsonl"):
        (tmp_path / name).write_text((ref_dir / name).read_text())
    summary = run_eval(_config(), tmp_path, device="cpu", progress=False)
    assert summary["timings"]["records_this_invocation"] == 0
    assert (tmp_path / "table.csv").read_text() == (ref_dir / "table.csv").read_text()


def test_run_folder_of_another_config_is_refused(reference_run, tmp_path):
    ref_dir, _ = reference_run
    for name in ("config.json", "pairs.jsonl"):
        (tmp_path / name).write_text((ref_dir / name).read_text())
    with pytest.raises(CamlocError, match=r"different config \(differs in: threshold; threshold: \"otsu\" there, "
                                          r"0.5 now\).*--force-new"):
        run_eval(_config(threshold=0.5), tmp_path, device="cpu", progress=False)
    (tmp_path / "vis" / "gradcam").mkdir(parents=True)
    (tmp_path / "vis" / "gradcam" / "best_00_1_1.jpg").write_bytes(b"stale picture")
    summary = run_eval(_config(threshold=0.5), tmp_path, device="cpu", progress=False, force_new=True)
    assert summary["timings"]["resumed_records"] == 0
    # --force-new once wrote config.json into pairs.jsonl (a reused loop variable): the folder lost its
    # config, and a later run with another threshold resumed the old records
    assert json.loads((tmp_path / "config.json").read_text())["threshold"] == 0.5
    records = _records(tmp_path)
    assert len(records) == 13 * len(METHODS) and all(r["threshold"] == 0.5 for r in records)
    assert not (tmp_path / "vis").exists()  # pictures of the discarded results go too
    again = run_eval(_config(threshold=0.5), tmp_path, device="cpu", progress=False)
    assert again["timings"]["resumed_records"] == 13 * len(METHODS)
    with pytest.raises(CamlocError, match="differs in: threshold"):
        run_eval(_config(threshold=0.3), tmp_path, device="cpu", progress=False)


def test_limit_and_classes(tmp_path):
    summary = run_eval(_config(limit=2, classes=["person"]), tmp_path, device="cpu", progress=False)
    assert summary["n_images"] == 2 and summary["n_pairs"] == 2
    assert {r["category"] for r in _records(tmp_path)} == {"person"}


def test_score_methods_in_eval_record_precision_and_options(tmp_path):
    config = EvalConfig(model="tiny-vit", methods=["all"], dataset="demo", limit=2, options={"topk": 20,
                        "grouping": "kmeans", "start_layer": 0, "rise_masks": 16})
    summary = run_eval(config, tmp_path, device="cpu", progress=False)
    assert summary["precision"] == "fp32" and summary["config"]["precision"] == "fp32"
    assert summary["config"]["options"]["topk"] == 20
    assert set(summary["methods"]) == {"gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "gscorecam",
                                       "gscorecam-abs", "groupcam", "hilacam", "clip-es", "grad-eclip", "legrad", "attnlrp", "maskclip", "sclip", "clearclip", "naclip",
                                       "cliptrase", "scclip", "cliper", "resclip", "gem", "clipsurgery", "rise"}
    assert summary["config"]["options"]["rise_masks"] == 16 and summary["config"]["options"]["seed"] == 0
    assert len(_records(tmp_path)) == 2 * 24


def test_killed_several_times_at_random_points(reference_run, tmp_path):
    """SIGKILL at random moments, three times, then a final run: same records and table, no pair lost
    or duplicated."""
    import random

    ref_dir, _ = reference_run
    cmd = [sys.executable, "-m", "camloc", "eval", "--method", ",".join(METHODS), "--model", "tiny-rn",
           "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
    rng = random.Random(7)
    records = tmp_path / "pairs.jsonl"
    for _ in range(3):
        before = len(records.read_text().splitlines()) if records.exists() else 0
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # wait until this run has written something
            if records.exists() and len(records.read_text().splitlines()) > before:
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _keys(_records(tmp_path)) == _keys(_records(ref_dir))
    assert (tmp_path / "table.csv").read_text() == (ref_dir / "table.csv").read_text()


@pytest.mark.parametrize("method,options", [("clip-es", {}), ("clipsurgery", {"contrast": "dataset"})])
def test_prompt_coupled_methods_resume_to_the_maps_of_a_fresh_run(method, options, tmp_path):
    """CLIP-ES's softmax reads the image's other prompts: an image resumed with one pair left to do is
    still scored with all of its prompts; CLIP Surgery's dataset contrast reads every prompt of the
    dataset, on a resume too."""
    config = lambda: EvalConfig(model="tiny-vit", methods=[method], dataset="demo", limit=6,  # noqa: E731
                                options=dict(options))
    fresh = tmp_path / "fresh"
    run_eval(config(), fresh, device="cpu", progress=False, save_heatmaps=tmp_path / "maps-fresh")
    records = _records(fresh)
    per_image = {}
    for r in records:
        per_image.setdefault(r["image_id"], []).append(r)
    multi = [rs for rs in per_image.values() if len(rs) >= 2]
    assert multi, "the demo subset needs an image with several categories"
    dropped = multi[0][-1]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "config.json").write_text((fresh / "config.json").read_text())
    kept = [line for line, r in zip((fresh / "pairs.jsonl").read_text().splitlines(keepends=True), records)
            if r is not dropped]
    (resumed / "pairs.jsonl").write_text("".join(kept))
    summary = run_eval(config(), resumed, device="cpu", progress=False, save_heatmaps=tmp_path / "maps-resumed")
    assert summary["timings"]["records_this_invocation"] == 1
    again = next(r for r in _records(resumed) if (r["image_id"], r["category_id"]) ==
                 (dropped["image_id"], dropped["category_id"]))
    assert again["box"] == dropped["box"] and again["iou"] == pytest.approx(dropped["iou"], abs=1e-12)
    # the dropped pair's map, recomputed alone into an empty cache, is the fresh run's map
    import numpy as np

    (recomputed,) = [f for f in (tmp_path / "maps-resumed").rglob("*.npz")]
    (original,) = [f for f in (tmp_path / "maps-fresh").rglob("*.npz") if f.relative_to(tmp_path / "maps-fresh")
                   == recomputed.relative_to(tmp_path / "maps-resumed")]
    key = f"c{dropped['category_id']}"
    with np.load(recomputed) as a, np.load(original) as b:
        assert a.files.count(key) == 1
        # float32 maps: the fresh run encoded 6 images in one batch, the resume one alone (rounding only)
        np.testing.assert_allclose(a[key], b[key], atol=1e-5)


def test_clip_surgery_labels_contrast_is_refused_before_any_work(tmp_path):
    config = EvalConfig(model="tiny-vit", methods=["clipsurgery"], dataset="demo", options={"contrast": "labels"})
    with pytest.raises(CamlocError, match="needs at least 2 prompts per image"):
        run_eval(config, tmp_path, device="cpu", progress=False)
    assert not (tmp_path / "pairs.jsonl").exists() or (tmp_path / "pairs.jsonl").read_text() == ""


def test_a_run_written_before_a_new_unused_field_still_resumes(tmp_path):
    """config.json written by a camloc without the `ovseg` field resumes (the field is null: unused); one
    that differs in a real field is still refused."""
    import json as _json

    from typer.testing import CliRunner

    from camloc.cli.app import app

    runner = CliRunner()
    args = ["eval", "--model", "tiny-rn", "--method", "gradcam", "--limit", "2", "--out", str(tmp_path / "r"),
            "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    path = tmp_path / "r" / "config.json"
    config = _json.loads(path.read_text())
    assert config.pop("ovseg") is None
    path.write_text(_json.dumps(config))
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 new records" in again.output
    config["threshold"] = 0.5
    path.write_text(_json.dumps(config))
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "threshold" in refused.stderr
