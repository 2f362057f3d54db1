import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

from camloc.models import ClipModel, load_image  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
SHARED_GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
PREFIX = {"tiny-rn": "tiny_rn", "tiny-vit": "tiny_vit"}


def golden(name: str) -> np.ndarray:
    return np.load(GOLDEN / name)


def golden_meta(model: str) -> dict:
    return json.loads((GOLDEN / f"{PREFIX[model]}_meta.json").read_text())


@pytest.fixture(scope="session")
def chelsea():
    return load_image(GOLDEN / "chelsea_small.png")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, ClipModel]:
    return {name: ClipModel.load(name, device="cpu") for name in PREFIX}


@pytest.fixture(scope="session")
def tiny_rn(tiny_models):
    return tiny_models["tiny-rn"]


@pytest.fixture(scope="session")
def tiny_vit(tiny_models):
    return tiny_models["tiny-vit"]


@contextmanager
def counting_forwards(model: ClipModel):
    """The batch sizes of the image-tower forwards run inside the block (begun: a forward a method stops early
    counts too)."""
    calls: list[int] = []
    handle = model.visual.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        yield calls
    finally:
        handle.remove()
