"""Preprocess images once into memory-mappable uint8 shards, content-addressed and reused across runs.

A cache lives in `<root>/<key>/`. The key hashes everything that goes into it: the image list in order, the
metadata table and labels, each image's content identity as its source names it (size and modification
time, archive member, S3 ETag; see `ImageSource.fingerprints`), and the preprocessing settings:

    shard-00000.npy   uint8 [n, size, size] grayscale images (np.load(..., mmap_mode="r"))
    shard-00000.json  the image ids in that shard and the images that failed, with reasons
    meta.csv          one row per cached image (catalog columns + shard, offset), row-aligned with
    labels.npy        float32 [N, 14] in the NIH finding order
    manifest.json     key, settings, counts, failures; written last, so its presence marks a complete cache

Shards are built independently (a process pool here, or a Metaflow foreach), each written atomically and
skipped when already present, so an interrupted build resumes where it stopped. Only faults of an image
itself (gone, undecodable) are recorded as failures; a read that fails for another reason (throttling,
network) raises `SourceReadError` and leaves its shard unwritten, so the next build reads it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.config import cxr_home
from cxr.data.catalog import Catalog
from cxr.data.findings import FINDINGS
from cxr.data.images import ImageDecodeError, decode_xray, resize_square
from cxr.data.sources import ImageSource, SourceReadError
from cxr.data.split import Split
from cxr.progress import Progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TABLE_FILES = ("meta.csv", "labels.npy", MANIFEST)


class CacheError(RuntimeError):
    """A cache directory is incomplete or inconsistent."""


@dataclass(frozen=True)
class PreprocessSettings:
    """How images are turned into cached arrays."""

    size: int = 256
    shard_size: int = 2048

    def __post_init__(self) -> None:
        if self.size < 16 or self.shard_size < 1:
            raise ValueError(f"invalid preprocessing settings: {self}")


@dataclass
class CachePlan:
    """What a cache for one catalog and settings will hold, and where."""

    key: str
    directory: Path
    settings: PreprocessSettings
    shards: list[list[str]]

    @property
    def complete(self) -> bool:
        """Whether the cache was fully built before (its manifest exists)."""
        return (self.directory / MANIFEST).is_file()


@dataclass
class ShardResult:
    """Outcome of building one shard."""

    index: int
    image_ids: list[str]
    failures: list[tuple[str, str]] = field(default_factory=list)
    reused: bool = False


def default_cache_root() -> Path:
    """`$CXR_HOME/cache` (default `~/.cxr/cache`)."""
    return cxr_home() / "cache"


def cache_key(catalog: Catalog, settings: PreprocessSettings) -> str:
    """Content address of a cache: sha256 over the settings, the ordered image list, the metadata table
    and labels, and each image's content identity from its source. Linear in the images; no pixel is read."""
    digest = hashlib.sha256()
    header = {"format": FORMAT_VERSION, **asdict(settings), "findings": list(FINDINGS)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    ids = catalog.meta["image_id"].tolist()
    digest.update("\0".join(ids).encode())
    digest.update(table_digest(catalog.meta))
    digest.update(np.ascontiguousarray(catalog.labels, dtype=np.float32).tobytes())
    digest.update("\0".join(catalog.source.fingerprints(ids)).encode())
    return digest.hexdigest()[:24]


def table_digest(table: pd.DataFrame) -> bytes:
    """sha256 of a table's column names, types and values (pandas' vectorised row hashes)."""
    digest = hashlib.sha256(json.dumps([[str(c), str(t)] for c, t in table.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    return digest.digest()


def plan_cache(
    catalog: Catalog, settings: PreprocessSettings | None = None, root: str | Path | None = None
) -> CachePlan:
    """Lay out the shards for a catalog: the source's natural groups, chunked to `shard_size`."""
    settings = settings or PreprocessSettings()
    ids = catalog.meta["image_id"].tolist()
    key = cache_key(catalog, settings)
    shards = []
    for group in catalog.source.shard_groups(ids):
        shards += [group[i : i + settings.shard_size] for i in range(0, len(group), settings.shard_size)]
    directory = Path(root or default_cache_root()) / key
    return CachePlan(key, directory, settings, shards)


def shard_path(directory: Path, index: int, suffix: str = ".npy") -> Path:
    """Path of shard `index`'s array (.npy) or index (.json)."""
    return directory / f"shard-{index:05d}{suffix}"


def build_shard(plan: CachePlan, index: int, source: ImageSource) -> ShardResult:
    """Decode, convert and resize one shard's images; write it atomically. Reuses an existing shard.

    Raises `SourceReadError` (nothing written) when images cannot be read for a reason that is not theirs.
    """
    info_path = shard_path(plan.directory, index, ".json")
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        return ShardResult(index, info["image_ids"], [tuple(f) for f in info["failures"]], reused=True)
    size = plan.settings.size
    wanted = plan.shards[index]
    pixels = np.empty((len(wanted), size, size), dtype=np.uint8)
    kept: list[str] = []
    failures: list[tuple[str, str]] = []
    try:
        for image_id, data, reason in source.iter_bytes(wanted):
            if data is None:
                failures.append((image_id, reason or "unreadable"))
                continue
            try:
                pixels[len(kept)] = resize_square(decode_xray(data), size)
            except ImageDecodeError as error:
                failures.append((image_id, str(error)))
                continue
            kept.append(image_id)
    except SourceReadError as error:
        raise SourceReadError(
            f"cache {plan.key}: shard {index} not written (a later build retries it): {error}"
        ) from error
    plan.directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(shard_path(plan.directory, index), lambda f: np.save(f, pixels[: len(kept)]))
    info_text = json.dumps({"image_ids": kept, "failures": failures})
    _atomic_write(info_path, lambda f: f.write(info_text.encode()))
    return ShardResult(index, kept, failures)


def finalize_cache(plan: CachePlan, catalog: Catalog, results: list[ShardResult]) -> ShardCache:
    """Write the table, labels and manifest that make a set of built shards a complete cache."""
    results = sorted(results, key=lambda r: r.index)
    if [r.index for r in results] != list(range(len(plan.shards))):
        raise CacheError(f"cache {plan.key}: expected {len(plan.shards)} shards, got {len(results)}")
    position = pd.Index(catalog.meta["image_id"])
    frames = []
    for result in results:
        rows = position.get_indexer(result.image_ids)
        frame = catalog.meta.iloc[rows].copy()
        frame["shard"], frame["offset"], frame["_row"] = result.index, np.arange(len(rows)), rows
        frames.append(frame)
    meta = pd.concat(frames, ignore_index=True)
    labels = catalog.labels[meta.pop("_row").to_numpy()]
    failures = [{"image_id": i, "reason": r} for res in results for i, r in res.failures]
    plan.directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "key": plan.key,
        "format": FORMAT_VERSION,
        "settings": asdict(plan.settings),
        "source": catalog.source.uri,
        "images": len(meta),
        "shards": [len(r.image_ids) for r in results],
        "findings": list(FINDINGS),
        "failures": failures,
    }
    _atomic_write(plan.directory / "meta.csv", lambda f: meta.to_csv(f, index=False))  # TABLE_FILES
    _atomic_write(plan.directory / "labels.npy", lambda f: np.save(f, labels))
    _atomic_write(plan.directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    if failures:
        log.warning("cache %s: %d images could not be used, e.g. %s", plan.key, len(failures), failures[:3])
    return ShardCache(plan.directory)


def build_cache(
    catalog: Catalog,
    settings: PreprocessSettings | None = None,
    root: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ShardCache:
    """Preprocess a catalog into a shard cache with a process pool, or reuse the existing one."""
    plan = plan_cache(catalog, settings, root)
    if plan.complete:
        log.info("reusing cache %s", plan.directory)
        return ShardCache(plan.directory)
    workers = max(1, min(workers or os.cpu_count() or 1, len(plan.shards)))
    results = []
    with Progress("preprocess", len(catalog), enabled=progress) as bar:
        if workers == 1:
            for index in range(len(plan.shards)):
                results.append(build_shard(plan, index, catalog.source))
                bar.update(len(plan.shards[index]))
        else:
            initargs = (plan, catalog.source)
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=initargs) as pool:
                for result in pool.map(_build_in_worker, range(len(plan.shards))):
                    results.append(result)
                    bar.update(len(plan.shards[result.index]))
    return finalize_cache(plan, catalog, results)


_worker_state: dict[str, Any] = {}


def _init_worker(plan: CachePlan, source: ImageSource) -> None:
    _worker_state["plan"], _worker_state["source"] = plan, source


def _build_in_worker(index: int) -> ShardResult:
    return build_shard(_worker_state["plan"], index, _worker_state["source"])


def _atomic_write(path: Path, write: Any) -> None:
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)  # noqa: SIM115
    try:
        with handle:
            write(handle)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


class ShardCache:
    """A complete cache opened for reading: images are memory-mapped, never decoded again."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self.manifest = json.loads((self.directory / MANIFEST).read_text())
        except (OSError, ValueError) as error:
            raise CacheError(f"{self.directory} is not a complete cache (no readable {MANIFEST})") from error
        self.key: str = self.manifest["key"]
        self.size: int = self.manifest["settings"]["size"]
        self.meta = pd.read_csv(self.directory / "meta.csv", dtype={"image_id": str})
        self.labels: np.ndarray = np.load(self.directory / "labels.npy")
        self._shard = self.meta["shard"].to_numpy()
        self._offset = self.meta["offset"].to_numpy()
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def failures(self) -> list[dict[str, str]]:
        """Images that could not be decoded or read, with the reason for each."""
        return list(self.manifest["failures"])

    def shard(self, index: int) -> np.ndarray:
        """The memory-mapped uint8 array of one shard."""
        if index not in self._arrays:
            self._arrays[index] = np.load(shard_path(self.directory, index), mmap_mode="r")
        return self._arrays[index]

    def image(self, row: int) -> np.ndarray:
        """The cached size×size uint8 image of table row `row` (a read-only view)."""
        return self.shard(int(self._shard[row]))[int(self._offset[row])]

    def rows_for(self, image_ids: list[str] | pd.Series) -> np.ndarray:
        """Table rows of the given images; images not in the cache (e.g. failed to decode) are dropped."""
        rows = pd.Index(self.meta["image_id"]).get_indexer(pd.Index(image_ids))
        return rows[rows >= 0]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # memory maps are reopened in each process
        return state


def cache_rows(cache: ShardCache, image_ids: pd.Series, split: Split) -> dict[str, np.ndarray]:
    """Map a split of catalog rows (whose ids are `image_ids`) to cache rows; failed images drop out."""
    ids = np.asarray(image_ids)
    return {name: cache.rows_for(list(ids[rows])) for name, rows in split.items()}
