"""Image loading and the spec's "squash" preprocessing (spec §2)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from camloc.errors import CamlocError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with a one-line error naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CamlocError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CamlocError(f"image file {path} could not be read as an image ({exc}); pass a JPEG or PNG file") from exc


def squash_transform(size: int) -> transforms.Compose:
    """Resize to size x size with PIL bilinear (aspect ratio ignored, no crop), ToTensor, CLIP Normalize."""
    return transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """One PIL image -> normalised input (1, 3, size, size), float32 on the CPU."""
    return squash_transform(size)(image).unsqueeze(0)
