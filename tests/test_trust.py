"""Trustworthy numbers on real data and careless inputs (issue 12): every way a run could print a
wrong table with exit code 0, or a traceback, is refused with one line (exit 2) or handled and counted."""
import copy
import json
import warnings
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from camloc.cli.app import app
from camloc.datasets import load_dataset
from camloc.datasets.registry import DEMO_DIR
from camloc.errors import CamlocError
from camloc.report.tables import build_report
from camloc.run.eval import run_eval
from camloc.run.identity import EvalConfig

runner = CliRunner()
DEMO = json.loads((DEMO_DIR / "instances_demo.json").read_text())
REAL = Path(__file__).parent / "real-formats"


def demo_copy(folder: Path, edit=None) -> tuple[Path, Path]:
    """The demo set's images and (edited) annotation file under `folder`: (ann file, image dir)."""
    images = folder / "images"
    images.mkdir(parents=True)
    for path in (DEMO_DIR / "images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    data = copy.deepcopy(DEMO)
    if edit:
        data = edit(data) or data
    ann = folder / "instances.json"
    ann.write_text(json.dumps(data))
    return ann, images


def _eval_args(out, *extra):
    return ["eval", "--method", "gradcam", "--model", "tiny-rn", "--out", str(out), "--no-progress", "--device", "cpu",
            *extra]


def _one_line_error(result, *fragments):
    """Exit code 2 and exactly one line on stderr, `error: ...`, holding every fragment; no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- A. Official formats --------------------------------------------------------------------------

def test_partimagenet_degenerate_polygons_zero_area_boxes_and_no_iscrowd(tmp_path):
    """As released: no iscrowd key (getAnnIds(iscrowd=False) raised KeyError), polygons of 2 and 4
    coordinates (annToMask raised), a zero-area box: polygons skipped and counted, the box with area
    kept, the zero-area box dropped and counted."""
    root = tmp_path / "PartImageNet"
    (root / "annotations").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(_mk(root / "images" / "test" / "n01" / "n01_1.JPEG"))
    anns = [{"id": 1, "image_id": 0, "category_id": 0, "bbox": [1, 1, 4, 3], "area": 12,
             "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4], [2, 2, 3, 3], [7, 7]]},
            {"id": 2, "image_id": 0, "category_id": 1, "bbox": [3, 3, 0, 4], "area": 0, "segmentation": [[3, 3, 3, 7]]}]
    (root / "annotations" / "test.json").write_text(json.dumps({
        "images": [{"id": 0, "file_name": "n01_1.JPEG", "width": 10, "height": 10}], "annotations": anns,
        "categories": [{"id": 0, "name": "Quadruped Head"}, {"id": 1, "name": "Quadruped Tail"}]}))
    issues = {}
    images = load_dataset("partimagenet", data_root_dir=root, issues=issues)  # --data-root naming the folder
    [pair] = images[0].pairs
    assert pair.category == "Quadruped Head" and pair.gt_boxes == [[1, 1, 5, 4]]
    assert pair.coverage == pytest.approx(12 / 100)  # the 4 x 3 polygon only
    assert issues["degenerate_polygons"] == 3 and issues["dropped_boxes"] == 1 and issues["skipped_pairs"] == 1


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_panoptic_stuff_categories_are_refused_unless_included(tmp_path):
    """As in the real panoptic detection-format JSON (cocodataset/panopticapi sample_data, 7ca21a3): the
    stuff categories carry no `isthing` key, only ids above 90 (e.g. 184 "tree-merged")."""
    def add_stuff(data):
        data["categories"].append({"supercategory": "plant", "color": [107, 142, 35], "id": 184,
                                   "name": "tree-merged"})
        data["annotations"].append({"id": 999, "image_id": 1, "category_id": 184, "bbox": [0, 0, 50, 50],
                                    "iscrowd": 0, "area": 2500})

    ann, images = demo_copy(tmp_path, add_stuff)
    with pytest.raises(CamlocError, match=r"1 stuff categories \(tree-merged.*--include-stuff"):
        load_dataset("coco", ann_file=ann, image_dir=images)
    kept = load_dataset("coco", ann_file=ann, image_dir=images, include_stuff=True)
    assert "tree-merged" in {p.category for item in kept for p in item.pairs}


def test_ade20k_scene_that_matches_no_class_is_an_error(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    base.mkdir()
    lines = (REAL / "ade20k-sceneparsing" / "objectInfo150.txt").read_text().splitlines()
    (base / "objectInfo150.txt").write_text("\n".join(line for line in lines if "\triver" not in line) + "\n")
    with pytest.raises(CamlocError, match="scene class\\(es\\) river match no class name"):
        load_dataset("ade20k-scenes", data_root_dir=base)  # --data-root naming the dataset's own folder


# --- B. Run folders -------------------------------------------------------------------------------

def test_corrupt_record_in_the_middle_is_an_error_or_skipped_and_counted(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, _eval_args(out, "--limit", "3")).exit_code == 0
    records = out / "pairs.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    assert len(lines) == 3
    records.write_text(lines[0] + '{"image_id": 1, "categ\n' + "".join(lines[2:]))
    # report once counted only the records before the bad line (rc 0); eval's resume truncated there
    _one_line_error(runner.invoke(app, ["report", str(out)]), f"{records} line 2 is not valid JSON",
                    "--skip-bad-records")
    _one_line_error(runner.invoke(app, _eval_args(out, "--limit", "3")), f"{records} line 2")
    assert records.read_text().count("\n") == 3  # nothing truncated
    skipped = runner.invoke(app, ["report", str(out), "--skip-bad-records", "--allow-incomplete", "--format", "csv"])
    assert skipped.exit_code == 0 and "1 bad record lines skipped" in skipped.output
    assert "tiny-rn,demo,gradcam,2," in skipped.stdout  # the two valid records, the bad one counted
    resumed = runner.invoke(app, _eval_args(out, "--limit", "3", "--skip-bad-records"))
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["faults"]["bad_record_lines"][0]["line"] == 2


def test_torn_last_line_is_repaired(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, _eval_args(out, "--limit", "2")).exit_code == 0
    records = out / "pairs.jsonl"
    text = records.read_text()
    records.write_text(text + text.splitlines()[0][:30])  # a crash mid-write: no newline
    assert runner.invoke(app, _eval_args(out, "--limit", "2")).exit_code == 0
    assert records.read_text() == text


def test_another_data_root_or_annotation_file_never_resumes_the_records(tmp_path):
    out = tmp_path / "run"
    ann, images = demo_copy(tmp_path / "a")
    assert runner.invoke(app, _eval_args(out, "--ann-file", str(ann), "--image-dir", str(images))).exit_code == 0

    def moved(data):
        data["annotations"][0]["bbox"][0] += 5

    ann_b, images_b = demo_copy(tmp_path / "b", moved)
    other = runner.invoke(app, _eval_args(out, "--ann-file", str(ann_b), "--image-dir", str(images_b)))
    _one_line_error(other, "differs in: data", str(images), str(images_b))
    same_images = runner.invoke(app, _eval_args(out, "--ann-file", str(ann_b), "--image-dir", str(images)))
    _one_line_error(same_images, "differs in: data", "other ground truth or prompts (another annotation file?)")


def _fake_run(folder: Path, threshold, ious, dataset="demo", model="tiny-rn"):
    folder.mkdir(parents=True)
    config = {"model": model, "methods": ["gradcam"], "dataset": dataset, "threshold": threshold,
              "data": {"image_root": "/d", "pairs_sha256": "ab", "n_images": len(ious), "n_pairs": len(ious)}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "pairs.jsonl").write_text("".join(json.dumps(
        {"image_id": i, "file_name": f"{i}.jpg", "category_id": 1, "category": "cat", "method": "gradcam",
         "model": model, "gt_boxes": [[0, 0, 10, 10]], "iou": v}) + "\n"
        for i, v in enumerate(ious)))
    return folder


def test_report_never_merges_runs_of_different_configs(tmp_path):
    a = _fake_run(tmp_path / "a", "otsu", [0.2, 0.4])
    b = _fake_run(tmp_path / "b", 0.5, [0.9, 0.9])
    for order in ([a, b], [b, a]):
        table = build_report(order, "long")
        assert list(table.columns) == ["model", "dataset", "method", "threshold", "n_pairs", "mean_iou", "acc@0.3",
                                       "acc@0.5", "acc@0.7"]
        assert sorted(zip(table["threshold"].astype(str), table["mean_iou"])) == [("0.5", 0.9),
                                                                                  ("otsu", pytest.approx(0.3))]
    s3 = build_report([a, b], "s3")
    assert len(s3) == 2 and "threshold" in s3.columns
    c = _fake_run(tmp_path / "c", "otsu", [0.2, 0.1])  # same config as a, another IoU for pair 1
    with pytest.raises(CamlocError, match="same config but different IoUs"):
        build_report([a, c], "long")
    d = _fake_run(tmp_path / "d", "otsu", [0.2, 0.4], dataset="coco")
    assert list(build_report([a, d], "s3").columns[:2]) == ["model", "dataset"]


def test_report_says_what_is_missing_and_which_layout(tmp_path):
    run = _fake_run(tmp_path / "a", "otsu", [0.2, 0.4])
    config = json.loads((run / "config.json").read_text())
    config["data"]["n_pairs"] = 5
    (run / "config.json").write_text(json.dumps(config))
    _one_line_error(runner.invoke(app, ["report", str(run)]), "3 of 5 (pair, method) records are missing",
                    "--allow-incomplete")
    search = tmp_path / "s1"
    search.mkdir()
    (search / "table_s1.csv").write_text("label,model,method,threshold,single,otsu,difference\n")
    _one_line_error(runner.invoke(app, ["report", str(search)]), "threshold-search folder", "--layout s1")


def test_a_second_eval_on_one_folder_is_refused_while_the_first_runs(tmp_path):
    from camloc.run.files import folder_lock

    out = tmp_path / "run"
    out.mkdir()
    with folder_lock(out):
        _one_line_error(runner.invoke(app, _eval_args(out, "--limit", "1")), f"run folder {out} is in use by camloc pid")
    assert runner.invoke(app, _eval_args(out, "--limit", "1")).exit_code == 0
    with folder_lock(out, ".lock.rank000-of-002"):  # a shard holds its own shard's lock only
        assert runner.invoke(app, _eval_args(out, "--limit", "1", "--shard", "1/2")).exit_code == 0


def test_zero_pairs_is_an_error_with_the_reason_and_summaries_are_valid_json(tmp_path):
    def all_crowd(data):
        for a in data["annotations"]:
            a["iscrowd"] = 1

    ann, images = demo_copy(tmp_path / "crowd", all_crowd)
    _one_line_error(runner.invoke(app, _eval_args(tmp_path / "r1", "--ann-file", str(ann), "--image-dir", str(images))),
                    "gives 0 (image, class) pairs", "are crowd regions")
    ann, images = demo_copy(tmp_path / "empty", lambda d: d.update(annotations=[]))
    _one_line_error(runner.invoke(app, _eval_args(tmp_path / "r2", "--ann-file", str(ann), "--image-dir", str(images))),
                    "has no annotations")
    # every image unreadable: no NaN table, a valid summary, exit 2
    ann, images = demo_copy(tmp_path / "broken")
    for path in images.iterdir():
        path.write_bytes(b"not an image")
    out = tmp_path / "r3"
    result = runner.invoke(app, _eval_args(out, "--ann-file", str(ann), "--image-dir", str(images)))
    assert result.exit_code == 2 and "no pair was scored for gradcam" in result.output
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert summary["methods"]["gradcam"]["mean_iou"] is None and not (out / "table.md").exists()


def test_out_that_is_the_root_or_a_file(tmp_path):
    _one_line_error(runner.invoke(app, _eval_args("/", "--limit", "1")), "--out / is the filesystem root")
    file = tmp_path / "file"
    file.write_text("x")
    _one_line_error(runner.invoke(app, _eval_args(file, "--limit", "1")), f"--out {file} is a file")


# --- C. Inputs ------------------------------------------------------------------------------------

def _annotations(edit, replace: bool = False):
    """A case whose annotation file is the demo's, edited in place (or replaced by what `edit` returns)."""
    def setup(tmp_path, monkeypatch):
        ann, images = demo_copy(tmp_path / "data", edit if replace else lambda d: [edit(d), None][1])
        return ["--ann-file", str(ann), "--image-dir", str(images)], [str(ann)]
    return setup


def _options(*args):
    def setup(tmp_path, monkeypatch):
        return list(args), []
    return setup


def _pixel_limit(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 20000)  # the demo's 320 x 320 photos exceed 2 x 20000
    return [], ["--max-pixels"]


def _read_only_out(tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    return [], ["cannot be written (Read-only file system)"]


def _full_disk(tmp_path, monkeypatch):
    import errno

    import camloc.run.pipeline

    def full(handle, records):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "pairs.jsonl"))

    monkeypatch.setattr(camloc.run.pipeline, "append_jsonl", full)
    return [], ["could not write", "pairs.jsonl"]


C2_CASES = {
    "unknown category_id": (_annotations(lambda d: d["annotations"][0].update(category_id=999)),
                            "has category_id 999, which is not in 'categories'"),
    "missing width": (_annotations(lambda d: d["images"][0].pop("width")), "image 1 has width None"),
    "missing height": (_annotations(lambda d: d["images"][0].pop("height")), "image 1 has height None"),
    "bbox of 3 numbers": (_annotations(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])), "bbox [1, 2, 3]"),
    "bbox of strings": (_annotations(lambda d: d["annotations"][0].update(bbox=["1", 2, 3, 4])), "four finite numbers"),
    "bbox with NaN": (_annotations(lambda d: d["annotations"][0].update(bbox=[math.nan, 2, 3, 4])), "four finite"),
    "string image ids": (_annotations(lambda d: [i.update(id=str(i["id"])) for i in d["images"]]),
                         "COCO image ids must be integers"),
    "duplicate image ids": (_annotations(lambda d: d["images"][1].update(id=1)), "image id 1 appears twice"),
    "list-shaped JSON": (_annotations(lambda d: [d], replace=True), "holds a JSON list, not a COCO object"),
    "image above Pillow's limit": (_pixel_limit, "larger than Pillow's decompression-bomb limit of 20000"),
    "read-only output folder": (_read_only_out, "--out"),
    "full output folder": (_full_disk, "No space left on device"),
    "--start-layer beyond the depth": (_options("--model", "tiny-vit", "--method", "hilacam", "--start-layer", "7"),
                                       "--start-layer 7 is outside tiny-vit's"),
    "negative --start-layer beyond the depth": (
        _options("--model", "tiny-vit", "--method", "hilacam", "--start-layer", "-9"), "--start-layer -9 is outside"),
    "--prompt-template with two {}": (_options("--prompt-template", "a {} of a {}"), "exactly one {}"),
    "--prompt-template with a named field": (_options("--prompt-template", "a {name}"), "exactly one {}"),
    "--subset-seed -1": (_options("--subset-seed", "-1"), "--subset-seed must be between 0 and 4294967295"),
    "--save-vis -1": (_options("--save-vis", "-1"), "--save-vis must be 0 or more"),
    "--ade-extent on coco": (_options("--ade-extent", "amodal"), "--ade-extent applies to ade20k-scenes only"),
}


@pytest.mark.parametrize("case", list(C2_CASES))
def test_every_refused_input_is_one_line_on_stderr_and_exit_2(case, tmp_path, monkeypatch):
    """Each of these gave a traceback, or ran and printed numbers, before; now: one line, exit code 2,
    and (except the full disk, which happens mid-run) no record written."""
    setup, message = C2_CASES[case]
    extra, fragments = setup(tmp_path, monkeypatch)
    args = _eval_args(tmp_path / "run", "--limit", "2")
    for flag in ("--model", "--method"):  # a case's own model/method replaces the default one
        if flag in extra:
            i = args.index(flag)
            del args[i:i + 2]
    _one_line_error(runner.invoke(app, args + extra), message, *fragments)
    if case != "full output folder":
        assert not (tmp_path / "run" / "pairs.jsonl").exists()


def test_image_size_other_than_its_annotation_is_refused(tmp_path):
    ann, images = demo_copy(tmp_path, lambda d: d["images"][2].update(width=213, height=320))
    _one_line_error(runner.invoke(app, _eval_args(tmp_path / "run", "--ann-file", str(ann), "--image-dir", str(images))),
                    "image 3", "is 320x213 pixels, but its annotation says 213x320")


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from camloc.models import load_image

    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f.tiff")
    for name in ("16.png", "f.tiff"):
        rgb = np.asarray(load_image(tmp_path / name))
        np.testing.assert_allclose(rgb[..., 0], np.rint(ramp * 255), atol=1)  # was all 255 / all 0
        assert (rgb[..., 0] == rgb[..., 2]).all()


def test_symlinked_images_are_accepted_and_odd_paths_are_named(tmp_path):
    ann, images = demo_copy(tmp_path / "a")
    elsewhere = tmp_path / "store"
    elsewhere.mkdir()
    target = images / "camera.jpg"
    target.rename(elsewhere / "camera.jpg")
    target.symlink_to(elsewhere / "camera.jpg")
    assert len(load_dataset("coco", ann_file=ann, image_dir=images)) == 10
    explain = ["explain", "--prompt", "cat", "--method", "gradcam", "--model", "tiny-rn"]
    _one_line_error(runner.invoke(app, [*explain[:1], str(tmp_path), *explain[1:]]), "is a folder, not an image file")
    _one_line_error(runner.invoke(app, [*explain[:1], "https://example.com/cat.jpg", *explain[1:]]),
                    "is a URL: camloc reads local files")


def test_empty_and_overlong_prompts_are_warned_once_and_recorded(tmp_path):
    long_name = " ".join(["enormous"] * 80)

    def names(data):
        data["categories"][0]["name"] = "   "
        data["categories"][1]["name"] = long_name

    ann, images = demo_copy(tmp_path, names)
    with pytest.warns(UserWarning) as caught:
        summary = run_eval(EvalConfig(model="tiny-rn", methods=["gradcam"]), tmp_path / "run", device="cpu",
                           progress=False, data_options={"ann_file": ann, "image_dir": images})
    messages = [str(w.message) for w in caught]
    assert sum("empty or whitespace-only" in m for m in messages) == 1
    assert sum("truncated" in m for m in messages) == 1
    assert summary["faults"]["empty_prompts"] == ["   "] and summary["faults"]["truncated_prompts"] == [long_name]


def test_exif_rotated_photo_in_explain(tmp_path):
    image = Image.open(DEMO_DIR / "images" / "coffee.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    image.save(tmp_path / "photo.jpg", exif=exif)
    args = ["explain", str(tmp_path / "photo.jpg"), "--prompt", "cup", "--method", "gradcam", "--model", "tiny-rn",
            "--json"]
    with pytest.warns(UserWarning, match="processed as stored .*--exif-transpose"):  # one line on the CLI
        stored = runner.invoke(app, args)
    assert stored.exit_code == 0 and json.loads(stored.stdout)["size"] == [320, 213]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shown = runner.invoke(app, args + ["--exif-transpose"])
    assert json.loads(shown.stdout)["size"] == [213, 320]


# --- D. What users see ----------------------------------------------------------------------------

def test_help_texts_keep_their_brackets():
    assert "TOML file with an [eval] table" in " ".join(runner.invoke(app, ["eval", "--help"]).output.split())
    text = " ".join(runner.invoke(app, ["eval", "--help"]).output.split())
    assert "[default: from RANK/WORLD_SIZE (torchrun)" in text


def test_topk_warning_once_per_run(tmp_path, monkeypatch):
    import camloc.methods.score

    monkeypatch.setattr(camloc.methods.score, "_CAPPED", set())
    with pytest.warns(UserWarning) as caught:
        run_eval(EvalConfig(model="tiny-rn", methods=["gscorecam"], options={"topk": 10**6, "grouping": "kmeans",
                                                                            "start_layer": 0}),
                 tmp_path, device="cpu", progress=False)
    assert sum("exceeds the" in str(w.message) for w in caught) == 1  # 13 pairs on 10 images: was once per image


def test_explain_out_without_suffix_and_huge_images(tmp_path):
    big = np.asarray(Image.open(DEMO_DIR / "images" / "astronaut.jpg").resize((4000, 3000)))
    Image.fromarray(big).save(tmp_path / "big.png")
    result = runner.invoke(app, ["explain", str(tmp_path / "big.png"), "--prompt", "person", "--method", "gradcam",
                                 "--model", "tiny-rn", "--out", str(tmp_path / "fig"), "--gt-box", "100,100,2000,2500"])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'fig.png'}" in result.output and (tmp_path / "fig.png").is_file()
    assert max(Image.open(tmp_path / "fig.png").size) < 1600  # drawn at a display size, not 4000 px per panel
    zero = runner.invoke(app, ["explain", str(tmp_path / "big.png"), "--prompt", "person", "--method", "gradcam",
                               "--model", "tiny-rn", "--out", str(tmp_path / "fig.gif")])
    _one_line_error(zero, "pictures are written as .png")


# --- the property: one --out, any sequence of runs ------------------------------------------------

def test_any_sequence_of_runs_into_one_folder_reports_one_config_each_record_once(tmp_path_factory):
    """Random configs (threshold, limit), --force-new, and interruptions (the records file cut at a
    random byte, as a kill mid-write leaves it) into one --out: `report` either refuses, or shows
    exactly the records of the folder's one config, each (pair, method) once."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from camloc.run.files import read_run_records

    step = st.tuples(st.sampled_from(["otsu", 0.5]), st.sampled_from([1, 2]), st.booleans(), st.floats(0, 1),
                     st.booleans())

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(step, min_size=1, max_size=4))
    def check(steps):
        out = tmp_path_factory.mktemp("out")
        for threshold, limit, force_new, cut_at, interrupted in steps:
            config = EvalConfig(model="tiny-rn", methods=["gradcam", "layercam"], limit=limit, threshold=threshold)
            try:
                run_eval(config, out, device="cpu", progress=False, force_new=force_new)
            except CamlocError as exc:
                assert "different config" in str(exc)
            records = out / "pairs.jsonl"
            if interrupted and records.exists():
                data = records.read_bytes()
                records.write_bytes(data[:int(cut_at * len(data))])
        try:
            table = build_report([out], "long", allow_incomplete=True)
        except CamlocError:
            return
        config = json.loads((out / "config.json").read_text())
        records = read_run_records(out)
        keys = [(r["image_id"], r["category_id"], r["method"]) for r in records]
        assert len(keys) == len(set(keys))
        assert all(r["threshold"] == config["threshold"] for r in records)
        assert len(records) <= config["data"]["n_pairs"] * 2
        for method, group in table.groupby("method"):
            ious = [r["iou"] for r in records if r["method"] == method]
            assert int(group["n_pairs"].iloc[0]) == len(ious)
            assert group["mean_iou"].iloc[0] == pytest.approx(sum(ious) / len(ious))

    check()


def test_threshold_search_cache_is_not_reused_for_another_data_root(tmp_path):
    """The cache once keyed a dataset by name and split only: a rerun with another data root took the
    first dataset's heatmaps. Now another image folder recomputes, and the same one reuses."""
    from camloc.run.threshold_search import SearchConfig, run_threshold_search

    out = tmp_path / "s1"

    def search(folder):
        ann, images = (folder / "instances.json", folder / "images")
        spec = {"dataset": "coco", "ann_file": str(ann), "image_dir": str(images)}
        config = SearchConfig(runs=[{"model": "tiny-rn", "methods": ["gradcam"]}], train=dict(spec),
                              val=dict(spec, limit=2))
        return run_threshold_search(config, out, device="cpu", progress=False, workers=1)

    demo_copy(tmp_path / "a")
    demo_copy(tmp_path / "b", lambda d: d["annotations"][0]["bbox"].__setitem__(0, 10))
    first = search(tmp_path / "a")
    assert first["pairs_computed"] == 13
    assert search(tmp_path / "a")["pairs_computed"] == 0
    (tmp_path / "b" / "images" / "astronaut.jpg").write_bytes((DEMO_DIR / "images" / "camera.jpg").read_bytes())
    second = search(tmp_path / "b")
    assert second["pairs_computed"] == 13  # another folder: its own maps
    assert json.loads((out / "config.json").read_text())["data"]["train"]["image_root"] == str(tmp_path / "b" / "images")


def test_compare_refuses_runs_on_different_data(tmp_path):
    a = _fake_run(tmp_path / "a", "otsu", [0.2, 0.4])
    b = _fake_run(tmp_path / "b", "otsu", [0.5, 0.1])
    records = [json.loads(line) for line in (b / "pairs.jsonl").read_text().splitlines()]
    assert runner.invoke(app, ["compare", str(a), str(b)]).exit_code == 0
    records[1]["gt_boxes"] = [[0, 0, 5, 5]]  # image 1 of run b is another image (other ground truth)
    (b / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _one_line_error(runner.invoke(app, ["compare", str(a), str(b)]), "disagree on image 1 / category 1",
                    "different data")


def test_pictures_have_a_legend_colour_bar_iou_and_flag_constant_maps(tmp_path, monkeypatch):
    import matplotlib

    from camloc.report.figures import comparison_figure, pipeline_figure

    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")  # keep the text as text
    image = Image.open(DEMO_DIR / "images" / "chelsea.jpg")
    ramp = np.tile(np.linspace(0, 1, image.width, dtype=np.float32), (image.height, 1))
    zeros = np.zeros_like(ramp)
    pipeline_figure(image, [("ramp", ramp), ("zeros", zeros)], tmp_path / "p.svg", gt_boxes=[[160, 0, 320, 213]])
    comparison_figure(image, ["cat"], {"a": ramp[None], "b": zeros[None]}, tmp_path / "c.svg",
                      gt_boxes=[[160, 0, 320, 213]])
    for name in ("p.svg", "c.svg"):
        svg = (tmp_path / name).read_text()
        for text in ("predicted box", "ground truth", "heatmap (min-max)", "IoU ", "constant map"):
            assert text in svg, (name, text)
