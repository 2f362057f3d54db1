"""`--protocols ovseg` against the SCLIP-style harness run on mmsegmentation's own machinery, on the real VOC 2012
image in tests/real-formats/voc2012: mmseg 1.2.2's dataset class, test pipeline (LoadImageFromFile, keep-ratio
Resize to (2048, S), LoadAnnotations, PackSegInputs), SegDataPreProcessor with SCLIP's constants,
`EncoderDecoder.slide_inference` and IoUMetric's per-class areas; the window logits and the post-processing as
SCLIP's `CLIPForSegmentation` computes them (wangf3014/SCLIP clip_segmentor.py at d84d4ab, clip/model.py at
961a11a), written out here. camloc's saved class map must equal the harness's on every pixel, and its counts
IoUMetric's.

mmcv-lite has no compiled ops: `mmcv.ops` is stubbed (mmseg imports names from it that this path never calls).
The test skips, saying so, where the three packages are not installed (they are test dependencies)."""
import math
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from camloc.cli.app import app

REAL = Path(__file__).parent / "real-formats" / "voc2012" / "VOC2012"
runner = CliRunner()


def _mmseg():
    if "mmcv.ops" not in sys.modules:
        try:
            import mmcv.ops  # noqa: F401
        except ImportError:  # mmcv-lite: no compiled ops
            ops = types.ModuleType("mmcv.ops")

            def missing(name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return type(name, (), {})

            ops.__getattr__ = missing
            sys.modules["mmcv.ops"] = ops
    try:
        import mmseg.datasets  # noqa: F401
        import mmseg.evaluation  # noqa: F401
        import mmseg.models  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"mmsegmentation 1.2.2, mmengine 0.10.7 and mmcv-lite 2.1.0 are needed ({exc})")
    return sys.modules["mmseg"]


def sclip_positions(table, patch, rows_px, cols_px):
    """SCLIP's `interpolate_pos_encoding`: the patch table scaled by ((side // p + 0.1) / sqrt(N)), bicubic."""
    n = table.shape[0] - 1
    g = math.sqrt(n)
    patches = table[1:].reshape(1, int(g), int(g), -1).permute(0, 3, 1, 2)
    out = F.interpolate(patches, scale_factor=((rows_px // patch + 0.1) / g, (cols_px // patch + 0.1) / g),
                        mode="bicubic")
    return torch.cat([table[:1], out.permute(0, 2, 3, 1).reshape(-1, table.shape[-1])])


def harness_predict(model, image_tensor, data_sample, queries, owner, names, crop, stride, logit_scale, prob_thd,
                    area_thd):
    """SCLIP's predict: mmseg's slide_inference over `forward_feature` windows, logits resized to the original
    size, then its postprocess_result (x logit scale, softmax over queries, max over each class's queries, area
    threshold, argmax, probability threshold)."""
    from mmengine.config import ConfigDict
    from mmseg.models.segmentors import EncoderDecoder

    from camloc.cams.registry import METHODS
    from camloc.segment.infer import window_grids

    visual = model.visual
    patch = visual.conv1.kernel_size[0]

    class Harness:
        test_cfg = ConfigDict(mode="slide", crop_size=(crop, crop), stride=(stride, stride))
        out_channels = len(queries)

        def encode_decode(self, window, metas):  # SCLIP's forward_feature on one window
            original, size = visual.positional_embedding, model.input_size
            rows, cols = window.shape[-2:]
            if (rows, cols) != (size, size):
                visual.positional_embedding = torch.nn.Parameter(
                    sclip_positions(original.detach().float(), patch, rows, cols), requires_grad=False)
                model.input_size = rows
            try:
                grid = window_grids(model, [METHODS["sclip"]], {}, window, queries, names)["sclip"]
            finally:
                visual.positional_embedding, model.input_size = original, size
            return F.interpolate(grid.float(), size=(rows, cols), mode="bilinear")

    logits = EncoderDecoder.slide_inference(Harness(), image_tensor, [dict(data_sample.metainfo)])
    logits = F.interpolate(logits, size=data_sample.metainfo["ori_shape"][:2], mode="bilinear")[0]
    probs = (logits * logit_scale).softmax(0)
    index = torch.tensor(owner)
    n_classes = int(index.max()) + 1
    if n_classes != len(owner):
        membership = F.one_hot(index).T.view(n_classes, len(owner), 1, 1)
        probs = (probs[None] * membership).max(1)[0]
    if area_thd is not None:
        hard = F.one_hot(probs.argmax(0), n_classes).to(probs.dtype)
        area = hard[:, :, 1:].sum((0, 1), keepdim=True)
        area = (area > area_thd * area.sum()).to(probs.dtype)
        probs[1:] *= area.transpose(0, -1)
    pred = probs.argmax(0, keepdim=True)
    pred[probs.max(0, keepdim=True)[0] < prob_thd] = 0
    return pred


def voc_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass"):
        shutil.copytree(REAL / folder, root / folder)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000063\n")
    return root


@pytest.mark.parametrize("extra,crop,stride", [([], 224, 112), (["--ovseg-crop", "64", "--ovseg-stride", "32"], 64, 32)])
def test_ovseg_equals_the_harness_on_every_pixel(tmp_path, extra, crop, stride):
    """The sclip preset on voc21 (short side 336, crop 224, stride 112: tiny-vit's 64 px positions resized the
    harness's way; logit scale 65, probability and area thresholds 0.1), and the same at its input size."""
    _mmseg()
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets import PascalVOCDataset
    from mmseg.datasets.transforms import LoadAnnotations, PackSegInputs, Resize
    from mmseg.evaluation import IoUMetric
    from mmseg.models.data_preprocessor import SegDataPreProcessor

    from camloc.datasets.segmentation import SEG_DATASETS
    from camloc.models import ClipModel
    from camloc.segment.infer import query_features

    root = voc_root(tmp_path)
    result = runner.invoke(app, ["eval", "--dataset", "voc21", "--protocols", "ovseg", "--method", "sclip", "--model",
                                 "tiny-vit", "--data-root", str(tmp_path), "--out", str(tmp_path / "run"),
                                 "--ovseg-templates", "single", "--save-predictions", "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    ours = np.asarray(Image.open(tmp_path / "run" / "predictions" / "sclip" / "2007_000063.png")).astype(np.int64)

    dataset = PascalVOCDataset(data_root=str(root), data_prefix=dict(img_path="JPEGImages",
                                                                     seg_map_path="SegmentationClass"),
                               ann_file="ImageSets/Segmentation/val.txt",
                               pipeline=[LoadImageFromFile(), Resize(scale=(2048, 336), keep_ratio=True),
                                         LoadAnnotations(), PackSegInputs()])
    item = dataset[0]
    preprocess = SegDataPreProcessor(mean=[122.771, 116.746, 104.094], std=[68.501, 66.632, 70.323], rgb_to_bgr=True)
    batch = preprocess(dict(inputs=[item["inputs"]], data_samples=[item["data_samples"]]), False)
    model = ClipModel.load("tiny-vit", device="cpu")
    classes = SEG_DATASETS["voc21"].classes()
    queries, owner, names = query_features(model, classes, "single")
    with torch.no_grad():
        pred = harness_predict(model, batch["inputs"], batch["data_samples"][0], queries, owner, names, crop, stride,
                               65.0, 0.1, 0.1)
    theirs = pred[0].numpy()
    assert theirs.shape == ours.shape == (375, 500)
    assert (theirs == ours).all(), f"{(theirs != ours).sum()} pixels differ"
    assert len(np.unique(ours)) > 1  # not a constant map: the comparison means something

    sample = batch["data_samples"][0]
    sample.set_data({"pred_sem_seg": __import__("mmengine.structures", fromlist=["PixelData"]).PixelData(data=pred)})
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=[c[0] for c in classes])
    metric.process({}, [sample.to_dict()])
    intersect, union, pred_area, label_area = (t.numpy() for t in metric.results[0])
    import json

    state = json.loads((tmp_path / "run" / "ovseg.jsonl").read_text().splitlines()[0])["state"]
    assert state["intersect"] == intersect.astype(int).tolist() and state["union"] == union.astype(int).tolist()
    assert state["pred"] == pred_area.astype(int).tolist() and state["label"] == label_area.astype(int).tolist()
