"""Pictures: --save-vis overlays, the self-contained HTML report (parsed; rendered in headless
Chromium with a screenshot when Chromium is installed), and `camloc compare`."""
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from camloc.cli.app import app
from camloc.run.eval import run_eval
from camloc.run.identity import EvalConfig

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vis_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vis")
    run_eval(EvalConfig(model="tiny-rn", methods=["gradcam", "scorecam"]), run_dir, device="cpu", progress=False,
             save_vis=2)
    return run_dir


def test_save_vis_writes_best_worst_random(vis_run):
    import json

    records = [json.loads(line) for line in (vis_run / "pairs.jsonl").read_text().splitlines()]
    for method in ("gradcam", "scorecam"):
        files = sorted(p.name for p in (vis_run / "vis" / method).iterdir())
        assert [f.split("_")[0] for f in files].count("best") == 2 and len(files) == 6
        ious = sorted((r["iou"], r["image_id"], r["category_id"]) for r in records if r["method"] == method)
        best = ious[-1]
        name = f"best_00_{best[1]}_{best[2]}.jpg"
        assert name in files
        with Image.open(vis_run / "vis" / method / name) as im:
            raw = {r["image_id"]: r["image_size"] for r in records}[best[1]]
            scale = min(1, 320 / max(raw))
            assert im.size == (round(raw[0] * scale), round(raw[1] * scale) + 22)  # + the caption strip


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.tables, self.text = [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables += 1
        for key in ("src", "href"):
            if key in attrs:
                self.sources.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_self_contained_and_has_the_tables(vis_run, tmp_path):
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(vis_run), "--html", str(out), "--compare-paper"])
    assert result.exit_code == 0, result.output
    parser = _Collector()
    parser.feed(out.read_text())
    text = " ".join(parser.text)
    assert parser.tables >= 2 and "gradcam" in text and "scorecam" in text
    assert "config and provenance" in text and "saved pairs" in text and "per-class mean box IoU" in text
    assert len(parser.sources) >= 1 + 12  # the histograms (per-class IoU is a heat table), 12 saved pairs
    for src in parser.sources:  # only embedded data or files that exist next to the page
        assert src.startswith("data:image/") or (out.parent / src).exists(), src


def test_compare_lists_pairs_where_a_beats_b(vis_run):
    result = runner.invoke(app, ["compare", str(vis_run), "--method-a", "scorecam", "--method-b", "gradcam",
                                 "--top", "3", "--format", "csv"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "image_id,file_name,category,iou_scorecam,iou_gradcam,difference" and len(lines) == 4
    diffs = [float(line.split(",")[-1]) for line in lines[1:]]
    assert diffs == sorted(diffs, reverse=True)
    ambiguous = runner.invoke(app, ["compare", str(vis_run)])
    assert ambiguous.exit_code == 2 and "several methods (gradcam, scorecam)" in ambiguous.output


def test_html_report_of_the_smoke_sweep_renders_in_headless_chromium(vis_run, tmp_path):
    """The committed smoke sweep (results/smoke: eval runs + the Table S1 search) plus a run with saved
    pairs, as one page, rendered by Debian's chromium to a screenshot."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    out = tmp_path / "report.html"
    smoke = REPO / "results" / "smoke"
    result = runner.invoke(app, ["report", str(smoke / "eval" / "tiny-rn"), str(smoke / "eval" / "tiny-vit"),
                                 str(smoke), str(vis_run), "--html", str(out), "--compare-paper"])
    assert result.exit_code == 0, result.output
    parser = _Collector()
    parser.feed(out.read_text())
    assert "GradCAM (tiny-rn)" in " ".join(parser.text)  # the Table S1 rows are on the page
    shot = tmp_path / "report.png"
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                             f"--screenshot={shot}", "--window-size=1200,2000", out.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert shot.exists(), result.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        colors = im.convert("L").getextrema()
        assert colors[0] < 100 and colors[1] > 200  # something was drawn, not a blank page


def test_explain_all_methods_wraps_and_keeps_full_image_boxes_visible():
    """25 methods: rows of at most 6 panels (the figure was one 5,200 px strip), the prompt's score in its label,
    and a box covering the whole image drawn inside the frame."""
    import camloc
    from camloc.report.figures import PANELS_PER_ROW

    ex = camloc.explain("tiny-vit", "tests/golden/chelsea_small.png", ["cat", "a dog"], "all")
    fig = ex.plot()
    width = fig.get_size_inches()[0] * 80  # the dpi figures are written at
    assert len(ex.maps) >= 24 and width <= 1400  # fits a 1,400 px window
    panels = [ax for ax in fig.axes if ax.get_title() in ex.maps]
    assert len(panels) == 2 * len(ex.maps)
    rows = {round(ax.get_position().y0, 3) for ax in panels}
    assert len(rows) == 2 * -(-len(ex.maps) // PANELS_PER_ROW)
    assert "score" in fig.axes[0].get_ylabel()
    from matplotlib.figure import Figure

    from camloc.report.figures import draw_boxes

    ax = Figure().subplots()
    draw_boxes(ax, [0, 0, 160, 100], None, 1.5, size=(160, 100))
    (x, y), w, h = ax.patches[0].get_xy(), ax.patches[0].get_width(), ax.patches[0].get_height()
    assert 0 < x and 0 < y and x + w < 160 and y + h < 100


def test_report_of_two_runs_of_every_method_fits_a_1400px_window(tmp_path):
    """Every method tiny-vit runs (24) in two runs that differ in the threshold: in headless Chromium at 1,400 px
    the page is no wider than the window (wide tables scroll inside their own box), and every method has a
    leaderboard row in each run's table."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    import re

    for threshold in ("otsu", "0.5"):
        result = runner.invoke(app, ["eval", "--dataset", "demo", "--model", "tiny-vit", "--method", "all", "--limit",
                                     "3", "--protocols", "box,mask-iou,pointing,maxboxacc,pxap", "--threshold",
                                     threshold, "--out", str(tmp_path / threshold), "--no-progress"])
        assert result.exit_code == 0, result.output
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(tmp_path / "otsu"), str(tmp_path / "0.5"), "--html", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    rows = re.findall(r'<tr><td class="m" data-v="([^"]+)"', page.split("<h2>runs</h2>")[0])
    assert len(rows) == 2 * len(set(rows)) and len(set(rows)) >= 24
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", '<script>document.title = "width " + '
                                  'document.documentElement.scrollWidth + " " + window.innerWidth</script></body>'))
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    page_width, window = map(int, re.search(r"<title>width (\d+) (\d+)</title>", dom).groups())
    assert window == 1400 and page_width <= window
