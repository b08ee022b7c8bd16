"""Read NIH `Data_Entry_2017.csv` / `Data_Entry_2017_v2020.csv` (plain or .gz) into one table shape.

The table has one row per image with the columns of `COLUMNS`; its labels are an N×14 array row-aligned
with it (see `cxr.data.catalog.Catalog`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from cxr.data.findings import encode_findings

log = logging.getLogger(__name__)

METADATA_NAMES = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
)
COLUMNS = ("image_id", "finding_labels", "follow_up", "patient_id", "age", "sex", "view")
_RENAME = {
    "Image Index": "image_id",
    "Finding Labels": "finding_labels",
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
}
MAX_PLAUSIBLE_AGE = 120


class MetadataError(ValueError):
    """The metadata file is missing, unreadable or lacks required columns."""


def find_metadata_file(root: str | Path) -> Path:
    """Return the Data_Entry file inside an NIH root directory (v2020 preferred)."""
    root = Path(root)
    for name in METADATA_NAMES:
        if (root / name).is_file():
            return root / name
    raise MetadataError(f"no NIH metadata file in {root}; expected one of: {', '.join(METADATA_NAMES)}")


def read_metadata(path: str | Path | IO[bytes]) -> tuple[pd.DataFrame, np.ndarray]:
    """Parse a Data_Entry CSV into (table with `COLUMNS`, N×14 labels).

    Ages are integers in years; the 2017 file's impossible ages (over 120) become missing. Sex is "M"/"F",
    view is "PA"/"AP" as released.
    """
    try:
        raw = pd.read_csv(path, dtype={"Image Index": str, "Finding Labels": str})
    except (OSError, ValueError, EOFError) as error:
        raise MetadataError(f"cannot read NIH metadata {path}: {error}") from error
    missing = [name for name in _RENAME if name not in raw.columns]
    if missing:
        raise MetadataError(f"{path} is missing NIH columns: {', '.join(missing)}")
    table = raw[list(_RENAME)].rename(columns=_RENAME)
    table["age"] = _clean_ages(table["age"], path)
    table["patient_id"] = table["patient_id"].astype(np.int64)
    table["follow_up"] = table["follow_up"].astype(np.int64)
    table["sex"] = table["sex"].astype(str).str.strip().str.upper()
    table["view"] = table["view"].astype(str).str.strip().str.upper()
    if table["image_id"].duplicated().any():
        dupes = table.loc[table["image_id"].duplicated(), "image_id"].head(5).tolist()
        raise MetadataError(f"{path} lists images more than once, e.g. {dupes}")
    table = table.reset_index(drop=True)
    return table, encode_findings(table["finding_labels"])


def _clean_ages(ages: pd.Series, path: object) -> pd.Series:
    years = pd.to_numeric(ages.astype(str).str.rstrip("YyMmDd"), errors="coerce")
    implausible = years > MAX_PLAUSIBLE_AGE
    if implausible.any():
        log.warning(
            "%s: %d implausible ages (> %d) set to missing", path, implausible.sum(), MAX_PLAUSIBLE_AGE
        )
    return years.where(~implausible).astype("Int64")


def read_split_list(path: str | Path) -> list[str]:
    """Read an official `train_val_list.txt` / `test_list.txt`: one image file name per line."""
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]
