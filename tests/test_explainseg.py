"""The explainability benchmarks' metrics (camloc/evaluators/explainseg.py): by hand on small arrays, and against
the reference scripts' arithmetic written out here from their commits (hila-chefer/Transformer-Explainability
`utils/metrices.py` and `baselines/ViT/imagenet_seg_eval.py` at 6b4f311; LUSSeg/ImageNet-S `evaluation/metric.py`
at d8e3cd0 and `evaluator.py` at 89bce0f), on torch tensors as they run them."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

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


def write_gtsegs(path, images, masks):
    """A gtsegs_ijcv.mat in the layout Transformer-Explainability's data/Imagenet.py reads (no real copy could be
    had: its host is dead): /value/img, (N, 1) references to (C, W, H) arrays; /value/gt, (N, 1) references to 1 x 1
    cells of references to (W, H) masks."""
    import h5py

    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs, gt_refs = [], []
        for i, (image, mask) in enumerate(zip(images, masks)):
            data = refs.create_dataset(f"img{i}", data=image.transpose((2, 1, 0)))
            m = refs.create_dataset(f"mask{i}", data=mask.transpose((1, 0)))
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = m.ref
            img_refs.append(data.ref)
            gt_refs.append(cell.ref)
        value = f.create_group("value")
        value.create_dataset("img", data=np.array(img_refs, dtype=h5py.ref_dtype).reshape(-1, 1))
        value.create_dataset("gt", data=np.array(gt_refs, dtype=h5py.ref_dtype).reshape(-1, 1))


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
