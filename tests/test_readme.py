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


def test_the_docs_commands_name_real_commands_and_options():
    """The docs' `camloc ...` lines are synopses (IMAGE, [--flag ...], a|b) or need real weights and datasets, so
    they are not run; each names a command that exists and only options that command has (none can go stale
    after a rename)."""
    import typer.main

    group = typer.main.get_command(app)
    checked = 0
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        lines = [line for block in re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)
                 for line in block.splitlines()]
        for line in lines:
            for part in line.split("&&"):
                words = part.split("#")[0].split()
                if not words or words[0] != "camloc" or len(words) < 2:
                    continue
                command = group.commands.get(words[1])
                assert command is not None, (page.name, part)
                rest = words[2:]
                if hasattr(command, "list_commands"):  # a group (camloc data): its sub-commands
                    names = rest[0].split("|") if rest else []
                    subs = [command.commands.get(n) for n in names]
                    assert subs and all(subs), (page.name, part)
                    options = {o for sub in subs for p in sub.params for o in (*p.opts, *p.secondary_opts)}
                else:
                    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
                options |= {"--help"}
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", " ".join(rest)):
                    assert flag in options, f"docs/{page.name}: {part.strip()!r} names {flag}, which camloc " \
                                            f"{words[1]} does not have"
                checked += 1
    assert checked >= 25
