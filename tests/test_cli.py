"""The command line: --help everywhere, version, list, explain outputs, and clear errors."""
import json
import re

import numpy as np
import pytest
from conftest import GOLDEN, golden
from PIL import Image
from typer.testing import CliRunner

from camloc import __version__
from camloc.cli.app import app

runner = CliRunner()
IMAGE = str(GOLDEN / "chelsea_small.png")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_version_and_help_on_every_command():
    assert invoke("--version").stdout.strip() == f"camloc {__version__}"
    for cmd in ([], ["list"], ["explain"], ["eval"]):
        result = invoke(*cmd, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout


def test_list():
    assert "RN50x16" in invoke("list", "models").stdout
    methods = invoke("list", "methods").stdout
    assert all(m in methods for m in ["gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "gscorecam",
                                      "gscorecam-abs", "groupcam", "hilacam"])
    assert "demo" in invoke("list", "datasets").stdout


@pytest.mark.parametrize("model,prefix", [("tiny-rn", "tiny_rn"), ("tiny-vit", "tiny_vit")])
def test_explain_reproduces_golden_heatmaps(model, prefix, tmp_path):
    out = tmp_path / "maps.npz"
    methods = "gradcam,gradcam++,xgradcam,layercam"
    result = invoke("explain", IMAGE, "--prompt", "cat", "--method", methods, "--model", model,
                    "--save-heatmap", out, "--device", "cpu")
    assert result.exit_code == 0, result.stdout
    maps = np.load(out)
    assert sorted(maps.files) == sorted(methods.split(","))
    for method in methods.split(","):
        assert maps[method].shape == (100, 150) and maps[method].dtype == np.float32
        if (model, method) != ("tiny-vit", "layercam"):  # see test_vit_layercam_uses_class_token_gradient
            np.testing.assert_allclose(maps[method], golden(f"{prefix}_{method}.npy"), atol=1e-4, rtol=0)


def test_explain_json_npy_and_figure(tmp_path):
    npy, fig = tmp_path / "m.npy", tmp_path / "fig.png"
    result = invoke("explain", IMAGE, "-p", "cat", "-p", "dog", "--method", "gradcam", "--model", "tiny-rn",
                    "--json", "--save-heatmap", npy, "--out", fig, "--gt-box", "10,10,100,90")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert [r["prompt"] for r in report["results"]] == ["cat", "dog"]
    assert report["results"][0]["score"] == pytest.approx(1.37218, abs=1e-4)  # golden logit
    # the golden Otsu box of tiny_rn gradcam (golden README §6)
    assert report["results"][0]["methods"]["gradcam"]["box"] == [105, 41, 150, 100]
    assert np.load(npy).shape == (2, 100, 150)  # several prompts: (P, H, W)
    with Image.open(fig) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 100


@pytest.mark.parametrize(
    "args,message",
    [
        (["explain", "missing.png", "-p", "cat", "--model", "tiny-rn"], "image file missing.png does not exist"),
        (["explain", IMAGE, "-p", "cat", "--model", "tiny-rn", "--method", "gradcan"],
         "unknown method 'gradcan'; valid methods: gradcam, gradcam++"),
        (["explain", IMAGE, "-p", "cat", "--model", "RN49"], "unknown model 'RN49'; valid names: RN50"),
        (["explain", IMAGE, "-p", "cat", "--model", "tiny-rn", "--method", "gradcam,hilacam"],
         "method 'hilacam' works only on ViT, average-pooled ViT or timm-trunk ViT CLIP models, and tiny-rn is a ResNet"),
        (["eval", "--method", "hilacam", "--model", "RN50", "--out", "r"],
         "method 'hilacam' works only on ViT, average-pooled ViT or timm-trunk ViT CLIP models, and RN50 is a ResNet"),
        (["explain", IMAGE, "-p", "cat", "--model", "tiny-rn", "--topk", "0"], "--topk must be at least 1"),
        (["explain", IMAGE, "-p", "cat", "--model", "tiny-rn", "--grouping", "spectral"], "--grouping 'spectral'"),
        (["explain", IMAGE, "-p", "cat", "--model", "tiny-rn", "--chunk-size", "-3"], "--chunk-size '-3'"),
        (["explain", IMAGE, "-p", "cat", "--model", "nowhere/ckpt.pt"], "checkpoint file nowhere/ckpt.pt does not exist"),
        (["explain", IMAGE, "-p", "cat", "--model", "tiny-rn", "--threshold", "high"], "--threshold 'high'"),
        (["explain", IMAGE, "-p", "cat", "--model", "tiny-rn", "--method", "gradcam,layercam", "--save-heatmap", "x.npy"],
         "several methods need an .npz file"),
        (["eval", "--method", "gradcam", "--model", "tiny-rn", "--dataset", "imagenet", "--out", "r"],
         "unknown dataset 'imagenet'; valid datasets: demo"),
        (["eval", "--method", "gradcam", "--model", "tiny-rn", "--out", "r", "--classes", "zebra"],
         "--classes: zebra not in dataset demo"),
        (["eval", "--method", "gradcam", "--model", "tiny-rn", "--out", "r", "--iou", "voc"], "--iou 'voc'"),
    ],
)
def test_bad_input_gives_one_clear_line_and_nonzero_exit(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_explain_all_methods_on_vit_side_by_side(tmp_path):
    fig = tmp_path / "fig.png"
    result = invoke("explain", IMAGE, "--prompt", "cat", "--method", "all", "--model", "tiny-vit", "--out", fig,
                    "--topk", 30, "--rise-masks", 32, "--json")
    assert result.exit_code == 0
    methods = json.loads(result.stdout)["results"][0]["methods"]
    assert list(methods) == ["gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "gscorecam",
                             "gscorecam-abs", "groupcam", "hilacam", "clip-es", "grad-eclip", "legrad", "attnlrp", "maskclip", "sclip", "clearclip", "naclip", "cliptrase", "scclip", "cliper", "resclip", "gem",
                             "clipsurgery", "rise"]
    assert methods["hilacam"]["box"] == [0, 23, 150, 100]  # golden README §6
    assert methods["gscorecam"]["box"] == [0, 0, 117, 100]
    with Image.open(fig) as im:  # 24 methods wrap: 6 panels a row, 4 rows (no 5,200 px strip)
        assert 1000 < im.width <= 1500 and im.height > im.width / 2


def test_unreadable_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = runner.invoke(app, ["explain", str(bad), "-p", "cat", "--model", "tiny-rn"])
    assert result.exit_code == 2 and f"image file {bad} could not be read as an image" in result.output


def test_refused_inputs_on_the_command_line(tmp_path):
    import torch

    not_clip = tmp_path / "resnet18.pt"
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, not_clip)
    result = runner.invoke(app, ["eval", "--method", "gradcam", "--model", str(not_clip), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "is not a CLIP checkpoint (missing visual.conv1.weight" in result.output
    run = tmp_path / "run"
    args = ["eval", "--method", "gradcam", "--model", "tiny-rn", "--out", str(run), "--limit", "1", "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    other = runner.invoke(app, args[:-2] + ["2", "--no-progress"])
    assert other.exit_code == 2
    assert f"run folder {run} was written by a different config (differs in: data, limit; data: n_images 1 there, " \
           "2 now, n_pairs 1 there, 2 now; limit: 1 there, 2 now)" in other.output
    assert "--force-new" in other.output
    assert runner.invoke(app, args[:-2] + ["2", "--no-progress", "--force-new"]).exit_code == 0


def test_the_option_manifest_is_the_live_option_table():
    """The command line builds its method flags from camloc/cams/options.json without importing a method; after
    an option is added or changed, `python -m camloc.cams.manifest` writes it again."""
    from camloc.cams.manifest import live_table, read

    assert read() == json.loads(json.dumps(live_table())), "run: python -m camloc.cams.manifest"


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["eval", "--help"], ["explain", "--help"],
                                  ["sanity", "--help"], ["threshold-search", "--help"], ["eval"],
                                  ["eval", "--model", "tiny-rn", "--method", "gradcam"]])
def test_help_version_and_usage_errors_import_no_torch(argv):
    import subprocess
    import sys

    code = ("import sys\nfrom camloc.cli.app import main\nsys.argv = ['camloc', *%r]\ntry:\n    main()\n"
            "except SystemExit:\n    pass\nprint(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'cv2', 'numpy', 'open_clip', 'pandas', 'matplotlib'}))" % (argv,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", (argv, done.stdout[-300:], done.stderr[-300:])


def test_help_groups_each_methods_options_under_its_methods():
    from typer.testing import CliRunner

    from camloc.cli.app import app

    text = CliRunner().invoke(app, ["eval", "--help"], terminal_width=120).output
    sections = {}
    for block in re.split(r"\n(?=\S[^\n]*:\n)", text):
        title, _, body = block.partition(":\n")
        sections[title.strip()] = body
    assert "--legrad-layers" in sections["Method options: legrad"]
    assert "--rise-masks" in sections["Method options: rise"]
    assert "--legrad-layers" not in sections["Options"] and "--out" in sections["Options"]


def test_warnings_and_the_progress_bar_share_one_console(capsys):
    """rich prints a line given to the live bar's own console above the bar; a second console would write
    into it. Units: eval counts pairs, ovseg images."""
    from camloc.cli.common import _show_warning, err_console
    from camloc.run.progress import progress_bar

    with progress_bar(True, 3) as bar:
        assert bar.progress.console is err_console
        _show_warning("something to say", UserWarning, "x.py", 1)  # what warnings.warn calls on the command line
        bar.advance(3)
    assert "warning: something to say" in capsys.readouterr().err
    assert progress_bar(True, 2, "ovseg", "images").progress.columns[3].text_format == "images"
