"""`camloc reproduce`: presets held against the official configs recorded with their sources, published numbers
as data, and a preset run end to end on tiny models and test-made datasets in each official layout (partial
titles, no differences printed for a partial run, shards merging to the one-process table)."""
import hashlib
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from camloc import reproduce
from camloc.cli.app import app
from camloc.datasets.segmentation import SEG_DATASETS
from camloc.errors import OptionError, RunFolderError
from camloc.segment.infer import resolve_settings

runner = CliRunner()
REAL = Path(__file__).parent / "real-formats"
CLASSES = Path(reproduce.__file__).resolve().parent.parent / "segment" / "classes"


def _official_files() -> dict[str, str]:
    """camloc's class file -> the harness file it copies (camloc/segment/classes/README.md's table)."""
    rows = re.findall(r"^\| (\S+\.txt) \|.*\| (cls_\S+\.txt|dataset_cfg\.py:\S+) \|$", (CLASSES / "README.md").read_text(),
                      re.M)
    return dict(rows)


METHOD_KEYS = {"temp_thd": "resclip_sfr_threshold", "attn_rcs_weights": "resclip_rcs_weights",
               "attn_sfr_weights": "resclip_sfr_weights", "cls_weight": "cliptrase_cls_weight"}
"""An official config's per-dataset method settings -> the camloc option that holds each (ResCLIP's, CLIPtrase's)."""


def _option_text(value):
    """A recorded value as camloc's option records it ([2.0, 0.3] -> "2,0.3")."""
    return ",".join(f"{v:g}" for v in value) if isinstance(value, list) else value


@pytest.mark.parametrize("name", sorted(reproduce.presets()))
def test_every_preset_holds_the_official_settings_recorded_with_their_source(name):
    p = reproduce.preset(name)
    official = reproduce.official_settings(p.official)
    assert re.search(r"(at [0-9a-f]{7}|appendix)", official["source"]), "the record names its commit or table"
    defaults = official["defaults"]
    if p.protocol == "ovseg":
        assert set(p.datasets) == set(official["datasets"]), "every dataset's settings are recorded"
        assert p.models == [defaults["model"]]
        copies = _official_files()
        for dataset in p.datasets:
            want = {**defaults, "area_threshold": None, **official["datasets"][dataset]}
            given = {k: v for k, v in p.ovseg.items() if k != "preset"}
            s = resolve_settings(dataset, p.ovseg["preset"], **given)
            got = {"short_side": s.short_side, "crop": s.crop, "stride": s.stride, "logit_scale": s.logit_scale,
                   "bg_threshold": s.bg_threshold, "area_threshold": s.area_threshold, "pamr_steps": s.pamr_steps}
            got.update({k: v for k, v in s.to_json().items() if k in ("geometry", "cluster_vote", "ignore_as_background")})
            assert got == {k: want.get(k, False) for k in got}, dataset  # a harness step it records, or none
            assert (s.templates, s.normalisation, s.position_resize) == (
                want.get("templates", "imagenet80"), want.get("normalisation", "harness"), "sclip")
            assert not {"geometry", "cluster_vote", "ignore_as_background"} - set(got) & set(want), dataset
            assert copies[s.classes or SEG_DATASETS[dataset].classes_file] == want["classes"], dataset
            method = {METHOD_KEYS[k]: _option_text(v) for k, v in want.items() if k in METHOD_KEYS}
            assert {k: p.options_for(dataset).get(k) for k in method} == method, dataset
    elif p.protocol == "threshold-search":
        assert (p.search["iou"], p.search["grid"], p.search["train"]["per_class"], p.search["val"]["split"]) == (
            defaults["iou"], defaults["grid"], defaults["per_class"], defaults["val_split"])
    else:
        assert (p.eval["threshold"], p.eval["iou"], p.eval["prompt_template"]) == (
            defaults["threshold"], defaults["iou"], defaults["prompt_template"])
    assert p.precision == defaults.get("precision"), "the harness's precision, where it records one"
    assert p.miou == defaults.get("miou", "mmseg"), "the paper's mIoU average"


def test_the_scclip_preset_runs_the_official_method_settings():
    """SC-CLIP's base_config.py layer indices and class-token weight are what camloc's scclip runs by default on
    ViT-B/16's 12 blocks, and the preset overrides none of them."""
    from camloc.methods.scclip import BETA, LAYERS, RES_CLS, resolve_layers

    p = reproduce.preset("scclip")
    method = reproduce.official_settings(p.official)["method"]
    assert not p.options
    assert resolve_layers(LAYERS.default, 12) == (method["pre_adjust_idx"], method["post_adjust_idx"],
                                                  method["multi_start_idx"], method["multi_end_idx"])
    assert RES_CLS.default == method["res_cls"] and BETA.default == 0.4


def test_the_clearclip_preset_runs_the_papers_attention_not_the_repositorys_default():
    """ClearCLIP's base_config.py says model_type='vanilla' (q-k attention without residual or FFN); the paper's
    method, which the preset runs, is custom_attn(model_type='ClearCLIP'): q-q attention, ignore_residual=True, no FFN.
    camloc's clearclip is that, with no option left to set."""
    from camloc.methods.dense import KEEPS_RESIDUAL, SELF_CORRELATION

    p = reproduce.preset("clearclip")
    method = reproduce.official_settings(p.official)["method"]
    assert (method["model_type"], method["ignore_residual"]) == ("ClearCLIP", True)
    assert method["repository_default_model_type"] == "vanilla" and "vanilla" in p.unpublished
    assert SELF_CORRELATION["clearclip"] == ("q",) and "clearclip" not in KEEPS_RESIDUAL
    assert p.methods == ["clearclip"] and not p.options and not p.dataset_options


def test_the_resclip_preset_runs_the_official_method_settings():
    """ResCLIP's main results (test_all.sh wo_resi resclip 5): the 'resclip' attention is NACLIP's k-k logits with its
    Gaussian term (std 5), no residual, RCS over blocks 6-9, SFR on; camloc's resclip defaults are that on 12 blocks,
    and the preset sets only each config's temp_thd and weights. VOC21 and VOC20, segmented whole, are refused
    by the ovseg preset rather than run otherwise."""
    from camloc.methods import resclip
    from camloc.methods.dense import NACLIP_STD

    p = reproduce.preset("resclip")
    official = reproduce.official_settings(p.official)
    method = official["method"]
    assert (method["arch"], method["attn_strategy"]) == ("wo_resi", "resclip") and resclip.BASE.default == "naclip"
    assert method["gaussian_std"] == NACLIP_STD.default and resclip.PARTS.default == "rcs,sfr"
    assert method["use_rcs"] and method["use_sfr"] and method["delete_same_entity"]

    class Twelve:
        depth = 12
    first, last = 5 * Twelve.depth // 12 + 1, 9 * Twelve.depth // 12  # rcs_attention's `auto`
    assert (resclip.RCS_LAYERS.default, f"{first}-{last}") == ("auto", method["rcs_blocks"])
    assert not p.options and set(p.dataset_options) == set(p.datasets)
    assert set(official["whole_image"]) == {"voc21", "voc20"} and not set(official["whole_image"]) & set(p.datasets)
    for dataset in official["whole_image"]:
        with pytest.raises(OptionError, match=f"resclip on {dataset}: the resclip harness segments this dataset's "
                                              "images whole"):
            resolve_settings(dataset, "resclip")


def test_the_proxyclip_preset_runs_the_official_method_settings():
    """ProxyCLIP's base_config.py: DINO ViT-B/8 from torch hub (timm's vit_base_patch8_224.dino), beta 1.2, gamma 3.0:
    the preset's proxy and camloc's defaults."""
    from camloc.methods.proxy import PROXY_BETA, PROXY_GAMMA

    p = reproduce.preset("proxyclip")
    method = reproduce.official_settings(p.official)["method"]
    assert p.options == {"proxy_model": method["proxy_model"]} and method["hub_model"] == "dino_vitb8"
    assert (PROXY_BETA.default, PROXY_GAMMA.default) == (method["beta"], method["gamma"])


def test_published_numbers_are_data_with_their_source_and_the_printed_means_agree():
    for path in sorted(reproduce.PUBLISHED_DIR.glob("*.toml")):
        data = tomllib.loads(path.read_text())
        for key, table in data.items():
            if key == "paper":
                continue
            assert table["source"] and table["unit"] in ("percent", "fraction"), (path.name, key)
            for model, methods in table["values"].items():
                for method, values in methods.items():
                    numbers = values.values() if isinstance(values, dict) else [values]
                    assert all(isinstance(v, float) for v in numbers), (path.name, key, model, method)
    naclip = reproduce.published_table("naclip", "main")
    values = naclip["values"]["ViT-B/16"]["naclip"]
    assert round(sum(values.values()) / 8, 2) == naclip["printed_mean"]  # the README's Avg is their mean
    s1 = reproduce.published_table("gscorecam", "s1")
    rows = [v for m in s1["values"].values() for v in m.values()]
    assert round(sum(r["single"] for r in rows) / len(rows), 4) == s1["printed_mean"]["single"]
    assert round(sum(r["otsu"] for r in rows) / len(rows), 4) == s1["printed_mean"]["otsu"]


def test_reproduce_list_names_every_preset_and_its_sources():
    result = runner.invoke(app, ["reproduce", "list"])
    assert result.exit_code == 0, result.output
    for name in reproduce.presets():
        assert f"{name}: " in result.stdout
    assert "wangf3014/SCLIP README.md at 5f69176" in result.stdout
    assert "about 1.5 GPU-hours at fp16" in result.stdout  # the harness's precision
    assert "configs/cfg_<dataset>.py and configs/base_config.py at 57fa9aa" in result.stdout


# --- the eight datasets in their official layouts, made here ---------------------------------------------

def _photo(path, w, h, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)


def _label(path, array, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.save(path)


def _blocks(h, w, a, b, border=None):
    label = np.full((h, w), a, np.uint8)
    label[h // 2:, w // 3:] = b
    if border is not None:
        label[h // 2, :] = border
    return label


SIZES = [(40, 30), (30, 44), (36, 36)]


def write_eight(root: Path) -> Path:
    """Three images each of VOC 2012, PASCAL-Context (VOC2010, mmseg's conversion), Cityscapes, COCO (val2017,
    the instances JSON, the official stuffthingmaps) and ADEChallengeData2016, in their released layouts."""
    voc = root / "VOCdevkit" / "VOC2012"
    ctx = root / "VOCdevkit" / "VOC2010"
    ids = []
    for i, (w, h) in enumerate(SIZES):
        stem = f"2008_00000{i}"
        ids.append(stem)
        _photo(voc / "JPEGImages" / f"{stem}.jpg", w, h, i)
        _label(voc / "SegmentationClass" / f"{stem}.png", _blocks(h, w, 0, 15, 255), palette=True)
        _photo(ctx / "JPEGImages" / f"{stem}.jpg", w, h, 10 + i)
        _label(ctx / "SegmentationClassContext" / f"{stem}.png", _blocks(h, w, 0, 12 + i), palette=True)
        city = root / "cityscapes"
        name = f"frankfurt_00000{i}_000019"
        _photo(city / "leftImg8bit" / "val" / "frankfurt" / f"{name}_leftImg8bit.png", w, h, 20 + i)
        _label(city / "gtFine" / "val" / "frankfurt" / f"{name}_gtFine_labelTrainIds.png", _blocks(h, w, 0, 10, 255))
        _photo(root / "val2017" / f"00000000013{i}.jpg", w, h, 30 + i)
        # COCO-Stuff ids - 1: person (0), sky-other (156, train id 148), unlabelled 255
        _label(root / "stuffthingmaps_trainval2017" / "val2017" / f"00000000013{i}.png", _blocks(h, w, 156, 0, 255))
        ade = root / "ADEChallengeData2016"
        _photo(ade / "images" / "validation" / f"ADE_val_0000000{i + 1}.jpg", w, h, 40 + i)
        _label(ade / "annotations" / "validation" / f"ADE_val_0000000{i + 1}.png", _blocks(h, w, 3, 150, 0))
    for folder, lists in ((voc, "Segmentation"), (ctx, "SegmentationContext")):
        (folder / "ImageSets" / lists).mkdir(parents=True, exist_ok=True)
        (folder / "ImageSets" / lists / "val.txt").write_text("\n".join(ids) + "\n")
    thing_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    coco = {"images": [{"id": 130 + i, "file_name": f"00000000013{i}.jpg", "width": w, "height": h}
                       for i, (w, h) in enumerate(SIZES)],
            "categories": [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in thing_ids],
            "annotations": [{"id": i + 1, "image_id": 130 + i, "category_id": 1, "iscrowd": 0, "area": 100,
                             "bbox": [2, 2, 10, 10], "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}
                            for i in range(len(SIZES))]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    return write_eight(tmp_path_factory.mktemp("eight"))


def _reproduce(name, out, data, *extra):
    return runner.invoke(app, ["reproduce", name, "--data-root", str(data), "--out", str(out),
                               "--substitute-model", "tiny-vit", "--no-progress", "--device", "cpu", *extra])


def test_sclip_table2_runs_end_to_end_and_writes_a_partial_table(eight, tmp_path):
    result = _reproduce("sclip-table2", tmp_path / "r", eight, "--limit", "2")
    assert result.exit_code == 0, result.output
    assert "note: sclip-table2 runs at fp16 on CUDA; on the CPU it runs fp32" in result.stderr
    out = tmp_path / "r"
    long = pd.read_csv(out / "table.csv")
    columns = ["voc21", "context60", "coco-object", "voc20", "context59", "coco-stuff-171", "cityscapes",
               "ade20k-150", "mean (with bg)", "mean (without bg)", "mean (8)"]
    assert list(long["column"]) == columns and set(long["method"]) == {"sclip"}
    assert long["published"].tolist()[:8] == [59.63, 31.74, 33.52, 81.54, 34.46, 22.77, 32.34, 16.45]
    assert long["published"].iloc[10] == pytest.approx(39.05625)
    assert long["delta"].isna().all() and not long["flagged"].any()  # partial: no difference is printed
    markdown = (out / "table.md").read_text()
    assert markdown.startswith("**PARTIAL (no differences printed): run with tiny-vit in place of ViT-B/16; ")
    assert "the first 2 images of each dataset only (--limit 2)" in markdown
    # SCLIP's harness runs in fp16 (clip.load on CUDA); on the CPU the preset runs fp32 and the table says so once
    assert "every run was run with precision fp32 (the preset's: fp16)" in markdown
    assert {json.loads((out / "ViT-B-16" / d / "config.json").read_text())["precision"] for d in
            ("voc21", "ade20k-150")} == {"fp32"}
    assert all(re.search(rf"\|\s*{row}\s*\|", markdown) for row in ("published", "camloc", "delta"))
    assert "PARTIAL" in (out / "table.tex").read_text()
    page = (out / "report.html").read_text()  # the report of the preset's runs opens with its table
    assert page.index("reproduction: sclip-table2") < page.index("leaderboard") and "59.63" in page
    # its leaderboard names each run by model and dataset: the values the preset gives a dataset (VOC21's logit scale
    # 65) are not told apart as if they were settings of their own
    assert "logit_scale=" not in page and "ViT-B/16 · voc21 (ovseg)" not in page and "tiny-vit · voc21 (ovseg)" in page
    # camloc's column is each run's own mIoU, x 100
    from camloc.report.tables import ovseg_table

    for dataset in columns[:8]:
        own = ovseg_table([out / "ViT-B-16" / dataset])
        assert long.set_index("column").loc[dataset, "camloc"] == pytest.approx(100 * own[dataset].iloc[0], abs=1e-6)
    eight_mean = long.set_index("column")["camloc"]
    assert eight_mean["mean (8)"] == pytest.approx(eight_mean.iloc[:8].mean())
    # `camloc report` on the eight run folders: one row (each dataset's preset values are the preset, not a
    # difference between the runs), its mean the table's
    folders = sorted((out / "ViT-B-16").iterdir())
    report = ovseg_table(folders)
    assert len(report) == 1 and list(report.columns[:2]) == ["model", "method"]
    assert 100 * report["mean"].iloc[0] == pytest.approx(eight_mean["mean (8)"], abs=1e-6)
    # a setting given beside the preset still parts the rows; two runs that differ only in their data are refused
    import shutil

    changed = tmp_path / "changed" / "voc21"
    shutil.copytree(out / "ViT-B-16" / "voc21", changed)
    config = json.loads((changed / "config.json").read_text())
    config["ovseg"]["logit_scale"] = 30.0
    (changed / "config.json").write_text(json.dumps(config))
    both = ovseg_table([*folders, changed])
    assert len(both) == 2 and "logit_scale=30.0" in both["ovseg"].tolist()
    config["ovseg"]["logit_scale"] = 65.0
    config["data"] = {**config["data"], "images_sha256": "0" * 64}
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunFolderError, match="differ only in their data"):
        ovseg_table([*folders, changed])
    assert eight_mean["mean (with bg)"] == pytest.approx(eight_mean[["voc21", "context60", "coco-object"]].mean())


def test_a_preset_sets_options_by_dataset_and_its_precision(eight, tmp_path, monkeypatch):
    """A harness whose method settings differ by dataset (ResCLIP's per-config weights) or that runs in another
    precision (ClearCLIP's fp16): each run gets its dataset's options and the preset's precision, and a folder run
    otherwise makes the table partial."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "by-dataset.toml").write_text(
        'title = "options by dataset"\nprotocol = "ovseg"\nmodels = ["ViT-B/16"]\nmethods = ["sclip"]\n'
        'datasets = ["voc21", "ade20k-150"]\ntolerance = 0.5\ngpu_hours = 0.1\nofficial = "sclip"\n'
        'unpublished = "a test preset"\nprecision = "fp32"\n\n[ovseg]\npreset = "sclip"\n\n'
        '[dataset_options.voc21]\ncls_lambda = 0.5\n')
    monkeypatch.setattr(reproduce, "PRESETS_DIR", presets)
    out = tmp_path / "r"
    result = _reproduce("by-dataset", out, eight, "--limit", "1")
    assert result.exit_code == 0, result.output
    configs = {d: json.loads((out / "ViT-B-16" / d / "config.json").read_text()) for d in ("voc21", "ade20k-150")}
    assert configs["voc21"]["options"]["cls_lambda"] == 0.5 and configs["ade20k-150"]["options"]["cls_lambda"] == 0.0
    assert {c["precision"] for c in configs.values()} == {"fp32"}
    assert "was run with" not in (out / "table.md").read_text()
    # the ADE20K folder run with VOC21's option: named in the title, no difference printed for it
    config = configs["ade20k-150"]
    config["options"]["cls_lambda"] = 0.5
    config["precision"] = "fp16"
    (out / "ViT-B-16" / "ade20k-150" / "config.json").write_text(json.dumps(config))
    result = _reproduce("by-dataset", out, eight, "--limit", "1", "--table-only")
    assert result.exit_code == 0, result.output
    assert ("ade20k-150 was run with option cls_lambda 0.5 (the preset's: 0.0); precision fp16 (the preset's: fp32)"
            in (out / "table.md").read_text())
    (presets / "bad.toml").write_text((presets / "by-dataset.toml").read_text().replace("dataset_options.voc21",
                                                                                        "dataset_options.voc20"))
    with pytest.raises(OptionError, match=r"bad.toml: \[dataset_options\] names voc20, not among its datasets"):
        reproduce.presets()


def test_the_clearclip_preset_runs_its_own_voc21_names_and_reports_one_row(eight, tmp_path):
    """The clearclip preset on the six datasets whose configs were read: VOC21 scores ClearCLIP's own class file
    (recorded with its SHA-256), the others camloc's; fp32 on the CPU is named as a difference from the harness's
    fp16; `camloc report` gives the six folders one row; a folder run with the dataset's own names is named."""
    from camloc.datasets.segmentation import CLASSES_DIR
    from camloc.report.tables import ovseg_table

    out = tmp_path / "r"
    result = _reproduce("clearclip", out, eight, "--limit", "1", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    voc = json.loads((out / "ViT-B-16" / "voc21" / "config.json").read_text())["ovseg"]
    assert voc["classes"] == "voc21-clearclip.txt" and voc["bg_threshold"] == 0.5
    assert voc["classes_sha256"] == hashlib.sha256((CLASSES_DIR / "voc21-clearclip.txt").read_bytes()).hexdigest()
    assert "classes" not in json.loads((out / "ViT-B-16" / "voc20" / "config.json").read_text())["ovseg"]
    rows = pd.read_csv(out / "ViT-B-16" / "voc21" / "ovseg_classes.csv")
    assert rows["class"].tolist()[-1] == "tvmonitor"
    markdown = (out / "table.md").read_text()
    assert "every run was run with precision fp32 (the preset's: fp16)" in markdown and "on voc21 was run" not in markdown
    long = pd.read_csv(out / "table.csv")
    assert list(long["column"]) == ["voc21", "context60", "coco-object", "voc20", "context59", "cityscapes",
                                    "mean (with bg)"] and long["published"].isna().all()
    report = ovseg_table(sorted((out / "ViT-B-16").iterdir()))
    assert len(report) == 1 and "ovseg" not in report.columns
    config_file = out / "ViT-B-16" / "voc21" / "config.json"
    config = json.loads(config_file.read_text())
    del config["ovseg"]["classes"], config["ovseg"]["classes_sha256"]
    config_file.write_text(json.dumps(config))
    assert _reproduce("clearclip", out, eight, "--limit", "1", "--precision", "fp32", "--table-only").exit_code == 0
    assert "ovseg classes None (the preset's: 'voc21-clearclip.txt')" in (out / "table.md").read_text()


def test_the_resclip_preset_gives_each_dataset_its_configs_weights(eight, tmp_path):
    """One of the resclip preset's datasets end to end (ResCLIP's feedback pass runs PAMR on every window: seconds each
    on the CPU): its run folder records its config's temp_thd and weights and the preset's ovseg values, and the table
    holds them (only fp32, run here on the CPU, is named). The other datasets' values are held by the official-settings
    test."""
    out = tmp_path / "r"
    result = _reproduce("resclip", out, eight, "--limit", "1", "--precision", "fp32", "--datasets", "context59")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "ViT-B-16" / "context59" / "config.json").read_text())
    assert {k: config["options"][k] for k in ("resclip_sfr_threshold", "resclip_rcs_weights", "resclip_sfr_weights")} \
        == {"resclip_sfr_threshold": 0.25, "resclip_rcs_weights": "2,0.4", "resclip_sfr_weights": "1.8,0.7"}
    assert (config["ovseg"]["preset"], config["ovseg"]["short_side"], config["ovseg"]["crop"]) == ("resclip", 336, 224)
    markdown = (out / "table.md").read_text()
    assert "ViT-B/16 on context59 was run with precision fp32 (the preset's: fp16)" in markdown
    assert "was run with option" not in markdown and "not run: ViT-B/16 on context60" in markdown


def test_the_proxyclip_preset_runs_end_to_end_with_a_random_proxy(eight, tmp_path, monkeypatch):
    """The proxyclip preset, its pretrained DINO swapped for a seeded random one (no download here): VOC21 and
    COCO-Object score ProxyCLIP's own class files at crop 336 and their thresholds; the swapped proxy is named."""
    presets = tmp_path / "presets"
    presets.mkdir()
    text = (reproduce.PRESETS_DIR / "proxyclip.toml").read_text()
    (presets / "proxyclip.toml").write_text(text.replace('"vit_base_patch8_224.dino"',
                                                          '"vit_small_patch8_224.dino:random"'))
    (presets / "proxyclip-as-published.toml").write_text(text)
    monkeypatch.setattr(reproduce, "PRESETS_DIR", presets)
    out = tmp_path / "r"
    result = _reproduce("proxyclip", out, eight, "--limit", "1", "--precision", "fp32",
                        "--datasets", "voc21,coco-object")
    assert result.exit_code == 0, result.output
    for dataset, classes, threshold in (("voc21", "voc21-proxyclip.txt", 0.2),
                                        ("coco-object", "coco-object-proxyclip.txt", 0.25)):
        config = json.loads((out / "ViT-B-16" / dataset / "config.json").read_text())
        assert (config["ovseg"]["classes"], config["ovseg"]["bg_threshold"], config["ovseg"]["crop"]) == (
            classes, threshold, 336)
        assert config["options"]["proxy_model"] == "vit_small_patch8_224.dino:random"
    # the same folders held to the published preset: the proxy is named, no difference is printed
    (out / "reproduce.json").write_text((out / "reproduce.json").read_text().replace('"proxyclip"',
                                                                                     '"proxyclip-as-published"'))
    table = reproduce.write_table("proxyclip-as-published", out)
    assert table["partial"] and ("option proxy_model 'vit_small_patch8_224.dino:random' (the preset's: "
                                 "'vit_base_patch8_224.dino')") in table["title"]


def test_cliptrases_miou_averages_the_classes_in_the_ground_truth():
    """configs/metric.py: IoU = I / (U + 0.01) over the classes with ground-truth pixels; a class only predicted is
    left out (mmseg's IoUMetric counts it as 0), one neither predicted nor labelled too."""
    from camloc.evaluators.segmentation import SegmentationState

    state = SegmentationState(np.array([5, 0, 0]), np.array([10, 4, 0]), np.array([7, 4, 0]), np.array([8, 0, 0]))
    assert reproduce.gt_classes_miou(state) == pytest.approx(5 / 10.01)
    assert state.result()["miou"] == pytest.approx(0.25)


def test_cliptrases_coco80_and_ade847_readings():
    """COCO80: the 171 COCO-Stuff train ids with things 0..79 -> 1..80, 'banner' (80) and unlabelled (255) -> its
    background 0, the other stuff not scored. ADE-847: one prompt a line, commas kept."""
    from camloc.datasets.segmentation import COCO80_FROM_STUFF
    from camloc.segment.infer import class_file, read_classes

    assert COCO80_FROM_STUFF[[0, 79, 80, 81, 170, 255]].tolist() == [1, 80, 0, 255, 255, 0]
    ade = read_classes(class_file("cliptrase-ade847.txt"))
    assert len(ade) == 847 and ade[1] == ["building, edifice"] and ade[-1] == ["adding machine, totalizer, totaliser"]
    coco = read_classes(class_file("cliptrase-coco80.txt"))
    assert len(coco) == 81 and len(coco[0]) == 107 and coco[1] == ["person"] and coco[80] == ["toothbrush"]


def test_the_cliptrase_preset_runs_its_harness_end_to_end(eight, tmp_path):
    """cliptrase-336 on two datasets: the centre crop, the cluster vote, its class lists, VOC21's label 255 as
    background, VOC20's class-token product; the table's value is the folder's mIoU over the classes in the ground
    truth, beside the README's number, with no precision difference on the CPU (the harness runs fp32)."""
    from camloc.report.tables import ovseg_groups, ovseg_method_states

    out = tmp_path / "r"
    result = _reproduce("cliptrase-336", out, eight, "--limit", "1", "--datasets", "voc21,voc20,coco80-cliptrase")
    assert result.exit_code == 0, result.output
    assert "note:" not in result.stderr
    configs = {d: json.loads((out / "ViT-B-16" / d / "config.json").read_text()) for d in ("voc21", "voc20")}
    voc21 = configs["voc21"]["ovseg"]
    assert (voc21["geometry"], voc21["cluster_vote"], voc21["ignore_as_background"], voc21["classes"]) == (
        "centre-crop", [1.1, 7], True, "cliptrase-voc21.txt")
    assert (configs["voc20"]["options"]["cliptrase_cls_weight"], configs["voc21"]["options"]["cliptrase_cls_weight"]) \
        == (True, False)
    assert {c["precision"] for c in configs.values()} == {"fp32"}
    long = pd.read_csv(out / "table.csv").set_index("column")
    assert long.loc["voc21", "published"] == 53.04 and long.loc["voc20", "published"] == 81.2
    [group] = ovseg_groups([out / "ViT-B-16" / "voc21"])
    state, _ = ovseg_method_states(group)["cliptrase"]
    assert long.loc["voc21", "camloc"] == pytest.approx(100 * reproduce.gt_classes_miou(state))
    assert state.label.sum() == 336 * 336  # VOC's boundary pixels scored as background: every pixel of the crop
    markdown = (out / "table.md").read_text()
    assert "mIoU (%) over the classes in the ground truth" in markdown and "precision" not in markdown
    # its COCO80: the COCO-Stuff labels (here person 0, sky-other 148, unlabelled 255) read as background + 80 things
    [group] = ovseg_groups([out / "ViT-B-16" / "coco80-cliptrase"])
    state, _ = ovseg_method_states(group)["cliptrase"]
    assert len(state.label) == 81 and state.label[1] > 0 and state.label[0] > 0 and state.label[2:].sum() == 0
    assert long.loc["coco80-cliptrase", "published"] == 44.84


def test_two_shards_merge_to_the_one_process_table(eight, tmp_path):
    args = ["--limit", "2", "--datasets", "voc21,voc20"]
    one = _reproduce("sclip-table2", tmp_path / "one", eight, *args)
    assert one.exit_code == 0, one.output
    first = _reproduce("sclip-table2", tmp_path / "two", eight, *args, "--shard", "0/2")
    assert first.exit_code == 0, first.output
    assert "images" in (tmp_path / "two" / "table.md").read_text().split("**")[1]  # says what is missing
    second = _reproduce("sclip-table2", tmp_path / "two", eight, *args, "--shard", "1/2")
    assert second.exit_code == 0, second.output
    a, b = pd.read_csv(tmp_path / "one" / "table.csv"), pd.read_csv(tmp_path / "two" / "table.csv")
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "one" / "table.md").read_text() == (tmp_path / "two" / "table.md").read_text()
    again = runner.invoke(app, ["reproduce", "sclip-table2", "--out", str(tmp_path / "two"), "--table-only"])
    assert again.exit_code == 0 and (tmp_path / "two" / "table.md").read_text() == (
        tmp_path / "one" / "table.md").read_text()


def test_a_complete_run_prints_differences_and_flags_those_beyond_the_tolerance(eight, tmp_path, monkeypatch):
    """A preset whose model is the one run and whose runs are whole: every cell present on both sides has a
    difference, flagged beyond the tolerance; a dataset not run has neither."""
    presets, published = tmp_path / "presets", tmp_path / "published"
    presets.mkdir(), published.mkdir()
    (presets / "tiny.toml").write_text(
        'title = "tiny"\npublished = "tiny:t"\nprotocol = "ovseg"\nmodels = ["tiny-vit"]\nmethods = ["sclip", '
        '"naclip"]\ndatasets = ["voc21", "voc20"]\ntolerance = 0.5\ngpu_hours = 0\nofficial = "sclip"\n'
        '[ovseg]\npreset = "sclip"\n')
    (published / "tiny.toml").write_text(
        'paper = "tiny"\n[t]\nsource = "made here"\nunit = "percent"\n[t.values.tiny-vit.sclip]\nvoc21 = 10.0\n'
        'voc20 = 20.0\n[t.values.tiny-vit.naclip]\nvoc21 = 0.0\n')
    monkeypatch.setattr(reproduce, "PRESETS_DIR", presets)
    monkeypatch.setattr(reproduce, "PUBLISHED_DIR", published)
    out = tmp_path / "r"
    result = runner.invoke(app, ["reproduce", "tiny", "--data-root", str(eight), "--out", str(out), "--datasets",
                                 "voc21", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    long, wide, title, partial = reproduce.reproduction_table("tiny", out)
    assert partial and title.startswith("PARTIAL (differences only where a cell's runs are whole): not run: tiny-vit "
                                         "on voc20. tiny: tiny — published: made here")
    cells = long.set_index(["method", "column"])
    sclip = cells.loc[("sclip", "voc21")]
    assert sclip["delta"] == pytest.approx(sclip["camloc"] - 10.0)
    assert bool(sclip["flagged"]) == (abs(sclip["delta"]) > 0.5)
    assert cells.loc[("naclip", "voc21"), "delta"] == pytest.approx(cells.loc[("naclip", "voc21"), "camloc"])
    assert cells.loc[("sclip", "voc20"), ["camloc", "delta"]].isna().all()  # not run: no value, no difference
    assert cells.loc[("naclip", "voc20"), "published"] != cells.loc[("naclip", "voc20"), "published"]  # NaN
    markdown = (out / "table.md").read_text()
    flagged = long[long["flagged"]]
    assert ("! = the difference exceeds" in markdown) == (len(flagged) > 0)
    rest = runner.invoke(app, ["reproduce", "tiny", "--data-root", str(eight), "--out", str(out), "--no-progress",
                               "--device", "cpu"])  # resumes voc21, runs voc20
    assert rest.exit_code == 0, rest.output
    long, _, title, partial = reproduce.reproduction_table("tiny", out)
    assert not partial and title == "tiny: tiny — published: made here; unit: mIoU (%); tolerance 0.5"
    assert long.set_index(["method", "column"]).loc[("sclip", "voc20"), "delta"] == pytest.approx(
        long.set_index(["method", "column"]).loc[("sclip", "voc20"), "camloc"] - 20.0)
    # a folder whose config says another setting or model (run by hand, or before the preset changed) is never
    # compared as the paper's
    voc21 = out / "tiny-vit" / "voc21" / "config.json"
    config = json.loads(voc21.read_text())
    config["ovseg"]["logit_scale"] = 10.0
    voc21.write_text(json.dumps(config))
    voc20 = out / "tiny-vit" / "voc20" / "config.json"
    config = json.loads(voc20.read_text())
    config["model"] = "tiny-rn"
    voc20.write_text(json.dumps(config))
    long, _, title, partial = reproduce.reproduction_table("tiny", out)
    assert partial and "tiny-vit on voc21 was run with ovseg logit_scale 10.0 (the preset's: 65.0)" in title
    assert "tiny-vit on voc20 was run with model tiny-rn (the preset's: tiny-vit)" in title
    assert long["delta"].isna().all() and long["camloc"].notna().all()  # values shown, no difference


def test_a_box_preset_runs_end_to_end(tmp_path):
    from test_datasets import write_ade_full

    write_ade_full(tmp_path / "data")
    result = runner.invoke(app, ["reproduce", "gscorecam-s3", "--data-root", str(tmp_path / "data"), "--out",
                                 str(tmp_path / "r"), "--substitute-model", "tiny-rn", "--methods", "gradcam,layercam",
                                 "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    long = pd.read_csv(tmp_path / "r" / "table.csv")
    methods = ["gradcam", "gradcam++", "xgradcam", "groupcam", "layercam", "gscorecam", "scorecam"]
    assert long[["model", "method"]].values.tolist() == [[m, x] for m in ("RN50x4", "RN50x16") for x in methods]
    assert long["published"].tolist()[:7] == [0.073, 0.105, 0.112, 0.161, 0.068, 0.211, 0.198]
    assert long["delta"].isna().all()
    ran = long[long["method"].isin(["gradcam", "layercam"])]
    assert ran["camloc"].notna().all() and long[~long.index.isin(ran.index)]["camloc"].isna().all()
    from camloc.report.tables import long_table

    own = long_table([tmp_path / "r" / "RN50x16" / "ade20k-scenes"]).set_index("method")["mean_iou"]
    assert ran.set_index(["model", "method"]).loc[("RN50x16", "layercam"), "camloc"] == pytest.approx(own["layercam"])
    markdown = (tmp_path / "r" / "table.md").read_text()
    assert markdown.startswith("**PARTIAL (no differences printed): run with tiny-rn in place of RN50x4, RN50x16; ")
    assert "not run: RN50x4 gradcam++ on ade20k-scenes, " in markdown
    assert "every run was run with precision fp32 (the preset's: fp16)" in markdown  # the CPU's, named


def test_bad_input_is_one_line(tmp_path):
    unknown = runner.invoke(app, ["reproduce", "sclip-table3", "--out", str(tmp_path)])
    assert unknown.exit_code == 2 and "no reproduction preset 'sclip-table3'" in unknown.output
    subset = runner.invoke(app, ["reproduce", "sclip-table2", "--out", str(tmp_path), "--datasets", "voc30"])
    assert subset.exit_code == 2 and "--datasets voc30: not in this preset" in subset.output
    stray = runner.invoke(app, ["reproduce", "sclip-table2", "--out", str(tmp_path), "--data", "voc30=/x"])
    assert stray.exit_code == 2 and "--data voc30: not a dataset of sclip-table2" in stray.output
    shape = runner.invoke(app, ["reproduce", "sclip-table2", "--out", str(tmp_path), "--data", "voc21"])
    assert shape.exit_code == 2 and "--data 'voc21': write DATASET=FOLDER" in shape.output
    missing = runner.invoke(app, ["reproduce", "sclip-table2", "--out", str(tmp_path / "none"), "--table-only"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_the_box_preset_is_the_table_s3_config():
    """gscorecam-s3 runs what configs/table_s3.toml (the documented `camloc eval --config` route) runs."""
    config = tomllib.loads((Path(__file__).resolve().parents[1] / "configs" / "table_s3.toml").read_text())["eval"]
    p = reproduce.preset("gscorecam-s3")
    assert (p.models, p.methods, p.datasets) == (config["models"], config["methods"], [config["dataset"]])
    assert (p.eval["threshold"], p.eval["iou"], p.options) == (config["threshold"], config["iou"], config["options"])


def test_the_threshold_search_preset_is_the_table_s1_config():
    config = tomllib.loads((Path(__file__).resolve().parents[1] / "configs" / "table_s1.toml").read_text())
    config = config["threshold_search"]
    p = reproduce.preset("gscorecam-s1")
    assert p.runs == config["runs"] and p.options == config["options"] and p.search["iou"] == config["iou"]
    assert (p.search["grid"], p.search["train"], p.search["val"]) == (config["grid"], config["train"], config["val"])
    assert p.rows == [(run["model"], m) for run in config["runs"] for m in run["methods"]]  # the appendix's rows


def test_the_table_s1_preset_runs_the_threshold_search_end_to_end(tmp_path):
    from test_datasets import write_coco

    data = tmp_path / "data"
    write_coco(data, "train2017")
    write_coco(data, "val2017")
    result = runner.invoke(app, ["reproduce", "gscorecam-s1", "--data-root", str(data), "--out", str(tmp_path / "r"),
                                 "--substitute-model", "tiny-rn", "--models", "RN50x16", "--methods",
                                 "gradcam,layercam", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    long = pd.read_csv(tmp_path / "r" / "table.csv")
    assert len(long) == 3 * 10 and list(long["column"][:3]) == ["single", "otsu", "difference"]
    cells = long.set_index(["model", "method", "column"])
    assert cells.loc[("RN50x16", "gradcam", "single"), "published"] == 0.1195
    assert cells.loc[("RN50x16", "gradcam", "difference"), "published"] == pytest.approx(0.1156 - 0.1195)
    summary = json.loads((tmp_path / "r" / "search" / "summary.json").read_text())
    row = next(r for r in summary["rows"] if r["method"] == "layercam")
    assert cells.loc[("RN50x16", "layercam", "otsu"), "camloc"] == pytest.approx(row["otsu"])
    assert cells.loc[("RN50x16", "layercam", "difference"), "camloc"] == pytest.approx(row["otsu"] - row["single"])
    assert cells.loc[("ViT-B/32", "hilacam", "single"), ["camloc", "delta"]].isna().all()
    assert long["delta"].isna().all()
    markdown = (tmp_path / "r" / "table.md").read_text()
    assert markdown.startswith("**PARTIAL (no differences printed): run with tiny-rn in place of RN50x16, ViT-B/32")
    assert "not run: RN50x16 gradcam++, RN50x16 xgradcam, " in markdown and "ViT-B/32 hilacam" in markdown
    assert "the threshold search was run with precision fp32 (the preset's: fp16)" in markdown  # the CPU's, named
    page = (tmp_path / "r" / "report.html").read_text()  # the search's own Table S1 section follows the table
    assert page.index("reproduction: gscorecam-s1") < page.index("Table S1: ")
    assert "\\caption{PARTIAL" in (tmp_path / "r" / "table.tex").read_text()
