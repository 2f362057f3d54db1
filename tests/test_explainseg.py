"""The explainability benchmarks' metrics (camloc/evaluators/explainseg.py): by hand on small arrays, and against
the reference scripts' arithmetic written out here from their commits (hila-chefer/Transformer-Explainability
`utils/metrices.py` and `baselines/ViT/imagenet_seg_eval.py` at 6b4f311; LUSSeg/ImageNet-S `evaluation/metric.py`
at d8e3cd0 and `evaluator.py` at 89bce0f), on torch tensors as they run them."""
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score
from typer.testing import CliRunner

from camloc.cli.app import app
from camloc.errors import CamlocError
from camloc.evaluators.explainseg import ImagenetSegState, ImagenetSState


def test_imagenet_seg_by_hand():
    heatmap = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 8.0]])  # normalised /8: mean 18/48 = 0.375
    mask = np.array([[0, 0, 1], [1, 1, 1]])
    state = ImagenetSegState().add(heatmap, mask)  # foreground where r > 0.375 (strictly): 4/8 and 8/8 only
    assert (state.correct, state.labeled) == (4, 6)  # (0, 2) and (1, 0) are foreground read as background
    assert state.intersect.tolist() == [2, 2] and state.union.tolist() == [4, 4]
    r = heatmap / 8
    ap = average_precision_score(np.r_[1 - mask.ravel(), mask.ravel()], np.r_[1 - r.ravel(), r.ravel()])
    assert state.ap_sum == pytest.approx(ap) and state.f1_sum == pytest.approx(2 * 2 / (2 * 2 + 0 + 2))
    result = state.result()
    assert result["pixel_accuracy"] == pytest.approx(4 / 6) and result["miou"] == pytest.approx(0.5)
    constant = ImagenetSegState().add(np.full((2, 3), 7.0), mask)  # 0/0: all background, both scores 0
    assert constant.intersect.tolist() == [2, 0] and constant.correct == 2 and constant.f1_sum == 0
    with pytest.raises(ValueError, match="mask values must be 0 and 1"):
        ImagenetSegState().add(heatmap, mask * 2)


def _chefer(res: torch.Tensor, labels: torch.Tensor):
    """imagenet_seg_eval.eval_batch's arithmetic for one (1, 1, H, W) map already at the mask's size and one
    (1, H, W) 0/1 mask: min-max, threshold at the mean, the 2-channel outputs, and metrices.py's counts."""
    res = (res - res.min()) / (res.max() - res.min())
    ret = res.mean()
    res_1 = res.gt(ret).type(res.type())
    res_0 = res.le(ret).type(res.type())
    res_1_ap = res
    res_0_ap = 1 - res
    for t in (res_1, res_0, res_1_ap, res_0_ap):
        t[t != t] = 0
    output = torch.cat((res_0, res_1), 1)
    output_ap = torch.cat((res_0_ap, res_1_ap), 1)
    _, predict = torch.max(output[0], 0)  # batch_pix_accuracy / batch_intersection_union
    predict = predict.numpy() + 1
    target = labels[0].numpy() + 1
    correct, labeled = np.sum((predict == target) * (target > 0)), np.sum(target > 0)
    predict = predict * (target > 0).astype(predict.dtype)
    inter = predict * (predict == target)
    area_inter, _ = np.histogram(inter, bins=2, range=(1, 2))
    area_pred, _ = np.histogram(predict, bins=2, range=(1, 2))
    area_lab, _ = np.histogram(target, bins=2, range=(1, 2))
    pred, tgt = output_ap[0], labels[0]  # get_ap_scores
    one_hot = torch.zeros_like(tgt.unsqueeze(0).expand_as(pred)).scatter_(0, tgt.unsqueeze(0).clamp(min=0).long(), 1)
    ap = np.nan_to_num(average_precision_score(one_hot.numpy().reshape(-1), pred.numpy().reshape(-1)))
    f1 = np.nan_to_num(f1_score(labels[0].numpy().reshape(-1), output[0, 1].numpy().reshape(-1)))  # get_f1_scores
    return correct, labeled, area_inter, area_pred + area_lab - area_inter, ap, f1


def test_imagenet_seg_equals_the_reference_arithmetic():
    rng = np.random.default_rng(0)
    state = ImagenetSegState()
    total = [0, 0, np.zeros(2), np.zeros(2), [], []]
    for i in range(5):
        grid = rng.random((1, 1, 4, 4)).astype(np.float32)
        up = torch.nn.functional.interpolate(torch.from_numpy(grid), scale_factor=4, mode="bilinear")  # 16 x 16
        mask = (rng.random((16, 16)) > 0.6).astype(np.int64)
        if i == 3:
            up = torch.full_like(up, 0.5)  # a constant map: NaN in the reference, zeroed
        with np.errstate(invalid="ignore"):
            correct, labeled, inter, union, ap, f1 = _chefer(up.clone(), torch.from_numpy(mask)[None])
        state.add(up[0, 0].numpy(), mask)
        total[0] += correct
        total[1] += labeled
        total[2] += inter
        total[3] += union
        total[4].append(ap)
        total[5].append(f1)
    assert (state.correct, state.labeled) == (total[0], total[1])
    assert state.intersect.tolist() == total[2].tolist() and state.union.tolist() == total[3].tolist()
    result = state.result()
    assert result["map"] == pytest.approx(np.mean(total[4]), abs=1e-12)
    assert result["mf1"] == pytest.approx(np.mean(total[5]), abs=1e-12)
    iou = total[2] / (np.spacing(1) + total[3])
    assert result["miou"] == pytest.approx(iou.mean()) and result["pixel_accuracy"] == pytest.approx(
        total[0] / (np.spacing(1) + total[1]))
    parts = ImagenetSegState.from_record(state.to_record())  # records merge by addition
    both = ImagenetSegState()
    both += parts
    assert both.result() == result


def test_imagenet_s_by_hand():
    gt = np.array([[0, 0, 0, 0], [0, 2, 2, 0], [1, 1, 1, 1], [1, 1, 1, 1000]])
    pred = np.array([[0, 0, 2, 0], [0, 2, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    state = ImagenetSState(2).add(pred, gt)  # the 1000 pixel is dropped from every count
    assert state.label.tolist() == [6, 7, 2] and state.pred.tolist() == [6, 7, 2]
    assert state.intersect.tolist() == [5, 6, 1]
    result = state.result()
    assert result["miou"] == pytest.approx(np.mean([5 / 7, 6 / 8, 1 / 3]))
    # F-measure of "any class" vs other: 9 labelled, 9 predicted, 8 hit
    precision = recall = 8 / 9
    assert result["fmeasure"] == pytest.approx(1.3 * precision * recall / (0.3 * precision + recall))
    # sizes of the whole image (16 px): class 1 ceil(700/16) = 44 % -> ML; class 2 ceil(200/16) = 13 % -> MS
    assert result["miou_ML"] == pytest.approx(np.mean([5 / 7, 6 / 7]))  # other + class 1's pixels; classes 0, 1
    assert result["miou_MS"] == pytest.approx(np.mean([5 / 6, 1 / 3]))  # other + class 2: predicted 5, 1, 2
    assert math.isnan(result["miou_S"]) and math.isnan(result["miou_L"])
    assert result["accuracy"] == 1.0  # class 1 predicted most, and present
    with pytest.raises(ValueError, match="label class ids must lie in 0..2 or be 1000"):
        ImagenetSState(2).add(pred, np.full((4, 4), 7))


def _lusseg(predicts, gts, k):
    """evaluator.evaluator's loop and metric.py's IoUGPU / FMeasureGPU / IoUDifferentSizeGPU, on float tensors."""
    def iou_gpu(output, target):
        output, target = output.view(-1), target.view(-1)
        inter = output[output == target]
        return (torch.histc(inter, bins=k, min=0, max=k - 1), torch.histc(output, bins=k, min=0, max=k - 1),
                torch.histc(target, bins=k, min=0, max=k - 1))

    t_, p_, tp_ = torch.zeros(k), torch.zeros(k), torch.zeros(k)
    ts, ps, tps = [torch.zeros(k) for _ in range(4)], [torch.zeros(k) for _ in range(4)], [torch.zeros(k) for _ in range(4)]
    fmeasure, acc = 0.0, 0.0
    for predict, gt in zip(predicts, gts):
        predict, gt = predict.view(-1), gt.view(-1)
        inter, out, tgt = iou_gpu(predict, gt)
        counts = torch.bincount(gt.long())
        bins = {0: [], 1: [], 2: [], 3: []}
        for c in torch.unique(gt):
            if c == 0:
                continue
            v = math.ceil(100.0 * counts[int(c)] / sum(counts))
            bins[0 if v <= 5 else 1 if v <= 25 else 2 if v <= 50 else 3].append(int(c))
        for b, classes in bins.items():
            if classes:
                g = torch.cat([gt[gt == 0]] + [gt[gt == c] for c in classes])
                q = torch.cat([predict[gt == 0]] + [predict[gt == c] for c in classes])
                i2, o2, t2 = iou_gpu(q, g)
                ts[b] += o2
                ps[b] += t2
                tps[b] += i2
        target, output = (gt > 0) * 1.0, (predict > 0) * 1.0
        tp = torch.sum(target * output)
        recall, precision = tp / (torch.sum(target) + 1e-20), tp / (torch.sum(output) + 1e-20)
        fmeasure += float((1 + 0.3) * precision * recall / (0.3 * precision + recall + 1e-20))
        t_ += out
        p_ += tgt
        tp_ += inter
        label = torch.argmax(out[1:]) + 1
        acc += float((tgt[label] > 0) * (out[label] > 0))
    iou = tp_ / (t_ + p_ - tp_ + 1e-10)
    sized = [float(torch.mean((tps[i] / (ts[i] + ps[i] - tps[i] + 1e-10))[ps[i] > 0])) for i in range(4)]
    return float(iou.mean()), fmeasure / len(gts), acc / len(gts), sized


def test_imagenet_s_equals_the_reference_arithmetic():
    rng = np.random.default_rng(1)
    k = 6
    gts, preds = [], []
    for i in range(6):
        gt = np.zeros((20, 20), np.int64)
        gt[: 1 + 3 * i, : 2 + 3 * i] = 1 + i % 5  # objects from under 5 % to over 50 % of the image
        gt[15:, 15:] = 1 + (i + 2) % 5
        pred = np.where(rng.random((20, 20)) > 0.3, gt, rng.integers(0, k, (20, 20)))
        gts.append(gt)
        preds.append(pred)
    state = ImagenetSState(k - 1)
    for pred, gt in zip(preds, gts):
        state.add(pred, gt)
    miou, fmeasure, acc, sized = _lusseg([torch.tensor(p, dtype=torch.float32) for p in preds],
                                         [torch.tensor(g, dtype=torch.float32) for g in gts], k)
    result = state.result()
    assert result["miou"] == pytest.approx(miou, rel=1e-6) and result["fmeasure"] == pytest.approx(fmeasure, rel=1e-6)
    assert result["accuracy"] == pytest.approx(acc)
    for name, value in zip(("S", "MS", "ML", "L"), sized):
        assert (math.isnan(result[f"miou_{name}"]) and math.isnan(value)) or result[f"miou_{name}"] == pytest.approx(
            value, rel=1e-6), name
    assert not any(math.isnan(result[f"miou_{n}"]) for n in ("S", "MS", "ML", "L"))  # every bin is exercised
    half = ImagenetSState(k - 1)
    for pred, gt in zip(preds[:3], gts[:3]):
        half.add(pred, gt)
    rest = ImagenetSState(k - 1)
    for pred, gt in zip(preds[3:], gts[3:]):
        rest.add(pred, gt)
    merged = ImagenetSState.from_record(half.to_record())
    merged += ImagenetSState.from_record(rest.to_record())
    assert merged.result() == pytest.approx(result, rel=1e-12)  # the F-measure's float sum in another order
    assert (merged.intersect == state.intersect).all() and (merged.sized == state.sized).all()


def write_gtsegs(path, images, masks, wnids=None):
    """A gtsegs_ijcv.mat in the layout Transformer-Explainability's data/Imagenet.py reads (no real copy could be
    had: its host is dead): /value/img, (N, 1) references to (C, W, H) arrays; /value/gt, (N, 1) references to 1 x 1
    cells of references to (W, H) masks; /value/target (as a public LeGrad evaluation script reads it), (N, 1)
    references to the WordNet id's characters as uint16 (MATLAB's char)."""
    import h5py

    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs, gt_refs, target_refs = [], [], []
        for i, (image, mask) in enumerate(zip(images, masks)):
            data = refs.create_dataset(f"img{i}", data=image.transpose((2, 1, 0)))
            m = refs.create_dataset(f"mask{i}", data=mask.transpose((1, 0)))
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = m.ref
            img_refs.append(data.ref)
            gt_refs.append(cell.ref)
            if wnids:
                chars = np.array([ord(c) for c in wnids[i]], np.uint16).reshape(-1, 1)
                target_refs.append(refs.create_dataset(f"target{i}", data=chars).ref)
        value = f.create_group("value")
        value.create_dataset("img", data=np.array(img_refs, dtype=h5py.ref_dtype).reshape(-1, 1))
        value.create_dataset("gt", data=np.array(gt_refs, dtype=h5py.ref_dtype).reshape(-1, 1))
        if wnids:
            value.create_dataset("target", data=np.array(target_refs, dtype=h5py.ref_dtype).reshape(-1, 1))


def test_imagenet_segmentation_file_reads_images_and_masks(tmp_path):
    from camloc.datasets.explainseg import ImagenetSegFile
    from camloc.errors import DataError

    rng = np.random.default_rng(0)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in ((6, 9), (5, 4))]
    masks = [(rng.random(im.shape[:2]) > 0.5).astype(np.uint8) for im in images]
    write_gtsegs(tmp_path / "gtsegs_ijcv.mat", images, masks)
    data = ImagenetSegFile(tmp_path)  # the folder holding it, or the file
    assert len(data) == 2
    for i in range(2):
        assert np.array_equal(np.asarray(data.image(i)), images[i]) and np.array_equal(data.mask(i), masks[i])
    data.close()
    with pytest.raises(DataError, match="camloc cannot download it"):
        ImagenetSegFile(tmp_path / "elsewhere")
    (tmp_path / "bad.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    with pytest.raises(DataError, match="is not ImageNet-Segmentation's MATLAB v7.3 file"):
        ImagenetSegFile(tmp_path / "bad.mat")
    write_gtsegs(tmp_path / "two.mat", images[:1], [masks[0] * 2])
    with pytest.raises(DataError, match="mask 0 holds values"):
        ImagenetSegFile(tmp_path / "two.mat").mask(0)


def test_imagenet_s_masks_decode_r_plus_256_g(tmp_path):
    from PIL import Image

    from camloc.datasets.explainseg import imagenet_s_label
    from camloc.errors import DataError

    ids = np.array([[0, 1, 255], [256, 919, 1000]])
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "n01440764_0.png")
    assert imagenet_s_label(tmp_path / "n01440764_0.png").tolist() == ids.tolist()
    Image.fromarray(ids.astype(np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(DataError, match="is a L image"):
        imagenet_s_label(tmp_path / "gray.png")


# --- the protocols in runs -------------------------------------------------------------------------------------------

runner = CliRunner()
SEG_WNIDS = ["n01440764", "n02123045", "n00007846"]  # tench, tabby cat (ImageNet-1k); person (WordNet only)


def _blob_images(rng, sizes):
    images, masks = [], []
    for h, w in sizes:
        image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: 3 * h // 4, w // 5: w // 2] = 1
        image[mask > 0] = (image[mask > 0] // 2 + 120).astype(np.uint8)
        images.append(image)
        masks.append(mask)
    return images, masks


def _records(run_dir):
    rows = [json.loads(line) for p in sorted(Path(run_dir).glob("pairs*.jsonl")) for line in p.read_text().splitlines()]
    for row in rows:
        row.pop("seconds", None)
    return sorted(rows, key=lambda r: (str(r["image_id"]), r["category_id"], r["method"]))


def _eval(out, *args, note=None):
    result = runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam,layercam", "--out", str(out),
                                 "--no-progress", "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    assert note is None or note in result.output, result.output
    return json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None


def _same_up_to_batch_rounding(batched: dict, one: dict) -> None:
    """A batched forward's maps differ from one image's by float rounding (~1e-6 of the range: oneDNN picks kernels
    by batch size, tests/test_throughput.py), which can move a pixel across a map's mean: values within 1e-3."""
    for method, values in one["methods"].items():
        for key, value in values.items():
            if key.startswith(("seg_", "imagenet_s_", "n_")) and value is not None:
                assert batched["methods"][method][key] == pytest.approx(value, abs=1e-3), (method, key)


def _chefer_by_hand(heatmaps, masks):
    """ImageNet-Segmentation's sums written out with NumPy and sklearn, at 224 x 224."""
    from sklearn.metrics import average_precision_score

    inter, union, correct, labeled, aps = np.zeros(2), np.zeros(2), 0, 0, []
    for h, m in zip(heatmaps, masks):
        r = cv2.resize(h.astype(np.float32), (224, 224), interpolation=cv2.INTER_LINEAR)
        t = cv2.resize(m.astype(np.uint8), (224, 224), interpolation=cv2.INTER_NEAREST) > 0
        constant = r.max() == r.min()  # all background, scores 0 (the reference's 0/0 zeroed)
        r = np.zeros_like(r) if constant else (r - r.min()) / (r.max() - r.min())
        fg = r > r.mean() if not constant else np.zeros(r.shape, bool)
        correct += (fg == t).sum()
        labeled += t.size
        for c, (a, b) in enumerate(((~fg, ~t), (fg, t))):
            inter[c] += (a & b).sum()
            union[c] += (a | b).sum()
        scores = np.zeros(2 * r.size) if constant else np.concatenate([1 - r.ravel(), r.ravel()])  # NaN -> 0: both
        aps.append(average_precision_score(np.concatenate([~t.ravel(), t.ravel()]), scores))
    return {"seg_pixel_accuracy": correct / labeled, "seg_miou": float((inter / union).mean()),
            "seg_map": float(np.mean(aps))}


def _heatmaps(run_dir, method, dataset, **data):
    from camloc.cams import compute_heatmaps
    from camloc.datasets import load_dataset
    from camloc.models import ClipModel, load_image

    model = ClipModel.load("tiny-rn", device="cpu")
    out = {}
    for item in load_dataset(dataset, **data):
        pair = item.pairs[0]
        out[str(item.image_id)] = compute_heatmaps(model, load_image(item.path), [pair.prompt], [method])[method][0]
    return out


def test_imagenet_segmentation_runs_end_to_end_sharded_batched_and_rescored(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    images, masks = _blob_images(rng, [(40, 48), (52, 36), (40, 40)])
    root = tmp_path / "data"
    (root / "imagenet-seg").mkdir(parents=True)
    write_gtsegs(root / "imagenet-seg" / "gtsegs_ijcv.mat", images, masks, SEG_WNIDS)
    args = ["--dataset", "imagenet-seg", "--data-root", str(root), "--protocols", "chefer-seg,mask-iou"]
    summary = _eval(tmp_path / "one", *args, "--save-heatmaps", "--image-batch", "1")
    records = _records(tmp_path / "one")
    assert [r["prompt"] for r in records if r["method"] == "gradcam"] == ["tench", "tabby cat", "person"]
    assert {r["category_id"] for r in records} == {int(w[1:]) for w in SEG_WNIDS}
    extracted = root / "imagenet-seg" / "gtsegs_ijcv_extracted"
    assert np.array_equal(np.asarray(Image.open(extracted / "images" / "0001.png")), images[1])
    for method in ("gradcam", "layercam"):
        maps = _heatmaps(tmp_path / "one", method, "imagenet-seg", data_root_dir=root)
        expected = _chefer_by_hand([maps[str(i)] for i in range(3)], masks)
        got = summary["methods"][method]
        assert got["n_seg"] == 3
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (method, key)
    # the extraction is done once: a second build reads the PNGs
    stamp = (extracted / "index.json").stat().st_mtime_ns
    # two shards give the same records and table; the extraction is not redone
    _eval(tmp_path / "two", *args, "--shard", "0/2", "--image-batch", "1")
    _eval(tmp_path / "two", *args, "--shard", "1/2", "--image-batch", "1")
    assert (extracted / "index.json").stat().st_mtime_ns == stamp
    assert _records(tmp_path / "two") == records
    assert (tmp_path / "two" / "table.csv").read_text() == (tmp_path / "one" / "table.csv").read_text()
    _same_up_to_batch_rounding(_eval(tmp_path / "batched", *args, "--image-batch", "4"), summary)
    assert "seg_miou" in (tmp_path / "one" / "table.csv").read_text()
    # rescored from the saved maps, without the model
    result = runner.invoke(app, ["rescore", str(tmp_path / "one"), "--protocols", "chefer-seg,mask-iou", "--out",
                                 str(tmp_path / "re"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert _records(tmp_path / "re") == records


def _imagenet_s(root, k=50, layout="nested"):
    """ImageNet-S-K's validation masks (R + 256 G PNGs) and a flat or nested image folder, test-made."""
    from camloc.datasets.explainseg import imagenet_names

    wnids = list(imagenet_names())[:k]
    base = root / f"ImageNetS{k}"
    (base / f"ImageNetS_categories_im{k}.txt").parent.mkdir(parents=True)
    (base / f"ImageNetS_categories_im{k}.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(7)
    images_dir = root / "imagenet-val"
    labels = {}
    for n, (wnid, size) in enumerate([(wnids[0], (30, 40)), (wnids[0], (36, 28)), (wnids[4], (32, 32)),
                                      (wnids[9], (24, 30))]):
        stem = f"ILSVRC2012_val_{n + 1:08d}"
        h, w = size
        label = np.zeros((h, w), np.int64)
        c = wnids.index(wnid) + 1
        label[h // 3: h - 2, 2: w // 2 + 3] = c
        if n == 2:
            label[: h // 4, w // 2:] = 7  # another class in the image
        if n == 3:
            label[:] = 0  # its own class is not labelled: no pair
        (base / "validation-segmentation" / wnid).mkdir(parents=True, exist_ok=True)
        rgb = np.stack([label % 256, label // 256, np.zeros_like(label)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(base / "validation-segmentation" / wnid / f"{stem}.png")
        image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        folder = images_dir / wnid if layout == "nested" else images_dir
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{stem}.JPEG", quality=95)
        labels[stem] = (label, c)
    return images_dir, labels


def test_imagenet_s_runs_end_to_end_against_the_reference_arithmetic(tmp_path):
    root = tmp_path / "data"
    images_dir, labels = _imagenet_s(root, layout="flat")
    args = ["--dataset", "imagenet-s50", "--data-root", str(root), "--image-dir", str(images_dir), "--protocols",
            "imagenet-s,chefer-seg"]
    summary = _eval(tmp_path / "one", *args, "--image-batch", "1",
                    note="1 images whose own class is not labelled in their mask left out (no pair to score)")
    records = _records(tmp_path / "one")
    assert {r["image_id"] for r in records} == set(list(labels)[:3])  # the image without its class gives no pair,
    assert summary["faults"]["images_without_their_class"] == 1  # and is counted, not silently dropped
    assert [r["prompt"] for r in records if r["method"] == "gradcam"] == ["tench", "tench", "hammerhead shark"]
    varied = 0
    for method in ("gradcam", "layercam"):
        maps = _heatmaps(tmp_path / "one", method, "imagenet-s50", data_root_dir=root, image_dir=images_dir)
        predicts, gts = [], []
        for stem, heatmap in maps.items():
            label, c = labels[stem]
            varied += heatmap.max() > heatmap.min()  # a constant map predicts "other" everywhere
            r = (heatmap - heatmap.min()) / max(heatmap.max() - heatmap.min(), 1e-30)
            predicts.append(np.where(r > r.mean(), c, 0) if heatmap.max() > heatmap.min() else np.zeros_like(label))
            gts.append(label)
        miou, fmeasure, accuracy, sized = _lusseg([torch.tensor(p, dtype=torch.float32) for p in predicts],
                                                  [torch.tensor(g, dtype=torch.float32) for g in gts], 51)
        got = summary["methods"][method]
        assert got["n_imagenet_s"] == 3
        assert got["imagenet_s_miou"] == pytest.approx(miou, rel=1e-6)
        assert got["imagenet_s_fmeasure"] == pytest.approx(fmeasure, rel=1e-6, abs=1e-12)
        assert got["imagenet_s_accuracy"] == pytest.approx(accuracy)
        for b, want in zip(("S", "MS", "ML", "L"), sized):
            assert (got[f"imagenet_s_miou_{b}"] is None) if math.isnan(want) else (
                got[f"imagenet_s_miou_{b}"] == pytest.approx(want, rel=1e-6)), b
    assert varied >= 3
    from camloc.report.leaderboard import METRICS, board
    from camloc.report.tables import eval_groups

    result = board(eval_groups([tmp_path / "one"]), [], lambda g: "run")
    for metric in (m for m in METRICS if m.field in ("imagenet_s_state", "chefer_seg_state")):
        for method, row in result["rows"].items():
            value = row["cells"][("run", metric.column)]["value"]
            assert value == pytest.approx(summary["methods"][method][metric.column], abs=1e-12), (method, metric.column)
    _eval(tmp_path / "two", *args, "--shard", "0/2", "--image-batch", "1")
    _eval(tmp_path / "two", *args, "--shard", "1/2", "--image-batch", "1")
    assert _records(tmp_path / "two") == records
    _same_up_to_batch_rounding(_eval(tmp_path / "batched", *args, "--image-batch", "3"), summary)
    assert (tmp_path / "two" / "table.csv").read_text() == (tmp_path / "one" / "table.csv").read_text()
    verify = runner.invoke(app, ["data", "verify", "imagenet-s50", "--data-root", str(root), "--image-dir",
                                 str(images_dir)])
    assert verify.exit_code == 0 and "images 3, pairs 3, missing image files 0" in verify.output, verify.output


def test_imagenet_s_bad_files_are_one_line(tmp_path):
    root = tmp_path / "data"
    images_dir, labels = _imagenet_s(root)
    args = ["eval", "--model", "tiny-rn", "--method", "gradcam", "--dataset", "imagenet-s50", "--data-root",
            str(root), "--image-dir", str(images_dir), "--protocols", "imagenet-s", "--no-progress", "--device", "cpu"]
    stem = next(iter(labels))
    wnid = next(p.name for p in (root / "ImageNetS50" / "validation-segmentation").iterdir()
                if (p / f"{stem}.png").exists())
    image = images_dir / wnid / f"{stem}.JPEG"
    Image.new("RGB", (12, 12)).save(image)  # an image of another size than its mask
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and f"{image}) is 12x12 pixels" in result.output and "Traceback" not in result.output
    mask = root / "ImageNetS50" / "validation-segmentation" / wnid / f"{stem}.png"
    Image.fromarray(np.full((4, 4, 3), [77, 0, 0], np.uint8)).save(mask)  # class 77 in ImageNet-S-50
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and f"ImageNet-S mask {mask} holds class ids [77]" in result.output
    (root / "ImageNetS50" / "ImageNetS_categories_im50.txt").write_text("n01440764\n")
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "is not ImageNet-S-50's class file" in result.output
    (root / "ImageNetS50" / "ImageNetS_categories_im50.txt").unlink()
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "get ImageNetS_categories_im50.txt from LUSSeg/ImageNet-S" in result.output


def test_imagenet_segmentation_file_missing_or_without_classes_is_one_line(tmp_path):
    args = ["eval", "--model", "tiny-rn", "--method", "gradcam", "--dataset", "imagenet-seg", "--data-root",
            str(tmp_path), "--protocols", "chefer-seg", "--no-progress", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "camloc cannot download it" in result.output and "Traceback" not in result.output
    images, masks = _blob_images(np.random.default_rng(0), [(20, 20)])
    (tmp_path / "imagenet-seg").mkdir()
    write_gtsegs(tmp_path / "imagenet-seg" / "gtsegs_ijcv.mat", images, masks)  # no /value/target
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "has no /value/target" in result.output


def test_imagenet_s_919_class_file_is_read_and_every_class_has_a_clip_name(tmp_path):
    """The real class file of ImageNet-S-919: 919 ids, every one an ImageNet-1k class camloc names, the five the
    README says were merged absent, and `imagenet_s_categories` reads it (row i = id i + 1)."""
    from camloc.datasets.explainseg import imagenet_names, imagenet_s_categories

    real = Path(__file__).parent / "real-formats" / "imagenet-s" / "ImageNetS_categories_im919.txt"
    wnids = imagenet_s_categories(real, 919)
    assert len(wnids) == 919 and set(wnids) <= set(imagenet_names())
    assert not {"n04356056", "n04493381", "n03642806", "n04008634", "n03887697"} & set(wnids)
    assert wnids[0] == "n01532829" and imagenet_names()[wnids[0]] == "house finch"
    with pytest.raises(CamlocError, match="is not ImageNet-S-50's class file"):
        imagenet_s_categories(real, 50)


def test_a_protocol_without_its_ground_truth_is_refused(tmp_path):
    result = runner.invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam", "--dataset", "demo",
                                 "--protocols", "imagenet-s", "--out", str(tmp_path / "a"), "--no-progress"])
    assert result.exit_code == 2 and "which demo does not have; run it on imagenet-s50" in result.output
    assert not (tmp_path / "a" / "pairs.jsonl").exists()


def _reconstruction(heatmap, yes_points, no_points):
    """The public reconstruction's compute_pointwise_miou written out: min-max with + 1e-8, > 0.5, points (y, x)
    truncated and clipped, IoUs with + 1e-8."""
    h = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min() + 1e-8)
    pred = h > 0.5
    H, W = h.shape
    tp = fn = fp = tn = 0
    for y, x in yes_points:
        if pred[int(np.clip(y, 0, H - 1)), int(np.clip(x, 0, W - 1))]:
            tp += 1
        else:
            fn += 1
    for y, x in no_points:
        if pred[int(np.clip(y, 0, H - 1)), int(np.clip(x, 0, W - 1))]:
            fp += 1
        else:
            tn += 1
    return (tp / (tp + fp + fn + 1e-8) + tn / (tn + fp + fn + 1e-8)) / 2


def test_point_miou_by_hand_and_against_the_reconstruction():
    from camloc.evaluators.explainseg import PointsState, point_counts, point_miou

    heatmap = np.zeros((10, 10), np.float32)
    heatmap[2:6, 2:6] = 1.0  # foreground: rows/cols 2..5
    points = [(3.7, 2.2, True), (8.0, 8.0, True), (4.0, 4.0, False), (0.5, 9.9, False), (12.0, -3.0, False)]
    # yes (3.7, 2.2) -> pixel (row 2, col 3): fg, tp; yes (8, 8): bg, fn; no (4, 4): fg, fp; no (0.5, 9.9) -> row 9,
    # col 0: bg, tn; no (12, -3) clipped to row 0, col 9: bg, tn
    counts = point_counts(heatmap, points)
    assert counts.tolist() == [1, 1, 1, 2]
    assert point_miou(counts) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert point_counts(np.full((4, 4), 0.3), [(1, 1, True)]).tolist() == [0, 1, 0, 0]  # constant: all background
    rng = np.random.default_rng(5)
    state, pairs = PointsState(), []
    for i in range(6):
        h = rng.random((12, 9)).astype(np.float32)
        pts = [(float(rng.uniform(-1, 10)), float(rng.uniform(-1, 13)), bool(rng.random() > 0.4)) for _ in range(7)]
        state.add(h, pts, "cat" if i % 2 else "dog")
        pairs.append(_reconstruction(h, [(y, x) for x, y, yes in pts if yes], [(y, x) for x, y, yes in pts if not yes]))
    result = state.result()
    assert result["p_miou_pair_mean"] == pytest.approx(np.mean(pairs), abs=1e-7)
    assert result["pairs"] == 6 and result["classes"] == 2
    expected = np.mean([point_miou(c) for c in state.per_class.values()])
    assert result["p_miou_class_mean"] == pytest.approx(expected)
    merged = PointsState(state.miou_sum / 2, 3, {"dog": state.per_class["dog"]})
    merged += PointsState(state.miou_sum / 2, 3, {"cat": state.per_class["cat"]})
    assert merged.result() == pytest.approx(result)


def test_rescore_refuses_a_protocol_without_its_ground_truth(tmp_path):
    """The eval check's twin: rescoring a run with imagenet-s on data without label maps would print an empty
    column with exit 0."""
    args = ["--model", "tiny-rn", "--method", "gradcam", "--dataset", "demo", "--limit", "2", "--no-progress"]
    result = runner.invoke(app, ["eval", *args, "--save-heatmaps", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["rescore", str(tmp_path / "run"), "--protocols", "imagenet-s", "--out",
                                 str(tmp_path / "re"), "--no-progress"])
    assert result.exit_code == 2 and "which demo does not have; run it on imagenet-s50" in result.output
    assert not list((tmp_path / "re").glob("pairs*.jsonl"))
