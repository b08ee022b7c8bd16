"""Copy a folder's files to and from an S3 prefix (boto3; honours AWS_ENDPOINT_URL). SSE-S3 on upload."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cxr.data.sources import s3_client, split_s3_uri


def upload(directory: str | Path, uri: str, names: Iterable[str]) -> list[str]:
    """Upload the named files of `directory` under `uri`; missing files are skipped."""
    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    done = []
    for name in names:
        path = Path(directory) / name
        if path.is_file():
            client.upload_file(str(path), bucket, prefix + name, ExtraArgs={"ServerSideEncryption": "AES256"})
            done.append(name)
    return done


def download(uri: str, directory: str | Path) -> list[str]:
    """Download every object directly under `uri` into `directory` (created); returns the file names."""
    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix) :]
            if name and "/" not in name:
                client.download_file(bucket, item["Key"], str(directory / name))
                names.append(name)
    return names
