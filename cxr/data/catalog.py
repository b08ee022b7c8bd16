"""The dataset contract: a metadata table row-aligned with an N×14 labels array, plus where the pixels are.

`load_catalog(root)` matches a dataset's metadata with the images a root actually holds: NIH's Data_Entry
file, or the published files of another dataset (`cxr.data.datasets`: CheXpert, MIMIC-CXR-JPG, PadChest,
VinDr-CXR, RSNA Pneumonia), whose frontal images it keeps by default. A partial download is fine: metadata
rows without an image are counted and reported, images without a metadata row too.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.data import datasets
from cxr.data.findings import FINDINGS
from cxr.data.metadata import METADATA_NAMES, MetadataError, find_metadata_file, read_metadata
from cxr.data.sources import DirectorySource, ImageSource, SourceError, open_source, s3_client, split_s3_uri

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """What ingest found: how much of the metadata has pixels, and what did not match."""

    root: str
    metadata_file: str
    metadata_rows: int
    images_in_source: int
    matched: int
    missing_images: int
    unlisted_images: int
    missing_examples: list[str] = field(default_factory=list)
    unlisted_examples: list[str] = field(default_factory=list)
    dataset: str = "nih"
    other_views: int = 0  # rows left out for their view (not frontal, or unknown)

    def summary(self) -> str:
        """One readable paragraph for logs and the CLI."""
        text = (
            f"{self.root}: {self.metadata_rows:,} metadata rows, {self.images_in_source:,} images found, "
            f"{self.matched:,} usable"
        )
        if self.missing_images:
            text += f"; {self.missing_images:,} rows have no image (partial download?)"
        if self.unlisted_images:
            text += f"; {self.unlisted_images:,} images are not in the metadata and are ignored"
        if self.other_views:
            text += f"; {self.other_views:,} rows left out for their view (frontal images only)"
        return text


@dataclass
class Catalog:
    """Images ready to use: `meta` (one row per image) row-aligned with `labels` (N×14, NIH order; 1
    present, 0 absent, NaN where the image's dataset does not label the finding)."""

    meta: pd.DataFrame
    labels: np.ndarray
    source: ImageSource

    def __post_init__(self) -> None:
        if len(self.meta) != len(self.labels) or self.labels.shape[1:] != (len(FINDINGS),):
            raise ValueError(f"labels {self.labels.shape} do not match metadata rows {len(self.meta)}")

    def __len__(self) -> int:
        return len(self.meta)

    def subset(self, rows: np.ndarray | list[int]) -> Catalog:
        """The catalog restricted to the given row positions, order kept as given."""
        rows = np.asarray(rows, dtype=np.int64)
        return Catalog(self.meta.iloc[rows].reset_index(drop=True), self.labels[rows], self.source)

    def prevalence(self) -> pd.Series:
        """Fraction of images positive for each finding, among the images that label it (NaN if none)."""
        known = (~np.isnan(self.labels)).sum(axis=0)
        values = np.where(known > 0, (self.labels > 0.5).sum(axis=0) / np.maximum(known, 1), np.nan)
        return pd.Series(values, index=list(FINDINGS), name="prevalence")


FRONTAL_VIEWS = ("PA", "AP", "AP SUPINE", "AP HORIZONTAL")  # decubitus, lordotic (AP AXIAL), lateral: not


def load_catalog(
    root: str | Path,
    metadata: str | Path | None = None,
    dataset: str | None = None,
    policy: datasets.LabelPolicy | None = None,
    views: str = "frontal",
    options: dict[str, Any] | None = None,
) -> tuple[Catalog, IngestReport]:
    """Match the root's metadata with the images it holds; raise only if nothing at all is usable.

    `dataset` names the layout (`nih` or one of `cxr.data.datasets.ADAPTERS`); by default an NIH metadata
    file decides, else the published files the root holds. For the other datasets, `policy` says how
    uncertain and unmentioned labels become targets, `views` keeps the `frontal` images (PA or AP) or
    `all`, and `options` go to the adapter's `read` (e.g. VinDr's `readers`, MIMIC's `labeller`).
    """
    if not str(root).startswith("s3://") and not Path(root).is_dir():
        raise SourceError(f"data root {root} does not exist or is not a directory")
    if dataset is None and (metadata is not None or str(root).startswith("s3://") or _has_nih_metadata(root)):
        dataset = "nih"
    dataset = dataset or datasets.detect(root)
    if dataset is None:
        raise MetadataError(
            f"{root} holds neither NIH metadata ({', '.join(METADATA_NAMES)}) nor the published files of "
            f"a dataset cxr reads ({', '.join(datasets.ADAPTERS)})"
        )
    if dataset != "nih":
        return _load_dataset(Path(root), dataset, policy or datasets.LabelPolicy(), views, options or {})
    source = open_source(root)
    metadata_path = metadata or _locate_metadata(root)
    table, labels = read_metadata(_local_copy(metadata_path))
    return _matched(root, str(metadata_path), source, table, labels, "nih", 0)


def _load_dataset(
    root: Path, name: str, policy: datasets.LabelPolicy, views: str, options: dict[str, Any]
) -> tuple[Catalog, IngestReport]:
    """A dataset's frontal (or all) images; rows whose image is missing are reported as such, whatever
    their view (a missing DICOM has no view to read), and images of other views are not "unlisted"."""
    if views not in ("frontal", "all"):
        raise ValueError(f"views must be 'frontal' or 'all', not {views!r}")
    table, labels = datasets.adapter(name).read(root, policy, **options)
    source = DirectorySource(root, by_path=True)
    present = table["image_id"].isin(source.list_images()).to_numpy()
    other = present & ~is_frontal(table["view"]) if views == "frontal" else np.zeros(len(table), dtype=bool)
    kept = table.loc[~other].reset_index(drop=True).assign(dataset=name)
    ignored = set(table.loc[other, "image_id"])
    return _matched(root, f"{name} metadata", source, kept, labels[~other], name, len(ignored), ignored)


def is_frontal(views: pd.Series) -> np.ndarray:
    """Whether each view is PA or AP (AP supine too, `AP_HORIZONTAL` as PadChest writes it); missing: no."""
    words = views.astype("string").str.upper().str.replace(r"[^A-Z]+", " ", regex=True).str.strip()
    return words.isin(FRONTAL_VIEWS).fillna(False).to_numpy(dtype=bool)


def _matched(
    root: str | Path,
    metadata_file: str,
    source: ImageSource,
    table: pd.DataFrame,
    labels: np.ndarray,
    dataset: str,
    other_views: int,
    ignored: set[str] | None = None,
) -> tuple[Catalog, IngestReport]:
    available = set(source.list_images())
    present = table["image_id"].isin(available).to_numpy()
    listed = set(table["image_id"]) | (ignored or set())
    unlisted = sorted(available - listed)
    missing = table.loc[~present, "image_id"]
    report = IngestReport(
        root=str(root),
        metadata_file=metadata_file,
        metadata_rows=len(table),
        images_in_source=len(available),
        matched=int(present.sum()),
        missing_images=int((~present).sum()),
        unlisted_images=len(unlisted),
        missing_examples=missing.head(5).tolist(),
        unlisted_examples=unlisted[:5],
        dataset=dataset,
        other_views=other_views,
    )
    log.info(report.summary())
    if report.matched == 0:
        raise MetadataError(f"no image in {root} matches a row of {metadata_file}: {report.summary()}")
    rows = np.flatnonzero(present)
    catalog = Catalog(table.iloc[rows].reset_index(drop=True), labels[rows], source)
    return catalog, report


def _has_nih_metadata(root: str | Path) -> bool:
    return any((Path(root) / name).is_file() for name in METADATA_NAMES)


def _locate_metadata(root: str | Path) -> str | Path:
    if not str(root).startswith("s3://"):
        return find_metadata_file(root)
    bucket, prefix = split_s3_uri(str(root))
    client = s3_client()
    response = client.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/")
    keys = {item["Key"] for item in response.get("Contents", [])}
    for name in METADATA_NAMES:
        if prefix + name in keys:
            return f"s3://{bucket}/{prefix}{name}"
    raise MetadataError(f"no NIH metadata file under {root}; expected one of: {', '.join(METADATA_NAMES)}")


def _local_copy(path: str | Path) -> str | Path | io.BytesIO:
    """Metadata on S3 is read into memory (pandas infers compression from the name for files only)."""
    if not str(path).startswith("s3://"):
        return path
    bucket, key = split_s3_uri(str(path))
    body = s3_client().get_object(Bucket=bucket, Key=key.rstrip("/"))["Body"].read()
    if str(path).endswith(".gz"):
        import gzip

        body = gzip.decompress(body)
    return io.BytesIO(body)
