"""MIMIC-CXR-JPG 2.0.0 / 2.1.0, read from its published CSVs (plain or gzipped) beside `files/`.

- `mimic-cxr-2.0.0-metadata.csv.gz`: one row per image (`dicom_id`, `subject_id`, `study_id`,
  `ViewPosition`, ...); images lie at `files/p{first 2 digits of subject_id}/p{subject_id}/s{study_id}/
  {dicom_id}.jpg`.
- `mimic-cxr-2.0.0-chexpert.csv.gz` or `-negbio.csv.gz`: one row per study, in the CheXpert labeller's
  encoding; every image of a study takes the study's labels. Images of a study without a label row are kept
  with NaN labels (nothing known about them), so the table still lists every image.
- `mimic-cxr-2.0.0-split.csv.gz`: one row per image, `split` in train / validate / test (patient-disjoint).

2.1.0 keeps the 2.0.0 file names. MIMIC-CXR-JPG carries no sex or age (they are in MIMIC-IV).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr.data.datasets import DatasetError, LabelPolicy
from cxr.data.datasets.chexpert import LABELLER_COLUMNS, labeller_labels
from cxr.data.datasets.tables import has_columns, image_table, read_columns, upper_or_missing

NAME = "mimic"

FILE_PREFIX = "mimic-cxr-2.0.0-"
LABELLERS = ("chexpert", "negbio")
STUDY_KEY = ["subject_id", "study_id"]
IMAGE_COLUMNS = {"dicom_id": "str", "subject_id": "int64", "study_id": "int64", "ViewPosition": "str"}
SPLITS = {"train": "train", "validate": "val", "test": "test"}


def csv_file(root: Path, stem: str) -> Path:
    """`mimic-cxr-2.0.0-{stem}.csv.gz` (or `.csv`) in root."""
    for suffix in (".csv.gz", ".csv"):
        path = root / f"{FILE_PREFIX}{stem}{suffix}"
        if path.is_file():
            return path
    raise DatasetError(f"{root} has no {FILE_PREFIX}{stem}.csv.gz (or .csv)")


def detect(root: str | Path) -> bool:
    """Whether `root` holds `files/` and MIMIC-CXR-JPG's metadata CSV with its header."""
    root = Path(root)
    try:
        metadata = csv_file(root, "metadata")
    except DatasetError:
        return False
    return (root / "files").is_dir() and has_columns(metadata, tuple(IMAGE_COLUMNS))


def read(
    root: str | Path, policy: LabelPolicy | None = None, *, labeller: str = "chexpert"
) -> tuple[pd.DataFrame, np.ndarray]:
    """Every image of the metadata CSV as (table with `TABLE_COLUMNS`, N×14 labels), labels from the
    `labeller` CSV ("chexpert" or "negbio") joined per study, official split from the split CSV.
    `policy` defaults to `LabelPolicy()`."""
    policy = policy or LabelPolicy()
    if labeller not in LABELLERS:
        raise DatasetError(f"unknown MIMIC-CXR labeller {labeller!r}; expected one of {', '.join(LABELLERS)}")
    root = Path(root)
    labels_file = csv_file(root, labeller)
    images = _read_images(csv_file(root, "metadata"))
    images = _with_split(_with_labels(images, labels_file), csv_file(root, "split"))
    labels = labeller_labels(images, policy, source=labels_file)
    labels[~images["_labelled"].to_numpy()] = np.nan
    subject = images["subject_id"].astype("str")
    study = images["study_id"].astype("str")
    table = image_table(
        len(images),
        image_id=image_path(subject, study, images["dicom_id"]),
        patient_id=subject,
        study_id=study,
        view=upper_or_missing(images["ViewPosition"]),
        official_split=images["split"].map(SPLITS),
    )
    return table, labels


def image_path(subject: pd.Series, study: pd.Series, dicom: pd.Series) -> pd.Series:
    """`files/p{first 2 digits of subject}/p{subject}/s{study}/{dicom}.jpg`, relative to the root."""
    return "files/p" + subject.str[:2] + "/p" + subject + "/s" + study + "/" + dicom + ".jpg"


def _read_images(path: Path) -> pd.DataFrame:
    images = read_columns(path, IMAGE_COLUMNS)
    images["dicom_id"] = images["dicom_id"].str.strip()
    absent = images["dicom_id"].isna() | (images["dicom_id"] == "")
    if absent.any():
        raise DatasetError(f"{path}: {absent.sum()} rows have no dicom_id")
    duplicated = images["dicom_id"].duplicated()
    if duplicated.any():
        raise DatasetError(
            f"{path} lists images more than once, e.g. {images.loc[duplicated, 'dicom_id'].head(3).tolist()}"
        )
    return images


def _with_labels(images: pd.DataFrame, path: Path) -> pd.DataFrame:
    studies = read_columns(
        path, {"subject_id": "int64", "study_id": "int64"} | dict.fromkeys(LABELLER_COLUMNS, "float64")
    )
    try:
        joined = images.merge(
            studies, how="left", on=STUDY_KEY, validate="many_to_one", indicator="_labelled"
        )
    except pd.errors.MergeError as error:
        raise DatasetError(f"{path} lists a study more than once: {error}") from error
    joined["_labelled"] = joined["_labelled"] == "both"
    return joined


def _with_split(images: pd.DataFrame, path: Path) -> pd.DataFrame:
    splits = read_columns(path, {"dicom_id": "str", "split": "str"})
    splits["dicom_id"] = splits["dicom_id"].str.strip()
    splits["split"] = splits["split"].str.strip().str.lower()
    unknown = sorted(set(splits["split"].dropna()) - set(SPLITS))
    if unknown:
        raise DatasetError(f"{path}: unknown split values {unknown}; expected {', '.join(SPLITS)}")
    try:
        return images.merge(splits, how="left", on="dicom_id", validate="many_to_one")
    except pd.errors.MergeError as error:
        raise DatasetError(f"{path} lists an image more than once: {error}") from error
