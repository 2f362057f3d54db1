"""The Python API: the same maps, records and errors as the command line."""
import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from conftest import GOLDEN
from PIL import Image
from typer.testing import CliRunner

import camloc
from camloc.cli.app import app
from camloc.errors import CamlocError, ImageError, ModelError, OptionError

runner = CliRunner()
IMAGE = GOLDEN / "chelsea_small.png"
REPO = Path(__file__).resolve().parent.parent
METHODS = {"tiny-rn": ["gradcam", "gscorecam", "groupcam", "maskclip"],
           "tiny-vit": ["gradcam", "hilacam", "legrad", "sclip"]}


@pytest.fixture(scope="module")
def models():
    return {name: camloc.load_model(name) for name in METHODS}


@pytest.mark.parametrize("name", list(METHODS))
def test_explain_equals_the_command_line_bit_for_bit(name, models, tmp_path):
    prompts = ["cat", "a dog"]
    ex = camloc.explain(models[name], IMAGE, prompts, METHODS[name], topk=20)
    for native in (False, True):
        out = tmp_path / f"maps{native}.npz"
        args = ["explain", str(IMAGE), "-p", prompts[0], "-p", prompts[1], "--method", ",".join(METHODS[name]),
                "--model", name, "--topk", "20", "--save-heatmap", str(out), "--json", *(["--native"] * native)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        saved = np.load(out)
        for method in METHODS[name]:
            ours = (ex.native if native else ex.maps)[method]
            assert ours.dtype == saved[method].dtype and np.array_equal(ours, saved[method]), (method, native)
        cli = json.loads(result.stdout)["results"] if not native else None
        if cli is not None:
            assert cli == json.loads(json.dumps(ex.to_dict()))  # boxes and scores as the CLI prints them
    assert ex.maps["gradcam"].shape == (2, 100, 150) and ex.scores.shape == (2,)
    assert ex.boxes["gradcam"][0] == camloc.box_from_heatmap(ex.maps["gradcam"][0])


def test_every_image_form_gives_the_same_maps(models):
    model = models["tiny-rn"]
    path = camloc.explain(model, str(IMAGE), "cat", "gradcam")
    pil = camloc.explain(model, Image.open(IMAGE), "cat", "gradcam")
    array = camloc.explain(model, np.asarray(Image.open(IMAGE).convert("RGB")), "cat", "gradcam")
    floats = camloc.explain(model, np.asarray(Image.open(IMAGE).convert("RGB")) / 255.0, "cat", "gradcam")
    for other in (pil, array, floats):
        assert np.array_equal(other.maps["gradcam"], path.maps["gradcam"])
    tensor = model.host_input(Image.open(IMAGE).convert("RGB"))  # the model's own input, (1, 3, n, n)
    pre = camloc.explain(model, tensor[0], "cat", "gradcam")
    assert np.array_equal(pre.native["gradcam"], path.native["gradcam"])  # same input, same native map
    assert pre.maps["gradcam"].shape == (1, model.input_size, model.input_size)


def test_a_list_of_images_is_batched_like_image_batch(models):
    model = models["tiny-vit"]
    images = [IMAGE, REPO / "camloc" / "datasets" / "demo" / "images" / "coffee.jpg"]
    batched = camloc.explain(model, images, ["cat", "cup"], ["gradcam", "maskclip"])
    for image, together in zip(images, batched):
        alone = camloc.explain(model, image, ["cat", "cup"], ["gradcam", "maskclip"])
        for method in together.maps:
            assert np.allclose(together.maps[method], alone.maps[method], atol=1e-6)


def test_plot_returns_a_figure_and_writes_one(models, tmp_path):
    ex = camloc.explain(models["tiny-rn"], IMAGE, ["cat", "dog"], ["gradcam", "layercam"])
    fig = ex.plot()
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure) and len(fig.axes) >= 2 * 3  # 2 prompts x (input + 2 methods) + colour bar
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # what a notebook shows
    assert ex.plot("pipeline", path=tmp_path / "p.png") is None and (tmp_path / "p.png").stat().st_size > 1000


def test_errors_are_kinds_with_the_cli_lines(models, tmp_path):
    model = models["tiny-rn"]
    with pytest.raises(OptionError, match="--topk must be at least 1"):
        camloc.explain(model, IMAGE, "cat", "gscorecam", topk=0)
    with pytest.raises(OptionError, match="unknown method option"):
        camloc.explain(model, IMAGE, "cat", "gradcam", top_k=3)
    with pytest.raises(OptionError, match="--threshold 2 is outside"):
        camloc.explain(model, IMAGE, "cat", "gradcam", threshold=2)
    with pytest.raises(ImageError, match=r"must be \(H, W\) or \(H, W, 3\)"):
        camloc.explain(model, np.zeros((4, 4, 2)), "cat", "gradcam")
    with pytest.raises(ImageError, match="does not exist"):
        camloc.explain(model, tmp_path / "none.png", "cat", "gradcam")
    with pytest.raises(ModelError):
        camloc.load_model(str(tmp_path / "no-such-checkpoint.pt"))
    assert all(issubclass(kind, CamlocError) for kind in (OptionError, ImageError, ModelError))
    cli = runner.invoke(app, ["explain", str(IMAGE), "-p", "cat", "--method", "gscorecam", "--model", "tiny-rn",
                              "--topk", "0"])
    assert cli.exit_code == 2 and "--topk must be at least 1" in cli.stderr


def test_evaluate_writes_what_camloc_eval_writes(tmp_path):
    args = ["eval", "--dataset", "demo", "--model", "tiny-rn", "--method", "gradcam,maskclip", "--protocols",
            "box,mask-iou,pointing", "--out", str(tmp_path / "cli"), "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    summary = camloc.evaluate("tiny-rn", "demo", ["gradcam", "maskclip"], out=tmp_path / "api",
                              protocols="box,mask-iou,pointing")
    assert summary["complete"] and summary["n_pairs"] == 13

    def records(folder):
        rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
        return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in rows),  # wall time differs
                      key=lambda r: (r["image_id"], r["category_id"], r["method"]))

    assert records(tmp_path / "api") == records(tmp_path / "cli")
    cli_config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert json.loads((tmp_path / "api" / "config.json").read_text()) == cli_config
    assert (tmp_path / "api" / "table.csv").read_text() == (tmp_path / "cli" / "table.csv").read_text()
    again = camloc.evaluate(camloc.load_model("tiny-rn"), "demo", ["gradcam", "maskclip"], out=tmp_path / "api",
                            protocols="box,mask-iou,pointing")
    assert again["timings"]["records_this_invocation"] == 0  # resumed: nothing recomputed
    with pytest.raises(CamlocError, match="different config"):
        camloc.evaluate("tiny-rn", "demo", ["gradcam", "maskclip"], out=tmp_path / "api", threshold=0.5,
                        protocols="box,mask-iou,pointing")


def test_dataset_states_merge_by_addition():
    rng = np.random.default_rng(0)
    maps = [rng.random((20, 30)) for _ in range(4)]
    boxes = [[[2, 3, 12, 15]], [[0, 0, 30, 20]], [[10, 5, 25, 18]], [[5, 5, 8, 9]]]
    masks = [np.zeros((20, 30), bool) for _ in range(4)]
    for m, [b] in zip(masks, boxes):
        m[b[1]:b[3], b[0]:b[2]] = True
    whole, first, second = camloc.MaxBoxAcc(), camloc.MaxBoxAcc(), camloc.MaxBoxAcc()
    for i, (heatmap, gt) in enumerate(zip(maps, boxes)):
        whole.add(heatmap, gt)
        (first if i < 2 else second).add(heatmap, gt)
    assert (first + second).result() == whole.result() and 0 <= whole.result()["maxboxacc_v2"] <= 1
    pxap = [camloc.PxAP().add(h, m) for h, m in zip(maps, masks)]
    total = camloc.PxAP()
    for h, m in zip(maps, masks):
        total.add(h, m)
    assert (pxap[0] + pxap[1] + pxap[2] + pxap[3]).result() == total.result()
    with pytest.raises(ValueError, match="one threshold step"):
        camloc.MaxBoxAcc(0.01) + camloc.MaxBoxAcc(0.05)


def test_listings():
    assert camloc.list_methods()[:4] == ["gradcam", "gradcam++", "xgradcam", "layercam"]
    assert "hilacam" not in camloc.list_methods(family="rn")
    assert "tiny-rn" in camloc.list_models() and "demo" in camloc.list_datasets()
    assert "open_clip:camloc-tiny-vit:random" in camloc.list_models("open_clip", "camloc-tiny-vit")


def test_the_quickstart_notebook_runs_and_its_committed_outputs_are_current(tmp_path):
    """examples/quickstart.ipynb, executed as a user would (a fresh kernel), so the example cannot rot; its
    committed outputs (written by examples/run_notebook.py) are what it prints today, the figure an image."""
    import importlib.util

    import nbformat

    spec = importlib.util.spec_from_file_location("run_notebook", REPO / "examples" / "run_notebook.py")
    run_notebook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_notebook)
    fresh = run_notebook.execute(workdir=tmp_path)
    outputs = "".join(run_notebook.text_outputs(fresh))
    assert "gradcam" in outputs and "mean_iou" in outputs
    assert (tmp_path / "runs" / "quickstart" / "table.csv").is_file()
    shown = [o for cell in fresh.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
             if "image/png" in o.get("data", {})]
    assert shown, "ex.plot() must display as a picture in a fresh kernel"
    committed = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)

    def rounded(texts):  # another CPU's float rounding must not make the committed outputs stale
        import re

        return [re.sub(r"-?\d+\.\d+", lambda m: f"{float(m.group()):.3f}", t) for t in texts]

    assert rounded(run_notebook.text_outputs(committed)) == rounded(run_notebook.text_outputs(fresh)), \
        "the committed outputs are stale: python examples/run_notebook.py"
    assert any("image/png" in o.get("data", {}) for cell in committed.cells if cell.cell_type == "code"
               for o in cell.get("outputs", []))


def test_the_library_never_imports_the_command_line():
    """camloc/cli is a layer over the library: no other module of the package imports from it."""
    import re

    imports = re.compile(r"^\s*(from camloc\.cli\b|import camloc\.cli\b|from camloc import cli\b)", re.M)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "camloc").rglob("*.py")
                 if p.relative_to(REPO / "camloc").parts[0] != "cli" and p.name != "__main__.py"
                 and imports.search(p.read_text())]
    assert offenders == []


def test_rescore_and_report_from_python(tmp_path):
    summary = camloc.evaluate("tiny-rn", "demo", "gradcam", out=tmp_path / "run", save_heatmaps=True)
    again = camloc.rescore(tmp_path / "run", ["box", "pointing"], tmp_path / "re")
    assert again["methods"]["gradcam"]["mean_iou"] == summary["methods"]["gradcam"]["mean_iou"]
    table = camloc.report_table([tmp_path / "run"])
    cli = runner.invoke(app, ["report", str(tmp_path / "run"), "--format", "csv"])
    assert cli.exit_code == 0 and table.to_csv(index=False, float_format="%.6f") == cli.stdout
    assert list(table["method"]) == ["gradcam"] and table["n_pairs"].tolist() == [13]
