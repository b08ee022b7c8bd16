"""External validation: a model scored on datasets it was not trained on, each read from its published
layout (`cxr.data.datasets`), at the thresholds chosen on its own validation set.

Each set (`evaluate.external` in the configuration) is a dataset root, optionally one part of the
dataset's published split (CheXpert's radiologist-labelled `val`, MIMIC's `test`...). Its images are
preprocessed into a shard cache like the training data and scored as the server would score them; the
report is `cxr.evaluate`'s, on the findings the dataset labels (per-finding AUROC with patient-level CIs,
prevalence, calibration, operating points), so a model's transfer reads like its own test results.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.data.cache import PreprocessSettings, ShardCache, build_cache
from cxr.data.catalog import Catalog, load_catalog
from cxr.data.datasets import ADAPTERS, LabelPolicy
from cxr.data.expert_labels import find_google2019, read_google2019
from cxr.data.findings import FINDINGS
from cxr.data.loader import ShardDataset
from cxr.evaluate import EvaluationReport, OperatingTarget, evaluate
from cxr.scoring import Predictor, score

ROWS = ("all", "train", "val", "test")


class ExternalSetError(ValueError):
    """An `evaluate.external` entry is malformed."""


@dataclass(frozen=True)
class ExternalSet:
    """One external test set: a name for reports and gates, a dataset root and which rows of it."""

    name: str
    root: str
    dataset: str | None = None  # None: recognised from the files the root holds
    rows: str = "all"  # all, or one part of the dataset's published split
    uncertain: str = "ignore"
    unmentioned: str = "negative"
    views: str = "frontal"
    options: dict[str, Any] | None = None  # for the adapter's `read`, e.g. VinDr's {readers: any}

    def catalog(self) -> Catalog:
        """The set's images and labels."""
        policy = LabelPolicy(self.uncertain, self.unmentioned)
        catalog, report = load_catalog(
            self.root, dataset=self.dataset, policy=policy, views=self.views, options=self.options
        )
        print(f"external set {self.name}: {report.summary()}")
        if self.rows == "all":
            return catalog
        official = catalog.meta.get("official_split")
        if official is None:
            raise ExternalSetError(
                f"external set {self.name}: {self.root} publishes no split to take {self.rows}"
            )
        chosen = np.flatnonzero((official == self.rows).to_numpy())
        if not len(chosen):
            raise ExternalSetError(f"external set {self.name}: no {self.rows} images in {self.root}")
        return catalog.subset(chosen)


def parse_external_sets(setting: Any) -> list[ExternalSet]:
    """`evaluate.external` from configuration: a list of `{name, root, dataset?, rows?, uncertain?,
    unmentioned?, views?, options?}`; names are unique identifiers."""
    if not setting:
        return []
    if not isinstance(setting, list):
        raise ExternalSetError("evaluate.external is a list of {name, root, ...}")
    sets, fields = [], set(ExternalSet.__dataclass_fields__)
    for entry in setting:
        if not isinstance(entry, dict) or not {"name", "root"} <= set(entry) or set(entry) - fields:
            raise ExternalSetError(
                f"an external set needs name and root, and only {sorted(fields)}: {entry!r}"
            )
        if not isinstance(entry.get("options") or {}, dict):
            raise ExternalSetError(f"external set {entry['name']}: options map adapter arguments to values")
        values: dict[str, Any] = {
            k: v if k == "options" else str(v) for k, v in entry.items() if v is not None
        }
        spec = ExternalSet(**values)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,39}", spec.name):
            raise ExternalSetError(f"external set name {spec.name!r}: letters, digits, _ . -")
        if spec.rows not in ROWS or (spec.dataset is not None and spec.dataset not in ("nih", *ADAPTERS)):
            raise ExternalSetError(
                f"external set {spec.name}: rows is one of {ROWS}; dataset nih or {ADAPTERS}"
            )
        LabelPolicy(spec.uncertain, spec.unmentioned)  # refused here, before any work
        sets.append(spec)
    if len({s.name for s in sets}) < len(sets):
        raise ExternalSetError("external set names must be unique")
    return sets


def validate_external(
    predictor: Predictor,
    spec: ExternalSet,
    settings: PreprocessSettings,
    crop: int,
    cache_root: str | Path | None = None,
    thresholds: np.ndarray | None = None,
    targets: list[OperatingTarget] | None = None,
    target_thresholds: dict[str, np.ndarray] | None = None,
    n_boot: int = 500,
) -> tuple[EvaluationReport, ShardCache]:
    """Preprocess one external set, score it with `predictor` and evaluate it at the given thresholds
    (the model's own, from its validation set)."""
    cache = build_cache(spec.catalog(), settings, root=cache_root)
    dataset = ShardDataset(cache, np.arange(len(cache)), crop=crop)
    probs = score(predictor, dataset, f"external {spec.name}").probabilities
    report = evaluate(cache.labels, probs, cache.meta, thresholds, n_boot, targets=targets or (),
                      target_thresholds=target_thresholds)  # fmt: skip
    return report, cache


def external_summary(spec: ExternalSet, report: EvaluationReport) -> dict[str, Any]:
    """What a run records of one external set: the set, its labelled findings' prevalence, and the report."""
    table = report.per_class
    labelled = table.index[table["n_labelled"] > 0].tolist()
    prevalence = {f: float(table.loc[f, "n_pos"] / table.loc[f, "n_labelled"]) for f in labelled}
    return {
        "set": asdict(spec),
        "labelled_findings": [f for f in FINDINGS if f in labelled],
        "prevalence": prevalence,
        **report.to_dict(),
    }


def expert_validation(
    root: str, meta: pd.DataFrame, probs: np.ndarray, thresholds: np.ndarray | None = None, n_boot: int = 500
) -> dict[str, Any] | None:
    """The test images that radiologists adjudicated (NIH's Google 2019 labels, when the file is beside the
    root's metadata) evaluated against the experts: Pneumothorax, and Nodule or mass and Airspace opacity
    as joint findings. None without the file; `n_images` 0 when no test image is among its 4,376."""
    path = find_google2019(root)
    if path is None:
        return None
    expert = read_google2019(path)
    rows = pd.Index(expert.table["image_id"]).get_indexer(meta["image_id"])
    chosen = np.flatnonzero(rows >= 0)
    summary: dict[str, Any] = {"file": str(path), "n_images": len(chosen)}
    if not len(chosen):
        return summary
    joint = expert.joint.iloc[rows[chosen]].reset_index(drop=True)
    tested = meta.iloc[chosen].reset_index(drop=True)
    report = evaluate(expert.labels[rows[chosen]], probs[chosen], tested, thresholds, n_boot, joint=joint)
    return {**summary, **report.to_dict()}
