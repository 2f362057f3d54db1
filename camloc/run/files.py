"""Crash-safe run-folder files: append-and-flush JSON lines, atomic whole-file writes."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from camloc.errors import RunFolderError


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


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


RECORD_FIELDS = ("image_id", "category_id", "category", "method", "iou")
NOT_IDENTITY = ("data_sources",)
"""config.json fields that do not make two runs different (where the data was read from; `data` says
what it is)."""
"""The fields every eval record must have to be counted."""
SKIP_HINT = "pass --skip-bad-records to skip (and count) such lines"


def read_jsonl(path: str | Path, repair: bool = False, required: tuple[str, ...] = (),
               skipped: list | None = None) -> list[dict]:
    """Records of a JSON-lines file.

    Appends are whole lines, so the only damage a crash can leave is a torn LAST line (no newline at
    the end): it is dropped, and with `repair` the file is truncated to its last complete line so
    appends continue cleanly. Any other line that is not a JSON object with the `required` fields is
    an error naming the file and line; with a list as `skipped` such lines are skipped instead and
    their (path, line number, reason) appended to it. Nothing valid is ever dropped or truncated."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good_end, pos, line_no = [], 0, 0, 0
    while pos < len(data):
        newline = data.find(b"\n", pos)
        if newline < 0:  # no newline: the last line was torn by a crash mid-write
            break
        line_no += 1
        line = data[pos:newline]
        pos = good_end = newline + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) else "not a JSON object"
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            record, problem = None, f"not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
        if problem is None:
            missing = [k for k in required if k not in record]
            problem = f"missing field(s) {', '.join(missing)}" if missing else None
        if problem is None:
            records.append(record)
        elif skipped is not None:
            skipped.append((str(path), line_no, problem))
        else:
            raise RunFolderError(f"{path} line {line_no} is {problem}; fix or delete that line, or {SKIP_HINT}")
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


RECORD_STEMS = ("pairs", "ovseg")
"""The records files' names: `pairs` (the pair protocols' runs), `ovseg` (`--protocols ovseg` runs)."""


def record_files(run_dir: Path, stem: str = "pairs") -> list[Path]:
    """Every records file of a run folder: a 1-process run's and every shard's (`stem`.jsonl,
    `stem`.rankRRR-of-NNN.jsonl)."""
    return sorted(Path(run_dir).glob(f"{stem}*.jsonl"))


def any_record_files(run_dir: Path) -> list[Path]:
    """The records files of every kind of run (`RECORD_STEMS`)."""
    return [path for stem in RECORD_STEMS for path in record_files(run_dir, stem)]


def read_run_records(run_dir: str | Path, skip_bad: bool = False, skipped: list | None = None) -> list[dict]:
    """Every eval record of a run folder (all shards' files). A line that is not a valid record is an
    error, or with `skip_bad` is skipped and listed in `skipped`."""
    bad = [] if skip_bad else None
    records = [r for path in record_files(Path(run_dir)) for r in read_jsonl(path, required=RECORD_FIELDS, skipped=bad)]
    if skipped is not None and bad:
        skipped.extend(bad)
    return records


def append_jsonl(handle, records: Iterable[dict]) -> None:
    """Append whole lines in one write and flush them to the OS."""
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    if text:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def prepare_out_dir(path: str | Path, option: str = "--out") -> Path:
    """Create an output folder, refusing the filesystem root, a file, and folders that cannot be
    created or written, each with one line naming the option."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{option} {path} is a file; give a folder for the results")
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise RunFolderError(f"{option} {path} is the filesystem root; give a folder of its own for the results")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".camloc-write-test.", delete=True)
        probe.close()
    except OSError as exc:
        raise RunFolderError(f"{option} {path} cannot be written ({exc.strerror or exc}); choose a writable folder") from None
    return path


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_error_line(exc: OSError) -> str | None:
    """The one-line message for an output that could not be written (full disk, read-only folder, no
    permission), or None for other OS errors."""
    if exc.errno not in WRITE_ERRNOS:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return (f"could not write{where}: {exc.strerror or exc}; free space or choose another output folder "
            "(what was written before is kept, and the same command resumes)")


@contextlib.contextmanager
def folder_lock(folder: Path, name: str = ".lock", what: str = "run folder"):
    """Hold an exclusive lock on `folder/name` (flock, released when the process ends however it ends);
    a second process asking for it gets one clear error instead of duplicating the work."""
    import fcntl

    path = Path(folder) / name
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderError(f"{what} {folder} is in use by {holder} (lock {path}); wait for it to finish, or use "
                             "another output folder") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"camloc pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def json_safe(value):
    """NaN and infinities -> None, recursively, so the result is valid JSON (`allow_nan=False`)."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, value) -> None:
    """Atomically write valid JSON (NaN -> null)."""
    atomic_write_text(path, json.dumps(json_safe(value), indent=1, allow_nan=False) + "\n")
