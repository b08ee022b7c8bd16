import numpy as np

from cxr.data import cache_store
from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog


def test_publish_and_fetch_through_s3_on_loopback(s3, nih_root, tmp_path):
    s3.create_bucket(Bucket="cxr-artifacts")
    catalog, _ = load_catalog(nih_root)
    local = build_cache(
        catalog, PreprocessSettings(size=32, shard_size=50), root=tmp_path / "a", progress=False
    )
    uri = cache_store.cache_uri("s3://cxr-artifacts/cxr-cache", local.key)
    uploaded = cache_store.publish(local.directory, uri)
    assert uploaded[-1] == "manifest.json" and "shard-00002.npy" in uploaded
    head = s3.head_object(Bucket="cxr-artifacts", Key=f"cxr-cache/{local.key}/labels.npy")
    assert head["ServerSideEncryption"] == "AES256"

    remote = cache_store.fetch(uri, root=tmp_path / "b")
    assert remote.directory == tmp_path / "b" / local.key and len(remote) == 120
    assert all(np.array_equal(remote.image(i), local.image(i)) for i in (0, 60, 119))
    assert np.array_equal(remote.labels, local.labels)
    assert cache_store.fetch(uri, root=tmp_path / "b").key == local.key  # second call: local copy


def test_fetch_of_incomplete_prefix_is_a_clear_error(s3, tmp_path):
    import pytest

    from cxr.data.cache import CacheError

    s3.create_bucket(Bucket="cxr-empty")
    s3.put_object(Bucket="cxr-empty", Key="cxr-cache/abc/shard-00000.npy", Body=b"partial")
    with pytest.raises(CacheError, match="no complete cache"):
        cache_store.fetch("s3://cxr-empty/cxr-cache/abc", root=tmp_path)
    assert not list(tmp_path.iterdir())
