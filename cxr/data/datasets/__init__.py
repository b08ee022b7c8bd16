"""Public chest X-ray datasets beside NIH, each read from its published layout into one contract.

An adapter module (one per dataset) has:
- `NAME`: the dataset's short name (`chexpert`, `mimic`, `padchest`, `vindr`, `rsna`);
- `detect(root) -> bool`: whether a directory holds the dataset's published metadata files;
- `read(root, policy) -> (table, labels)`: the table has one row per image with `TABLE_COLUMNS`
  (`image_id` is the image file's path relative to `root`, POSIX separators), row-aligned with an N×14
  float32 array in the NIH finding order (`cxr.data.findings.FINDINGS`): 1 present, 0 absent, NaN where
  the dataset does not label the finding (or the policy masks an uncertain label).

Views are kept as the dataset names them, upper case (`PA`, `AP`, `LATERAL`, ...); the catalog keeps the
frontal ones by default. Rows are not deduplicated by patient: every image of every patient is kept.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

TABLE_COLUMNS = ("image_id", "patient_id", "study_id", "view", "age", "sex", "official_split")
"""image_id: str path relative to the root; patient_id, study_id: str (study_id may be missing);
view: str upper case or missing; age: Int64 years or missing; sex: "M", "F" or missing;
official_split: "train", "val" or "test" where the dataset publishes a split, else missing."""

ADAPTERS = ("chexpert", "mimic", "padchest", "vindr", "rsna")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
UNMENTIONED_POLICIES = ("negative", "ignore")


class DatasetError(ValueError):
    """A dataset root is missing files its layout needs, or they do not parse."""


@dataclass(frozen=True)
class LabelPolicy:
    """How labels that are neither a clear yes nor a clear no become training and evaluation targets.

    `uncertain`: CheXpert-style -1 ("uncertain") labels become NaN and are masked ("ignore", U-Ignore),
    0 ("zeros", U-Zeros) or 1 ("ones", U-Ones). `unmentioned`: a finding a labeller could have reported
    but whose cell is blank becomes 0 ("negative", what the labeller's silence means) or NaN ("ignore").
    Findings outside a dataset's vocabulary are always NaN.
    """

    uncertain: str = "ignore"
    unmentioned: str = "negative"

    def __post_init__(self) -> None:
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, not {self.uncertain!r}")
        if self.unmentioned not in UNMENTIONED_POLICIES:
            raise ValueError(f"unmentioned must be one of {UNMENTIONED_POLICIES}, not {self.unmentioned!r}")


def adapter(name: str) -> ModuleType:
    """The adapter module of a dataset by its short name."""
    if name not in ADAPTERS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(ADAPTERS)}")
    return importlib.import_module(f"cxr.data.datasets.{name}")


def detect(root: str | Path) -> str | None:
    """The short name of the dataset whose metadata files `root` holds, or None."""
    for name in ADAPTERS:
        if adapter(name).detect(Path(root)):
            return name
    return None
