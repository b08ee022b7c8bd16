"""NIH ChestX-ray14 data: findings, metadata, image sources, patient split, demo set, shard cache, loaders."""

from cxr.data.catalog import Catalog, IngestReport, load_catalog
from cxr.data.findings import FINDINGS, NO_FINDING, decode_findings, encode_findings

__all__ = [
    "FINDINGS",
    "NO_FINDING",
    "Catalog",
    "IngestReport",
    "decode_findings",
    "encode_findings",
    "load_catalog",
]
