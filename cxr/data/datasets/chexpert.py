"""CheXpert v1.0 (full resolution or `CheXpert-v1.0-small`), read from its `train.csv` and `valid.csv`.

The root is the folder holding both CSVs, with the images under `train/` and `valid/`. `Path` names an image
as `CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg` (`CheXpert-v1.0/...` in the full
release, no prefix in some mirrors); the prefix is dropped so that `image_id` is relative to the root.

The CheXpert labeller's encoding (1.0 positive, 0.0 negative, -1.0 uncertain, blank not mentioned) is shared
with MIMIC-CXR's chexpert and negbio CSVs: `labeller_labels` maps it onto the NIH findings for both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr.data.datasets import DatasetError, LabelPolicy
from cxr.data.datasets.tables import (
    has_columns,
    image_table,
    read_columns,
    sexes,
    unlabelled,
    upper_or_missing,
    years,
)
from cxr.data.findings import FINDINGS, NO_FINDING

NAME = "chexpert"

NIH_FROM_OBSERVATION = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
}
"""CheXpert-labeller observations that are NIH findings. The other seven NIH findings are not labelled
(`Lung Lesion`, `Lung Opacity` and `Pleural Other` are broader than any one of them)."""
LABELLER_COLUMNS = (*NIH_FROM_OBSERVATION, NO_FINDING)
LABELLER_VALUES = (1.0, 0.0, -1.0)

SPLIT_FILES = {"train.csv": "train", "valid.csv": "val"}
IMAGE_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
PATH_PREFIX = r"^(?:\./)?CheXpert-v1\.0(?:-small)?/"
STUDY_IN_PATH = r"(?:^|/)(patient\d+)/(study\d+)/"
SEX = {"Male": "M", "Female": "F"}

_UNCERTAIN = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}
_UNMENTIONED = {"negative": 0.0, "ignore": np.nan}


def detect(root: str | Path) -> bool:
    """Whether `root` holds CheXpert's `train.csv` and `valid.csv` with CheXpert's header."""
    return all(has_columns(Path(root) / name, IMAGE_COLUMNS + LABELLER_COLUMNS) for name in SPLIT_FILES)


def read(root: str | Path, policy: LabelPolicy | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Both CSVs as (table with `TABLE_COLUMNS`, N×14 labels): train.csv rows are "train", valid.csv rows
    (the radiologist-labelled set) "val". `policy` defaults to `LabelPolicy()`."""
    policy = policy or LabelPolicy()
    parts = [_read_split(Path(root) / name, split, policy) for name, split in SPLIT_FILES.items()]
    table = pd.concat([part[0] for part in parts], ignore_index=True)
    duplicated = table["image_id"].duplicated()
    if duplicated.any():
        examples = table.loc[duplicated, "image_id"].head(3).tolist()
        raise DatasetError(f"{root}: images listed more than once, e.g. {examples}")
    return table, np.concatenate([part[1] for part in parts])


def labeller_labels(observations: pd.DataFrame, policy: LabelPolicy, source: object = "labels") -> np.ndarray:
    """Map CheXpert-labeller columns (`LABELLER_COLUMNS`, floats, blank as NaN) to N×14 NIH labels.

    1.0 → 1 and 0.0 → 0; -1.0 (uncertain) follows `policy.uncertain`, blank (not mentioned) follows
    `policy.unmentioned`. On a `No Finding` = 1.0 row the labeller saw nothing wrong, so its uncertain and
    blank findings become 0 whatever the policy (an explicit 1.0 stays 1). NIH findings outside
    `NIH_FROM_OBSERVATION` are NaN. `source` names the file in errors.
    """
    values = observations[list(NIH_FROM_OBSERVATION)].to_numpy(dtype=np.float64, na_value=np.nan)
    blank = np.isnan(values)
    uncertain = values == -1.0
    unknown = ~(blank | np.isin(values, LABELLER_VALUES))
    if unknown.any():
        columns = [name for name, bad in zip(NIH_FROM_OBSERVATION, unknown.any(axis=0), strict=True) if bad]
        raise DatasetError(
            f"{source}: {', '.join(columns)} hold values other than 1.0, 0.0, -1.0 or blank, "
            f"e.g. {values[unknown][:3].tolist()}"
        )
    mapped = values.copy()
    mapped[uncertain] = _UNCERTAIN[policy.uncertain]
    mapped[blank] = _UNMENTIONED[policy.unmentioned]
    no_finding = observations[NO_FINDING].to_numpy(dtype=np.float64, na_value=np.nan) == 1.0
    mapped[(blank | uncertain) & no_finding[:, None]] = 0.0
    labels = unlabelled(len(observations))
    labels[:, [FINDINGS.index(name) for name in NIH_FROM_OBSERVATION.values()]] = mapped
    return labels


def _read_split(path: Path, split: str, policy: LabelPolicy) -> tuple[pd.DataFrame, np.ndarray]:
    dtypes = {name: "str" for name in IMAGE_COLUMNS} | {name: "float64" for name in LABELLER_COLUMNS}
    frame = read_columns(path, dtypes)
    image_id = frame["Path"].str.strip().str.replace(PATH_PREFIX, "", regex=True)
    ids = image_id.str.extract(STUDY_IN_PATH)
    unparsed = ids[0].isna()
    if unparsed.any():
        examples = frame.loc[unparsed, "Path"].head(3).tolist()
        raise DatasetError(f"{path}: {unparsed.sum()} Path values name no patientN/studyN, e.g. {examples}")
    lateral = frame["Frontal/Lateral"].str.strip().str.lower() == "lateral"
    age = years(frame["Age"], str(path))
    table = image_table(
        len(frame),
        image_id=image_id,
        patient_id=ids[0],
        study_id=ids[0] + "/" + ids[1],
        view=upper_or_missing(frame["AP/PA"]).where(~lateral, "LATERAL"),
        age=age.mask(age == 0),
        sex=sexes(frame["Sex"].str.strip().map(SEX)),
        official_split=split,
    )
    return table, labeller_labels(frame, policy, source=path)
