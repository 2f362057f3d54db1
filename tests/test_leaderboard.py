"""The leaderboard (the HTML report's first screen): values equal the tables', bootstrap intervals over
images, the best per column by each metric's direction, maps per second with shared work split between
the methods that share it, and an HTML page that shows what differs between runs without dumping dicts."""
import json
import time
from html.parser import HTMLParser

import numpy as np
import pytest
from typer.testing import CliRunner

from camloc.cli.app import app
from camloc.report.leaderboard import METRICS, _ratio, board, bootstrap_interval, metric_cell
from camloc.report.tables import eval_groups, long_table

runner = CliRunner()
PROTOCOLS = "box,mask-iou,pointing,maxboxacc,pxap,chefer-seg,deletion-rise,insertion-rise,deletion-eclip,road"
MEASURED = [m for m in METRICS if m.field not in ("imagenet_s_state", "points_counts")]  # imagenet-s needs label maps,
# points needs point labels (tests/test_explainseg.py)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("board")
    for name, threshold in (("otsu", "otsu"), ("half", "0.5")):
        result = runner.invoke(app, ["eval", "--model", "tiny-vit", "--method", "gradcam,legrad,sclip",
                                     "--dataset", "demo", "--protocols", PROTOCOLS, "--faith-steps", "4",
                                     "--road-percentiles", "50", "--threshold", threshold, "--out",
                                     str(root / name), "--no-progress"])
        assert result.exit_code == 0, result.output
    return root


def test_bootstrap_interval_by_hand():
    # three images, one pair each, IoU 0, 0, 1: a resample's mean is k/3 with k ~ Binomial(3, 1/3);
    # P(k = 0) = 8/27 > 2.5 % and P(k = 3) = 1/27 > 2.5 %, so the 95 % interval is [0, 1]
    stats = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    assert bootstrap_interval(stats, _ratio) == (0.0, 1.0)
    assert bootstrap_interval(stats[:1], _ratio) is None  # one image: no interval
    same = np.array([[0.4, 1.0]] * 5)
    assert bootstrap_interval(same, _ratio) == pytest.approx((0.4, 0.4))
    # an image with two pairs counts as one draw: its pairs are resampled together
    clustered = np.array([[2.0, 2.0], [0.0, 1.0]])
    low, high = bootstrap_interval(clustered, _ratio)
    assert (low, high) == (0.0, 1.0)
    assert bootstrap_interval(stats, _ratio, seed=0) == bootstrap_interval(stats, _ratio, seed=0)


def test_leaderboard_values_equal_the_long_table_and_the_best_follows_the_direction(runs):
    dirs = [runs / "otsu"]
    long = long_table(dirs).set_index("method")
    groups = eval_groups(dirs)
    result = board(groups, [], lambda g: "otsu")
    assert [c["metric"] for c in result["columns"]] == [m.column for m in MEASURED]
    for metric in MEASURED:
        values = {}
        for method, row in result["rows"].items():
            cell = row["cells"][("otsu", metric.column)]
            assert cell["value"] == pytest.approx(long.loc[method, metric.column], abs=1e-9), (method, metric.column)
            assert cell["n_images"] >= 2 and cell["interval"][0] <= cell["value"] + 1e-12
            assert cell["interval"][1] >= cell["value"] - 1e-12
            values[method] = cell["value"]
        best = [m for m, row in result["rows"].items() if row["cells"][("otsu", metric.column)].get("best")]
        expected = (max if metric.higher else min)(values.values())
        assert best and all(values[m] == expected for m in best), metric.column
    assert all(row["rates"]["otsu"] > 0 for row in result["rows"].values())
    assert metric_cell([{"image_id": 1, "iou": 0.5}], METRICS[1]) is None  # a protocol the run did not measure


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.stack, self.headers = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self.stack.append([tag, dict(attrs), ""])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.stack:
            kind, attrs, text = self.stack.pop()
            (self.headers if kind == "th" else self.cells).append((attrs, text))

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2] += data


def test_html_report_leads_with_the_leaderboard_and_shows_only_what_differs(runs, tmp_path):
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(runs / "otsu"), str(runs / "half"), "--html", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.index("<h2>leaderboard</h2>") < page.index("<h2>runs</h2>") < page.index("Table S3")
    parser = _Cells()
    parser.feed(page)
    groups = [text for attrs, text in parser.headers if attrs.get("class") == "group"]
    assert groups == ["tiny-vit · demo · threshold: otsu", "tiny-vit · demo · threshold: 0.5"]
    sortable = [attrs for attrs, _ in parser.headers if "data-col" in attrs]
    assert len(sortable) == 2 * (1 + len(MEASURED) + 1)  # a table per run (too wide beside each other): method,
    # the run's metrics and its rate
    stars = [text for attrs, text in parser.cells if attrs.get("class") == "best"]
    assert len(stars) >= 2 * len(MEASURED) and all(text.startswith("★") for text in stars)
    tips = {text: attrs.get("title") for attrs, text in parser.cells if attrs.get("class") == "m"}
    assert "GradCAM" in tips["gradcam"] and tips["legrad"]
    # the options and weights dicts differ in nothing here; no cell outside the folded config holds a dict
    visible = page.split("<h2>config and provenance</h2>")[0]
    assert '{"' not in visible and "{'" not in visible
    assert "<script>" in page and "addEventListener('click'" in page


def test_shared_work_is_split_between_the_methods_that_read_it():
    from PIL import Image

    from camloc.api import load_model
    from camloc.cams.context import CamContext, Ledger
    from camloc.cams.engine import compute_raw

    ledger = Ledger()
    ledger.costs = {"x": 3.0, "y": 1.0}
    ledger.readers = {"x": {"a", "b"}}
    assert ledger.method_seconds({"a": 1.0, "b": 2.0}) == {"a": 1.0 + 1.5 + 0.5, "b": 2.0 + 1.5 + 0.5}  # y: unread
    model = load_model("tiny-vit", device="cpu")
    image = Image.new("RGB", (64, 48), (120, 30, 200))
    methods = ["gradcam", "gradcam++", "sclip"]
    ctx = CamContext(model, image, ["a", "b"], methods=methods)
    seconds = {}
    compute_raw(model, image, ["a", "b"], methods, context=ctx, seconds=seconds)
    assert set(seconds) == set(methods) and all(s > 0 for s in seconds.values())
    # gradcam++ reads the gradients gradcam computed, and through them the forward and text features
    assert ctx.ledger.readers["gradients"] == {"gradcam", "gradcam++"}
    assert ctx.ledger.readers["_pass"] == set(methods)
    assert {"_pass", "text_features", "gradients"} <= set(ctx.ledger.costs)
    assert json.dumps(seconds)  # plain floats: what the records carry


def test_a_masked_embedding_store_is_split_between_the_methods_that_read_it():
    """gScoreCAM and gScoreCAM-abs encode through one store of masked images: its time is theirs to share,
    not the first one's (the second used to look twice as fast)."""
    from PIL import Image

    from camloc.api import load_model
    from camloc.cams.context import CamContext
    from camloc.cams.engine import compute_raw

    model = load_model("tiny-rn", device="cpu")
    image = Image.new("RGB", (64, 48), (120, 30, 200))
    methods = ["scorecam", "gscorecam", "gscorecam-abs"]
    ctx = CamContext(model, image, ["a", "b"], {"topk": 20}, methods=methods)
    seconds = {}
    started = time.perf_counter()
    compute_raw(model, image, ["a", "b"], methods, context=ctx, seconds=seconds)
    wall = time.perf_counter() - started
    assert ctx.ledger.readers["masked 1e-06"] == {"gscorecam", "gscorecam-abs"}
    assert "scorecam" in ctx.ledger.readers["masked None"] and ctx.ledger.costs["masked 1e-06"] > 0
    # every second is counted once: the methods' seconds add up to no more than the call's own wall time (a
    # store's time counted in the method that ran it AND shared out would exceed it by that time)
    assert sum(seconds.values()) <= wall
