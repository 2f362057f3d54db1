"""The compute pipeline of `camloc eval`: pending work, image loading in threads, batched device steps
(`--image-batch`, CUDA out-of-memory halving in `share_batch`), and each pair's records from its maps."""
from __future__ import annotations

import os
import time
from pathlib import Path


from camloc.cams import CamContext
from camloc.cams.context import Ledger, share_batch, synchronize
from camloc.cams.engine import compute_native
from camloc.cams.postprocess import native_to_raw
from camloc.cams.registry import METHODS
from camloc.datasets import ImagePairs
from camloc.errors import CamlocError, DataError, ImageError, OptionError
from camloc.evaluators import best_iou, box_from_heatmap
from camloc.evaluators.protocols import MASK_PROTOCOLS, pair_values
from camloc.models import ClipModel, load_image
from camloc.run.faithfulness import DEFAULT_FAITH_BATCH, faith_values, wants_faithfulness
from camloc.run.files import append_jsonl
from camloc.run.heatmap_cache import HeatmapCache
from camloc.run.identity import EvalConfig


def pending(images: list[ImagePairs], methods: list[str], done: set) -> list[tuple[ImagePairs, dict]]:
    """Per image, the methods still to run for each of its pairs."""
    work = []
    for item in images:
        todo = {}
        for pair in item.pairs:
            missing = [m for m in methods if (str(pair.image_id), pair.category_id, m) not in done]
            if missing:
                todo[pair.key] = missing
        if todo:
            work.append((item, todo))
    return work


class UnreadableImage(ImageError):
    """An image file of the dataset could not be read: the run skips it and reports it."""


def image_prompts(item: ImagePairs, pairs: list, methods: list[str]) -> list[str]:
    """The prompts one image is scored with: those of its pending pairs, or all of its prompts when a
    method's maps depend on the other prompts (`MethodSpec.prompt_coupled`: CLIP-ES, CLIP Surgery), so a
    resumed image gets the maps a fresh run gives."""
    coupled = any(METHODS[m].prompt_coupled for m in methods)
    return list(dict.fromkeys(p.prompt for p in (item.pairs if coupled else pairs)))


DEFAULT_IMAGE_BATCH = 8


def resolve_image_batch(value: int | str, methods: list[str]) -> int:
    """Images per device step (`--image-batch`): a number, or auto: 1 when a method scores masked copies
    (ScoreCAM, gScoreCAM, GroupCAM, RISE: one image's chunks already fill the device) or when no method
    has a stage to share, else DEFAULT_IMAGE_BATCH."""
    if value != "auto":
        size = int(value)
        if size < 1:
            raise OptionError(f"--image-batch {value!r} must be a positive number or auto")
        return size
    specs = [METHODS[m] for m in methods]
    if any(s.masked_forwards for s in specs) or not any(s.shares_forward for s in specs):
        return 1
    return DEFAULT_IMAGE_BATCH


def compute_images(model: ClipModel, batch: list[tuple], config: EvalConfig, runtime: dict | None = None,
                   cache: HeatmapCache | None = None) -> list[tuple[dict, int, dict]]:
    """The device stage of a batch of images, each `(item, todo, image, host_input)`: native maps of each
    image's pending (pair, method) combinations (stored in `cache` when given), the CUDA out-of-memory
    retries each needed, and each method's device seconds on the image (its own work plus an even share of
    the work it shares with others, the image's part of the batched forward included: `Ledger`). The
    images' encoder forwards run as one batch (`share_batch`); every method then runs on its image's own
    context."""
    contexts = []
    for item, todo, image, host_input in batch:
        pairs = [p for p in item.pairs if p.key in todo]
        methods = [m for m in config.methods if any(m in todo[p.key] for p in pairs)]
        contexts.append((pairs, methods, CamContext(model, image, image_prompts(item, pairs, methods),
                                                    {**config.options, **(runtime or {})}, methods=methods,
                                                    host_input=host_input)))
    started = time.perf_counter()
    share_batch([ctx for _, _, ctx in contexts])
    synchronize(model.device)
    batched = [ctx for _, _, ctx in contexts if ctx.batched]
    forward = (time.perf_counter() - started) / max(len(batched), 1)
    out = []
    for (item, _, image, _), (pairs, methods, ctx) in zip(batch, contexts):
        ctx.ledger = Ledger()
        if ctx.batched:  # its share of the batched forward, split over the methods that read it
            ctx.ledger.costs[ctx.forward_name] = forward
        seconds: dict = {}
        native = compute_native(model, image, ctx.prompts, methods, context=ctx, seconds=seconds)
        if cache is not None:
            cache.put_native(item, pairs, ctx.prompts, native, image.size)
        out.append((native, ctx.oom_retries, seconds))
    return out


def raw_heatmaps(item: ImagePairs, todo: dict, config: EvalConfig, native: dict, size: tuple[int, int]):
    """`heatmap_of(pair, method)` of one image's native maps: its raw-size map, from the live float32 maps
    whether or not (and in whichever precision) the run caches them, so a run's numbers never depend on
    its cache."""
    pairs = [p for p in item.pairs if p.key in todo]
    prompts = image_prompts(item, pairs, list(native))
    heatmaps = {m: native_to_raw(kind, maps, size) for m, (kind, maps) in native.items()}
    return lambda pair, method: heatmaps[method][prompts.index(pair.prompt)]


def image_records(model_name: str, item: ImagePairs, todo: dict, config: EvalConfig, native: dict | None,
                  size: tuple[int, int], heatmap_of=None, extra: dict | None = None,
                  seconds: dict | None = None) -> list[dict]:
    """The host stage of one image: raw-size heatmaps (unless given), then every protocol's values -> records,
    each with its share of its method's model `seconds` on the image (split evenly over its pairs)."""
    pairs = [p for p in item.pairs if p.key in todo]
    heatmap_of = heatmap_of or raw_heatmaps(item, todo, config, native, size)
    records = pair_records(model_name, item, pairs, todo, config, heatmap_of, size, extra)
    if seconds:
        counts = {m: sum(m in todo[p.key] for p in pairs) for m in seconds}
        for record in records:
            record["seconds"] = round(seconds[record["method"]] / counts[record["method"]], 6)
    return records


def pair_records(model_name: str, item: ImagePairs, pairs: list, todo: dict, config: EvalConfig, heatmap_of,
                 size: tuple[int, int], extra: dict | None = None) -> list[dict]:
    """Records of these pairs of one image, `heatmap_of(pair, method)` giving each raw-size map: the
    box protocol (Algorithm 1 box, IoU) and the other selected protocols, with the class masks read
    once per image where a protocol needs them; `extra[(pair.key, method)]`: fields computed with the
    model (the faithfulness protocols). Shared by eval and rescore."""
    masks = item.masks() if item.masks is not None and MASK_PROTOCOLS & set(config.protocols) else {}
    labels = item.labels() if item.labels is not None and "imagenet-s" in config.protocols else None
    records = []
    for pair in pairs:
        for method in todo[pair.key]:
            heatmap = heatmap_of(pair, method)
            box = box_from_heatmap(heatmap, config.threshold)
            records.append({
                "image_id": pair.image_id, "file_name": pair.file_name, "image_size": list(size),
                "category_id": pair.category_id, "category": pair.category, "prompt": pair.prompt,
                "model": model_name, "method": method, "threshold": config.threshold,
                "box": [int(v) for v in box], "gt_boxes": pair.gt_boxes,
                # a pair with point labels and no boxes (sanitize_boxes keeps no other box-less pair) has no IoU
                "iou": best_iou(box, pair.gt_boxes, config.iou_convention) if pair.gt_boxes else None,
                "coverage": pair.coverage,
                **({"points": pair.points} if pair.points is not None else {}),
                **pair_values(config.protocols, heatmap, masks.get(pair.category_id), pair.gt_boxes,
                              config.threshold, config.pointing_tolerance, config.cam_curve_interval, labels,
                              pair.category_id, pair.points),
                **((extra or {}).get((pair.key, method)) or {}),
            })
    return records


def image_faith_values(model: ClipModel, item: ImagePairs, todo: dict, config: EvalConfig, image, host_input,
                       heatmap_of, runtime: dict | None) -> dict:
    """The faithfulness fields of one image's pending (pair, method) combinations, scored among all of
    the image's prompts (and, for deletion-eclip, the dataset's), so a resumed image scores as a fresh
    one does."""
    from camloc.evaluators.faithfulness import FaithSettings

    pairs = [p for p in item.pairs if p.key in todo]
    prompts = list(dict.fromkeys(p.prompt for p in item.pairs))
    return faith_values(model, image, host_input, pairs, todo, config.protocols, FaithSettings(**config.faith),
                        heatmap_of, prompts, (runtime or {}).get("contrast_prompts") or prompts, config.seed,
                        item.image_id, batch=(runtime or {}).get("faith_batch") or DEFAULT_FAITH_BATCH)


def _read_image(path: str, model: ClipModel):
    """Loader thread: the decoded image and its model input (pinned on CUDA, for an asynchronous copy)."""
    try:
        image = load_image(path)
    except CamlocError as exc:
        raise UnreadableImage(str(exc)) from exc
    return image, model.host_input(image)


def run_pipeline(model: ClipModel, work: list, config: EvalConfig, handle, bar, runtime: dict,
                 cache: HeatmapCache | None, image_batch: int = 1, host_workers: int | None = None) -> tuple:
    """Evaluate `work` `image_batch` images per device step, with the decoding of the next images and the
    box derivation of the previous ones overlapped with the model (threads: PIL and OpenCV release the
    GIL). Records are appended in image order as each image completes. Returns (records written,
    skipped images, OOM retries)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    cores = os.cpu_count() or 1
    host_workers = host_workers or min(8, cores)
    prefetch = max(2, 2 * image_batch)  # the next batch decodes while this one computes
    loaders = min(prefetch, max(2, cores // 2))  # a GPU eats 8-image batches faster than 2 threads decode
    written, skipped, retries = 0, [], 0
    queue = iter(work)
    loads: deque = deque()
    boxes: deque = deque()

    def flush(block_until: int) -> None:
        nonlocal written
        while boxes and (len(boxes) > block_until or boxes[0][2].done()):
            _, todo, future = boxes.popleft()
            records = future.result()
            append_jsonl(handle, records)
            written += len(records)
            bar.advance(len(todo))

    with ThreadPoolExecutor(loaders) as loader, ThreadPoolExecutor(host_workers) as boxer:
        for item, todo in queue:
            loads.append((item, todo, loader.submit(_read_image, item.path, model)))
            if len(loads) > prefetch:
                break
        while loads:
            batch = []
            while loads and len(batch) < image_batch:
                item, todo, future = loads.popleft()
                nxt = next(queue, None)
                if nxt is not None:
                    loads.append((*nxt, loader.submit(_read_image, nxt[0].path, model)))
                try:
                    image, host_input = future.result()
                except UnreadableImage as exc:  # a corrupt or missing file: counted and reported, not fatal
                    skipped.append({"image_id": item.image_id, "path": item.path, "pairs": len(todo),
                                    "reason": str(exc)})
                    bar.advance(len(todo))
                    continue
                batch.append((item, todo, image, host_input))
            if not batch:
                continue
            for (item, todo, image, host_input), (native, oom, seconds) in zip(
                    batch, compute_images(model, batch, config, runtime, cache)):
                retries += oom
                heatmap_of, extra = None, None
                if wants_faithfulness(config.protocols):  # the model's forwards: on this thread
                    heatmap_of = raw_heatmaps(item, todo, config, native, image.size)
                    extra = image_faith_values(model, item, todo, config, image, host_input, heatmap_of, runtime)
                boxes.append((item, todo, boxer.submit(image_records, model.name, item, todo, config, native,
                                                       image.size, heatmap_of, extra, seconds)))
            flush(block_until=host_workers)
        flush(block_until=0)
    return written, skipped, retries


def check_images(images: list[ImagePairs], skip_missing: bool, dataset: str) -> list[ImagePairs]:
    """Before any work: every image file exists (or, with `skip_missing`, the missing ones are dropped
    and reported later), is within Pillow's pixel limit, and has the size its annotation says (boxes
    in one frame scored against a map in another would be silently wrong). Reads headers only.
    Unreadable files are left to the run, which skips and reports them."""
    from camloc.models.preprocess import ImageTooLarge, image_size

    missing = []
    for item in images:
        path = Path(item.path)
        if not path.is_file():
            missing.append(item)
            continue
        try:
            size = image_size(path)
        except ImageTooLarge:
            raise
        except CamlocError:
            continue  # corrupt: the loader skips and reports it
        expected = tuple(item.pairs[0].image_size)
        if size != expected:
            raise DataError(f"image {item.image_id} ({path}) is {size[0]}x{size[1]} pixels, but its annotation says "
                            f"{expected[0]}x{expected[1]}: its boxes would be scored in another frame; fix the "
                            "annotation's width/height or use the image it was made for")
    if missing and not skip_missing:
        folder = Path(missing[0].path).parent
        where = f"the image folder {folder} does not exist" if not folder.is_dir() else f"{missing[0].path} does not exist"
        raise DataError(f"{len(missing)} of {len(images)} images are missing ({where}); check --data-root "
                        f"(`camloc data verify {dataset}`) or pass --skip-missing to skip and report them")
    return images
