"""`camloc eval --save-vis N`: the pairs drawn (best, worst, random by IoU) and their overlays."""
from __future__ import annotations

from pathlib import Path

from camloc.cams import compute_heatmaps
from camloc.datasets import ImagePairs, dataset_prompts
from camloc.evaluators.meter import record_key
from camloc.models import ClipModel, load_image
from camloc.run.identity import EvalConfig


def pair_score(record: dict) -> tuple[float, str] | None:
    """What a pair is ranked by, and its name: the box IoU, or for a box-less pair (point labels) its p-mIoU; None
    for a box-less pair without the points protocol."""
    if record["iou"] is not None:
        return record["iou"], "IoU"
    if record.get("points_counts") is not None:
        from camloc.evaluators.explainseg import point_miou

        return point_miou(record["points_counts"]), "p-mIoU"
    return None


def pick_for_vis(records: list[dict], n: int, seed: int = 0) -> dict[str, list[dict]]:
    """The n best, n worst and n random (seeded) records by IoU (p-mIoU for box-less pairs; pairs with neither are
    not drawn); best and worst exclude each other."""
    import random

    records = [r for r in records if pair_score(r) is not None]
    ranked = sorted(records, key=lambda r: (-pair_score(r)[0], str(r["image_id"]), r["category_id"]))
    best = ranked[:n]
    worst = [r for r in reversed(ranked) if r not in best][:n]
    chosen = random.Random(seed).sample(ranked, min(n, len(ranked)))
    return {"best": best, "worst": worst, "random": chosen}


def save_visualizations(model: ClipModel, images: list[ImagePairs], records: list[dict], config: EvalConfig,
                        out: Path, n: int) -> None:
    """`--save-vis N`: overlays of the N best, N worst and N random pairs per method, IoU in the caption."""
    from camloc.report.figures import pair_overlay

    paths = {str(item.image_id): item.path for item in images}
    prompts_of = {str(item.image_id): list(dict.fromkeys(p.prompt for p in item.pairs)) for item in images}
    options = {**config.options, "contrast_prompts": dataset_prompts(images)}
    unique = {record_key(r): r for r in records}
    for method in config.methods:
        picks = pick_for_vis([r for r in unique.values() if r["method"] == method], n, config.seed)
        folder = out / method.replace("+", "p")
        folder.mkdir(parents=True, exist_ok=True)
        for group, chosen in picks.items():
            for rank, r in enumerate(chosen):
                image = load_image(paths[str(r["image_id"])])
                # with all of the image's prompts, as eval scored it (CLIP-ES's softmax and CLIP Surgery's
                # labels contrast depend on the image's other prompts)
                prompts = prompts_of[str(r["image_id"])]
                heatmap = compute_heatmaps(model, image, prompts, [method], options)[method][prompts.index(r["prompt"])]
                name = f"{group}_{rank:02d}_{r['image_id']}_{r['category_id']}.jpg"
                value, what = pair_score(r)
                pair_overlay(image, heatmap, r["box"], r["gt_boxes"], f"{method} '{r['prompt']}' {what} {value:.3f}",
                             folder / name, points=r.get("points"))
