"""Where image bytes come from: an NIH directory tree, the NIH `.tar.gz` archives, or an `s3://` prefix;
several datasets' sources together as one (`PrefixedSource` in a `CombinedSource`).

Every source maps image file names (NIH `Image Index`, e.g. ``00000001_000.png``) to bytes, and reads many
images in one pass with `iter_bytes`, the fast path for each backend: sequential file reads, one streaming
pass over an archive (no extraction), or concurrent S3 GETs. A root with some archives extracted and
others still packed reads from both.

`fingerprints` names the content of each image without reading it (file size and modification time, the
archive member's place and size, the S3 ETag), so a cache key can follow the pixels cheaply.

Only faults of the image itself come back as a reason (missing, vanished, truncated). A read that fails
for any other reason (throttling, network, permissions), after retries, raises `SourceReadError`: it says
nothing about the image, so it must never be recorded as the image's failure.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
S3_ATTEMPTS = 8  # per S3 request, botocore's standard retry mode
BODY_ATTEMPTS = 3  # per object, when its body breaks off mid-stream
ARCHIVE_PATTERN = re.compile(r"^images_\d{3}\.tar(\.gz)?$")

ReadResult = tuple[str, bytes | None, str | None]
"""(image id, bytes or None, reason it could not be read or None)."""


class SourceError(ValueError):
    """The data root does not exist or holds no images in a known layout."""


class SourceReadError(RuntimeError):
    """Reading failed, after retries, for a reason that is not the image's (throttling, network, access)."""


class ImageSource(Protocol):
    """A place that holds NIH images by file name."""

    uri: str

    def list_images(self) -> list[str]:
        """All image ids the source holds, sorted."""
        ...

    def iter_bytes(self, image_ids: Iterable[str]) -> Iterator[ReadResult]:
        """Read the given images; unreadable ones come back with a reason instead of bytes."""
        ...

    def shard_groups(self, image_ids: list[str]) -> list[list[str]]:
        """Partition ids into groups that are cheap to read together (e.g. one archive each)."""
        ...

    def fingerprints(self, image_ids: list[str]) -> list[str]:
        """A cheap identity of each image's bytes (changes when the file does), without reading them."""
        ...


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


@dataclass
class DirectorySource:
    """Images under a directory: NIH's `images_XXX/images/*.png`, a single `images/`, or any subfolders.

    Images are named by file name (NIH's `Image Index`), or with `by_path` by their path relative to the
    root, POSIX separators (`train/patient00001/study1/view1_frontal.jpg`), for datasets whose file names
    repeat across folders."""

    root: Path
    by_path: bool = False
    _paths: dict[str, Path] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.uri = str(self.root)
        for dirpath, _, filenames in os.walk(self.root):
            folder = Path(dirpath)
            prefix = folder.relative_to(self.root).as_posix() + "/" if self.by_path else ""
            for name in filenames:
                if _is_image(name) and not name.startswith("."):
                    self._paths.setdefault(prefix.removeprefix("./") + name, folder / name)

    def list_images(self) -> list[str]:
        return sorted(self._paths)

    def path(self, image_id: str) -> Path:
        """The file that holds an image."""
        return self._paths[image_id]

    def iter_bytes(self, image_ids: Iterable[str]) -> Iterator[ReadResult]:
        for image_id in image_ids:
            path = self._paths.get(image_id)
            if path is None:
                yield image_id, None, "not in source"
                continue
            try:
                yield image_id, path.read_bytes(), None
            except OSError as error:
                yield image_id, None, f"unreadable file: {error.strerror or error}"

    def shard_groups(self, image_ids: list[str]) -> list[list[str]]:
        return [list(image_ids)]

    def fingerprints(self, image_ids: list[str]) -> list[str]:
        return [_file_identity(self._paths[i]) if i in self._paths else "absent" for i in image_ids]


def _file_identity(path: Path) -> str:
    """Size and modification time (ns) of a file, links followed; "absent" when it cannot be stat'ed."""
    try:
        stat = path.stat()
    except OSError:
        return "absent"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


@dataclass
class ArchiveSource:
    """Images inside NIH `images_XXX.tar.gz` archives, read by streaming (never extracted to disk)."""

    archives: list[Path]
    _members: dict[str, tuple[Path, str]] = field(default_factory=dict, repr=False)
    _places: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.archives = sorted(Path(a) for a in self.archives)
        self.uri = ",".join(str(a) for a in self.archives)
        for archive in self.archives:
            for member in _stream_members(archive):
                name = os.path.basename(member.name)
                if member.isfile() and _is_image(name) and name not in self._members:
                    self._members[name] = (archive, member.name)
                    self._places[name] = f"{member.offset_data}:{member.size}"

    def fingerprints(self, image_ids: list[str]) -> list[str]:
        archives = {a: _file_identity(a) for a in self.archives}
        return [
            f"{archives[self._members[i][0]]}:{self._places[i]}" if i in self._members else "absent"
            for i in image_ids
        ]

    def list_images(self) -> list[str]:
        return sorted(self._members)

    def shard_groups(self, image_ids: list[str]) -> list[list[str]]:
        by_archive: dict[Path, list[str]] = {}
        for image_id in image_ids:
            archive = self._members[image_id][0] if image_id in self._members else self.archives[0]
            by_archive.setdefault(archive, []).append(image_id)
        return [by_archive[a] for a in sorted(by_archive)]

    def iter_bytes(self, image_ids: Iterable[str]) -> Iterator[ReadResult]:
        wanted = list(image_ids)
        pending: dict[Path, set[str]] = {}
        for image_id in wanted:
            if image_id in self._members:
                pending.setdefault(self._members[image_id][0], set()).add(image_id)
        found: dict[str, ReadResult] = {}
        for archive, names in pending.items():
            found.update(_read_from_archive(archive, names))
        for image_id in wanted:
            yield found.get(image_id, (image_id, None, "not in source"))


def _stream_members(archive: Path) -> Iterator[tarfile.TarInfo]:
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            yield from tar
    except (tarfile.TarError, OSError, EOFError) as error:
        raise SourceError(f"cannot read archive {archive}: {error}") from error


def _read_from_archive(archive: Path, names: set[str]) -> dict[str, ReadResult]:
    results: dict[str, ReadResult] = {}
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if name not in names or not member.isfile():
                    continue
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                results[name] = (name, data, None)
                if len(results) == len(names):
                    break
    except (tarfile.TarError, OSError, EOFError) as error:
        for name in names - results.keys():
            results[name] = (name, None, f"archive {archive.name} truncated or corrupt: {error}")
    return results


@dataclass
class S3Source:
    """Images under an `s3://bucket/prefix`, listed once and fetched with concurrent GETs.

    The client honours the usual AWS settings (credentials, region, `AWS_ENDPOINT_URL`).
    """

    uri: str
    concurrency: int = 16
    _keys: dict[str, str] = field(default_factory=dict, repr=False)
    _etags: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.bucket, self.prefix = split_s3_uri(self.uri)
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents", []):
                name = os.path.basename(item["Key"])
                if _is_image(name) and name not in self._keys:
                    self._keys[name] = item["Key"]
                    self._etags[name] = f"{item.get('ETag', '')}:{item.get('Size', '')}"

    def list_images(self) -> list[str]:
        return sorted(self._keys)

    def shard_groups(self, image_ids: list[str]) -> list[list[str]]:
        return [list(image_ids)]

    def fingerprints(self, image_ids: list[str]) -> list[str]:
        return [self._etags.get(i, "absent") for i in image_ids]

    def iter_bytes(self, image_ids: Iterable[str]) -> Iterator[ReadResult]:
        client = s3_client()

        def fetch(image_id: str) -> ReadResult:
            key = self._keys.get(image_id)
            if key is None:
                return image_id, None, "not in source"
            return image_id, *_get_object(client, self.bucket, key)

        with ThreadPoolExecutor(self.concurrency) as pool:
            yield from pool.map(fetch, image_ids)


def _get_object(client: Any, bucket: str, key: str) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, reason) when the object is gone; anything else raises SourceReadError.

    botocore retries throttling, 5xx and connection errors (see `s3_client`); a body that breaks off while
    streaming is fetched again here, up to `BODY_ATTEMPTS` times.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"s3://{bucket}/{key}"
    broken: BotoCoreError | None = None
    for _ in range(BODY_ATTEMPTS):
        try:
            response = client.get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                return None, f"S3 object {where} vanished after listing ({code})"
            raise SourceReadError(f"S3 GET {where} failed after retries: {error}") from error
        except BotoCoreError as error:
            raise SourceReadError(f"S3 GET {where} failed after retries: {error}") from error
        try:
            return response["Body"].read(), None
        except BotoCoreError as error:
            broken = error
    raise SourceReadError(f"S3 GET {where}: the body broke off {BODY_ATTEMPTS} times: {broken}")


@dataclass
class CombinedSource:
    """Several sources as one, e.g. some archives already extracted and the rest still packed."""

    sources: list[ImageSource]

    def __post_init__(self) -> None:
        self.uri = " + ".join(s.uri for s in self.sources)
        self._owner: dict[str, int] = {}
        for number, source in enumerate(self.sources):
            for image_id in source.list_images():
                self._owner.setdefault(image_id, number)

    def list_images(self) -> list[str]:
        return sorted(self._owner)

    def _by_source(self, image_ids: Iterable[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for image_id in image_ids:
            groups.setdefault(self._owner.get(image_id, 0), []).append(image_id)
        return groups

    def shard_groups(self, image_ids: list[str]) -> list[list[str]]:
        return [
            g
            for n, ids in sorted(self._by_source(image_ids).items())
            for g in self.sources[n].shard_groups(ids)
        ]

    def fingerprints(self, image_ids: list[str]) -> list[str]:
        found: dict[str, str] = {}
        for n, ids in self._by_source(image_ids).items():
            found.update(zip(ids, self.sources[n].fingerprints(ids), strict=True))
        return [found[i] for i in image_ids]

    def iter_bytes(self, image_ids: Iterable[str]) -> Iterator[ReadResult]:
        wanted = list(image_ids)
        groups = self._by_source(wanted)
        if len(groups) == 1:  # a shard of one source (`shard_groups`): streamed, not held in memory
            ((number, ids),) = groups.items()
            yield from self.sources[number].iter_bytes(ids)
            return
        found = {result[0]: result for n, ids in groups.items() for result in self.sources[n].iter_bytes(ids)}
        for image_id in wanted:
            yield found[image_id]


@dataclass
class PrefixedSource:
    """Another source's images under `<name>/`: `nih/00000001_000.png` is the inner source's
    `00000001_000.png`, so that several datasets' ids stay unique in one `CombinedSource`."""

    name: str
    inner: ImageSource

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"a source prefix must be a non-empty name without '/', not {self.name!r}")
        self.prefix = self.name + "/"
        self.uri = f"{self.name}:{self.inner.uri}"

    def _inner_id(self, image_id: str) -> str | None:
        return image_id[len(self.prefix) :] if image_id.startswith(self.prefix) else None

    def list_images(self) -> list[str]:
        return [self.prefix + i for i in self.inner.list_images()]

    def shard_groups(self, image_ids: list[str]) -> list[list[str]]:
        ours = [i for i in map(self._inner_id, image_ids) if i is not None]
        foreign = [i for i in image_ids if self._inner_id(i) is None]
        groups = self.inner.shard_groups(ours) if ours else []
        return [[self.prefix + i for i in group] for group in groups] + ([foreign] if foreign else [])

    def fingerprints(self, image_ids: list[str]) -> list[str]:
        inner = [self._inner_id(i) for i in image_ids]
        known = [i for i in inner if i is not None]
        prints = dict(zip(known, self.inner.fingerprints(known), strict=True))
        return [prints[i] if i is not None else "absent" for i in inner]

    def iter_bytes(self, image_ids: Iterable[str]) -> Iterator[ReadResult]:
        wanted = list(image_ids)
        known = [i for i in map(self._inner_id, wanted) if i is not None]
        for inner_id, data, reason in self.inner.iter_bytes(known):  # as they come: one image in memory
            yield self.prefix + inner_id, data, reason
        for image_id in wanted:
            if self._inner_id(image_id) is None:
                yield image_id, None, "not in source"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix/")."""
    if not uri.startswith("s3://"):
        raise SourceError(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise SourceError(f"no bucket in {uri}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment (credentials, region, AWS_ENDPOINT_URL).

    Throttling, 5xx and connection errors are retried with botocore's standard mode (backoff with jitter),
    `AWS_MAX_ATTEMPTS` attempts in all (default `S3_ATTEMPTS`).
    """
    import boto3
    from botocore.config import Config

    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_ATTEMPTS)
    return boto3.client("s3", config=Config(retries={"mode": "standard", "total_max_attempts": attempts}))


def open_source(root: str | Path) -> ImageSource:
    """Pick the source for a data root: `s3://…`, a folder of NIH archives, or a directory of images."""
    if str(root).startswith("s3://"):
        return S3Source(str(root))
    path = Path(root)
    if not path.is_dir():
        raise SourceError(f"data root {root} does not exist or is not a directory")
    archives = [p for p in path.iterdir() if ARCHIVE_PATTERN.match(p.name)]
    if not archives:
        return DirectorySource(path)
    if not any(p.is_dir() and p.name.startswith("images") for p in path.iterdir()):
        return ArchiveSource(archives)
    return CombinedSource([DirectorySource(path), ArchiveSource(archives)])
