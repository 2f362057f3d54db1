"""Crash-safe run-folder files: append-and-flush JSON lines, atomic whole-file writes."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file.
    The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of a JSON-lines file. A torn last line (a crash mid-write) is dropped; with `repair`
    the file is truncated to its last complete line so appends continue cleanly."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good_end = [], 0
    pos = 0
    while pos < len(data):
        newline = data.find(b"\n", pos)
        if newline < 0:  # no newline: the last line was torn
            break
        line = data[pos:newline]
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn line followed by later writes cannot happen: appends are whole lines
        pos = good_end = newline + 1
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def append_jsonl(handle, records: Iterable[dict]) -> None:
    """Append whole lines in one write and flush them to the OS."""
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    if text:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
