"""Plug-in methods (issue 31): a single file through `--plugin`, an installed package through its entry point,
their source in the run's identity (an edited file is refused), every command and protocol, shards."""
import json
import shutil
from pathlib import Path
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

import camloc
from camloc.cli.app import app

runner = CliRunner()

PLUGIN = textwrap.dedent('''
    """A plug-in method for the tests: LayerCAM with the positive gradients raised to a power (1 = LayerCAM)."""
    import camloc

    POWER = camloc.method_option("mine_power", float, 1.0, "mine: the positive gradients' exponent (1 = LayerCAM).")


    @camloc.register_method("mine", shares_forward=True, uses_gradients=True, params=("mine_power",),
                            description="test plug-in: sum_c relu(G_c)^k A_c")
    def mine(ctx):
        k = float(ctx.options.get("mine_power", POWER.default))
        return (ctx.gradients.clamp_min(0) ** k * ctx.activations).sum(dim=1)
''')


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Each test starts from camloc's own methods and options, and leaves them so (other tests count them)."""
    import camloc.plugins as plugins
    from camloc.cams.options import OPTIONS, all_options
    from camloc.cams.registry import METHODS
    from camloc.datasets.registry import DATASETS, list_datasets

    all_options(), list_datasets()
    methods, options, datasets = dict(METHODS), dict(OPTIONS), dict(DATASETS)
    monkeypatch.setattr(plugins, "_LOADED", {})
    monkeypatch.setattr(plugins, "_DEFAULTS_LOADED", False)
    monkeypatch.delenv(plugins.ENV, raising=False)
    yield
    METHODS.clear(), METHODS.update(methods)
    OPTIONS.clear(), OPTIONS.update(options)
    DATASETS.clear(), DATASETS.update(datasets)


def _records(folder):
    rows = [json.loads(line) for p in sorted(folder.glob("pairs*.jsonl")) for line in p.read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # wall time: never equal
    return sorted(rows, key=lambda r: (r["image_id"], r["category_id"], r["method"]))


def test_a_single_file_plugin_runs_everywhere_and_its_edit_is_refused(tmp_path):
    plugin = tmp_path / "mine.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "run"
    args = ["eval", "--plugin", str(plugin), "--method", "mine,layercam", "--model", "tiny-vit", "--protocols",
            "box,mask-iou,pointing", "--out", str(out), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _records(out)
    mine = [{k: v for k, v in r.items() if k != "method"} for r in rows if r["method"] == "mine"]
    layercam = [{k: v for k, v in r.items() if k != "method"} for r in rows if r["method"] == "layercam"]
    assert mine == layercam and len(mine) == len(rows) // 2 > 0  # power 1 is LayerCAM: every protocol's value, exactly
    config = json.loads((out / "config.json").read_text())
    assert list(config["plugins"]) == ["mine"] and config["plugins"]["mine"]["file"] == str(plugin.resolve())
    heatmaps = runner.invoke(app, [*args[:-3], "--out", str(tmp_path / "cached"), "--no-progress", "--save-heatmaps"])
    assert heatmaps.exit_code == 0
    assert any("src" in p.name for p in (tmp_path / "cached" / "heatmaps").rglob("mine*"))  # the cache keys the source
    # explain (with a plug-in option) and sanity
    explain = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--plugin",
                                  str(plugin), "--method", "mine", "--model", "tiny-vit", "--method-option",
                                  "mine_power=2", "--json"])
    assert explain.exit_code == 0, explain.output
    sanity = runner.invoke(app, ["sanity", "--plugin", str(plugin), "--method", "mine", "--model", "tiny-vit",
                                 "--limit", "1", "--out", str(tmp_path / "sanity")])
    assert sanity.exit_code == 0, sanity.output
    assert json.loads((tmp_path / "sanity" / "sanity.json").read_text())["plugins"]["mine"]["sha256"]
    listed = runner.invoke(app, ["list", "methods", "--plugin", str(plugin)])
    assert f"[plug-in: {plugin.resolve()}]" in listed.stdout
    # the same command after an edit of the plug-in: refused in one line, nothing appended
    plugin.write_text(PLUGIN.replace("1 = LayerCAM).", "1 = LayerCAM; edited)."))
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "differs in: plugins" in again.stderr, again.output
    assert len(again.stderr.strip().splitlines()) == 1 and _records(out) == rows
    # a resume without --plugin reads the run's own plug-in (here: the edited file, so refused the same way)
    resumed = runner.invoke(app, [a for a in args if a not in ("--plugin", str(plugin))])
    assert resumed.exit_code == 2 and "differs in: plugins" in resumed.stderr


def test_a_plugin_that_cannot_load_is_one_line_naming_it(tmp_path):
    cases = {"clash.py": PLUGIN.replace('"mine"', '"gradcam"'), "broken.py": "def (:\n",
             "option.py": PLUGIN.replace('"mine_power"', '"topk"'), "fails.py": "raise RuntimeError('no GPU here')\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        result = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--plugin",
                                     str(tmp_path / name), "--model", "tiny-vit"])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and name in lines[0], (name, result.output)
    from camloc.cams.registry import METHODS

    assert "mine" not in METHODS  # nothing half-registered stays
    missing = runner.invoke(app, ["explain", "tests/golden/chelsea_small.png", "--prompt", "cat", "--plugin",
                                  str(tmp_path / "nothere.py"), "--model", "tiny-vit"])
    assert missing.exit_code == 2 and "no such file" in missing.stderr


def test_an_installed_package_is_found_by_its_entry_point(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "camloc_mine").mkdir(parents=True)
    (site / "camloc_mine" / "__init__.py").write_text(PLUGIN)
    dist = site / "camloc_mine-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: camloc-mine\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[camloc.plugins]\nmine = camloc_mine\n")
    (dist / "top_level.txt").write_text("camloc_mine\n")
    monkeypatch.syspath_prepend(str(site))
    result = runner.invoke(app, ["eval", "--method", "mine", "--model", "tiny-vit", "--limit", "2", "--out",
                                 str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    origin = json.loads((tmp_path / "run" / "config.json").read_text())["plugins"]["mine"]
    assert origin["module"] == "camloc_mine" and origin["distribution"] == "camloc-mine 0.1"


def test_shards_with_a_plugin_merge_to_the_one_process_table(tmp_path):
    plugin = tmp_path / "mine.py"
    plugin.write_text(PLUGIN)
    base = ["eval", "--plugin", str(plugin), "--method", "mine", "--model", "tiny-vit", "--no-progress",
            "--method-option", "mine_power=2"]
    assert runner.invoke(app, [*base, "--out", str(tmp_path / "one")]).exit_code == 0
    for rank in ("0/2", "1/2"):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / "two"), "--shard", rank])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "two" / "table.csv").read_text() == (tmp_path / "one" / "table.csv").read_text()
    assert json.loads((tmp_path / "one" / "config.json").read_text())["options"]["mine_power"] == 2.0


def test_a_method_registered_from_python_carries_its_source(tmp_path):
    @camloc.register_method("inline", shares_forward=True, uses_gradients=True, description="inline test method")
    def inline(ctx):
        return (ctx.gradients.clamp_min(0) * ctx.activations).sum(dim=1)

    summary = camloc.evaluate("tiny-vit", "demo", ["inline"], out=tmp_path / "run", limit=1)
    origin = json.loads((tmp_path / "run" / "config.json").read_text())["plugins"]["inline"]
    assert origin["module"] == __name__ and len(origin["sha256"]) == 64
    assert np.isfinite(summary["methods"]["inline"]["mean_iou"])


def test_a_plugin_dataset_is_recorded_and_evaluated(tmp_path):
    plugin = tmp_path / "boxes.py"
    plugin.write_text(textwrap.dedent('''
        """A plug-in dataset: the demo set's first two images."""
        import camloc
        from camloc.datasets.coco_format import load_coco_pairs
        from camloc.datasets.registry import DEMO_DIR


        @camloc.register_dataset("two-demo", "the demo set's first two images", layout="inside camloc")
        def two_demo(opts):
            return load_coco_pairs(DEMO_DIR / "instances_demo.json", DEMO_DIR / "images", opts.prompt_template)[:2]
    '''))
    result = runner.invoke(app, ["eval", "--plugin", str(plugin), "--dataset", "two-demo", "--method", "gradcam",
                                 "--model", "tiny-rn", "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["plugins"]["dataset:two-demo"]["file"] == str(plugin.resolve()) and config["data"]["n_images"] == 2
    clash = tmp_path / "clash.py"
    clash.write_text(plugin.read_text().replace('"two-demo"', '"coco"'))
    refused = runner.invoke(app, ["eval", "--plugin", str(clash), "--method", "gradcam", "--model", "tiny-rn",
                                  "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "dataset 'coco' registered twice" in refused.stderr


def test_the_public_author_surface():
    for name in ("register_method", "method_option", "CamContext", "MethodSpec", "load_plugin", "register_dataset",
                 "wrap_model"):
        assert getattr(camloc, name) is not None, name


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "plugins"
POWERCAM = EXAMPLES / "camloc-powercam" / "camloc_powercam" / "powercam.py"


def test_the_example_single_file_plugin_equals_layercam_at_power_one(tmp_path):
    image = "tests/golden/chelsea_small.png"
    ex = camloc.explain("tiny-vit", image, ["a cat", "a dog"], ["powercam", "layercam"],
                        plugins=[str(POWERCAM)])
    np.testing.assert_array_equal(ex.maps["powercam"], ex.maps["layercam"])
    squared = camloc.explain("tiny-vit", image, ["a cat", "a dog"], ["powercam"], powercam_power=2.0)
    assert not np.allclose(squared.maps["powercam"], ex.maps["powercam"], atol=1e-3)
    bad = runner.invoke(app, ["explain", image, "--prompt", "cat", "--plugin", str(POWERCAM),
                              "--method", "powercam", "--model", "tiny-vit", "--method-option", "powercam_power=50"])
    assert bad.exit_code == 2 and "--powercam-power must be in [0.1, 10]" in bad.stderr


def test_the_example_package_is_found_by_the_entry_point_it_declares(tmp_path, monkeypatch):
    """Installed as pip would (its package on the path, a dist-info with the entry points of its pyproject)."""
    import tomllib

    project = tomllib.loads((EXAMPLES / "camloc-powercam" / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site"
    shutil.copytree(EXAMPLES / "camloc-powercam" / "camloc_powercam", site / "camloc_powercam")
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    entries = project["entry-points"]["camloc.plugins"]
    (dist / "entry_points.txt").write_text("[camloc.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    (dist / "top_level.txt").write_text("camloc_powercam\n")
    monkeypatch.syspath_prepend(str(site))
    listed = runner.invoke(app, ["list", "methods"])
    assert "powercam" in listed.stdout and "[plug-in: camloc-powercam 0.1.0]" in listed.stdout, listed.output


def test_no_builtin_method_module_reads_a_private_name():
    """The built-ins are written against the author surface a plug-in has (docs/methods.md)."""
    import ast

    found = []
    methods = sorted((Path(camloc.__file__).parent / "methods").glob("*.py"))
    assert len(methods) >= 13
    for path in methods:
        if path.stem.startswith("_"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("camloc"):
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in ("ctx", "context", "model")):
                found.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert found == []


def test_the_readme_table_list_methods_and_docs_methods_agree():
    """docs/methods.md's table, the README's list and `camloc list methods` name the same methods, in order."""
    import re

    from camloc.cams.registry import list_methods

    root = Path(__file__).resolve().parents[1]
    docs = (root / "docs" / "methods.md").read_text()
    table = docs[docs.index("| method | families | gradients |"):]
    table = table[:table.index("\n\n")]
    in_docs = [n.strip() for line in table.splitlines()[2:] for n in line.split("|")[1].split(",")]
    readme = (root / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("**Methods**"))
    in_readme = re.findall(r"`([^`]+)`", line.partition(":")[2])
    listed = [line.split()[0] for line in runner.invoke(app, ["list", "methods"]).stdout.splitlines()
              if line and not line.startswith("families:")]
    assert in_readme == in_docs == listed == list_methods()


def test_threshold_search_and_rescore_run_a_plugin_method(tmp_path):
    import camloc.plugins as plugins
    from camloc.cams.registry import METHODS

    plugin = tmp_path / "mine.py"
    plugin.write_text(PLUGIN)
    search = runner.invoke(app, ["threshold-search", "--plugin", str(plugin), "--model", "tiny-vit", "--method",
                                 "mine", "--train-dataset", "demo", "--val-dataset", "demo", "--limit", "2",
                                 "--workers", "1", "--no-progress", "--out", str(tmp_path / "s1")])
    assert search.exit_code == 0, search.output
    assert "mine" in (tmp_path / "s1" / "table_s1.csv").read_text()
    run = tmp_path / "run"
    made = runner.invoke(app, ["eval", "--plugin", str(plugin), "--method", "mine", "--model", "tiny-vit",
                               "--limit", "2", "--save-heatmaps", "--out", str(run), "--no-progress"])
    assert made.exit_code == 0, made.output
    from camloc.cams.options import OPTIONS

    def fresh_process():  # as a new `camloc` process starts: the plug-in not loaded
        METHODS.pop("mine"), OPTIONS.pop("mine_power")
        plugins._LOADED.clear()

    fresh_process()  # rescore loads the plug-in the run recorded, with no --plugin
    again = runner.invoke(app, ["rescore", str(run), "--protocols", "box,pointing", "--out", str(tmp_path / "re"),
                                "--no-progress"])
    assert again.exit_code == 0, again.output
    plugin.write_text(PLUGIN.replace("(1 = LayerCAM)", "(1 = LayerCAM, edited)"))
    fresh_process()
    stale = runner.invoke(app, ["rescore", str(run), "--protocols", "box,pointing", "--out", str(tmp_path / "re2"),
                                "--no-progress"])
    assert stale.exit_code == 2 and "plug-in methods whose source differs" in stale.stderr


def test_the_readme_plugin_command(tmp_path, monkeypatch):
    """The README's plug-in command, as written (run from the repository root)."""
    import shlex

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("camloc eval --plugin "))
    monkeypatch.chdir(root)
    args = shlex.split(line)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "mine")
    result = runner.invoke(app, [*args, "--limit", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "powercam" in (tmp_path / "mine" / "table.md").read_text()
