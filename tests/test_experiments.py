"""Heatmap cache, threshold search (Table S1), configs and `camloc report`."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from camloc.cli.app import app
from camloc.datasets import ImagePairs
from camloc.errors import CamlocError
from camloc.evaluators import best_iou, box_from_heatmap
from camloc.evaluators.threshold import Item, score_items, threshold_grid
from camloc.run.heatmap_cache import HeatmapCache
from camloc.run.threshold_search import search_and_score

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_threshold_grid():
    grid = threshold_grid()
    assert len(grid) == 20 and grid[0] == 0.0 and grid[-1] == 0.95 and grid[9] == 0.45
    assert threshold_grid(0.2, 0.4, 0.1) == [0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="grid"):
        threshold_grid(0.5, 0.2, 0.1)


def _rings(outer: float, inner: float, size=(40, 30)):
    """A heatmap (H, W) = 30 x 40: background 0, a ring at `outer`, a core at `inner`, a 2x2 peak at 1.
    Foreground under threshold t: the ring's box when t < outer, the core's box when outer <= t < inner,
    the peak's box above. The ground truth is the core's box, so the optimal thresholds are those with
    round(255 outer) <= round(255 t) < round(255 inner)."""
    w, h = size
    m = np.zeros((h, w), np.float32)
    m[3:27, 4:36] = outer
    m[8:22, 10:30] = inner
    m[14:16, 19:21] = 1.0
    return m, [[10, 8, 30, 22]]


def test_search_selects_the_threshold_known_by_construction():
    # item A is right for t in 0.35..0.60; item B only for t = 0.45 (its ring at 0.42, core at 0.47):
    # 0.45 is the one grid value that is optimal for both
    a, gt_a = _rings(0.32, 0.62)
    b, gt_b = _rings(0.42, 0.47)
    train = [Item("resize", a, (40, 30), gt_a), Item("resize", b, (40, 30), gt_b)]
    c, gt_c = _rings(0.2, 0.5)  # val: core box for 0.2 <= t < 0.5
    d, gt_d = _rings(0.5, 0.9)  # val: ring box (IoU < 1) for t < 0.5
    val = [Item("resize", c, (40, 30), gt_c), Item("resize", d, (40, 30), gt_d)]
    grid = threshold_grid()
    result = search_and_score(train, val, grid, workers=1)
    assert result["threshold"] == 0.45
    curve = np.array(result["curve"])
    assert curve[grid.index(0.45)] == pytest.approx(1.0, abs=1e-5) and (curve[:9] < 0.99).all()
    # the columns as specified: val mean IoU of Algorithm 1 with t = 0.45, and with Otsu
    single = np.mean([best_iou(box_from_heatmap(m, 0.45), gt) for m, gt in ((c, gt_c), (d, gt_d))])
    otsu = np.mean([best_iou(box_from_heatmap(m, "otsu"), gt) for m, gt in ((c, gt_c), (d, gt_d))])
    assert result["single"] == pytest.approx(single) and result["otsu"] == pytest.approx(otsu)
    assert result["difference"] == pytest.approx(otsu - single)
    assert result["single"] < 1.0  # item d's core starts at 0.5: t = 0.45 gives its ring


def test_parallel_scoring_equals_serial():
    rng = np.random.default_rng(0)
    items = []
    for i in range(80):
        m = rng.random((6, 6)).astype(np.float32)
        items.append(Item("grid", m, (50 + i % 7, 40), [[5, 5, 30, 30]]))
    grid = threshold_grid(0, 0.9, 0.1)
    np.testing.assert_array_equal(score_items(items, grid, workers=1), score_items(items, grid, workers=2))


def test_eval_save_heatmaps_rederives_the_maps(tmp_path):
    from camloc.cams import compute_heatmaps
    from camloc.datasets.registry import DEMO_DIR
    from camloc.models import ClipModel, load_image
    from camloc.run.eval import run_eval
    from camloc.run.identity import EvalConfig

    config = EvalConfig(model="tiny-rn", methods=["gradcam", "groupcam"], dataset="demo", limit=2)
    from camloc.datasets import load_dataset
    from camloc.run.heatmap_cache import dataset_key

    run_eval(config, tmp_path, device="cpu", progress=False, save_heatmaps=tmp_path / "heatmaps")
    key = dataset_key("demo", None, "{}", load_dataset("demo", limit=2))
    assert key.startswith("demo-d")
    cache = HeatmapCache(tmp_path / "heatmaps", "tiny-rn", key, config.options, "fp32")
    model = ClipModel.load("tiny-rn", device="cpu")
    live = compute_heatmaps(model, load_image(DEMO_DIR / "images" / "astronaut.jpg"), ["person"],
                            ["gradcam", "groupcam"])
    for method in ("gradcam", "groupcam"):
        kind, native, size = cache.get(method, 1, 1)
        assert native.dtype == np.float32 and size == (320, 320)  # float32 by default: the run's own maps
        assert native.shape == ((4, 4) if method == "gradcam" else (128, 128))
        raw = cache.raw(method, 1, 1)
        np.testing.assert_allclose(raw, live[method][0], atol=1e-6)
        np.testing.assert_array_equal(raw, cache.raw(method, 1, 1))  # deterministic
    assert "groupcam-grouping=kmeans-fp32-f32" in str(cache.path("groupcam", 1))
    # opt-in float16 storage: a cache of its own, half the size, maps within float16's rounding
    half = tmp_path / "half"
    run_eval(EvalConfig(model="tiny-rn", methods=["gradcam"], dataset="demo", limit=2), half, device="cpu",
             progress=False, save_heatmaps=half / "heatmaps", heatmap_dtype="float16")
    small = HeatmapCache(half / "heatmaps", "tiny-rn", key, config.options, "fp32", dtype="float16")
    kind, native, size = small.get("gradcam", 1, 1)
    assert native.dtype == np.float16 and str(small.path("gradcam", 1)).count("-f16") == 1
    np.testing.assert_allclose(small.raw("gradcam", 1, 1), live["gradcam"][0], atol=2e-3)
    assert json.loads((half / "config.json").read_text())["heatmaps"] == "cache:float16"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_saving_heatmaps_does_not_change_the_records(tmp_path, dtype):
    """A run's numbers do not depend on whether (or in which precision) its maps are cached: the records
    come from the live float32 maps either way (issue 30: the float16 cache moved SCLIP's mean IoU)."""
    from camloc.run.eval import run_eval
    from camloc.run.identity import EvalConfig

    methods = ["gradcam", "sclip", "maskclip", "gem", "scorecam"]
    plain = run_eval(EvalConfig(model="tiny-vit", methods=methods, dataset="demo"), tmp_path / "plain",
                     device="cpu", progress=False)
    saved = run_eval(EvalConfig(model="tiny-vit", methods=methods, dataset="demo"), tmp_path / "saved",
                     device="cpu", progress=False, save_heatmaps=tmp_path / "saved" / "heatmaps", heatmap_dtype=dtype)

    def records(run):
        rows = [json.loads(line) for line in (tmp_path / run / "pairs.jsonl").read_text().splitlines()]
        return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in rows),  # wall time differs
                      key=lambda r: (r["image_id"], r["category_id"], r["method"]))

    assert records("plain") == records("saved")
    rate = "pairs_per_second"  # wall time differs
    assert ({m: {k: v for k, v in s.items() if k != rate} for m, s in plain["methods"].items()}
            == {m: {k: v for k, v in s.items() if k != rate} for m, s in saved["methods"].items()})


def test_smoke_threshold_search_and_rerun_without_the_model(tmp_path, monkeypatch):
    out = tmp_path / "s1"
    result = runner.invoke(app, ["threshold-search", "--config", str(REPO / "configs" / "smoke.toml"), "--out",
                                 str(out), "--no-progress", "--workers", "1"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "table_s1.csv")
    assert list(table.columns) == ["label", "model", "method", "threshold", "single", "otsu", "difference"]
    assert list(table["label"]) == ["GradCAM (tiny-rn)", "GradCAM++ (tiny-rn)", "xGradCAM (tiny-rn)",
                                    "GroupCAM (tiny-rn)", "LayerCAM (tiny-rn)", "ScoreCAM (tiny-rn)",
                                    "gScoreCAM (tiny-rn)", "Hila's method (tiny-vit)", "ScoreCAM (tiny-vit)",
                                    "gScoreCAM (tiny-vit)", "Mean"]
    body = table.iloc[:-1]
    np.testing.assert_allclose(body["difference"], body["otsu"] - body["single"], atol=1e-6)
    assert table.iloc[-1]["single"] == pytest.approx(body["single"].mean(), abs=1e-6)
    assert "| method " in (out / "table_s1.md").read_text() and "%" in (out / "table_s1.md").read_text()
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 10 * 20
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    first = json.loads((out / "summary.json").read_text())
    assert first["models_loaded"] == 2 and first["pairs_computed"] == 26
    sources = json.loads((out / "config.json").read_text())["data_sources"]  # where each split was read from
    assert set(sources) == {"train", "val"} and all(Path(v).is_absolute() for s in sources.values()
                                                    for v in s.values() if v)
    assert any(sources["train"].values())
    assert [run["encoder"] for run in first["runs"]] == [{"compiled": False}] * 2  # --compile auto: off on the CPU

    from camloc.models import ClipModel

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every heatmap is cached")

    monkeypatch.setattr(ClipModel, "load", no_model)
    again = runner.invoke(app, ["threshold-search", "--config", str(REPO / "configs" / "smoke.toml"), "--out",
                                str(out), "--no-progress", "--workers", "1"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "summary.json").read_text())["models_loaded"] == 0
    assert [run["encoder"] for run in json.loads((out / "summary.json").read_text())["runs"]] == [None, None]
    pd.testing.assert_frame_equal(pd.read_csv(out / "table_s1.csv"), table)


def test_config_unknown_key_and_cli_override(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[eval]\nmodels = ["tiny-rn"]\nmethods = ["gradcam"]\nout = "x"\nlimt = 2\n')
    result = runner.invoke(app, ["eval", "--config", str(bad)])
    assert result.exit_code == 2 and "unknown key(s) limt in [eval]" in result.output
    good = tmp_path / "good.toml"
    good.write_text(f'[eval]\nmodels = ["tiny-rn"]\nmethods = ["gradcam"]\nout = "{tmp_path / "run"}"\nlimit = 3\n'
                    'device = "cpu"\n')
    result = runner.invoke(app, ["eval", "--config", str(good), "--limit", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["limit"] == 1 and written["methods"] == ["gradcam"]  # the CLI wins over the file
    with pytest.raises(CamlocError, match="no \\[threshold_search\\] table"):
        from camloc.config import load_config

        load_config(good, "threshold_search")


def test_report_merges_shards_exactly_and_formats(tmp_path):
    from camloc.report.tables import build_report, render
    from camloc.run.eval import run_eval
    from camloc.run.identity import EvalConfig

    whole = tmp_path / "whole"
    run_eval(EvalConfig(model="tiny-rn", methods=["gradcam", "layercam"], dataset="demo"), whole, device="cpu",
             progress=False)
    lines = (whole / "pairs.jsonl").read_text().splitlines(keepends=True)
    for i, part in enumerate((lines[::2], lines[1::2])):  # two "shards" of the same run
        shard = tmp_path / f"shard{i}"
        shard.mkdir()
        shutil.copy(whole / "config.json", shard / "config.json")
        (shard / "pairs.jsonl").write_text("".join(part))
    merged = build_report([tmp_path / "shard0", tmp_path / "shard1"], "long")
    single = pd.read_csv(whole / "table.csv")
    assert list(merged["method"]) == ["gradcam", "layercam"]
    np.testing.assert_allclose(merged["mean_iou"], single["mean_iou"], atol=1e-6)
    assert list(merged["n_pairs"]) == [13, 13]
    both = build_report([whole, tmp_path / "shard0"], "long")  # overlapping folders: each pair counted once
    assert list(both["n_pairs"]) == [13, 13]
    s3 = build_report([whole], "s3")
    assert list(s3.columns) == ["model", "GradCAM", "LayerCAM"]
    assert "\\begin{tabular}" in render(s3, "latex") and render(s3, "csv").startswith("model,GradCAM")
    with pytest.raises(CamlocError, match="not a camloc run folder"):
        build_report([tmp_path], "long")


S1_ROWS = [("RN50x16", m) for m in ["gradcam", "gradcam++", "xgradcam", "groupcam", "layercam", "scorecam",
                                    "gscorecam"]] + [("ViT-B/32", m) for m in ["hilacam", "scorecam", "gscorecam"]]


def test_report_s1_has_exactly_the_appendix_rows_and_columns(tmp_path):
    from camloc.report.tables import build_report
    from camloc.run.threshold_search import row_label, table_s1

    out = tmp_path / "s1"
    out.mkdir()
    rows = [{"label": row_label(x, m), "model": m, "method": x, "threshold": 0.5, "single": 0.1 + i / 100,
             "otsu": 0.11 + i / 100, "difference": 0.01} for i, (m, x) in enumerate(S1_ROWS)]
    table_s1(rows).to_csv(out / "table_s1.csv", index=False)
    table = build_report([out], "s1", compare_paper=True)
    assert list(table["method"]) == ["GradCAM", "GradCAM++", "xGradCAM", "GroupCAM", "LayerCAM", "ScoreCAM",
                                     "gScoreCAM", "Hila's method (ViT-B/32)", "ScoreCAM (ViT-B/32)",
                                     "gScoreCAM (ViT-B/32)", "Mean"]
    assert list(table.columns) == ["method", "single value", "Otsu", "difference", "paper single value",
                                   "paper Otsu", "paper difference"]
    gscore = table[table["method"] == "gScoreCAM"].iloc[0]
    assert (gscore["paper single value"], gscore["paper Otsu"]) == pytest.approx((20.27, 20.83))
    assert gscore["paper difference"] == pytest.approx(0.56)
    assert gscore["single value"] == pytest.approx(16.0) and gscore["difference"] == pytest.approx(1.0)
    assert table.iloc[-1][["paper single value", "paper Otsu", "paper difference"]].tolist() == [11.67, 11.49, -0.18]


def test_report_s3_has_exactly_the_appendix_rows_and_columns(tmp_path):
    from camloc.report.tables import build_report

    methods = ["gradcam", "gradcam++", "xgradcam", "groupcam", "layercam", "gscorecam", "scorecam"]
    dirs = []
    for model in ("RN50x16", "RN50x4"):
        run = tmp_path / model
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"dataset": "ade20k-scenes"}))
        records = [{"model": model, "method": m, "image_id": f"ADE_val_{i}", "category_id": 5, "category": "sky",
                    "iou": 0.1 * (j + 1) if i == 0 else 0.0} for j, m in enumerate(methods) for i in range(2)]
        (run / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        dirs.append(run)
    table = build_report(dirs, "s3")
    assert list(table.columns) == ["model", "GradCAM", "GradCAM++", "xGradCAM", "GroupCAM", "LayerCAM", "gScoreCAM",
                                   "ScoreCAM"]
    assert list(table["model"]) == ["RN50x4", "RN50x16"]  # the appendix's order
    assert table.iloc[0]["ScoreCAM"] == pytest.approx(0.35)
    compared = build_report(dirs, "s3", compare_paper=True)
    assert list(compared["model"]) == ["RN50x4", "RN50x4 (paper)", "RN50x4 (difference)", "RN50x16",
                                       "RN50x16 (paper)", "RN50x16 (difference)"]
    assert compared.iloc[1]["gScoreCAM"] == 0.211 and compared.iloc[4]["GradCAM"] == 0.141
    assert compared.iloc[2]["ScoreCAM"] == pytest.approx(0.35 - 0.198)


def test_cache_keys_name_the_default_split_so_eval_and_threshold_search_share_them():
    from camloc.run.heatmap_cache import dataset_key

    assert dataset_key("coco", None, "{}") == dataset_key("coco", "val2017", "{}") == "coco-val2017"
    assert dataset_key("coco-train-balanced", None, "{}") == "coco-train-balanced-train2017"
    assert dataset_key("ade20k-scenes", None, "{}") == "ade20k-scenes-validation"
    assert dataset_key("partimagenet", None, "{}") == "partimagenet-test"
    assert dataset_key("demo", None, "{}") == "demo"
    assert dataset_key("coco", "train2017", "{}") != dataset_key("coco", None, "{}")
    assert dataset_key("coco", None, "a photo of a {}").startswith("coco-val2017-t")
    # another data root or image folder: its own key (the folder of the images, hashed)
    here = [ImagePairs("/data/a/val2017/1.jpg", 1, []), ImagePairs("/data/a/val2017/2.jpg", 2, [])]
    there = [ImagePairs("/data/b/val2017/1.jpg", 1, [])]
    assert dataset_key("coco", None, "{}", here).startswith("coco-val2017-d")
    assert dataset_key("coco", None, "{}", here) == dataset_key("coco", None, "{}", here[:1])
    assert dataset_key("coco", None, "{}", here) != dataset_key("coco", None, "{}", there)


def test_cache_entries_know_their_image_and_prompts(tmp_path):
    """An entry made from another image file or prompt (another annotation file reusing the image
    ids) is not taken as cached, is replaced when recomputed, and is an error if read."""
    from camloc.datasets import Pair

    cache = HeatmapCache(tmp_path, "tiny-rn", "demo", {}, "fp32")
    pair = Pair(1, "a.jpg", (8, 8), 3, "dog", "dog")
    item = ImagePairs(str(tmp_path / "a.jpg"), 1, [pair])
    cache.put_native(item, [pair], ["dog"], {"gradcam": ("upsample", np.ones((1, 2, 2), np.float32))}, (8, 8))
    assert cache.has("gradcam", 1, [3], item.path, {3: "dog"})
    assert not cache.has("gradcam", 1, [3], str(tmp_path / "b.jpg"), {3: "dog"})
    assert not cache.has("gradcam", 1, [3], item.path, {3: "a photo of a dog"})
    with pytest.raises(CamlocError, match="made from another image file or prompt"):
        cache.get("gradcam", 1, 3, str(tmp_path / "b.jpg"), "dog")
    other = ImagePairs(str(tmp_path / "b.jpg"), 1, [pair])
    cache.put_native(other, [pair], ["dog"], {"gradcam": ("upsample", np.zeros((1, 2, 2), np.float32))}, (8, 8))
    assert cache.get("gradcam", 1, 3, other.path, "dog")[1].max() == 0
    assert not cache.has("gradcam", 1, [3], item.path, {3: "dog"})


def test_sharded_threshold_search_splits_the_maps_and_the_last_shard_searches(tmp_path):
    """Two shards fill one cache with disjoint shares; the first to finish reports that it waits, the
    second finds every map cached and writes the same table as one unsharded run."""
    args = ["threshold-search", "--config", str(REPO / "configs" / "smoke.toml"), "--no-progress", "--workers", "1"]
    whole = runner.invoke(app, [*args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    out = tmp_path / "sharded"
    first = runner.invoke(app, [*args, "--out", str(out), "--shard", "0/2"])
    assert first.exit_code == 0, first.output
    assert "shard 0/2:" in first.output and "other shards are still missing maps" in first.output
    assert not (out / "table_s1.csv").exists()
    second = runner.invoke(app, [*args, "--out", str(out), "--shard", "1/2"])
    assert second.exit_code == 0, second.output
    computed = [int(re.search(r"(\d+) heatmaps computed", r.output).group(1)) for r in (first, second)]
    assert 0 < computed[0] < 26 and sum(computed) == 26  # each pair's maps computed once, by one shard
    pd.testing.assert_frame_equal(pd.read_csv(out / "table_s1.csv"), pd.read_csv(tmp_path / "whole" / "table_s1.csv"))
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_report_shows_only_what_differs_between_runs(tmp_path):
    """Two runs that differ in one nested option: the table's column holds that entry, not the whole dict."""
    for topk in ("10", "20"):
        result = runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gscorecam", "--limit", "2",
                                     "--topk", topk, "--out", str(tmp_path / topk), "--no-progress"])
        assert result.exit_code == 0, result.output
    table = runner.invoke(app, ["report", str(tmp_path / "10"), str(tmp_path / "20"), "--format", "csv"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.strip().splitlines()
    assert lines[0].startswith("model,dataset,method,options,") and "topk=10" in lines[1] and "topk=20" in lines[2]
    assert max(len(line) for line in lines) < 200  # no 40-key dict in a cell


def test_results_smoke_is_a_fresh_run(tmp_path, monkeypatch):
    """results/smoke (written by results/smoke/regenerate.sh) holds today's numbers: a fresh run of the smoke
    config's eval table equals the committed one (4 decimals), method for method."""
    import csv

    monkeypatch.chdir(REPO)
    result = runner.invoke(app, ["eval", "--config", "configs/smoke.toml", "--out", str(tmp_path / "eval"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    table = runner.invoke(app, ["report", *sorted(str(p) for p in (tmp_path / "eval").iterdir()), "--layout", "long",
                                "--format", "csv"])
    assert table.exit_code == 0, table.output

    def rows(text):
        return [{k: (f"{float(v):.4f}" if re.fullmatch(r"-?\d+\.\d+(e-?\d+)?", v or "") else v) for k, v in r.items()}
                for r in csv.DictReader(text.splitlines())]

    fresh = rows(table.stdout)
    committed = rows((REPO / "results" / "smoke" / "table_long.csv").read_text())
    assert len(fresh) >= 30 and fresh == committed, "results/smoke is stale: results/smoke/regenerate.sh"
