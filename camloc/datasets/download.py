"""`camloc data download`: streamed downloads with resume, size and checksum checks, extraction.

Only datasets with public direct URLs are listed. Checksums: SHA-1 values as published in GluonCV's
dataset scripts (`mscoco.py`, `ade20k.py`); camloc also writes the SHA-256 of every file it fetched
next to it (`<file>.sha256`). Sizes are the servers' published byte counts where known.
"""
from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from camloc.errors import DataError, OptionError


@dataclass(frozen=True)
class Archive:
    url: str
    size: int | None = None
    sha1: str | None = None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


SOURCES: dict[str, dict[str, list[Archive]]] = {
    "coco": {
        "val2017": [
            Archive("http://images.cocodataset.org/annotations/annotations_trainval2017.zip", 252907541,
                    "8551ee4bb5860311e79dace7e79cb91e432e78b3"),
            Archive("http://images.cocodataset.org/zips/val2017.zip", 815585330,
                    "4950dc9d00dbe1c933ee0170f5797584351d2a41"),
        ],
        "train2017": [
            Archive("http://images.cocodataset.org/annotations/annotations_trainval2017.zip", 252907541,
                    "8551ee4bb5860311e79dace7e79cb91e432e78b3"),
            Archive("http://images.cocodataset.org/zips/train2017.zip", 19336861798,
                    "10ad623668ab00c62c096f0ed636d6aff41faca5"),
        ],
    },
    # VOC2012 trainval (VOCdevkit/VOC2012: JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt) for the
    # voc21 / voc20 segmentation datasets; SHA-1 as d2l publishes it for the same archive (its MD5 6cd6e144...
    # is torchvision's), size from the server
    "voc2012": {
        "val": [
            Archive("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar", None,
                    "4e443f8a2eca6b1dac8a6c57641b67dd40621a49"),
        ],
    },
    # ImageNet-S validation masks (and its other annotation files) from LUSSeg's GitHub release, the URLs of
    # LUSSeg/ImageNet-S datapreparation/datapreparation_anno.sh (at 780c2e7); no checksum or size is published
    # (the hex part of each name is not documented as one), so camloc records the SHA-256 of what it fetched. The
    # images are ImageNet-1k's: not downloadable here.
    **{f"imagenet-s{k}": {"validation": [Archive(
        f"https://github.com/UnsupervisedSemanticSegmentation/ImageNet-S/releases/download/ImageNet-S/{name}")]}
       for k, name in ((50, "ImageNetS50-a0fe9d82231f9bc4787ee76e304dfa51.zip"),
                       (300, "ImageNetS300-dd8e42e156bac415a35c3c239de297bf.zip"),
                       (919, "ImageNetS919-5f7f58ae1003d21da9409a8576bf7680.zip"))},
    "ade20k-sceneparsing": {
        "validation": [
            Archive("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip", None,
                    "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"),
        ],
    },
}


def file_digests(path: Path) -> tuple[str, str]:
    """(sha1, sha256) of a file, read once."""
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha1.update(block)
            sha256.update(block)
    return sha1.hexdigest(), sha256.hexdigest()


def download(archive: Archive, folder: Path, verify: bool = True, progress: bool = True, timeout: float = 60,
             record_sha256: bool = True) -> Path:
    """Fetch `archive` into `folder`, resuming a `.part` file left by an interrupted run (HTTP Range); the SHA-256
    of what was fetched is written beside it (`record_sha256`)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / archive.file_name
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(archive.url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # nothing left to send at or after `start` (Apache, S3, nginx)
            total = _range_total(exc.headers.get("Content-Range")) or archive.size
            if total != start:
                raise DataError(f"{part} has {start} bytes, but the server's file has {total or 'an unknown number of'} "
                                "bytes; delete it and run the same command again to start over") from exc
            response = None  # the .part is already complete: go on to the checksum
        else:
            raise DataError(f"downloading {archive.url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"downloading {archive.url} failed ({exc}); check the network and run the same command "
                        f"again to resume ({start} bytes kept in {part})") from exc
    if response is not None:
        with response:
            if start and response.status != 206:  # the server ignored the Range header: start over
                start = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else archive.size
            try:
                _stream(response, part, start, total, archive.file_name, progress)
            except (http.client.IncompleteRead, OSError) as exc:
                raise DataError(f"the connection was cut while downloading {archive.url} ({type(exc).__name__}); "
                                f"{part.stat().st_size} bytes are kept in {part}: run the same command again to "
                                "resume") from exc
            if total is not None and part.stat().st_size < total:
                raise DataError(f"the connection was cut while downloading {archive.url}: {part.stat().st_size} of "
                                f"{total} bytes are kept in {part}; run the same command again to resume")
    size = part.stat().st_size
    if archive.size is not None and size != archive.size:
        raise DataError(f"{part} has {size} bytes, expected {archive.size}; run the same command again to resume, "
                        "or delete the file to start over")
    sha1, sha256 = file_digests(part)
    if verify and archive.sha1 and sha1 != archive.sha1:
        bad = part.with_name(part.name + ".corrupt")
        part.rename(bad)
        raise DataError(f"{archive.file_name}: SHA-1 {sha1} differs from the published {archive.sha1}; moved it to "
                        f"{bad}; run again to download afresh (or pass --no-verify if the server's file changed)")
    part.rename(dest)
    if record_sha256:
        dest.with_name(dest.name + ".sha256").write_text(f"{sha256}  {dest.name}\n")
    return dest


def _range_total(header: str | None) -> int | None:
    """N of a `Content-Range: bytes */N` (or `bytes a-b/N`) header; None when absent or `*`."""
    if not header or "/" not in header:
        return None
    total = header.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _stream(response, part: Path, start: int, total: int | None, label: str, progress: bool) -> None:
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with open(part, "ab" if start else "wb") as f, Progress(
        TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task(label, total=total, completed=start)
        for block in iter(lambda: response.read(1 << 20), b""):
            f.write(block)
            bar.advance(task, len(block))


def extract(archive_path: Path, root: Path) -> None:
    """Unpack a zip or tar archive into the data root once (a marker file records that it was done)."""
    import tarfile

    marker = root / f".{archive_path.name}.extracted"
    if marker.exists():
        return
    if archive_path.name.endswith((".tar", ".tar.gz", ".tgz")):
        try:
            with tarfile.open(archive_path) as tf:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuses paths outside the root, links, devices
                    tf.extractall(root, filter="data")
                else:
                    for member in tf.getmembers():
                        target = (root / member.name).resolve()
                        if not str(target).startswith(str(root.resolve())) or not (member.isfile() or member.isdir()):
                            raise tarfile.TarError(f"member {member.name} is outside the data root or not a plain "
                                                   "file or folder")
                    tf.extractall(root)
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"{archive_path} could not be unpacked ({exc}); delete it and download again") from exc
        marker.write_text("ok\n")
        return
    try:
        with zipfile.ZipFile(archive_path) as zf:
            for member in zf.namelist():
                target = (root / member).resolve()
                if not str(target).startswith(str(root.resolve())):
                    raise DataError(f"{archive_path} holds a path outside the data root: {member}")
            zf.extractall(root)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive_path} is not a valid zip file ({exc}); delete it and download again") from exc
    marker.write_text("ok\n")


def fetch_dataset(name: str, root: Path, split: str | None = None, verify: bool = True, progress: bool = True,
                  sources: dict | None = None) -> list[Path]:
    """Download and extract every archive of `name` (and `split`) into `root`; returns the archives."""
    sources = sources or SOURCES
    if name not in sources:
        raise DataError(f"`camloc data download` knows {', '.join(sources)}; {name!r} has no public direct URL "
                        f"(see `camloc data verify {name}` for how to obtain it)")
    splits = sources[name]
    split = split or next(iter(splits))
    if split not in splits:
        raise OptionError(f"--split {split!r} is not one of {', '.join(splits)} for {name}")
    downloads = root / "downloads"
    archives = []
    for archive in splits[split]:
        path = download(archive, downloads, verify=verify, progress=progress)
        extract(path, root)
        archives.append(path)
    return archives


OPENIMAGES_POINTS = {
    "points": "https://storage.googleapis.com/openimages/v7/oidv7-val-annotations-point-labels.csv",
    "classes": "https://storage.googleapis.com/openimages/v7/oidv7-class-descriptions.csv",
    "images": "https://open-images-dataset.s3.amazonaws.com/validation/{}.jpg",
}
"""Open Images V7's validation point labels and class names (the URLs of its download page), and its images as
the official downloader.py fetches them (the `open-images-dataset` S3 bucket, `validation/<ImageId>.jpg`). No size or
checksum of these copies is published (the image list's MD5 is of the original Flickr files): camloc records the
SHA-256 of both CSV files it fetched."""


def fetch_openimages_points(root: Path, limit: int | None = None, progress: bool = True, workers: int = 16,
                            urls: dict | None = None) -> tuple[int, int]:
    """`camloc data download openimages-v7-points`: both CSV files, then the images of the pairs (the first `limit`
    image ids in sorted order, or all), several at a time, each resumable; images already there are kept. Returns
    (images fetched now, images wanted). Images that failed are one `DataError` after the others are fetched."""
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from camloc.datasets.openimages import CLASSES_FILE, POINTS_FILE, ROOT, images_with_yes_points, read_point_labels

    urls = {**OPENIMAGES_POINTS, **(urls or {})}
    if limit is not None and limit < 1:
        raise OptionError(f"--limit must be at least 1, got {limit}")
    base = root / ROOT
    for key, name in (("points", POINTS_FILE), ("classes", CLASSES_FILE)):
        path = download(Archive(urls[key]), base, progress=progress)
        if path.name != name:
            path.rename(base / name)
    wanted = images_with_yes_points(read_point_labels(base / POINTS_FILE))
    wanted = wanted[:limit] if limit is not None else wanted
    folder = base / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in wanted if not (folder / f"{i}.jpg").is_file()]
    failed: list[tuple[str, str]] = []

    def fetch(image_id: str) -> None:
        try:
            download(Archive(urls["images"].format(image_id)), folder, progress=False, record_sha256=False)
        except DataError as exc:
            failed.append((image_id, str(exc)))

    with Progress(TextColumn("images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress) as bar, ThreadPoolExecutor(workers) as pool:
        task = bar.add_task("images", total=len(todo))
        for _ in pool.map(fetch, todo):
            bar.advance(task)
    if failed:
        image_id, why = sorted(failed)[0]
        raise DataError(f"{len(failed)} of {len(todo)} images could not be fetched (first: {image_id}: {why}); the "
                        f"others are in {folder}: run the same command again to fetch the rest")
    return len(todo), len(wanted)
