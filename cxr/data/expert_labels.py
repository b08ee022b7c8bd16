"""NIH ChestX-ray14's radiologist-adjudicated labels (Google Health, 2019: Majkowska et al., Radiology).

4,376 images of NIH's own validation and test sets (`Set Id`), each read by three radiologists with
adjudication, for four findings as YES/NO: Pneumothorax, Nodule or mass, Airspace opacity and Fracture,
beside the NIH metadata columns. They are a reference for evaluation, against the 14 text-mined labels:
- Pneumothorax is one of the 14 and is compared directly;
- Nodule or mass and Airspace opacity name several of the 14 at once (`JOINT_FINDINGS`), so a model is
  scored on them by its highest member probability;
- Fracture is none of the 14, and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from cxr.data.findings import FINDINGS, JOINT_FINDINGS
from cxr.data.metadata import MetadataError, read_metadata

GOOGLE2019_NAME = "google2019_nih-chest-xray-labels.csv.gz"
DIRECT = ("Pneumothorax",)  # expert findings that are one of the 14
JOINT = ("Nodule or mass", "Airspace opacity")  # expert findings that name several (see JOINT_FINDINGS)
SET_COLUMN = "Set Id"


@dataclass
class ExpertLabels:
    """The images' NIH table (plus `set`), their expert labels as N×14 (NaN but the direct findings), and
    the joint findings' labels (N×J, columns `JOINT`)."""

    table: pd.DataFrame
    labels: np.ndarray
    joint: pd.DataFrame


def find_google2019(root: str | Path) -> Path | None:
    """The adjudicated labels file beside an NIH root's metadata (local roots), or None."""
    path = Path(str(root)) / GOOGLE2019_NAME
    return path if not str(root).startswith("s3://") and path.is_file() else None


def is_google2019(path: str | Path) -> bool:
    """Whether a CSV file has the Google 2019 labels' columns."""
    try:
        header = pd.read_csv(path, nrows=0).columns
    except (OSError, ValueError, EOFError):
        return False
    return {SET_COLUMN, *DIRECT, *JOINT} <= set(header)


def read_google2019(path: str | Path | IO[bytes]) -> ExpertLabels:
    """Read the adjudicated labels file (YES/NO cells) into `ExpertLabels`."""
    table, _ = read_metadata(path)  # the NIH columns, checked as for Data_Entry
    raw = pd.read_csv(path, usecols=["Image Index", SET_COLUMN, *DIRECT, *JOINT], dtype=str)
    values = {}
    for column in (*DIRECT, *JOINT):
        cells = raw[column].str.strip().str.upper()
        unknown = ~cells.isin(["YES", "NO"])
        if unknown.any():
            raise MetadataError(f"{path}: {column} holds {cells[unknown].iloc[0]!r}, not YES or NO")
        values[column] = (cells == "YES").to_numpy(dtype=np.float32)
    labels = np.full((len(table), len(FINDINGS)), np.nan, dtype=np.float32)
    for name in DIRECT:
        labels[:, FINDINGS.index(name)] = values[name]
    joint = pd.DataFrame({name: values[name] for name in JOINT if name in JOINT_FINDINGS})
    return ExpertLabels(table.assign(set=raw[SET_COLUMN].str.strip().to_numpy()), labels, joint)
