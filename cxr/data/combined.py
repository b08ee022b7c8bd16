"""Several datasets as one catalog: NIH beside CheXpert, MIMIC-CXR, PadChest, ... trained on together.

`combine_catalogs` stacks the parts' catalogs row-aligned: each image keeps its dataset's labels (NaN where
that dataset does not label a finding, which the masked loss skips), its id becomes `<name>/<image_id>` and
its patient `<name>:<patient_id>`, so neither collides across datasets, and a `dataset` column names its
part. Its source reads each id from its part's source (`PrefixedSource` in a `CombinedSource`).

`split_combined` splits each part on its own (`split_catalog`: its published test set, else by patient)
and offsets the rows into the combined catalog, so no patient crosses splits and each dataset's test set
stays its test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cxr.data.catalog import Catalog
from cxr.data.prepare import split_catalog
from cxr.data.sources import CombinedSource, PrefixedSource
from cxr.data.split import Split

DATASET = "dataset"


def combine_catalogs(parts: Sequence[tuple[str, Catalog]]) -> Catalog:
    """One catalog of the parts' images, in the parts' order: the columns all parts share plus `dataset`
    (the part's name), ids `<name>/<image_id>`, patients `<name>:<patient_id>` (str)."""
    names = [name for name, _ in parts]
    if not parts:
        raise ValueError("no catalogs to combine")
    if len(set(names)) < len(names) or any(not name or "/" in name or ":" in name for name in names):
        raise ValueError(f"dataset names must be unique, non-empty and free of '/' and ':': {names}")
    shared = [c for c in parts[0][1].meta.columns if all(c in part.meta.columns for _, part in parts)]
    columns = [c for c in shared if c != DATASET]
    tables = [
        part.meta[columns].assign(
            image_id=name + "/" + part.meta["image_id"].astype(str),
            patient_id=name + ":" + part.meta["patient_id"].astype(str),
            **{DATASET: name},
        )
        for name, part in parts
    ]
    source = CombinedSource([PrefixedSource(name, part.source) for name, part in parts])
    labels = np.concatenate([part.labels for _, part in parts]).astype(np.float32, copy=False)
    return Catalog(pd.concat(tables, ignore_index=True), labels, source)


def split_combined(parts: Sequence[tuple[str, Catalog, str]], split: dict[str, Any]) -> tuple[Split, str]:
    """Split each (name, catalog, root) part on its own as `split_catalog` does, rows offset into
    `combine_catalogs` of the same parts in the same order; returns (split, method of each part)."""
    offset, pieces, methods = 0, [], []
    for name, catalog, root in parts:
        own, method = split_catalog(catalog, root, split)
        pieces.append([rows + offset for _, rows in own.items()])
        methods.append(f"{name}: {method}")
        offset += len(catalog)
    train, val, test = (np.concatenate([piece[k] for piece in pieces]).astype(np.int64) for k in range(3))
    return Split(train, val, test), "; ".join(methods)
