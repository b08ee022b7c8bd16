import json
import shutil
import tarfile
import threading

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr.data import sources
from cxr.data.cache import PreprocessSettings, ShardCache, build_cache, build_shard, plan_cache, shard_path
from cxr.data.catalog import load_catalog
from cxr.data.findings import FINDINGS
from cxr.data.sources import SourceReadError


def real_images(nih_root, n):
    return sorted((nih_root / "images_001" / "images").glob("*.png"))[:n]


def metadata_rows(nih_root, paths):
    """The real metadata rows of some images (the NIH columns as released)."""
    table = pd.read_csv(nih_root / "Data_Entry_2017_v2020.csv.gz")
    return table[table["Image Index"].isin([p.name for p in paths])].reset_index(drop=True)


def small_root(directory, nih_root, n=6):
    """A root with n real images copied under images/ and their metadata rows; returns (root, paths)."""
    (directory / "images").mkdir(parents=True)
    paths = real_images(nih_root, n)
    for path in paths:
        shutil.copy(path, directory / "images" / path.name)
    metadata_rows(nih_root, paths).to_csv(directory / "Data_Entry_2017_v2020.csv", index=False)
    return directory, paths


def key_of(root, size=32):
    return plan_cache(load_catalog(root)[0], PreprocessSettings(size=size)).key


def test_real_images_to_shards_and_reuse(tmp_path, nih_root):
    catalog, _ = load_catalog(nih_root)
    settings = PreprocessSettings(size=64, shard_size=50)
    cache = build_cache(catalog, settings, root=tmp_path, workers=2, progress=False)
    assert len(cache) == 120 and cache.failures == [] and cache.manifest["shards"] == [50, 50, 20]
    for row in (0, 57, 119):
        image_id = cache.meta.at[row, "image_id"]
        source = nih_root / "images_001" / "images" / image_id
        expected = np.asarray(Image.open(source).convert("L").resize((64, 64), Image.Resampling.BOX))
        assert np.abs(cache.image(row).astype(int) - expected).max() <= 1
        catalog_row = catalog.meta.index[catalog.meta["image_id"] == image_id][0]
        assert np.array_equal(cache.labels[row], catalog.labels[catalog_row])
    assert np.load(shard_path(cache.directory, 0), mmap_mode="r").dtype == np.uint8
    stamp = (cache.directory / "shard-00000.npy").stat().st_mtime_ns
    again = build_cache(catalog, settings, root=tmp_path, workers=2, progress=False)
    assert again.key == cache.key and (cache.directory / "shard-00000.npy").stat().st_mtime_ns == stamp
    other = plan_cache(catalog, PreprocessSettings(size=32, shard_size=50), root=tmp_path)
    assert other.key != cache.key and not other.complete
    fewer = plan_cache(catalog.subset(np.arange(100)), settings, root=tmp_path)
    assert fewer.key != cache.key


def test_corrupt_and_vanished_files_are_listed_not_fatal(tmp_path, nih_root):
    root, paths = small_root(tmp_path / "root", nih_root)
    (root / "images" / paths[1].name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    catalog, _ = load_catalog(root)
    (root / "images" / paths[2].name).unlink()  # disappears between listing and reading
    cache = build_cache(
        catalog, PreprocessSettings(size=32), root=tmp_path / "cache", workers=1, progress=False
    )
    reasons = {f["image_id"]: f["reason"] for f in cache.failures}
    assert set(reasons) == {paths[1].name, paths[2].name}
    assert "not a decodable image" in reasons[paths[1].name] and "unreadable" in reasons[paths[2].name]
    assert len(cache) == 4 and len(cache.rows_for([p.name for p in paths])) == 4
    assert json.loads((cache.directory / "manifest.json").read_text())["images"] == 4


def test_interrupted_build_resumes_from_written_shards(tmp_path, nih_root):
    catalog, _ = load_catalog(nih_root)
    plan = plan_cache(catalog, PreprocessSettings(size=32, shard_size=40), root=tmp_path)
    first = build_shard(plan, 0, catalog.source)  # then the process "dies"
    stamp = shard_path(plan.directory, 0).stat().st_mtime_ns
    assert not plan.complete and not first.reused
    cache = build_cache(catalog, plan.settings, root=tmp_path, workers=1, progress=False)
    assert shard_path(plan.directory, 0).stat().st_mtime_ns == stamp
    assert len(cache) == 120 and ShardCache(plan.directory).key == plan.key


def test_key_follows_labels_metadata_and_pixels(tmp_path, nih_root):
    root, paths = small_root(tmp_path / "root", nih_root)
    key = key_of(root)
    assert key_of(root) == key, "an unchanged root keeps its key"
    moved = root.rename(tmp_path / "moved")
    assert key_of(moved) == key, "moving a root changes no content"
    root = moved.rename(tmp_path / "root")

    metadata = root / "Data_Entry_2017_v2020.csv"
    table = pd.read_csv(metadata)
    table.loc[0, "Patient Age"] += 1  # metadata only; labels unchanged
    table.to_csv(metadata, index=False)
    aged = key_of(root)
    assert aged != key

    settings = PreprocessSettings(size=32)
    before = build_cache(load_catalog(root)[0], settings, root=tmp_path / "cache", workers=2, progress=False)
    table.loc[0, "Finding Labels"] = "Hernia"  # a label fixed in place
    table.to_csv(metadata, index=False)
    after = build_cache(load_catalog(root)[0], settings, root=tmp_path / "cache", workers=2, progress=False)
    assert after.key not in (key, aged, before.key)
    row = after.rows_for([table.loc[0, "Image Index"]])[0]
    assert after.labels[row].tolist() == [float(f == "Hernia") for f in FINDINGS]  # not the stale label

    older = table.copy()
    older.loc[0, "Finding Labels"] = "Mass"
    older.to_csv(root / "Data_Entry_2017.csv", index=False)
    metadata.unlink()  # the 2017 file instead of v2020, same images
    assert key_of(root) != after.key

    changed = key_of(root)
    (root / "images" / paths[2].name).write_bytes(paths[3].read_bytes())  # other pixels, same name
    assert key_of(root) != changed


def test_new_root_with_the_same_names_gets_a_new_key(tmp_path, nih_root):
    first, paths = small_root(tmp_path / "first", nih_root)
    second, _ = small_root(tmp_path / "second", nih_root)
    shuffled = [paths[(i + 1) % len(paths)] for i in range(len(paths))]
    for name, source in zip(paths, shuffled, strict=True):  # same file names, other images
        shutil.copy2(source, second / "images" / name.name)
    assert key_of(first) != key_of(second)

    archives = {}
    for name, order in (("a", paths), ("b", shuffled)):  # archives: same member names, other bytes
        archive_root = tmp_path / f"archive-{name}"
        archive_root.mkdir()
        shutil.copy(first / "Data_Entry_2017_v2020.csv", archive_root)
        with tarfile.open(archive_root / "images_001.tar.gz", "w:gz") as tar:
            for member, source in zip(paths, order, strict=True):
                tar.add(source, arcname=f"images/{member.name}")
        archives[name] = key_of(archive_root)
    assert archives["a"] != archives["b"]


def s3_root(s3, bucket, nih_root, paths):
    """An s3:// NIH root holding `paths` and their metadata rows."""
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="nih/Data_Entry_2017_v2020.csv",
                  Body=metadata_rows(nih_root, paths).to_csv(index=False).encode())  # fmt: skip
    for path in paths:
        s3.put_object(Bucket=bucket, Key=f"nih/images/{path.name}", Body=path.read_bytes())
    return f"s3://{bucket}/nih"


def test_s3_key_follows_object_content(s3, tmp_path, nih_root):
    paths = real_images(nih_root, 4)
    s3_root(s3, "cxr-key", nih_root, paths)
    key = key_of("s3://cxr-key/nih")
    assert key_of("s3://cxr-key/nih") == key
    s3.put_object(Bucket="cxr-key", Key=f"nih/images/{paths[0].name}", Body=paths[1].read_bytes())
    assert key_of("s3://cxr-key/nih") != key


class FlakyS3:
    """A botocore hook failing GETs of chosen keys: a dropped connection, S3's SlowDown, a body that breaks
    off mid-stream, in that order (`transient`), or SlowDown forever (`down`). Counts GETs per key in files
    so that loader processes count too."""

    def __init__(self, directory, transient=(), down=()):
        self.directory, self.transient, self.down = directory, set(transient), set(down)
        self.lock = threading.Lock()

    def gets(self, key):
        path = self.directory / key.replace("/", "_")
        return path.stat().st_size if path.exists() else 0

    def __call__(self, request, **_):
        from botocore.exceptions import EndpointConnectionError

        key = next((k for k in self.transient | self.down if request.url.endswith(k)), None)
        if key is None:
            return None
        with self.lock, open(self.directory / key.replace("/", "_"), "ab") as counter:
            counter.write(b".")
            attempt = counter.tell()
        if key in self.down or attempt == 2:
            return Response(
                503, b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
            )
        if attempt == 1:
            raise EndpointConnectionError(endpoint_url=request.url)
        if attempt == 3:
            return Response(200, b"", broken=True)
        return None


class Response:
    """A raw HTTP response for botocore's `before-send` hook; `broken` bodies fail while streaming."""

    def __new__(cls, status, body, broken=False):
        from botocore.awsrequest import AWSResponse

        headers = {"Content-Length": "1000" if broken else str(len(body))}
        return AWSResponse("http://127.0.0.1/", status, headers, cls.Raw(body, broken))

    class Raw:
        def __init__(self, body, broken):
            self.body, self.broken = body, broken

        def stream(self, **_):
            yield self.body

        def read(self, *_args, **_kwargs):
            from urllib3.exceptions import ProtocolError

            if self.broken:
                raise ProtocolError("Connection broken: IncompleteRead(100 bytes read, 900 more expected)")
            return self.body


def test_transient_s3_errors_are_retried_and_never_recorded(s3, tmp_path, nih_root, monkeypatch):
    import botocore.retries.standard

    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda *_: 0)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    paths = real_images(nih_root, 6)
    s3_root(s3, "cxr-flaky", nih_root, paths)
    catalog, _ = load_catalog("s3://cxr-flaky/nih")
    ids = catalog.meta["image_id"].tolist()
    flaky, down = f"nih/images/{ids[0]}", f"nih/images/{ids[4]}"  # shards of 3: one in each
    hook = FlakyS3(tmp_path, transient=[flaky], down=[down])
    original = sources.s3_client

    def client():
        made = original()
        made.meta.events.register("before-send.s3.GetObject", hook)
        return made

    monkeypatch.setattr(sources, "s3_client", client)
    settings, cache_root = PreprocessSettings(size=32, shard_size=3), tmp_path / "cache"
    with pytest.raises(SourceReadError, match=f"shard 1 not written.*{down}.*SlowDown"):
        build_cache(catalog, settings, root=cache_root, workers=2, progress=False)
    plan = plan_cache(catalog, settings, root=cache_root)
    assert not plan.complete and not shard_path(plan.directory, 1, ".json").exists()
    assert hook.gets(flaky) == 4 and hook.gets(down) == 3  # 3 botocore attempts, +1 for the broken body
    first = json.loads(shard_path(plan.directory, 0, ".json").read_text())
    assert first == {"image_ids": ids[:3], "failures": []}  # the flaky image made it, nothing recorded

    hook.down.clear()  # S3 recovers; one object vanishes for good
    s3.delete_object(Bucket="cxr-flaky", Key=f"nih/images/{ids[5]}")
    stamp = shard_path(plan.directory, 0).stat().st_mtime_ns
    cache = build_cache(catalog, settings, root=cache_root, workers=2, progress=False)
    assert shard_path(plan.directory, 0).stat().st_mtime_ns == stamp
    assert cache.key == plan.key  # the same content: the shard that failed is built now, shard 0 reused
    assert sorted(cache.meta["image_id"]) == sorted(ids[:5])
    assert [f["image_id"] for f in cache.failures] == [ids[5]] and "vanished" in cache.failures[0]["reason"]
