"""The README's commands and Python, run as written (outputs redirected into a temporary folder), so the front
page cannot go stale."""
import csv
import math
import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from camloc.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
runner = CliRunner()


def commands() -> list[list[str]]:
    """Every `camloc ...` command of the README's bash blocks (also after `&&` in the set-up line)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.strip().splitlines():
            for part in line.split("&&"):
                if part.strip().startswith("camloc "):
                    found.append(shlex.split(part.strip())[1:])
    return found


def test_the_readme_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    ran = []
    for argv in commands():
        for flag in ("--out", "--html"):
            if flag in argv:
                i = argv.index(flag) + 1
                argv[i] = str(tmp_path / Path(argv[i]).name)
        argv = [str(tmp_path / Path(a).name) if a.startswith("runs/") else a for a in argv]  # the report reads them
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, (argv, result.output)
        ran.append(argv[0])
    assert ran.count("eval") >= 3 and {"explain", "report"} <= set(ran)
    assert (tmp_path / "explain.png").stat().st_size > 10_000 and (tmp_path / "report.html").is_file()
    # the demo's masks and demo-seg give a number in every protocol's every column
    box = list(csv.DictReader(open(tmp_path / "demo-vit" / "table.csv")))
    for column in ("mean_iou", "mask_iou", "pointing", "energy_pointing", "maxboxacc_v2", "pxap"):
        assert all(math.isfinite(float(row[column])) for row in box), column
    assert {row["n_mask"] for row in box} == {"13"}
    seg = list(csv.DictReader(open(tmp_path / "demo-seg" / "table.csv")))
    assert len(seg) == 2 and all(0 < float(row["miou"]) <= 1 and row["n_images"] == "10" for row in seg)


def test_the_readme_python_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_the_readme_names_only_pages_that_exist():
    for page in set(re.findall(r"`(docs/[a-z_-]+\.md)`", README)):
        assert (ROOT / page).is_file(), page
    assert len(README.splitlines()) < 200
