"""The adversarial pass of issue 30 over ovseg, the data layouts and the run folders: each way a careless or
hostile input could print another number with exit code 0 is refused in one line (exit 2) or handled."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from camloc.cli.app import app

runner = CliRunner()
SMALL = ["--ovseg-short-side", "64", "--ovseg-crop", "64", "--ovseg-stride", "32"]


def write_voc(root, stems=("2007_000033", "2007_000042"), seed=0):
    """VOC2012's segmentation layout with palette label maps (0 background, 1..20, 255 border)."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
        label = np.zeros((48, 64), np.uint8)
        label[10:30, 5:40] = rng.integers(1, 21)
        label[0] = 255
        write_label(voc / "SegmentationClass" / f"{stem}.png", label)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{s}\n" for s in stems))
    return voc


def write_label(path, label):
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.save(path)


def ovseg(root, out, *extra, dataset="voc21"):
    return runner.invoke(app, ["eval", "--dataset", dataset, "--protocols", "ovseg", "--method", "sclip", "--model",
                               "tiny-vit", "--out", str(out), "--no-progress", *SMALL,
                               *(["--data-root", str(root)] if root else []), *extra])


def test_f1_another_label_folder_under_the_same_images_is_another_run(tmp_path):
    voc = write_voc(tmp_path / "a")
    first = ovseg(tmp_path / "a", tmp_path / "run", "--limit", "1")
    assert first.exit_code == 0, first.output
    # the same image files (--image-dir), labels from another data root that differs in one label map
    other = tmp_path / "b" / "VOCdevkit" / "VOC2012"
    shutil.copytree(voc, other)
    label = np.asarray(Image.open(other / "SegmentationClass" / "2007_000042.png")).copy()
    label[40:, :] = 7
    write_label(other / "SegmentationClass" / "2007_000042.png", label)
    again = ovseg(tmp_path / "b", tmp_path / "run", "--image-dir", str(voc / "JPEGImages"))
    assert again.exit_code == 2 and "differs in: data" in again.stderr, again.output


def test_f4_f5_label_maps_beyond_8_bits_are_refused_not_wrapped(tmp_path):
    from camloc.datasets.segmentation import load_seg_dataset
    from camloc.errors import DataError

    voc = write_voc(tmp_path)
    wide = np.zeros((48, 64), np.uint16)
    wide[5, 5] = 263  # read modulo 256 this was class 7
    Image.fromarray(wide).save(voc / "SegmentationClass" / "2007_000033.png")
    _, (item, _) = load_seg_dataset("voc21", data_root=tmp_path)
    with pytest.raises(DataError, match=r"holds values \[263\] outside 0..255 \(a 16-bit PNG\)"):
        item.label()
    for command in (["data", "verify", "voc21", "--data-root", str(tmp_path)], None):
        result = runner.invoke(app, command) if command else ovseg(tmp_path, tmp_path / "run")
        assert result.exit_code == 2 and "outside 0..255" in result.stderr, result.output
    # coco-stuff-171's official stuffthingmaps: a value >= 256 was an IndexError
    raw = tmp_path / "stuff"
    (raw / "stuffthingmaps_trainval2017" / "val2017").mkdir(parents=True)
    (raw / "val2017").mkdir()
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(raw / "val2017" / "000000000139.jpg")
    Image.fromarray(np.array([[0, 300], [1, 2]], np.uint16)).save(
        raw / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png")
    _, [stuff] = load_seg_dataset("coco-stuff-171", data_root=raw)
    with pytest.raises(DataError, match=r"\[300\] outside 0..255"):
        stuff.label()


@pytest.mark.parametrize("bad", ["../../../../x/evil", "sub/2007_000033", "/etc/passwd", ".."])
def test_f6_image_ids_that_are_paths_are_refused(tmp_path, bad):
    voc = write_voc(tmp_path)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text(f"2007_000033\n{bad}\n")
    result = ovseg(tmp_path, tmp_path / "run", "--save-predictions")
    assert result.exit_code == 2 and "is not a plain file name" in result.stderr and "val.txt" in result.stderr
    assert not (tmp_path / "run" / "ovseg.jsonl").exists() or not (tmp_path / "run" / "ovseg.jsonl").read_text()


def test_f8_a_duplicate_id_is_refused_up_front(tmp_path):
    voc = write_voc(tmp_path)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_000042\n2007_000033\n")
    result = ovseg(tmp_path, tmp_path / "run")
    assert result.exit_code == 2 and "image id '2007_000033' is listed twice" in result.stderr
    assert not (tmp_path / "run" / "config.json").exists()


def test_f9_f11_a_resume_reads_where_the_run_read_and_moved_data_is_the_same_data(tmp_path, monkeypatch):
    write_voc(tmp_path / "data")
    first = ovseg(tmp_path / "data", tmp_path / "run", "--limit", "1")
    assert first.exit_code == 0, first.output
    sources = json.loads((tmp_path / "run" / "config.json").read_text())["data_sources"]
    assert sources["data_root"] == str((tmp_path / "data").resolve())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAMLOC_DATA", raising=False)
    # a resume given no data option reads where the run read (it used to read ./data or $CAMLOC_DATA)
    resumed = ovseg(None, tmp_path / "run", "--limit", "2")
    assert resumed.exit_code == 2 and "differs in: data, limit" in resumed.stderr  # another --limit: another run
    again = ovseg(None, tmp_path / "run", "--limit", "1")
    assert again.exit_code == 0 and "0 new records, 1 resumed" in again.output, again.output
    # the data moves: the message names the recorded folder, and --data-root to the new place resumes
    shutil.move(tmp_path / "data", tmp_path / "moved")
    lost = ovseg(None, tmp_path / "run", "--limit", "1")
    assert lost.exit_code == 2 and "--data-root" in lost.stderr, lost.output
    moved = ovseg(tmp_path / "moved", tmp_path / "run", "--limit", "1")
    assert moved.exit_code == 0 and "0 new records, 1 resumed" in moved.output, moved.output


def test_f10_save_predictions_given_on_a_resume_writes_every_image(tmp_path):
    write_voc(tmp_path)
    assert ovseg(tmp_path, tmp_path / "run", "--limit", "1").exit_code == 0
    shutil.copy(tmp_path / "run" / "ovseg.jsonl", tmp_path / "first.jsonl")
    result = ovseg(tmp_path, tmp_path / "fresh", "--save-predictions")
    assert result.exit_code == 0
    # the same run resumed with --save-predictions: the finished image's map is written too, its record kept
    result = ovseg(tmp_path, tmp_path / "run", "--save-predictions", "--limit", "1")
    assert result.exit_code == 0 and "0 new records, 1 resumed" in result.output, result.output
    assert (tmp_path / "run" / "ovseg.jsonl").read_text() == (tmp_path / "first.jsonl").read_text()
    saved = sorted(p.name for p in (tmp_path / "run" / "predictions" / "sclip").iterdir())
    assert saved == ["2007_000033.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "run" / "predictions" / "sclip" / saved[0])),
                                  np.asarray(Image.open(tmp_path / "fresh" / "predictions" / "sclip" / saved[0])))


def test_f17_verify_refuses_a_label_map_of_another_size(tmp_path):
    voc = write_voc(tmp_path)
    assert runner.invoke(app, ["data", "verify", "voc21", "--data-root", str(tmp_path)]).exit_code == 0
    write_label(voc / "SegmentationClass" / "2007_000042.png", np.zeros((40, 64), np.uint8))
    result = runner.invoke(app, ["data", "verify", "voc21", "--data-root", str(tmp_path)])
    assert result.exit_code == 2 and "is 64x40, but its image" in result.stderr


# --- F2: every numeric option, fuzzed --------------------------------------------------------------

FUZZ = ["nan", "inf", "-inf", "-1", "1e30"]


def numeric_flags(command: str) -> list[str]:
    """The numeric options of a command, read from its signature (the method options included)."""
    import inspect

    for registered in app.registered_commands:
        if (registered.name or registered.callback.__name__.replace("_cmd", "").replace("_", "-")) == command:
            return [p.default.param_decls[0] for p in inspect.signature(registered.callback).parameters.values()
                    if hasattr(p.default, "param_decls") and any(t in str(p.annotation) for t in ("float", "int"))]
    raise AssertionError(f"no command {command}")


def method_using(flag: str) -> str:
    from camloc.cams.registry import METHODS, list_methods

    name = flag[2:].replace("-", "_")
    return next((m for m in list_methods("*", "vit") if name in METHODS[m].params and not METHODS[m].needs),
                "proxyclip" if name.startswith("proxy") else "gradcam")


def settles(result, where) -> None:
    """One line and exit 2 (click's own usage errors included), or a run that ended well."""
    assert result.exit_code in (0, 2), (where, result.exit_code, result.output)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        (where, repr(result.exception))
    assert "Traceback" not in result.output, where


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    write_voc(root, stems=("2007_000033",))
    return root


def test_explain_method_options_fuzz(tmp_path):
    flags = [f for f in numeric_flags("explain") if f not in ("--topk",)]
    assert "--proxy-beta" in flags and "--cls-lambda" in flags and "--lrp-gamma-linear" in flags
    for flag in flags:
        method = method_using(flag)
        extra = ["--proxy-model", "vit_small_patch8_224.dino:random"] if method == "proxyclip" else []
        for value in FUZZ:
            maps = tmp_path / "maps.npz"
            maps.unlink(missing_ok=True)
            result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--prompt",
                                         "a dog", "--method", method, "--model", "tiny-vit-mh", flag, value,
                                         "--save-heatmap", str(maps), *extra])
            settles(result, (flag, value))
            if result.exit_code == 0:  # a valid run: finite maps that are not constant
                with np.load(maps) as data:
                    heatmaps = data[method]
                assert np.isfinite(heatmaps).all() and heatmaps.max() > heatmaps.min(), (flag, value)
            elif "Usage" not in result.output:
                assert result.stderr.count("\n") == 1 and flag in result.stderr, (flag, value, result.stderr)


def test_eval_sanity_and_search_numeric_options_fuzz(tmp_path, voc):
    method_flags = {f for f in numeric_flags("explain")}
    base = {"eval": ["eval", "--model", "tiny-vit", "--method", "gradcam", "--dataset", "demo", "--limit", "1",
                     "--no-progress", "--protocols", "box,pointing,maxboxacc"],
            "sanity": ["sanity", "--model", "tiny-vit", "--method", "gradcam", "--dataset", "demo", "--limit", "1"],
            "threshold-search": ["threshold-search", "--model", "tiny-vit", "--method", "gradcam", "--limit", "1",
                                 "--no-progress", "--workers", "1"]}
    for command, args in base.items():
        flags = [f for f in numeric_flags(command) if f not in method_flags]
        assert flags, command
        for flag in flags:
            run = list(args)
            if flag.startswith("--ovseg"):
                run = ["eval", "--model", "tiny-vit", "--method", "sclip", "--dataset", "voc21", "--data-root",
                       str(voc), "--protocols", "ovseg", "--no-progress", *SMALL[2:]] if flag == "--ovseg-short-side" \
                    else ["eval", "--model", "tiny-vit", "--method", "sclip", "--dataset", "voc21", "--data-root",
                          str(voc), "--protocols", "ovseg", "--no-progress", *[a for a in SMALL if a != flag]]
                run = [a for i, a in enumerate(run) if not (run[i - 1:i] == [flag])]
            elif flag.startswith("--faith"):
                run = [*args[:-1], "box,deletion-rise"]
            elif flag.startswith("--grid") and command == "threshold-search":
                pass
            for value in FUZZ:
                out = tmp_path / f"{command}{flag}{value}".replace("-", "_")
                result = runner.invoke(app, [*run, "--out", str(out), flag, value])
                settles(result, (command, flag, value))
                if result.exit_code == 0 and (out / "summary.json").is_file():
                    summary = json.loads((out / "summary.json").read_text())
                    assert "nan" not in json.dumps(summary["methods"]).lower(), (command, flag, value)


# --- F7, F12: the Python API and seeds ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    import camloc

    return camloc.load_model("tiny-vit", device="cpu")


@pytest.mark.parametrize("call", [
    lambda c, m, tmp: c.explain(m, "tests/golden/chelsea_small.png", None),
    lambda c, m, tmp: c.explain(m, "tests/golden/chelsea_small.png", "cat", None),
    lambda c, m, tmp: c.explain(m, "tests/golden/chelsea_small.png", "cat", seed="a"),
    lambda c, m, tmp: c.explain(m, "tests/golden/chelsea_small.png", "cat", "rise", seed=-1, rise_masks=8),
    lambda c, m, tmp: c.explain(m, "tests/golden/chelsea_small.png", "cat", "rise", seed=2**32, rise_masks=8),
    lambda c, m, tmp: c.explain(m, np.full((8, 8, 3), 300, np.int64), "cat"),
    lambda c, m, tmp: c.evaluate(m, "demo", "gradcam", out=tmp / "a", limit="2"),
    lambda c, m, tmp: c.evaluate(m, "demo", None, out=tmp / "b"),
    lambda c, m, tmp: c.evaluate(m, "demo", "gradcam", out=tmp / "c", seed=-1),
    lambda c, m, tmp: c.evaluate(m, "demo", "gradcam", out=tmp / "d", shard=(-1, 2)),
    lambda c, m, tmp: c.evaluate(m, "demo", "gradcam", out=tmp / "e", shard=(2, 2)),
    lambda c, m, tmp: c.evaluate(m, "demo", "gradcam", out=tmp / "f", subset_seed="x", limit=1),
    lambda c, m, tmp: c.sanity(m, "demo", "gradcam", out=tmp / "g", seed=-5),
    lambda c, m, tmp: c.sanity(m, "demo", "gradcam", out=tmp / "h", limit=0),
])
def test_f12_the_python_api_raises_camloc_errors_on_bad_arguments(call, tiny, tmp_path):
    import camloc
    from camloc.errors import CamlocError

    with pytest.raises(CamlocError):
        call(camloc, tiny, tmp_path)


def test_f12_an_integer_array_in_0_255_is_an_image(tiny):
    import camloc

    array = np.asarray(Image.open("tests/golden/chelsea_small.png").convert("RGB"))
    a = camloc.explain(tiny, array.astype(np.int64), "cat")
    b = camloc.explain(tiny, array, "cat")
    np.testing.assert_array_equal(a.maps["gradcam"], b.maps["gradcam"])


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_f7_a_seed_outside_numpys_range_is_one_line(tmp_path, seed):
    for args in (["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--method", "rise", "--rise-masks",
                  "8", "--model", "tiny-vit"],
                 ["eval", "--model", "tiny-vit", "--method", "gradcam", "--protocols", "box,deletion-eclip",
                  "--limit", "1", "--out", str(tmp_path / "run"), "--no-progress"]):
        result = runner.invoke(app, [*args, "--seed", seed])
        assert result.exit_code == 2 and "--seed" in result.stderr and "0 and 4294967295" in result.stderr, \
            result.output


@pytest.mark.parametrize("extra", [["--classes", "cat"], ["--subset-seed", "3"], ["--prompt-template", "a {}."],
                                   ["--threshold", "0.5"], ["--faith-steps", "10"], ["--save-heatmaps"],
                                   ["--pointing-tolerance", "3"]])
def test_f3_options_ovseg_does_not_use_are_refused(tmp_path, voc, extra):
    result = ovseg(voc, tmp_path / "run", *extra)
    assert result.exit_code == 2 and extra[0] in result.stderr and "no effect under --protocols ovseg" in result.stderr


def test_f3_save_predictions_on_a_box_run_is_refused(tmp_path):
    result = runner.invoke(app, ["eval", "--model", "tiny-vit", "--method", "gradcam", "--limit", "1", "--out",
                                 str(tmp_path / "r"), "--save-predictions"])
    assert result.exit_code == 2 and "--save-predictions belong to --protocols ovseg" in result.stderr


def test_f13_an_image_too_narrow_for_a_window_is_skipped_and_named(tmp_path):
    voc = write_voc(tmp_path, stems=("2007_000033", "2007_000042", "2007_000061"))
    Image.fromarray(np.full((3, 700, 3), 90, np.uint8)).save(voc / "JPEGImages" / "2007_000042.jpg")
    write_label(voc / "SegmentationClass" / "2007_000042.png", np.zeros((3, 700), np.uint8))
    result = ovseg(tmp_path, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "skipped image 2007_000042: 700x3 px is 2048x9 at the protocol's scale" in " ".join(result.stderr.split())
    assert "complete false" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] is False and summary["methods"]["sclip"]["n_images"] == 2
    assert [s["image_id"] for s in summary["faults"]["skipped_images"]] == ["2007_000042"]
    report = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert report.exit_code == 2 and "--allow-incomplete" in report.stderr


def test_f15_f16_all_dense_methods_under_ovseg_and_the_background_class_named(tmp_path):
    import csv

    from camloc.cams.registry import METHODS, list_methods

    write_voc(tmp_path, stems=("2007_000033",))
    result = ovseg(tmp_path, tmp_path / "run", "--method", "all")  # the last --method wins
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    dense = [m for m in list_methods("*", "vit") if METHODS[m].segments and not METHODS[m].needs]
    assert list(summary["methods"]) == dense and {"cliptrase", "scclip", "cliper", "resclip"} <= set(dense)
    rows = list(csv.DictReader((tmp_path / "run" / "ovseg_classes.csv").open()))
    assert rows[0]["class"] == "background" and rows[1]["class"] == "aeroplane"
    box = runner.invoke(app, ["eval", "--dataset", "voc21", "--method", "gradcam", "--model", "tiny-vit", "--out",
                              str(tmp_path / "box"), "--data-root", str(tmp_path)])
    assert box.exit_code == 2 and "voc21 is a segmentation dataset: run it with --protocols ovseg" in box.stderr


def test_f11_a_box_run_resumes_on_its_moved_data_and_refuses_when_it_caches_maps(tmp_path):
    from test_protocols import coco_with_polygons

    ann, images = coco_with_polygons(tmp_path / "data")

    def run(out, a, i, *extra):
        return runner.invoke(app, ["eval", "--method", "gradcam", "--model", "tiny-rn", "--ann-file", str(a),
                                   "--image-dir", str(i), "--out", str(out), "--no-progress", "--limit", "2", *extra])

    assert run(tmp_path / "run", ann, images).exit_code == 0
    assert run(tmp_path / "cached", ann, images, "--save-heatmaps").exit_code == 0
    shutil.move(tmp_path / "data", tmp_path / "moved")
    ann, images = tmp_path / "moved" / ann.name, tmp_path / "moved" / images.name
    moved = run(tmp_path / "run", ann, images)
    assert moved.exit_code == 0 and "0 new records, 2 resumed" in moved.output, moved.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["image_root"] == str(tmp_path / "data" / "images")  # the identity it began with
    assert config["data_sources"]["image_dir"] == str(images)                 # where the data is now
    cached = run(tmp_path / "cached", ann, images, "--save-heatmaps")
    assert cached.exit_code == 2 and "heatmap cache is keyed by the images' folder" in cached.stderr


def test_data_verify_takes_the_names_data_download_takes(tmp_path):
    write_voc(tmp_path)
    result = runner.invoke(app, ["data", "verify", "voc2012", "--data-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "voc2012 -> voc21" in result.stdout and "voc2012 -> voc20" in result.stdout
    assert result.stdout.count("\nok") + result.stdout.startswith("ok") == 2


def test_summary_says_when_it_finished_and_each_mean_iou_s_interval(tmp_path):
    import re

    result = runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam", "--limit", "3", "--out",
                                 str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", summary["finished_at"])
    low, high = summary["methods"]["gradcam"]["mean_iou_ci95"]
    assert low <= summary["methods"]["gradcam"]["mean_iou"] <= high
