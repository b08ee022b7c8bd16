"""Share shard caches through S3: publish a local cache's files under a prefix, fetch them elsewhere.

A remote cache lives at `<prefix>/<key>/…` with the same files as a local one, so a training step on
another machine (AWS Batch, SageMaker) downloads exactly what preprocessing wrote, verified by key.
Uploads use server-side encryption (SSE-S3).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cxr import s3sync
from cxr.data.cache import MANIFEST, CacheError, ShardCache, default_cache_root
from cxr.data.sources import s3_client, split_s3_uri


def cache_uri(prefix: str, key: str) -> str:
    """Where cache `key` lives under an S3 prefix."""
    return prefix.rstrip("/") + "/" + key


def publish(directory: str | Path, uri: str, names: Iterable[str] | None = None) -> list[str]:
    """Upload cache files (default: all; the manifest last, so readers never see a half-written cache)."""
    directory = Path(directory)
    chosen = (
        sorted(names) if names is not None else sorted(p.name for p in directory.iterdir() if p.is_file())
    )
    body = [n for n in chosen if not n.startswith(".") and n != MANIFEST]
    done = s3sync.upload(directory, uri, body)
    if MANIFEST in chosen:
        done += s3sync.upload(directory, uri, [MANIFEST])
    return done


def is_complete(uri: str) -> bool:
    """Whether a remote cache was fully published (its manifest exists)."""
    bucket, prefix = split_s3_uri(uri)
    response = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix + MANIFEST, MaxKeys=1)
    return any(item["Key"] == prefix + MANIFEST for item in response.get("Contents", []))


def open_cache(directory: str | Path, uri: str | None = None) -> ShardCache:
    """Open a cache from its local directory when complete there, else fetch it from `uri`."""
    if (Path(directory) / MANIFEST).is_file() or uri is None:
        return ShardCache(directory)
    return fetch(uri, Path(directory).parent)


def fetch(uri: str, root: str | Path | None = None) -> ShardCache:
    """Make a remote cache available locally (downloaded once into `<root>/<key>`) and open it."""
    _, prefix = split_s3_uri(uri)
    key = prefix.rstrip("/").rsplit("/", 1)[-1]
    target = Path(root or default_cache_root()) / key
    if (target / MANIFEST).is_file():
        return ShardCache(target)
    names = s3sync.list_names(uri)
    if MANIFEST not in names:
        raise CacheError(f"{uri} holds no complete cache (no {MANIFEST})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        s3sync.download(uri, staging, names)
        if ShardCache(staging).key != key:
            raise CacheError(f"{uri}: manifest key does not match the prefix")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ShardCache(target)
