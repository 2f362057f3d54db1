"""The heatmap cache: each pair's map at the method's native resolution (compressed; float32 by default,
so what is re-scored is exactly what the run scored; float16 on request, at half the size), so box
protocols can be re-scored later without the model (`camloc eval --save-heatmaps`,
`camloc threshold-search`).

Layout: `<root>/<model>/<method>[-<param>=<value>...]-<precision>-<f32|f16>/<dataset>/<image_id>.npz`,
one array per category id (`c<id>`), plus the post-processing kind and the raw image size. Raw-size
maps are re-derived deterministically with `native_to_raw`. Files are written atomically. (Caches of
camloc before the storage type was chosen have no `-f32|-f16` part and hold float16 maps.)
"""
from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np

from camloc.cams.postprocess import native_to_raw
from camloc.cams.registry import METHODS, list_methods
from camloc.run.files import atomic_write_bytes


def _where(path: str) -> str:
    """An image's location as recorded in cache entries (absolute, links not followed)."""
    import os

    return os.path.abspath(path)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def dataset_key(dataset: str, split: str | None, prompt_template: str, images=None, image_root: str | None = None) -> str:
    """Maps depend on the images and the prompts: dataset, split (the dataset's default when none is
    given, so `eval --dataset coco` and a threshold search naming split val2017 share one cache),
    prompt template, and where the images are (a short hash of their folder: another data root or
    `--image-dir` never reuses these maps). Each entry also records its image file and prompts, which
    are checked on every read (`HeatmapCache.has`)."""
    from camloc.datasets.records import data_identity
    from camloc.datasets.registry import resolved_split

    split = resolved_split(dataset, split)
    key = dataset + (f"-{split}" if split else "")
    if prompt_template != "{}":
        key += "-t" + hashlib.sha1(prompt_template.encode()).hexdigest()[:10]
    image_root = data_identity(images)["image_root"] if images else image_root
    if image_root:
        key += "-d" + hashlib.sha1(image_root.encode()).hexdigest()[:8]
    return _safe(key)


def method_key(method: str, options: dict, precision: str) -> str:
    from camloc.cams.options import OPTIONS

    list_methods()  # make sure the registry is filled (and every option declared)
    params = "".join(f"-{p}={_param(options[p])}" for p in METHODS[method].params
                     if p in options and (p not in OPTIONS or OPTIONS[p].cache_key))
    origin = METHODS[method].origin  # a plug-in's maps are keyed by its source: an edited file never reuses them
    source = f"-src{origin['sha256'][:12]}" if origin else ""
    return _safe(f"{method}{params}{source}-{precision}")


def _param(value) -> str:
    """A parameter value in a cache key: as written when short and file-name safe, else a hash of it
    (`_safe` would map "a b,c" and "a,b c" to one key; a long word list would exceed file-name limits)."""
    text = str(value)
    if len(text) <= 40 and _safe(text) == text:
        return text
    return "h" + hashlib.sha1(text.encode()).hexdigest()[:12]


def model_key(name: str) -> str:
    """Official and test model names as they are; checkpoint paths as <stem>-<hash of the path>."""
    from camloc.models.specs import ALL_SPECS

    if name in ALL_SPECS:
        return _safe(name)
    if name.startswith("open_clip:") and "/" not in name.partition("hf-hub:")[0] and not name.endswith((".pt", ".bin")):
        return _safe(name)  # open_clip:ARCH:TAG / random / hf-hub:ORG/REPO: readable and unique as it is
    return _safe(f"{Path(name).stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}")


HEATMAP_DTYPES = {"float32": "f32", "float16": "f16"}
"""How cached maps are stored (`--heatmap-dtype`) and the part of the cache path that says so."""


def check_heatmap_dtype(dtype: str) -> str:
    from camloc.errors import OptionError

    if dtype not in HEATMAP_DTYPES:
        raise OptionError(f"--heatmap-dtype {dtype!r} must be one of {', '.join(HEATMAP_DTYPES)}")
    return dtype


class HeatmapCache:
    def __init__(self, root: str | Path, model: str, dataset: str, options: dict, precision: str,
                 dtype: str | None = "float32"):
        """`dtype`: how maps are stored (float32 or float16); None reads a cache written before the storage
        type was part of the layout (float16 maps)."""
        self.root = Path(root)
        self.model = model_key(model)
        self.dataset = dataset
        self.options = options
        self.precision = precision
        self.dtype = check_heatmap_dtype(dtype) if dtype is not None else None

    def path(self, method: str, image_id) -> Path:
        key = method_key(method, self.options, self.precision)
        if self.dtype is not None:
            key += f"-{HEATMAP_DTYPES[self.dtype]}"
        return self.root / self.model / key / self.dataset / f"{_safe(str(image_id))}.npz"

    def has(self, method: str, image_id, category_ids, image_path: str | None = None,
            prompts: dict | None = None) -> bool:
        """Whether every category's map of this image is cached, for this image file and these prompts
        ({category id: prompt}); an entry made from another file or prompt does not count (it is
        recomputed and replaced)."""
        path = self.path(method, image_id)
        if not path.exists():
            return False
        with np.load(path) as data:
            if not self._matches(data, image_path, prompts):
                return False
            return all(f"c{c}" in data.files for c in category_ids)

    @staticmethod
    def _matches(data, image_path: str | None, prompts: dict | None) -> bool:
        if image_path is not None and ("image" not in data.files or str(data["image"]) != _where(image_path)):
            return False
        for c, prompt in (prompts or {}).items():
            if f"c{c}" in data.files and (f"p{c}" not in data.files or str(data[f"p{c}"]) != prompt):
                return False
        return True

    def put(self, method: str, image_id, kind: str, maps: dict[int, np.ndarray], raw_size: tuple[int, int],
            image_path: str | None = None, prompts: dict | None = None) -> None:
        """Store (merging with what is there for the same file and prompts) the native maps of some
        categories of one image."""
        path = self.path(method, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        if path.exists():
            with np.load(path) as old:
                if self._matches(old, image_path, prompts):
                    arrays = {k: old[k] for k in old.files}
        arrays.update({f"c{c}": m.astype(self.dtype or "float16") for c, m in maps.items()})
        arrays.update({f"p{c}": np.array(p) for c, p in (prompts or {}).items()})
        if image_path is not None:
            arrays["image"] = np.array(_where(image_path))
        arrays["kind"] = np.array(kind)
        arrays["raw_size"] = np.array(raw_size, dtype=np.int64)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())

    def put_native(self, item, pairs: list, prompts: list[str], native: dict, raw_size: tuple[int, int]) -> None:
        """Store `compute_native`'s output for one image (`ImagePairs`): each pair's row, under its
        category id, with the image file and prompts it was computed from."""
        for method, (kind, maps) in native.items():
            self.put(method, item.image_id, kind, {p.category_id: maps[prompts.index(p.prompt)] for p in pairs},
                     raw_size, item.path, {p.category_id: p.prompt for p in pairs})

    def get(self, method: str, image_id, category_id: int, image_path: str | None = None,
            prompt: str | None = None) -> tuple[str, np.ndarray, tuple[int, int]]:
        """(kind, native map as stored, raw size (W, H)) of one pair; with `image_path`/`prompt`, an entry
        made from another file or prompt is an error rather than a wrong map."""
        from camloc.errors import RunFolderError

        path = self.path(method, image_id)
        with np.load(path) as data:
            if not self._matches(data, image_path, {category_id: prompt} if prompt is not None else None):
                raise RunFolderError(f"heatmap cache entry {path} was made from another image file or prompt than "
                                     f"image {image_id} / category {category_id} of this run; delete it to recompute")
            return str(data["kind"]), data[f"c{category_id}"], tuple(int(v) for v in data["raw_size"])

    def raw(self, method: str, image_id, category_id: int, image_path: str | None = None,
            prompt: str | None = None) -> np.ndarray:
        """The raw-size heatmap, re-derived from the cached native map (checked as in `get`)."""
        kind, native, size = self.get(method, image_id, category_id, image_path, prompt)
        return native_to_raw(kind, native[None].astype(np.float32), size)[0]
