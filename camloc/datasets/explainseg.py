"""Readers of the explainability benchmarks' annotation files (`camloc/evaluators/explainseg.py` scores them).

- ImageNet-Segmentation: one MATLAB v7.3 file, `gtsegs_ijcv.mat` (HDF5), read through h5py as
  hila-chefer/Transformer-Explainability `data/Imagenet.py` (at d524286) reads it: `/value/img` holds one object
  reference per image to a (C, W, H) uint8 array (transposed to (H, W, C)); `/value/gt` one reference per image to
  a 1 x 1 cell whose element references the (W, H) mask (transposed to (H, W)), 1 = foreground; `/value/target` one
  reference per image to the characters of its WordNet id (read as a public LeGrad evaluation script reads it: the
  Transformer-Explainability reader ignores it). The file's host is reported dead and camloc cannot download it: a
  missing file is one line saying where it is expected. The `imagenet-seg` dataset extracts the file's images and
  masks once into PNG files beside it (`gtsegs_ijcv_extracted/`, or --image-dir), so runs read ordinary files.
- ImageNet-S: a mask is an RGB PNG whose class id is R + 256 G (0 = other, 1000 = ignore), as LUSSeg/ImageNet-S's
  README describes its released masks. Datasets `imagenet-s50`, `imagenet-s300`, `imagenet-s919`: the validation
  masks under <data-root>/ImageNetS<K>/validation-segmentation/<wnid>/<name>.png, class ids as the rows of
  ImageNetS_categories_im<K>.txt (row i = id i + 1, as the README's matching table says), one pair per image: its
  ImageNet class (the folder's WordNet id).

Prompts: the class's name in OpenAI CLIP's ImageNet names (`imagenet/imagenet1k.tsv`), for the WordNet ids outside
ImageNet-1k the first lemma of timm's WordNet table (installed with open_clip)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from camloc.datasets.records import ImagePairs, Pair
from camloc.datasets.registry import DataOptions, register_dataset
from camloc.errors import DataError
from camloc.evaluators.explainseg import IMAGENET_S_IGNORE

GTSEGS_FILE = "gtsegs_ijcv.mat"
IMAGENET_SEG_ROOT = "imagenet-seg"
EXTRACTED = "gtsegs_ijcv_extracted"
IMAGENET_TABLE = Path(__file__).parent / "imagenet" / "imagenet1k.tsv"


@functools.lru_cache(maxsize=1)
def imagenet_names() -> dict[str, str]:
    """ImageNet-1k's WordNet ids -> OpenAI CLIP's class names."""
    return dict(line.split("\t") for line in IMAGENET_TABLE.read_text().splitlines())


@functools.lru_cache(maxsize=1)
def _wordnet_lemmas() -> dict[str, str]:
    try:
        import timm
    except ImportError:
        return {}
    table = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synset_to_lemma.txt"
    if not table.is_file():
        return {}
    return {w: lemmas.split(",")[0].strip() for w, lemmas in (line.split("\t", 1) for line in
                                                                table.read_text().splitlines())}


def class_name(wnid: str, source: str) -> str:
    """The prompt name of a WordNet id: CLIP's ImageNet-1k name, else WordNet's first lemma (timm's table)."""
    name = imagenet_names().get(wnid) or _wordnet_lemmas().get(wnid)
    if name is None:
        raise DataError(f"{source}: WordNet id {wnid!r} is not an ImageNet-1k class, and its WordNet name needs timm's "
                        "synset table: pip install 'camloc[open-clip]' (it brings timm)")
    return name


class ImagenetSegFile:
    """The images and masks of `gtsegs_ijcv.mat`, read on demand (the file stays open while in use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / GTSEGS_FILE
        if not self.path.is_file():
            raise DataError(f"ImageNet-Segmentation's {GTSEGS_FILE} is expected at {self.path}; camloc cannot download "
                            "it (its host, calvin-vision.net, is reported dead): put your copy there or pass its path")
        import h5py

        try:
            self.file = h5py.File(self.path, "r")
            self.images = self.file["/value/img"]
            self.masks = self.file["/value/gt"]
        except (OSError, KeyError) as exc:
            raise DataError(f"{self.path} is not ImageNet-Segmentation's MATLAB v7.3 file (/value/img and /value/gt "
                            f"of HDF5 references): {exc}") from None
        if len(self.images) != len(self.masks):
            raise DataError(f"{self.path}: {len(self.images)} images but {len(self.masks)} masks")
        self.targets = self.file["/value/target"] if "target" in self.file["/value"] else None

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> Image.Image:
        array = np.asarray(self.file[self.images[index, 0]]).transpose((2, 1, 0))
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")

    def mask(self, index: int) -> np.ndarray:
        cell = self.file[self.masks[index, 0]]
        mask = np.ascontiguousarray(np.asarray(self.file[cell[0, 0]]).transpose((1, 0)))
        values = set(np.unique(mask).tolist())
        if not values <= {0, 1}:
            raise DataError(f"{self.path}: mask {index} holds values {sorted(values)[:5]}, not 0 and 1")
        return mask.astype(np.uint8)

    def wnid(self, index: int) -> str:
        """The image's WordNet id (`/value/target`)."""
        if self.targets is None:
            raise DataError(f"{self.path} has no /value/target (the images' WordNet ids), which camloc needs for the "
                            "prompts")
        chars = np.asarray(self.file[self.targets[index, 0]]).ravel()
        return "".join(chr(int(c)) for c in chars)

    def close(self) -> None:
        self.file.close()


def extract_imagenet_seg(mat: Path, dest: Path) -> list[dict]:
    """The images and masks of `gtsegs_ijcv.mat` as PNG files in `dest` (done once: `index.json` records the .mat's
    size and modification time, and is redone when they change); returns the index's items."""
    index_file = dest / "index.json"
    stat = mat.stat()
    source = {"file": str(mat.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        if index.get("source") == source:
            return index["items"]
    data = ImagenetSegFile(mat)
    try:
        (dest / "images").mkdir(parents=True, exist_ok=True)
        (dest / "masks").mkdir(parents=True, exist_ok=True)
        items = []
        for i in range(len(data)):
            image, mask, wnid = data.image(i), data.mask(i), data.wnid(i)
            if mask.shape != (image.height, image.width):
                raise DataError(f"{mat}: mask {i} is {mask.shape[1]}x{mask.shape[0]}, its image "
                                f"{image.width}x{image.height}")
            name = f"{i:04d}.png"
            image.save(dest / "images" / name)
            Image.fromarray(mask * 255).save(dest / "masks" / name)
            items.append({"file": name, "wnid": wnid, "size": [image.width, image.height]})
    except OSError as exc:
        raise DataError(f"cannot write ImageNet-Segmentation's images into {dest} ({exc}); pass --image-dir to a "
                        "writable folder") from None
    finally:
        data.close()
    index_file.write_text(json.dumps({"source": source, "items": items}))
    return items


def _boxes(mask: np.ndarray) -> list[list[int]]:
    """[x1, y1, x2, y2) of each 8-connected region of a bool mask."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [[int(x), int(y), int(x + w), int(y + h)] for x, y, w, h, _ in stats[1:count]]


def _mask_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 0


def _foreground_masks(path: Path, category_id: int) -> dict:
    return {category_id: _mask_png(path)}


@register_dataset(
    "imagenet-seg", "ImageNet-Segmentation (Guillaumin et al.): 4,276 images, one foreground mask each, prompted by "
                    "the image's ImageNet class",
    layout=f"<data-root>/{IMAGENET_SEG_ROOT}/{GTSEGS_FILE} (or --ann-file); its images and masks are extracted "
           f"once to <folder of the .mat>/{EXTRACTED}/ (or --image-dir)",
    obtain="not downloadable: the only published host (calvin-vision.net/bigstuff/proj-imagenet/data/gtsegs_ijcv.mat) "
           f"is reported dead; put your copy of {GTSEGS_FILE} there",
    folders=(IMAGENET_SEG_ROOT,),
)
def imagenet_seg(opts: DataOptions) -> list[ImagePairs]:
    mat = opts.ann_file or opts.root / IMAGENET_SEG_ROOT / GTSEGS_FILE
    if mat.is_dir():
        mat = mat / GTSEGS_FILE
    if not mat.is_file():
        ImagenetSegFile(mat)  # the one line saying where the file is expected
    dest = opts.image_dir or mat.parent / EXTRACTED
    opts.reads(mat, dest / "images")
    images = []
    for i, item in enumerate(extract_imagenet_seg(mat, dest)):
        mask_path = dest / "masks" / item["file"]
        mask = _mask_png(mask_path)
        name = class_name(item["wnid"], f"{mat} image {i}")
        category_id = int(item["wnid"][1:])  # the WordNet noun offset: unique, stable across files
        pair = Pair(i, item["file"], tuple(item["size"]), category_id, name, opts.prompt_template.format(name),
                    _boxes(mask), float(mask.mean()))
        images.append(ImagePairs(str(dest / "images" / item["file"]), i, [pair],
                                 masks=functools.partial(_foreground_masks, mask_path, category_id)))
    return images


IMAGENET_S_SIZES = (50, 300, 919)


def imagenet_s_root(k: int) -> str:
    return f"ImageNetS{k}"


def imagenet_s_categories(path: Path, k: int) -> list[str]:
    """The WordNet ids of ImageNet-S's class ids 1..K (row i = id i + 1)."""
    if not path.is_file():
        raise DataError(f"ImageNet-S's class file {path} does not exist: get ImageNetS_categories_im{k}.txt from "
                        "LUSSeg/ImageNet-S (data/categories/) and put it there, or pass it as --ann-file")
    wnids = path.read_text().split()
    if len(wnids) != k or len(set(wnids)) != k or not all(w.startswith("n") and w[1:].isdigit() for w in wnids):
        raise DataError(f"{path} is not ImageNet-S-{k}'s class file: expected {k} distinct WordNet ids (n########), "
                        f"one per line; found {len(wnids)}")
    return wnids


def imagenet_s_labels(path: Path, k: int) -> np.ndarray:
    """An ImageNet-S mask's class ids, checked to lie in 0..K or be 1000."""
    label = imagenet_s_label(path)
    bad = np.unique(label[(label > k) & (label != IMAGENET_S_IGNORE)])
    if bad.size:
        raise DataError(f"ImageNet-S mask {path} holds class ids {bad[:5].tolist()}, outside 0..{k} and "
                        f"{IMAGENET_S_IGNORE}: "
                        f"is it a mask of another ImageNet-S split than ImageNetS{k}?")
    return label



def _class_masks(path: Path, k: int, category_id: int) -> dict:
    return {category_id: imagenet_s_labels(path, k) == category_id}


def _label_map(path: Path, k: int) -> tuple[np.ndarray, int]:
    return imagenet_s_labels(path, k), k


def _find_image(folder: Path, wnid: str, stem: str) -> Path:
    for candidate in (folder / wnid / f"{stem}.JPEG", folder / f"{stem}.JPEG", folder / wnid / f"{stem}.jpg"):
        if candidate.is_file():
            return candidate
    return folder / wnid / f"{stem}.JPEG"  # reported missing by the run (or `camloc data verify`)


def imagenet_s_pairs(opts: DataOptions, k: int) -> list[ImagePairs]:
    base = opts.root / imagenet_s_root(k)
    split = opts.split
    mask_dir = base / f"{split}-segmentation"
    if not mask_dir.is_dir():
        raise DataError(f"ImageNet-S-{k}'s {split} masks are expected in {mask_dir}: `camloc data download "
                        f"imagenet-s{k}` fetches them (images come from your ImageNet-1k: --image-dir)")
    category_file = opts.ann_file or next((c for c in (base / f"ImageNetS_categories_im{k}.txt",
                                                       opts.root / f"ImageNetS_categories_im{k}.txt") if c.is_file()),
                                          base / f"ImageNetS_categories_im{k}.txt")
    wnids = imagenet_s_categories(category_file, k)
    ids = {w: i + 1 for i, w in enumerate(wnids)}
    image_dir = opts.image_dir or base / split
    opts.reads(category_file, image_dir)
    images, without = [], 0
    for folder in sorted(p for p in mask_dir.iterdir() if p.is_dir()):
        if folder.name not in ids:
            raise DataError(f"{folder} is not a class of ImageNet-S-{k} ({category_file} does not list {folder.name})")
        c = ids[folder.name]
        name = class_name(folder.name, str(category_file))
        for png in sorted(folder.glob("*.png")):
            label = imagenet_s_labels(png, k)
            mask = label == c
            if not mask.any():  # the image's own class is not labelled: no pair to score
                without += 1
                continue
            height, width = label.shape
            pair = Pair(png.stem, f"{folder.name}/{png.stem}.JPEG", (width, height), c, name,
                        opts.prompt_template.format(name), _boxes(mask), float(mask.mean()))
            images.append(ImagePairs(str(_find_image(image_dir, folder.name, png.stem)), png.stem, [pair],
                                     masks=functools.partial(_class_masks, png, k, c),
                                     labels=functools.partial(_label_map, png, k)))
    if opts.stats is not None:
        opts.stats.update({"source": str(mask_dir), "images": len(images) + without,
                           "images_without_their_class": without})
    return images


def _imagenet_s_builder(k: int):
    def build(opts: DataOptions) -> list[ImagePairs]:
        return imagenet_s_pairs(opts, k)

    build.__name__ = f"imagenet_s{k}"
    return build


for _k in IMAGENET_S_SIZES:
    register_dataset(
        f"imagenet-s{_k}", f"ImageNet-S-{_k} (LUSSeg) validation masks, one pair per image: its ImageNet class",
        layout=f"<data-root>/{imagenet_s_root(_k)}/validation-segmentation/<wnid>/<name>.png, "
               f"<data-root>/{imagenet_s_root(_k)}/ImageNetS_categories_im{_k}.txt (or --ann-file), images in "
               f"<data-root>/{imagenet_s_root(_k)}/validation/<wnid>/<name>.JPEG or --image-dir (your ImageNet-1k "
               "validation images, in <wnid>/ folders or flat)",
        obtain=f"`camloc data download imagenet-s{_k}` fetches the masks (LUSSeg's GitHub release); the class file is "
               "LUSSeg/ImageNet-S data/categories/; the images are ImageNet-1k's (not downloadable: image-net.org)",
        default_split="validation",
        folders=(imagenet_s_root(_k),),
    )(_imagenet_s_builder(_k))


def imagenet_s_label(path: str | Path) -> np.ndarray:
    """An ImageNet-S mask PNG -> (H, W) int32 class ids R + 256 G (0 = other, 1000 = ignore)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ImageNet-S mask {path} does not exist")
    image = Image.open(path)
    if image.mode != "RGB":
        raise DataError(f"ImageNet-S mask {path} is a {image.mode} image: the released masks are RGB PNGs whose class "
                        "id is R + 256 G")
    rgb = np.asarray(image).astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1]
