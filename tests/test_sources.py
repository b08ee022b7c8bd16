import gzip
import tarfile

import numpy as np
import pytest

from cxr.data.catalog import load_catalog
from cxr.data.metadata import MetadataError
from cxr.data.sources import ArchiveSource, CombinedSource, DirectorySource, SourceError, open_source


def real_images(nih_root, n=None):
    return sorted((nih_root / "images_001" / "images").glob("*.png"))[:n]


def nih_like_root(tmp_path, nih_root):
    """A data root holding the real metadata file (linked, not copied into the repository)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "Data_Entry_2017_v2020.csv.gz").symlink_to(nih_root / "Data_Entry_2017_v2020.csv.gz")
    return root


def test_directory_partial_download_is_reported_not_fatal(nih_root):
    catalog, report = load_catalog(nih_root)
    assert isinstance(catalog.source, DirectorySource)
    assert (report.metadata_rows, report.images_in_source, report.matched) == (112_120, 120, 120)
    assert report.missing_images == 112_000 and "112,000 rows have no image" in report.summary()
    assert len(catalog) == 120 and catalog.labels.shape == (120, 14)
    assert set(catalog.meta["image_id"]) == {p.name for p in real_images(nih_root)}


def test_archives_are_read_without_extraction(tmp_path, nih_root):
    root = nih_like_root(tmp_path, nih_root)
    paths = real_images(nih_root, 12)
    for number, chunk in ((1, paths[:7]), (2, paths[7:])):
        with tarfile.open(root / f"images_{number:03d}.tar.gz", "w:gz") as tar:
            for path in chunk:
                tar.add(path, arcname=f"images/{path.name}")
    catalog, report = load_catalog(root)
    assert isinstance(catalog.source, ArchiveSource)
    assert report.matched == 12 and report.missing_images == 112_120 - 12
    assert [len(g) for g in catalog.source.shard_groups(catalog.meta["image_id"].tolist())] == [7, 5]
    got = {i: b for i, b, _ in catalog.source.iter_bytes([p.name for p in paths] + ["absent.png"])}
    assert all(got[p.name] == p.read_bytes() for p in paths)
    assert got["absent.png"] is None
    assert not list(root.glob("images/*")), "nothing may be extracted to disk"


def test_truncated_archive_reports_reasons(tmp_path, nih_root):
    root = nih_like_root(tmp_path, nih_root)
    paths = real_images(nih_root, 4)
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        for path in paths:
            tar.add(path, arcname=f"images/{path.name}")
    data = good.read_bytes()
    (root / "images_001.tar.gz").write_bytes(data)
    source = ArchiveSource([root / "images_001.tar.gz"])
    (root / "images_001.tar.gz").write_bytes(data[: len(data) // 2])  # the file breaks after listing
    results = list(source.iter_bytes([p.name for p in paths]))
    failed = [reason for _, payload, reason in results if payload is None]
    assert failed and all("truncated or corrupt" in reason for reason in failed)


def test_missing_root_and_no_matches_are_clear_errors(tmp_path, nih_root):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nope")
    root = nih_like_root(tmp_path, nih_root)
    (root / "images").mkdir()
    (root / "images" / "unrelated.png").write_bytes(real_images(nih_root, 1)[0].read_bytes())
    with pytest.raises(MetadataError, match="no image"):
        load_catalog(root)


def test_s3_prefix_on_loopback(s3, nih_root):
    s3.create_bucket(Bucket="cxr-data")
    paths = real_images(nih_root, 5)
    for path in paths:
        s3.put_object(Bucket="cxr-data", Key=f"nih/images_001/images/{path.name}", Body=path.read_bytes())
    s3.put_object(
        Bucket="cxr-data",
        Key="nih/Data_Entry_2017_v2020.csv.gz",
        Body=(nih_root / "Data_Entry_2017_v2020.csv.gz").read_bytes(),
    )
    catalog, report = load_catalog("s3://cxr-data/nih")
    assert report.matched == 5 and report.missing_images == 112_115
    payloads = {i: b for i, b, _ in catalog.source.iter_bytes([p.name for p in paths])}
    assert all(payloads[p.name] == p.read_bytes() for p in paths)
    first = catalog.meta.iloc[0]
    raw = gzip.decompress((nih_root / "Data_Entry_2017_v2020.csv.gz").read_bytes()).decode()
    line = next(row for row in raw.splitlines() if row.startswith(first["image_id"]))
    assert line.split(",")[3] == str(first["patient_id"])
    assert np.isfinite(catalog.labels).all()

    from cxr.data.prepare import split_catalog

    assert split_catalog(catalog, "s3://cxr-data/nih", {})[1] == "stratified by patient"  # no list: ratios
    test_names = [p.name for p in paths[:2]]
    s3.put_object(Bucket="cxr-data", Key="nih/test_list.txt", Body="\n".join(test_names).encode())
    split, method = split_catalog(catalog, "s3://cxr-data/nih", {})
    assert method.startswith("official") and sorted(catalog.meta["image_id"].iloc[split.test]) == test_names


def test_extracted_and_packed_archives_together(tmp_path, nih_root):
    root = nih_like_root(tmp_path, nih_root)
    paths = real_images(nih_root, 6)
    (root / "images_001" / "images").mkdir(parents=True)
    for path in paths[:3]:
        (root / "images_001" / "images" / path.name).write_bytes(path.read_bytes())
    with tarfile.open(root / "images_002.tar.gz", "w:gz") as tar:
        for path in paths[3:]:
            tar.add(path, arcname=f"images/{path.name}")
    catalog, report = load_catalog(root)
    assert isinstance(catalog.source, CombinedSource) and report.matched == 6
    got = {i: b for i, b, _ in catalog.source.iter_bytes([p.name for p in reversed(paths)])}
    assert all(got[p.name] == p.read_bytes() for p in paths)
    assert sorted(len(g) for g in catalog.source.shard_groups([p.name for p in paths])) == [3, 3]
