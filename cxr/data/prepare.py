"""The data stages as the pipeline runs them: resolve the data root, then split a catalog as configured."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cxr.config import cxr_home
from cxr.data.catalog import Catalog, IngestReport, load_catalog
from cxr.data.datasets import LabelPolicy
from cxr.data.metadata import read_split_list
from cxr.data.sources import s3_client, split_s3_uri
from cxr.data.split import Split, official_split, patient_split
from cxr.data.synthetic import make_demo_dataset

log = logging.getLogger(__name__)

DEMO = "demo"
TEST_LIST = "test_list.txt"


def resolve_data_root(data: dict[str, Any], progress: bool = True) -> str:
    """The NIH root to read: the configured root, or the synthetic demo set (generated once) for "demo"."""
    root = str(data.get("root") or DEMO)
    if root != DEMO:
        return root
    demo = {"n_patients": 600, "max_images_per_patient": 6, "size": 256, "seed": 0, **data.get("demo", {})}
    directory = cxr_home() / "demo" / "p{n_patients}-m{max_images_per_patient}-s{size}-r{seed}".format(**demo)
    return str(make_demo_dataset(directory, **demo, progress=progress))


PART_KEYS = {"root", "dataset", "name", "uncertain", "unmentioned", "views", "options"}


def load_parts(root: str, data: dict[str, Any]) -> list[tuple[str, Catalog, str, IngestReport]]:
    """The training data as (name, catalog, root, report) parts: the data root, then each `data.also`
    entry `{root, dataset?, name?, uncertain?, unmentioned?, views?, options?}` read under its own label
    policy and views. A part's name (default: its dataset) names it in ids, patients and weights."""
    parts = [_part(root, {k: v for k, v in data.items() if k in PART_KEYS - {"root"}})]
    for entry in data.get("also") or []:
        if not isinstance(entry, dict) or "root" not in entry or set(entry) - PART_KEYS:
            raise ValueError(
                f"data.also entries are {{root, ...}} with keys from {sorted(PART_KEYS)}: {entry!r}"
            )
        parts.append(_part(str(entry["root"]), entry))
    return parts


def _part(root: str, entry: dict[str, Any]) -> tuple[str, Catalog, str, IngestReport]:
    policy = LabelPolicy(entry.get("uncertain", "ignore"), entry.get("unmentioned", "negative"))
    dataset, views, options = entry.get("dataset"), entry.get("views", "frontal"), entry.get("options")
    catalog, report = load_catalog(root, dataset=dataset, policy=policy, views=views, options=options)
    log.info(report.summary())
    return str(entry.get("name") or report.dataset), catalog, root, report


def split_catalog(catalog: Catalog, root: str, split: dict[str, Any]) -> tuple[Split, str]:
    """Split by patient as configured (NIH's official test list when present); returns (split, method)."""
    ratios = tuple(split.get("ratios", (0.7, 0.1, 0.2)))
    seed = int(split.get("seed", 0))
    patients = catalog.meta["patient_id"].to_numpy()
    official = catalog.meta.get("official_split")
    if split.get("use_official", True) and official is not None and (official == "test").any():
        return published_split(catalog, ratios[1] / max(ratios[0] + ratios[1], 1e-9), seed), (
            "the dataset's published split (validation by patient from train where it has none)"
        )
    test_list = official_test_list(root) if split.get("use_official", True) else None
    if test_list is not None:
        val_share = ratios[1] / max(ratios[0] + ratios[1], 1e-9)
        ids = catalog.meta["image_id"]
        official = official_split(ids, patients, catalog.labels, test_list, val_share, seed)
        return official, "official test list, train/val by patient"
    return patient_split(patients, catalog.labels, ratios, seed), "stratified by patient"


def published_split(catalog: Catalog, val_share: float, seed: int) -> Split:
    """A dataset's own `official_split` (train, val, test): its test set kept whole; its val set, or where
    it publishes none a `val_share` of train's patients (stratified), for validation."""
    official = catalog.meta["official_split"].astype("string").fillna("").to_numpy()
    test = np.flatnonzero(official == "test")
    val = np.flatnonzero(official == "val")
    train = np.flatnonzero(official == "train")
    if len(val) == 0 and len(train):
        patients = catalog.meta["patient_id"].to_numpy()[train]
        inner = patient_split(patients, catalog.labels[train], (1.0 - val_share, val_share, 0.0), seed)
        train, val = np.sort(train[inner.train]), np.sort(train[inner.val])
    return Split(train, val, test)


def official_test_list(root: str) -> list[str] | None:
    """The image names of `test_list.txt` in a root directory or `s3://` prefix (None without one)."""
    if not root.startswith("s3://"):
        path = Path(root) / TEST_LIST
        return read_split_list(path) if path.is_file() else None
    bucket, prefix = split_s3_uri(root)
    client = s3_client()
    try:
        body = client.get_object(Bucket=bucket, Key=prefix + TEST_LIST)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return [line.strip() for line in body.decode("utf-8").splitlines() if line.strip()]
