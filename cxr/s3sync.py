"""Copy a folder's files to and from an S3 prefix (boto3; honours AWS_ENDPOINT_URL), and the one rule for
encrypting every S3 write of the project: SSE-KMS with a configured key, else SSE-S3."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cxr.data.sources import s3_client, split_s3_uri

CONCURRENCY = 8
KMS_KEY_ENV = "CXR_KMS_KEY_ID"


def encryption(kms_key_id: str | None = None) -> dict[str, str]:
    """S3 server-side encryption arguments: SSE-KMS with `kms_key_id` (or $CXR_KMS_KEY_ID), else SSE-S3."""
    key = kms_key_id or os.environ.get(KMS_KEY_ENV)
    if key:
        return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": key}
    return {"ServerSideEncryption": "AES256"}


def put(uri: str, content: bytes | str | Path, kms_key_id: str | None = None, client: Any = None) -> str:
    """Write bytes, or the file at a path, to the object `uri`, encrypted (see `encryption`)."""
    bucket, key = split_s3_uri(uri)
    key, client = key.rstrip("/"), client or s3_client()
    extra = encryption(kms_key_id)
    if isinstance(content, bytes):
        client.upload_fileobj(io.BytesIO(content), bucket, key, ExtraArgs=extra)
    else:
        client.upload_file(str(content), bucket, key, ExtraArgs=extra)
    return uri


def upload(directory: str | Path, uri: str, names: Iterable[str]) -> list[str]:
    """Upload the named files of `directory` under `uri`, concurrently; missing files are skipped."""
    client = s3_client()
    present = [name for name in names if (Path(directory) / name).is_file()]

    def upload_one(name: str) -> str:
        put(f"{uri.rstrip('/')}/{name}", Path(directory) / name, client=client)
        return name

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(upload_one, present))


def list_names(uri: str) -> list[str]:
    """Names of the objects directly under `uri`."""
    bucket, prefix = split_s3_uri(uri)
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    names = [item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])]
    return [name for name in names if name and "/" not in name]


def download(uri: str, directory: str | Path, names: Iterable[str] | None = None) -> list[str]:
    """Download objects directly under `uri` (default: all) into `directory` (created), concurrently."""
    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chosen = list(names) if names is not None else list_names(uri)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(
            pool.map(lambda name: client.download_file(bucket, prefix + name, str(directory / name)), chosen)
        )
    return chosen
