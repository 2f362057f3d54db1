"""Readers of the explainability benchmarks' annotation files (`camloc/evaluators/explainseg.py` scores them).

- ImageNet-Segmentation: one MATLAB v7.3 file, `gtsegs_ijcv.mat` (HDF5), read through h5py as
  hila-chefer/Transformer-Explainability `data/Imagenet.py` (at d524286) reads it: `/value/img` holds one object
  reference per image to a (C, W, H) uint8 array (transposed to (H, W, C)); `/value/gt` one reference per image to
  a 1 x 1 cell whose element references the (W, H) mask (transposed to (H, W)), 1 = foreground. The file's host is
  reported dead and camloc cannot download it: a missing file is one line saying where it is expected.
- ImageNet-S: a mask is an RGB PNG whose class id is R + 256 G (0 = other, 1000 = ignore), as LUSSeg/ImageNet-S's
  README describes its released masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from camloc.errors import DataError

GTSEGS_FILE = "gtsegs_ijcv.mat"


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

    def close(self) -> None:
        self.file.close()


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
