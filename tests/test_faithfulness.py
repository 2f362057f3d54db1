"""Faithfulness protocols: hand-computed curves on a stub model, the batched curve against one image at a
time, Grad-ECLIP's deletion loop written out, ROAD against pytorch-grad-cam, and the run folder."""
import json
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from camloc.cli.app import app
from camloc.report import html as html_report
from camloc.evaluators.faithfulness import (FaithSettings, FaithSums, auc, eclip_images, image_noise, impute,
                                            road_keep, road_seed)
from camloc.run.faithfulness import Scorer, faith_values, road_values

runner = CliRunner()


class QuadrantModel:
    """A stub whose cosine with prompt "a" is the mean of channel 0 over the top-left 4 x 4 pixels of its
    8 x 8 input (features [q, sqrt(1 - q²)], text "a" = [1, 0], "b" = [0, 1])."""

    input_size = 8
    logit_scale = torch.tensor(10.0)
    logit_bias = 0.0

    def encoder(self, x):
        q = x[:, 0, :4, :4].mean(dim=(1, 2)).clamp(0, 1)
        return torch.stack([q, (1 - q ** 2).sqrt()], dim=1)

    def as_input(self, x):
        return x

    def text_features(self, prompts):
        return torch.tensor([[1.0, 0.0] if p == "a" else [0.0, 1.0] for p in prompts])

    def scores(self, features, text):
        f = features / features.norm(dim=-1, keepdim=True)
        return self.logit_scale * f @ text.T + self.logit_bias


def _pair(prompt="a"):
    return SimpleNamespace(key=(1, 1), image_id=1, category_id=1, prompt=prompt)


def test_rise_curves_by_hand_on_a_stub_model():
    # the map ranks the top-left quadrant's 16 pixels first; 8 steps of 8 pixels
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[:4, :4] = 1 + np.arange(16, dtype=np.float32).reshape(4, 4)
    x = torch.ones(1, 3, 8, 8)
    settings = FaithSettings(steps=8, score="cosine")
    values = faith_values(QuadrantModel(), None, x, [_pair()], {(1, 1): ["m"]}, ["deletion-rise", "insertion-rise"],
                          settings, lambda pair, method: heatmap, ["a"], ["a"], 0, 1)[((1, 1), "m")]
    deletion = values["deletion_rise"]
    # zero baseline: after 8 i pixels the quadrant keeps max(0, 16 - 8 i) of its 16 ones
    assert deletion["curve"] == pytest.approx([1, 0.5, 0, 0, 0, 0, 0, 0, 0], abs=1e-6)
    assert deletion["auc"] == pytest.approx((1.5 - 0.5 - 0) / 8, abs=1e-6)
    # insertion from the blurred image of ones (zero padding: < 1 at the borders): the quadrant's pixels
    # become the image's first, so from point 2 on the score is 1
    insertion = values["insertion_rise"]["curve"]
    assert insertion[2:] == pytest.approx([1] * 7, abs=1e-6)
    assert 0 < insertion[0] < insertion[1] < 1
    assert auc([0, 0.5, 1]) == pytest.approx(0.5)


def test_softmax_score_by_hand_and_one_prompt_records_no_curve():
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[:4, :4] = 1
    x = torch.ones(1, 3, 8, 8)
    model = QuadrantModel()
    values = faith_values(model, None, x, [_pair()], {(1, 1): ["m"]}, ["deletion-rise"], FaithSettings(steps=2),
                          lambda pair, method: heatmap, ["a", "b"], ["a", "b"], 0, 1)[((1, 1), "m")]
    # point 0: q = 1 -> logits (10, 0); point 1 (32 pixels: the quadrant first): q = 0 -> (0, 10)
    expected = [np.exp(10) / (np.exp(10) + 1), 1 / (1 + np.exp(10)), 1 / (1 + np.exp(10))]
    assert values["deletion_rise"]["curve"] == pytest.approx(expected, rel=1e-6)
    alone = faith_values(model, None, x, [_pair()], {(1, 1): ["m"]}, ["deletion-rise", "road"], FaithSettings(steps=2),
                         lambda pair, method: heatmap, ["a"], ["a"], 0, 1)[((1, 1), "m")]
    assert alone == {"deletion_rise": None, "road": None}  # a softmax over one prompt is 1 whatever the image


def _tiny_inputs(model, image):
    return model.host_input(image)


def test_batched_curves_equal_one_image_at_a_time(tiny_vit, chelsea):
    rng = np.random.default_rng(0)
    heatmap = rng.random((chelsea.size[1], chelsea.size[0])).astype(np.float32)
    x = tiny_vit.host_input(chelsea)
    args = (tiny_vit, chelsea, x, [_pair("a cat")], {(1, 1): ["m"]},
            ["deletion-rise", "insertion-rise", "deletion-eclip", "road"], FaithSettings(steps=12),
            lambda pair, method: heatmap, ["a cat", "a dog"], ["a cat", "a dog", "a car"], 3, 7)
    one = faith_values(*args, batch=1)[((1, 1), "m")]
    many = faith_values(*args, batch=64)[((1, 1), "m")]
    for name in ("deletion_rise", "insertion_rise"):
        assert len(many[name]["curve"]) == 13
        np.testing.assert_allclose(many[name]["curve"], one[name]["curve"], atol=1e-6)
    assert many["deletion_eclip"] == one["deletion_eclip"]
    for kind in ("morf", "lerf"):
        np.testing.assert_allclose(many["road"][kind], one["road"][kind], atol=1e-6)


def test_deletion_eclip_equals_grad_eclips_loop_written_out(tiny_vit, chelsea):
    """Grad-ECLIP imagenet_eval_deletion.py@5c1b5cc: L = 100 steps of int(area / 200) pixels, random RGB,
    the image classified after every 10th step; here one image at a time, as there."""
    heatmap = np.random.default_rng(1).random((chelsea.size[1], chelsea.size[0])).astype(np.float32)
    pixels = np.asarray(chelsea.convert("RGB")).copy()
    noise = image_noise(5, "img", pixels.shape[:2])
    prompts = ["a cat", "a dog", "a car"]
    text = tiny_vit.text_features(prompts)
    h, w = heatmap.shape
    order = np.argsort(-heatmap.reshape(-1), kind="stable")
    once = max(1, int(h * w / 200))
    ys, xs = np.divmod(order, w)

    from PIL import Image

    def rank(array):
        with torch.no_grad():
            logits = tiny_vit.scores(tiny_vit.visual(tiny_vit.preprocess(Image.fromarray(array))), text)[0]
        return int((logits > logits[0]).sum())

    expected = [rank(pixels)]
    image = pixels.copy()
    for step in range(1, 101):
        sel = slice((step - 1) * once, step * once)
        image[ys[sel], xs[sel]] = noise[ys[sel], xs[sel]]
        if step % 10 == 0:
            expected.append(rank(image))
    got = faith_values(tiny_vit, chelsea, tiny_vit.host_input(chelsea), [_pair("a cat")], {(1, 1): ["m"]},
                       ["deletion-eclip"], FaithSettings(), lambda pair, method: heatmap, ["a cat"], prompts, 5,
                       "img")[((1, 1), "m")]["deletion_eclip"]["ranks"]
    assert got == expected
    steps = eclip_images(pixels, heatmap, noise)
    assert len(steps) == 10
    assert (steps[-1] != pixels).any(axis=2).sum() <= h * w // 2  # at most half of the pixels replaced


class LogitsOf(torch.nn.Module):
    """A tiny model as a classifier over prompts, for pytorch-grad-cam's metrics."""

    def __init__(self, model, prompts):
        super().__init__()
        self.model, self.text = model, model.text_features(prompts)

    def forward(self, x):
        return self.model.scores(self.model.encoder(x), self.text)


def test_imputer_equals_pytorch_grad_cams(tiny_vit, chelsea):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    x = tiny_vit.host_input(chelsea)[0]
    keep = np.random.default_rng(2).random(x.shape[1:]) > 0.3
    keep[:3, :] = False  # a missing border
    torch.manual_seed(11)
    theirs = NoisyLinearImputer()(x, torch.from_numpy(keep.astype(np.float32)))
    mine = impute(x, keep, generator=torch.Generator().manual_seed(11))
    np.testing.assert_allclose(mine.numpy(), theirs.numpy(), atol=1e-5)
    assert torch.equal(mine[:, keep], x[:, keep])


@pytest.mark.parametrize("score", ["softmax", "cosine"])
def test_road_equals_pytorch_grad_cams_road(tiny_vit, chelsea, score):
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

    prompts = ["a cat", "a dog"]
    saliency = np.random.default_rng(3).random((tiny_vit.input_size,) * 2)
    x = tiny_vit.host_input(chelsea)[0]
    settings = FaithSettings(score=score, road_percentiles=[20, 50, 80])
    pair = _pair("a cat")
    mine = road_values(Scorer(tiny_vit, prompts, score), x, saliency, pair, "m", settings, 4, {})
    s = ((saliency - saliency.min()) / (saliency.max() - saliency.min())).astype(np.float32)
    if score == "softmax":
        classifier, target = LogitsOf(tiny_vit, prompts), ClassifierOutputSoftmaxTarget(0)
    else:
        class Cosines(LogitsOf):
            def forward(self, x):
                f = self.model.encoder(x)
                return (f / f.norm(dim=-1, keepdim=True)) @ self.text.T
        classifier, target = Cosines(tiny_vit, prompts), ClassifierOutputTarget(0)
    for kind, metric in (("morf", ROADMostRelevantFirst), ("lerf", ROADLeastRelevantFirst)):
        for i, p in enumerate(settings.road_percentiles):
            torch.manual_seed(road_seed(4, 1, 1, "m", kind, p))
            theirs = metric(p)(x[None], s[None], [target], classifier)
            assert mine[kind][i] == pytest.approx(float(theirs[0]), abs=1e-5), (kind, p)
    # pytorch-grad-cam's percentile: MoRF 80 removes the top 20 %, LeRF 20 the lowest 80 %
    assert (~road_keep(s, 80, "morf")).mean() == pytest.approx(0.2, abs=0.01)
    assert (~road_keep(s, 20, "lerf")).mean() == pytest.approx(0.8, abs=0.01)


def test_sums_merge_exactly_like_one_pass():
    rng = np.random.default_rng(4)
    records = [{"deletion_rise": {"auc": float(a), "curve": [float(a), 0.1]},
                "insertion_rise": None, "deletion_eclip": {"ranks": [0, int(r)]},
                "road": {"morf": [float(a), 0.2], "lerf": [0.3, float(a)]}} for a, r in zip(rng.random(7), [0, 1] * 4)]
    whole, first, second = FaithSums(), FaithSums(), FaithSums()
    for i, r in enumerate(records):
        whole.add(r)
        (first if i < 3 else second).add(r)
    first += second
    assert first.result() == whole.result()
    result = whole.result()
    assert result["deletion_rise"] == float(sum(Fraction(r["deletion_rise"]["auc"]) for r in records) / 7)
    assert result["insertion_rise"] is None and result["n_rise"] == 7
    assert result["deletion_eclip@50%"] == 4 / 7 and result["deletion_eclip"] == pytest.approx((1 + 4 / 7) / 2)
    morf = float(sum((Fraction(r["road"]["morf"][0]) + Fraction(0.2)) / 2 for r in records) / 7)
    assert result["road_morf"] == morf
    assert result["road_combined"] == pytest.approx((result["road_lerf"] - morf) / 2)


FAITH = ["--protocols", "deletion-rise,insertion-rise,deletion-eclip,road", "--faith-steps", "8",
         "--road-percentiles", "30,70"]


def _eval(out, *extra):
    return runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam,gscorecam", "--dataset", "demo",
                               "--out", str(out), "--no-progress", *FAITH, *extra])


def test_eval_records_summary_report_and_resume(tmp_path, monkeypatch):
    result = _eval(tmp_path / "run")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["faith"]["steps"] == 8 and summary["config"]["faith"]["road_percentiles"] == [30, 70]
    records = [json.loads(line) for line in (tmp_path / "run" / "pairs.jsonl").read_text().splitlines()]
    several = [r for r in records if r["image_id"] in {r2["image_id"] for r2 in records if r2 is not r and
                                                       r2["method"] == r["method"]}]
    assert all(len(r["deletion_rise"]["curve"]) == 9 and len(r["road"]["morf"]) == 2 for r in several)
    assert all(r["deletion_rise"] is None for r in records if r not in several)  # images with one prompt
    assert all(len(r["deletion_eclip"]["ranks"]) == 11 for r in records)
    for method, values in summary["methods"].items():
        assert 0 <= values["deletion_rise"] <= 1 and 0 <= values["deletion_eclip"] <= 1
        assert values["n_rise"] == len([r for r in several if r["method"] == method])
        assert len(values["faith_curves"]["insertion_rise"]) == 9
    table = (tmp_path / "run" / "table.csv").read_text().splitlines()[0]
    assert "deletion_rise" in table and "road_combined" in table
    report = runner.invoke(app, ["report", str(tmp_path / "run"), "--format", "csv"])
    assert report.exit_code == 0 and "deletion_eclip@50%" in report.output.splitlines()[0]
    # the HTML report plots each method's mean curves: the summary's, drawn
    figures = []
    monkeypatch.setattr(html_report, "_png", lambda fig: figures.append(fig) or "<img>")
    html_report.write_html_report([tmp_path / "run"], tmp_path / "report.html")
    assert "faithfulness curves" in (tmp_path / "report.html").read_text()
    panels = {ax.get_title(): ax for fig in figures for ax in fig.axes}
    for name, title in (("deletion_rise", "mean deletion (RISE) curve"), ("insertion_rise", "mean insertion (RISE) curve"),
                        ("deletion_eclip", "mean deletion (Grad-ECLIP) curve")):
        drawn = {line.get_label().split(" (AUC")[0]: list(line.get_ydata()) for line in panels[title].lines}
        assert drawn == {m: v["faith_curves"][name] for m, v in summary["methods"].items()}, name
    # a resumed image (half of the records dropped) scores as a fresh one
    lines = (tmp_path / "run" / "pairs.jsonl").read_text().splitlines()
    (tmp_path / "run" / "pairs.jsonl").write_text("\n".join(lines[::2]) + "\n")
    assert _eval(tmp_path / "run").exit_code == 0
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    for method in summary["methods"]:
        for key in ("deletion_rise", "insertion_rise", "deletion_eclip", "road_morf", "road_lerf"):
            assert resumed["methods"][method][key] == summary["methods"][method][key], (method, key)
    # other faithfulness settings are another run
    again = _eval(tmp_path / "run", "--faith-baseline", "mean")
    assert again.exit_code == 2 and "faith" in again.output


@pytest.mark.parametrize("extra, words", [
    (["--faith-steps", "0"], "--faith-steps"),
    (["--faith-baseline", "grey"], "--faith-baseline"),
    (["--faith-score", "logit"], "--faith-score"),
    (["--road-percentiles", "0,50"], "--road-percentiles"),
])
def test_bad_faithfulness_options_are_one_line(tmp_path, extra, words):
    result = _eval(tmp_path / "bad", *extra)
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_faithfulness_option_without_its_protocol_is_refused(tmp_path):
    result = runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam", "--out", str(tmp_path / "o"),
                                 "--faith-steps", "10", "--no-progress"])
    assert result.exit_code == 2 and "--faith-steps" in result.output


def test_rescore_refuses_the_faithfulness_protocols_instead_of_dropping_them(tmp_path):
    source = tmp_path / "source"
    result = runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam", "--dataset", "demo", "--out",
                                 str(source), "--save-heatmaps", "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["rescore", str(source), "--protocols", "box,road", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "road" in result.output and "camloc eval" in result.output
    assert not (tmp_path / "r" / "summary.json").exists()
