import json
import shutil

import numpy as np
import pandas as pd
from PIL import Image

from cxr.data.cache import PreprocessSettings, ShardCache, build_cache, build_shard, plan_cache, shard_path
from cxr.data.catalog import load_catalog


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
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    paths = sorted((nih_root / "images_001" / "images").glob("*.png"))[:6]
    for path in paths:
        shutil.copy(path, root / "images" / path.name)
    (root / "images" / paths[1].name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    table = pd.read_csv(nih_root / "Data_Entry_2017_v2020.csv.gz")
    table[table["Image Index"].isin([p.name for p in paths])].to_csv(
        root / "Data_Entry_2017_v2020.csv", index=False
    )
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
