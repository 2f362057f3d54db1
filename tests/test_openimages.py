"""OpenImages V7 point labels (`openimages-v7-points`, `--protocols points`): the loader on files written in the
published column layout (no real file could be had here: the CSV's columns are those FiftyOne's loader and the public
p-mIoU reconstruction read), a run end to end against the reconstruction's arithmetic, shards, batching, rescore,
the report, bad files, and `camloc data download openimages-v7-points` against a local server."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from camloc.cli.app import app
from camloc.errors import CamlocError

runner = CliRunner()
HEADER = ["ImageId", "X", "Y", "Label", "EstimatedYesNo", "Source", "YesVotes", "NoVotes", "UnsureVotes",
          "TextLabel"]
CLASSES = [("/m/01yrx", "Cat"), ("/m/0bt9lr", "Dog"), ("/m/0k4j", "Car")]


def _reconstruction(heatmap, yes_points, no_points):
    """The public reconstruction's compute_pointwise_miou, written out: min-max with + 1e-8, > 0.5, points (y, x)
    as int(y * H), int(x * W), clipped, IoUs with + 1e-8 (tests/test_explainseg.py checks it by hand)."""
    h = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min() + 1e-8)
    pred = h > 0.5
    H, W = h.shape
    counts = [0, 0, 0, 0]
    for points, yes in ((yes_points, True), (no_points, False)):
        for y, x in points:
            inside = pred[int(np.clip(int(y * H), 0, H - 1)), int(np.clip(int(x * W), 0, W - 1))]
            counts[(0 if inside else 1) if yes else (2 if inside else 3)] += 1
    tp, fn, fp, tn = counts
    return (tp / (tp + fp + fn + 1e-8) + tn / (tn + fp + fn + 1e-8)) / 2, counts


def _rows():
    """Point rows: image a (cat: 3 yes, 2 no, 1 unsure; dog: 2 no only -> no pair), image b (cat 1 yes 1 no; car 2
    yes 2 no), image c (dog 2 yes 1 no), image d (car: annotated, not downloaded)."""
    rng = np.random.default_rng(11)
    rows = []
    plan = {"a": [("/m/01yrx", "yes", 3), ("/m/01yrx", "no", 2), ("/m/01yrx", "unsure", 1), ("/m/0bt9lr", "no", 2)],
            "b": [("/m/0k4j", "yes", 2), ("/m/01yrx", "yes", 1), ("/m/0k4j", "no", 2), ("/m/01yrx", "no", 1)],
            "c": [("/m/0bt9lr", "yes", 2), ("/m/0bt9lr", "no", 1)],
            "d": [("/m/0k4j", "yes", 1)]}
    for image, points in plan.items():
        for label, answer, n in points:
            for _ in range(n):
                rows.append([f"{image}0c1d2e3f4a5b6c7d", f"{rng.uniform(0, 1):.6f}", f"{rng.uniform(0, 1):.6f}", label,
                             answer, "ih", "1", "0", "0", ""])
    return rows


def _write_data(root: Path, rows=None, classes=CLASSES, images=("a", "b", "c")) -> Path:
    base = root / "openimages-v7"
    (base / "validation").mkdir(parents=True, exist_ok=True)
    with open(base / "oidv7-val-annotations-point-labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([HEADER, *(rows if rows is not None else _rows())])
    with open(base / "oidv7-class-descriptions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("LabelName", "DisplayName"), *classes])
    rng = np.random.default_rng(2)
    for name, (h, w) in zip(images, [(40, 56), (48, 36), (44, 44)]):
        image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        image[h // 4: h // 2, w // 3: 2 * w // 3] = (230, 200, 40)
        Image.fromarray(image).save(base / "validation" / f"{name}0c1d2e3f4a5b6c7d.jpg", quality=95)
    return base


def _records(run_dir):
    rows = [json.loads(line) for p in sorted(Path(run_dir).glob("pairs*.jsonl")) for line in p.read_text().splitlines()]
    for row in rows:
        row.pop("seconds", None)
    return sorted(rows, key=lambda r: (str(r["image_id"]), r["category_id"], r["method"]))


def _eval(out, root, *args):
    result = runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam,layercam", "--dataset",
                                 "openimages-v7-points", "--data-root", str(root), "--out", str(out), "--no-progress",
                                 "--device", "cpu", *args])
    return result


def test_loader_builds_box_less_pairs_from_yes_points(tmp_path):
    from camloc.datasets import load_dataset

    _write_data(tmp_path)
    issues = {}
    images = load_dataset("openimages-v7-points", data_root_dir=tmp_path, prompt_template="a photo of a {}.",
                          issues=issues)
    assert issues["images_not_found"] == 1  # image d is annotated, not downloaded
    pairs = {(str(p.image_id)[0], p.category): p for item in images for p in item.pairs}
    assert sorted(pairs) == [("a", "Cat"), ("b", "Car"), ("b", "Cat"), ("c", "Dog")]  # a's dog: no points only
    cat = pairs[("a", "Cat")]
    assert cat.gt_boxes == [] and cat.prompt == "a photo of a Cat." and cat.category_id == 1
    assert cat.image_size == (56, 40)
    assert [yes for _, _, yes in cat.points] == [1, 1, 1, 0, 0]  # the unsure point dropped
    rows = [r for r in _rows() if r[0].startswith("a") and r[3] == "/m/01yrx" and r[4] != "unsure"]
    assert cat.points[0][:2] == pytest.approx([float(rows[0][1]) * 56, float(rows[0][2]) * 40])
    assert pairs[("b", "Car")].category_id == 3


def test_points_run_end_to_end_against_the_reconstruction(tmp_path):
    from camloc.cams import compute_heatmaps
    from camloc.datasets import load_dataset
    from camloc.models import ClipModel, load_image

    root = tmp_path / "data"
    _write_data(root)
    result = _eval(tmp_path / "one", root, "--protocols", "points", "--save-heatmaps", "--image-batch", "1",
                   "--save-vis", "1")
    assert result.exit_code == 0, result.output
    assert "1 annotated images are not in the image folder" in result.output
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    records = _records(tmp_path / "one")
    assert all(r["iou"] is None and len(r["points_counts"]) == 4 for r in records)
    assert summary["faults"]["images_not_found"] == 1
    # the reconstruction's arithmetic on the maps the methods give, with all of an image's prompts as eval runs them
    model = ClipModel.load("tiny-rn", device="cpu")
    table = [r for r in _rows() if r[4] != "unsure"]
    for method in ("gradcam", "layercam"):
        per_pair, per_class = [], {}
        for item in load_dataset("openimages-v7-points", data_root_dir=root):
            prompts = [p.prompt for p in item.pairs]
            maps = compute_heatmaps(model, load_image(item.path), prompts, [method])[method]
            for pair, heatmap in zip(item.pairs, maps):
                label = next(mid for mid, name in CLASSES if name == pair.category)
                rows = [r for r in table if r[0] == item.image_id and r[3] == label]
                value, counts = _reconstruction(heatmap, [(float(r[2]), float(r[1])) for r in rows if r[4] == "yes"],
                                                [(float(r[2]), float(r[1])) for r in rows if r[4] == "no"])
                per_pair.append(value)
                per_class[label] = np.add(per_class.get(label, 0), counts)
        got = summary["methods"][method]
        assert got["n_points"] == 4 and got["n_pairs"] == 4
        assert got["mean_iou"] is None and got["acc@0.5"] is None  # no boxes: not scored, not a 0
        assert got["p_miou_pair_mean"] == pytest.approx(np.mean(per_pair), abs=1e-7)
        by_class = [(tp / (tp + fp + fn + 1e-8) + tn / (tn + fp + fn + 1e-8)) / 2
                    for tp, fn, fp, tn in per_class.values()]
        assert got["p_miou_class_mean"] == pytest.approx(np.mean(by_class), abs=1e-7)
    header = (tmp_path / "one" / "table.csv").read_text().splitlines()[0].split(",")
    assert {"p_miou_pair_mean", "p_miou_class_mean", "n_points"} <= set(header)
    assert len(list((tmp_path / "one" / "vis" / "gradcam").glob("*.jpg"))) >= 2
    # two shards: the same records and table, byte for byte
    for shard in ("0/2", "1/2"):
        assert _eval(tmp_path / "two", root, "--protocols", "points", "--image-batch", "1",
                     "--shard", shard).exit_code == 0
    assert _records(tmp_path / "two") == [{k: v for k, v in r.items()} for r in records]
    assert (tmp_path / "two" / "table.csv").read_text() == (tmp_path / "one" / "table.csv").read_text()
    # batched forwards differ by float rounding only: a point would have to sit within ~1e-6 of the threshold
    assert _eval(tmp_path / "batched", root, "--protocols", "points", "--image-batch", "4").exit_code == 0
    batched = json.loads((tmp_path / "batched" / "summary.json").read_text())
    for method in ("gradcam", "layercam"):
        assert batched["methods"][method]["p_miou_pair_mean"] == pytest.approx(
            summary["methods"][method]["p_miou_pair_mean"], abs=1e-3)
    # rescored from the saved maps, without the model
    result = runner.invoke(app, ["rescore", str(tmp_path / "one"), "--protocols", "points", "--out",
                                 str(tmp_path / "re"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert _records(tmp_path / "re") == records
    # the report: the long table and the HTML page with p-mIoU, no box-IoU sections for pairs without boxes
    result = runner.invoke(app, ["report", str(tmp_path / "one"), str(tmp_path / "two"), "--html",
                                 str(tmp_path / "report.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    assert "p-mIoU" in page and "box IoU histograms" not in page and "Table S3 layout" not in page
    result = runner.invoke(app, ["report", str(tmp_path / "one"), "--format", "csv"])
    assert result.exit_code == 0 and "mean_iou" not in result.output and "p_miou_pair_mean" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "one"), "--layout", "s3"])
    assert result.exit_code == 2 and "have no box IoU" in result.output
    result = runner.invoke(app, ["compare", str(tmp_path / "one"), str(tmp_path / "two"), "--method-a", "gradcam",
                                 "--method-b", "gradcam"])
    assert result.exit_code == 2 and "point labels only" in result.output


def test_leaderboard_p_miou_equals_the_summary(tmp_path):
    from camloc.report.leaderboard import board
    from camloc.report.tables import eval_groups

    root = tmp_path / "data"
    _write_data(root)
    assert _eval(tmp_path / "run", root, "--protocols", "points").exit_code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    result = board(eval_groups([tmp_path / "run"]), [], lambda g: "run")
    assert [c["metric"] for c in result["columns"]] == ["p_miou_pair_mean"]  # no box IoU column
    for method, row in result["rows"].items():
        assert row["cells"][("run", "p_miou_pair_mean")]["value"] == pytest.approx(
            summary["methods"][method]["p_miou_pair_mean"], abs=1e-12)


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows.__setitem__(0, [*rows[0][:1], "1.2", *rows[0][2:]]), "row 2: the point (1.2, "),
    (lambda rows: rows.__setitem__(1, [*rows[1][:4], "maybe", *rows[1][5:]]), "row 3: EstimatedYesNo is 'maybe'"),
    (lambda rows: rows.__setitem__(2, [*rows[2][:3], "/m/0unknown", *rows[2][4:]]), "does not name (/m/0unknown)"),
])
def test_bad_point_files_are_one_line(tmp_path, edit, message):
    rows = _rows()
    edit(rows)
    _write_data(tmp_path / "data", rows)
    result = _eval(tmp_path / "run", tmp_path / "data", "--protocols", "points")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert "oidv7-" in result.output  # names the file


def test_wrong_files_and_protocols_are_refused(tmp_path):
    root = tmp_path / "data"
    base = _write_data(root)
    for protocols, message in (("box", "add --protocols points"), ("points,maxboxacc", "maxboxacc scores boxes"),
                               ("points,pointing", "needs boxes or masks")):
        result = _eval(tmp_path / "run", root, "--protocols", protocols)
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam", "--dataset", "demo",
                                 "--protocols", "points", "--out", str(tmp_path / "demo"), "--no-progress"])
    assert result.exit_code == 2 and "openimages-v7-points" in result.output
    result = runner.invoke(app, ["threshold-search", "--model", "tiny-rn", "--method", "gradcam", "--train-dataset",
                                 "openimages-v7-points", "--val-dataset", "demo", "--data-root", str(root), "--out",
                                 str(tmp_path / "search"), "--no-progress"])
    assert result.exit_code == 2 and "pairs have no boxes" in result.output, result.output
    with open(base / "oidv7-val-annotations-point-labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["ImageId", "X", "Y", "Label"], ["a", "0.1", "0.2", "/m/01yrx"]])
    result = _eval(tmp_path / "run", root, "--protocols", "points")
    assert result.exit_code == 2 and "has no column EstimatedYesNo" in result.output
    for path in base.glob("validation/*.jpg"):
        path.unlink()
    _write_data(root, images=())
    result = _eval(tmp_path / "run", root, "--protocols", "points")
    assert result.exit_code == 2 and "none of the 4 annotated images is in the image folder" in result.output


def test_download_fetches_the_labels_and_the_first_images_resumably(tmp_path, http_server):
    from camloc.datasets.download import fetch_openimages_points

    base, handler = http_server
    source = _write_data(tmp_path / "source")
    handler.files = {"/points.csv": (source / "oidv7-val-annotations-point-labels.csv").read_bytes(),
                     "/classes.csv": (source / "oidv7-class-descriptions.csv").read_bytes(),
                     **{f"/validation/{p.name}": p.read_bytes() for p in (source / "validation").glob("*.jpg")}}
    urls = {"points": f"{base}/points.csv", "classes": f"{base}/classes.csv", "images": f"{base}/validation/{{}}.jpg"}
    root = tmp_path / "data"
    assert fetch_openimages_points(root, limit=2, progress=False, urls=urls) == (2, 2)
    folder = root / "openimages-v7"
    assert sorted(p.name for p in (folder / "validation").iterdir()) == ["a0c1d2e3f4a5b6c7d.jpg",
                                                                         "b0c1d2e3f4a5b6c7d.jpg"]
    assert (folder / "oidv7-val-annotations-point-labels.csv").read_bytes() == handler.files["/points.csv"]
    assert (folder / "validation" / "a0c1d2e3f4a5b6c7d.jpg").read_bytes() == handler.files[
        "/validation/a0c1d2e3f4a5b6c7d.jpg"]
    assert fetch_openimages_points(root, limit=2, progress=False, urls=urls) == (0, 2)  # nothing again
    # all: c is fetched, d is missing on the server: one error after the others, saying to run again
    with pytest.raises(CamlocError, match=r"1 of 2 images could not be fetched \(first: d0c1d2e3f4a5b6c7d: .*HTTP 404"):
        fetch_openimages_points(root, progress=False, urls=urls)
    assert (folder / "validation" / "c0c1d2e3f4a5b6c7d.jpg").is_file()
    # the download is what the dataset reads
    result = runner.invoke(app, ["data", "verify", "openimages-v7-points", "--data-root", str(root)])
    assert result.exit_code == 0 and "images 3, pairs 4, missing image files 0" in result.output, result.output
    result = runner.invoke(app, ["data", "download", "coco", "--limit", "3", "--data-root", str(root)])
    assert result.exit_code == 2 and "--limit is for openimages-v7-points" in result.output


def test_pairs_without_points_hash_as_before():
    """`Pair.points` enters the data identity only when present: every existing run's identity is unchanged."""
    import hashlib

    from camloc.datasets.records import ImagePairs, Pair, data_identity

    pair = Pair(7, "x.jpg", (10, 8), 3, "cat", "cat", [[1, 2, 5, 6]], 0.25)
    before = hashlib.sha256(json.dumps(["7", "x.jpg", [10, 8], 3, "cat", "cat", [[1, 2, 5, 6]], 0.25]).encode()
                            + b"\n").hexdigest()
    assert data_identity([ImagePairs("/d/x.jpg", 7, [pair])])["pairs_sha256"] == before
    pointed = Pair(7, "x.jpg", (10, 8), 3, "cat", "cat", [], None, [[1.5, 2.0, 1]])
    moved = Pair(7, "x.jpg", (10, 8), 3, "cat", "cat", [], None, [[1.5, 3.0, 1]])
    assert (data_identity([ImagePairs("/d/x.jpg", 7, [pointed])])["pairs_sha256"]
            != data_identity([ImagePairs("/d/x.jpg", 7, [moved])])["pairs_sha256"])


def test_meter_counts_box_less_pairs_apart():
    from camloc.evaluators import LocalizationMeter

    meter = LocalizationMeter()
    for iou in (0.6, None, 0.2):
        meter.update(iou, "cat")
    result = meter.compute()
    assert result["n_pairs"] == 3 and result["n_iou"] == 2
    assert result["mean_iou"] == pytest.approx(0.4) and result["acc@0.5"] == 0.5
    only = LocalizationMeter()
    only.update(None, "cat")
    assert only.compute()["mean_iou"] is None and only.compute()["n_pairs"] == 1
