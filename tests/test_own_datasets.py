"""Datasets of one's own (issue 31): any COCO-format JSON (category ids 1000 and up, stuff ids too) and a
segmentation folder (the real VOC 2012 label map in tests/real-formats), under their own names in the tables;
`camloc.register_dataset` for a plug-in's."""
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from camloc.cli.app import app
from camloc.datasets.registry import DEMO_DIR

runner = CliRunner()
REAL_VOC = Path(__file__).parent / "real-formats" / "voc2012" / "VOC2012"


def test_a_coco_format_file_with_any_category_ids_evaluates_under_its_name(tmp_path):
    data = json.loads((DEMO_DIR / "instances_demo.json").read_text())
    shift = {c["id"]: 1000 + 7 * i for i, c in enumerate(data["categories"])}
    for c in data["categories"]:
        c["id"] = shift[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = shift[a["category_id"]]
    ann = tmp_path / "instances_mine.json"
    ann.write_text(json.dumps(data))
    args = ["eval", "--model", "tiny-rn", "--method", "gradcam", "--no-progress", "--image-dir",
            str(DEMO_DIR / "images")]
    result = runner.invoke(app, [*args, "--dataset", "coco-format", "--ann-file", str(ann), "--out",
                                 str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    assert "coco-format:instances_mine.json" in (tmp_path / "mine" / "table.md").read_text()
    demo = runner.invoke(app, [*args, "--dataset", "demo", "--out", str(tmp_path / "demo")])
    assert demo.exit_code == 0
    mine = json.loads((tmp_path / "mine" / "summary.json").read_text())
    ref = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert mine["methods"]["gradcam"]["mean_iou"] == ref["methods"]["gradcam"]["mean_iou"]  # the same boxes
    # `coco` itself still refuses ids above 90 as stuff; coco-format needs its two files
    coco = runner.invoke(app, [*args, "--dataset", "coco", "--ann-file", str(ann), "--out", str(tmp_path / "c")])
    assert coco.exit_code == 2 and "stuff categories" in coco.stderr
    bare = runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam", "--dataset", "coco-format",
                               "--out", str(tmp_path / "b")])
    assert bare.exit_code == 2 and "give --ann-file" in bare.stderr
    report = runner.invoke(app, ["report", str(tmp_path / "mine"), str(tmp_path / "demo"), "--format", "csv"])
    assert report.exit_code == 0 and "coco-format:instances_mine.json" in report.stdout


def write_folder(root: Path) -> Path:
    """A segmentation folder of the real VOC image and label map: VOC's 21 classes, 255 the border."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    shutil.copy(REAL_VOC / "JPEGImages" / "2007_000063.jpg", root / "images")
    shutil.copy(REAL_VOC / "SegmentationClass" / "2007_000063.png", root / "labels")
    shutil.copy("camloc/segment/classes/voc21.txt", root / "classes.txt")  # VOC's names, synonyms and all
    return root


def test_a_segmentation_folder_evaluates_under_its_name(tmp_path):
    folder = write_folder(tmp_path / "myvoc")
    small = ["--ovseg-short-side", "64", "--ovseg-crop", "64", "--ovseg-stride", "32"]
    base = ["eval", "--protocols", "ovseg", "--method", "sclip", "--model", "tiny-vit", "--no-progress", *small,
            "--ovseg-preset", "tcl"]  # the same settings for every dataset (sclip's differ for voc21)
    mine = runner.invoke(app, [*base, "--dataset", "seg-folder", "--data-root", str(folder), "--seg-background",
                               "--ovseg-templates", "single", "--save-predictions", "--out", str(tmp_path / "mine")])
    assert mine.exit_code == 0, mine.output
    assert "seg-folder:myvoc" in (tmp_path / "mine" / "table.md").read_text()
    classes = (tmp_path / "mine" / "ovseg_classes.csv").read_text().splitlines()
    assert classes[1].split(",")[2] == "background" and len(classes) == 1 + 21
    # the same image and label through the voc21 layout, with the same settings: the same prediction and counts
    voc = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass"):
        shutil.copytree(REAL_VOC / sub, voc / sub)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000063\n")
    ref = runner.invoke(app, [*base, "--dataset", "voc21", "--data-root", str(tmp_path / "voc"), "--ovseg-templates",
                              "single", "--save-predictions", "--out", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    ours = np.asarray(Image.open(tmp_path / "mine" / "predictions" / "sclip" / "2007_000063.png"))
    theirs = np.asarray(Image.open(tmp_path / "ref" / "predictions" / "sclip" / "2007_000063.png"))
    np.testing.assert_array_equal(ours, theirs)
    state = json.loads((tmp_path / "mine" / "ovseg.jsonl").read_text())["state"]
    assert state == json.loads((tmp_path / "ref" / "ovseg.jsonl").read_text())["state"]
    assert ours.shape == (375, 500) and state["label"][12] == 27632  # the dog's pixels, read as they are
    verify = runner.invoke(app, ["data", "verify", "seg-folder", "--data-root", str(folder)])
    assert verify.exit_code == 0 and "images 1, classes 21" in verify.stdout, verify.output
    # reduce-zero-label: background ignored, the classes lowered by one (the dog, 12, counted as 11)
    reduced = runner.invoke(app, [*base, "--dataset", "seg-folder", "--data-root", str(folder),
                                  "--seg-reduce-zero-label", "--ovseg-templates", "single", "--out",
                                  str(tmp_path / "reduced")])
    assert reduced.exit_code == 0, reduced.output
    record = json.loads((tmp_path / "reduced" / "ovseg.jsonl").read_text().splitlines()[0])["state"]
    assert record["label"][11] == 27632 and sum(record["label"]) == 27632 + 78930
    wrong = runner.invoke(app, [*base, "--dataset", "voc21", "--data-root", str(tmp_path / "voc"),
                                "--seg-reduce-zero-label", "--out", str(tmp_path / "w")])
    assert wrong.exit_code == 2 and "--seg-reduce-zero-label read your own segmentation folder" in wrong.stderr
