import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class RangeHandler(BaseHTTPRequestHandler):
    """A file server that answers HTTP Range requests as Apache and S3 do (the download tests' server)."""

    files: dict = {}
    ranges: list = []

    def do_GET(self):
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        header = self.headers.get("Range")
        self.ranges.append(header)
        if header:
            start = int(header.split("=")[1].split("-")[0])
            if start >= len(data):  # as Apache and S3 answer a range past the end: 416 with the size
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    RangeHandler.files, RangeHandler.ranges = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", RangeHandler
    server.shutdown()
