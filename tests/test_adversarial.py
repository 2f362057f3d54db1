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
