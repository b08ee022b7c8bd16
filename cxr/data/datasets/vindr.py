"""VinDr-CXR (PhysioNet `vindr-cxr` 1.0.0): 18,000 PA radiographs from two Vietnamese hospitals.

Layout: `<root>/annotations/image_labels_train.csv` and `image_labels_test.csv`, the DICOMs in
`<root>/train/<image_id>.dicom` and `<root>/test/<image_id>.dicom`. Either split alone is read (the other
is logged as absent); `official_split` is "train" or "test".

Train has one row per (image, radiologist), three readers per image (`rad_id`, spelt `rad_ID` in some
copies); an image's finding is positive under `readers="majority"` when more than half of its rows mark
it (2 of 3), or under `readers="any"` when one does. A blank cell counts as not marked. Test has one row
per image, already the consensus of five radiologists, which the same rule keeps as it is. Columns are
found by name, in any case; `Other disease` (test) and `Other diseases` (train) are not used.

Mapping to NIH: Atelectasis, Cardiomegaly, Effusion ← `Pleural effusion`, Infiltration, Pneumonia,
Pneumothorax, Consolidation, Edema, Emphysema, Fibrosis ← `Pulmonary fibrosis`, Pleural_Thickening ←
`Pleural thickening`. VinDr has one `Nodule/Mass` label: negative, both Mass and Nodule are 0; positive,
both are NaN, as which of the two it is is not known. Hernia is not labelled (NaN). Other VinDr labels
(Lung Opacity, ILD, COPD, Lung tumor, ...) have no NIH finding of the same meaning and are not used. The
labels are 0/1 with no uncertain or blank cells, so the label policy has nothing to decide.

No patient ids, sexes or ages are published: `patient_id` is the image id (so a patient-grouped split
cannot keep one patient's images together), study id, sex and age are missing. Every image is PA.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.data.datasets import DatasetError, LabelPolicy
from cxr.data.datasets.tables import find_columns, header, image_table, read_csv
from cxr.data.findings import FINDINGS, NUM_FINDINGS

log = logging.getLogger(__name__)

NAME = "vindr"
SPLITS = ("train", "test")
LABEL_FILES = {split: Path("annotations") / f"image_labels_{split}.csv" for split in SPLITS}
IMAGE_SUFFIX = ".dicom"
READER_RULES = ("majority", "any")
JOINT_NODULE_MASS = "Nodule/Mass"

COLUMN_FINDINGS = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural effusion": "Effusion",
    "Infiltration": "Infiltration",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Emphysema": "Emphysema",
    "Pulmonary fibrosis": "Fibrosis",
    "Pleural thickening": "Pleural_Thickening",
}
"""VinDr label column → NIH finding, for the findings with one label each."""


def detect(root: Path) -> bool:
    """Whether `root` holds a VinDr-CXR image-label file (train or test)."""
    return any((Path(root) / path).is_file() for path in LABEL_FILES.values())


def read(
    root: Path, policy: LabelPolicy | None = None, readers: str = "majority"
) -> tuple[pd.DataFrame, np.ndarray]:
    """The VinDr-CXR table and its N×14 labels; `readers` ("majority" or "any") makes train's consensus."""
    if readers not in READER_RULES:
        raise ValueError(f"readers must be one of {READER_RULES}, not {readers!r}")
    root = Path(root)
    present = [split for split in SPLITS if (root / LABEL_FILES[split]).is_file()]
    if not present:
        expected = " and ".join(str(root / path) for path in LABEL_FILES.values())
        raise DatasetError(f"{root} holds no VinDr-CXR labels: expected {expected}")
    for split in set(SPLITS) - set(present):
        log.warning("%s: no %s; its %s split is left out", root, LABEL_FILES[split], split)
    parts = [_read_split(root / LABEL_FILES[split], readers) for split in present]
    image_ids = pd.concat([ids for ids, _ in parts], ignore_index=True)
    splits = np.repeat(present, [len(ids) for ids, _ in parts]).astype(object)
    paths = pd.Series(splits, dtype=object) + "/" + image_ids + IMAGE_SUFFIX
    table = image_table(
        len(image_ids), image_id=paths, patient_id=image_ids, view="PA", official_split=splits
    )
    return table, np.concatenate([labels for _, labels in parts])


def _read_split(path: Path, readers: str) -> tuple[pd.Series, np.ndarray]:
    """One label file's image ids and labels, one row per image: its rows (one per reader in train, the
    one consensus row in test) combined by the `readers` rule."""
    wanted = ["image_id", *COLUMN_FINDINGS, JOINT_NODULE_MASS]
    names = find_columns(header(path), wanted, path)
    raw = read_csv(path, usecols=list(names.values()), dtype={names["image_id"]: str})
    raw = raw.rename(columns={column: name for name, column in names.items()})
    marks = raw[wanted[1:]].apply(pd.to_numeric, errors="coerce").fillna(0.0) > 0
    marks.insert(0, "image_id", raw["image_id"].str.strip())
    marks = marks[marks["image_id"].fillna("") != ""]
    positive = _consensus(marks, readers)
    return pd.Series(positive.index, dtype=object), _nih_labels(positive)


def _consensus(marks: pd.DataFrame, readers: str) -> pd.DataFrame:
    """Per image (in first-seen order), whether the rule holds for each label over its rows' marks: more
    than half of them ("majority"), or one ("any"). One row (test's consensus) decides alone."""
    grouped = marks.groupby("image_id", sort=False)
    votes = grouped.sum()
    if readers == "any":
        return votes > 0
    count = grouped.size()
    return votes.mul(2).gt(count, axis=0)


def _nih_labels(positive: pd.DataFrame) -> np.ndarray:
    """An N×14 float32 array from per-image VinDr labels (booleans, columns by VinDr name)."""
    labels = np.full((len(positive), NUM_FINDINGS), np.nan, dtype=np.float32)
    for column, finding in COLUMN_FINDINGS.items():
        labels[:, FINDINGS.index(finding)] = positive[column].to_numpy(dtype=np.float32)
    joint = np.where(positive[JOINT_NODULE_MASS].to_numpy(), np.nan, 0.0)
    labels[:, FINDINGS.index("Mass")] = labels[:, FINDINGS.index("Nodule")] = joint
    return labels
