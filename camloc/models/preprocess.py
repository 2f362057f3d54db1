"""Image loading and the spec's "squash" preprocessing (docs/protocol.md §2)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from camloc.errors import CamlocError, ImageError, OptionError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_path(path: Path) -> None:
    import re

    text = str(path)
    if re.match(r"^[a-z][a-z0-9+.-]+:/", text, re.IGNORECASE):  # http://..., as a Path makes it http:/...
        raise ImageError(f"image {text} is a URL: camloc reads local files; download it first and pass the file")
    if path.is_dir():
        raise ImageError(f"image {path} is a folder, not an image file; pass a JPEG or PNG file")
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist")


class ImageTooLarge(ImageError):
    """An image above Pillow's decompression-bomb limit (`--max-pixels` raises it)."""


def _bomb_error(path: Path, exc: Exception) -> CamlocError:
    return ImageTooLarge(f"image file {path} is larger than Pillow's decompression-bomb limit of "
                       f"{Image.MAX_IMAGE_PIXELS} pixels ({exc}); if it is genuine, pass --max-pixels N with N at "
                       "least its width x height")


def set_max_pixels(limit: int | None) -> None:
    """`--max-pixels`: raise Pillow's decompression-bomb limit (default about 89 million pixels)."""
    if limit is not None:
        if limit < 1:
            raise OptionError(f"--max-pixels must be a positive number of pixels, got {limit}")
        Image.MAX_IMAGE_PIXELS = limit


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB by the image's bit depth, not by clipping: 16-bit integer images (Pillow modes I;16*, and
    I holding 16-bit values) are scaled by 255/65535, 32-bit float images (mode F) by 255 when their
    values lie in [0, 1], else min-max to [0, 255]. Pillow's own convert("RGB") clips such values
    to 255 (all white) or truncates floats in [0, 1] to 0 (black)."""
    import numpy as np

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        data = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            finite = data[np.isfinite(data)]
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if low >= 0 and high <= 1:
                scaled = data * 255
            else:
                scaled = (data - low) * (255 / (high - low)) if high > low else np.zeros_like(data)
        elif image.mode.startswith("I;16") or 0 <= data.min() and data.max() <= 65535:
            scaled = data * (255 / 65535) if image.mode.startswith("I;16") or data.max() > 255 else data
        else:
            low, high = float(data.min()), float(data.max())
            scaled = (data - low) * (255 / (high - low)) if high > low else np.zeros_like(data)
        gray = np.clip(np.nan_to_num(np.rint(scaled)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return image.convert("RGB")


def exif_rotated(image: Image.Image) -> bool:
    """Whether the file's EXIF orientation says it is displayed rotated or mirrored."""
    try:
        return image.getexif().get(0x0112, 1) not in (1, None)
    except Exception:  # a malformed EXIF block: treat as not rotated
        return False


def _read(path: str | Path, action):
    """`action(opened PIL image)`, with one-line errors naming the file: missing, a folder, a URL,
    above Pillow's decompression-bomb limit, or not an image."""
    import warnings

    path = Path(path)
    _check_path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return action(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(path, exc) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image file {path} could not be read as an image ({exc}); pass a JPEG or PNG file") from exc


def load_image(path: str | Path, exif_transpose: bool = False) -> Image.Image:
    """Open an image file as RGB in its stored frame (as COCO's boxes are), or as displayed with
    `exif_transpose`."""
    from PIL import ImageOps

    return _read(path, lambda image: to_rgb(ImageOps.exif_transpose(image) if exif_transpose else image))


def image_size(path: str | Path) -> tuple[int, int]:
    """(W, H) of an image file in its stored frame, from its header (no decoding)."""
    return _read(path, lambda image: image.size)


def squash_transform(size: int, mean=CLIP_MEAN, std=CLIP_STD) -> transforms.Compose:
    """Resize to size x size with PIL bilinear (aspect ratio ignored, no crop), ToTensor, Normalize
    (CLIP's mean and std unless the model has its own, e.g. SigLIP's 0.5)."""
    return transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def preprocess(image: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """One PIL image -> normalised input (1, 3, size, size), float32 on the CPU."""
    return squash_transform(size, mean, std)(image).unsqueeze(0)
