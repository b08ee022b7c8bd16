"""PadChest (BIMCV, Hospital San Juan, Alicante): 160k images, labels from the Spanish reports.

Layout: `<root>/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv` (or `.csv.gz`) and the 16-bit PNGs,
either flat (`<root>/<ImageID>`) or in one folder per zip (`<root>/<ImageDir>/<ImageID>`). `image_id` is
the path of the file that exists, flat first; an image found in neither place keeps the flat path, so the
catalog reports it missing. The CSV was written with its pandas index as a leading unnamed column.

Labels: `Labels` is a Python-list string (`"['pleural effusion', ' cardiomegaly']"`) of terms from the
PadChest label tree (`manual_review/trees_code.txt` in the authors' repository). Items are stripped and
lower-cased; a blank cell or one that is not a list of strings drops the row (counted in a log line);
`['']` is an empty list, a row with none of the 14 findings. A finding is 1 when one of its exact terms in
`TERMS` is in the list, else 0: PadChest labels all 14, and the policy has nothing to decide (no
uncertain labels, no blank cells per finding). Exact terms, not substrings: `pseudonodule` (nipple
shadow, end-on vessel) is no Nodule, `subcutaneous emphysema` (air in the soft tissues) no Emphysema,
`pericardial effusion` no Effusion.

How `TERMS` was chosen: a finding takes its own tree node and the node's descendants, except
- Infiltration: `infiltrates` with the interstitial and alveolar patterns below it, but not
  `consolidation` and its `air bronchogram`, which are Consolidation only (NIH labels Consolidation
  apart from Infiltration, from the report's own words);
- Mass: a mass of the lung only: `pulmonary mass`, and the plain `mass` (its children say where a mass
  lies when it is not the lung); mediastinal, breast, pleural and soft-tissue masses are left out;
- Effusion: all of `pleural effusion`'s children are pleural fluid (`hydropneumothorax` is also a
  Pneumothorax); Fibrosis: `pulmonary fibrosis` with `post radiotherapy changes` and `asbestosis signs`
  below it, not the linear scar `fibrotic band`; Pleural_Thickening: not `pleural plaques` (a node of its
  own); Emphysema: not `COPD signs`, `bullas` or `hyperinflated lung` (related, not the finding).

View (`Projection`): PA, AP, `AP_horizontal` → "AP SUPINE" (an AP film of a lying patient: frontal, first
word AP), L → LATERAL, `UNK` → missing, others (`COSTAL`, `EXCLUDE`) upper-cased as they are. Age: the
study's year (`StudyDate_DICOM`) minus `PatientBirth` (a year). No official split.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.data.datasets import DatasetError, LabelPolicy
from cxr.data.datasets.tables import (
    find_columns,
    header,
    image_table,
    read_csv,
    sexes,
    upper_or_missing,
    years,
)
from cxr.data.findings import FINDINGS, NUM_FINDINGS

log = logging.getLogger(__name__)

NAME = "padchest"
CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
CSV_NAMES = (CSV_NAME, CSV_NAME + ".gz")
COLUMNS = (
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "StudyID",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "Projection",
    "Labels",
)

TERMS: dict[str, tuple[str, ...]] = {
    "Atelectasis": (
        "atelectasis",
        "total atelectasis",
        "lobar atelectasis",
        "segmental atelectasis",
        "laminar atelectasis",
        "round atelectasis",
        "atelectasis basal",
    ),
    "Cardiomegaly": ("cardiomegaly",),
    "Effusion": (
        "pleural effusion",
        "loculated pleural effusion",
        "loculated fissural effusion",
        "hydropneumothorax",
        "empyema",
        "hemothorax",
    ),
    "Infiltration": (
        "infiltrates",
        "interstitial pattern",
        "ground glass pattern",
        "reticular interstitial pattern",
        "reticulonodular interstitial pattern",
        "miliary opacities",
        "alveolar pattern",
    ),
    "Mass": ("mass", "pulmonary mass"),
    "Nodule": ("nodule", "multiple nodules"),
    "Pneumonia": ("pneumonia", "atypical pneumonia", "viral pneumonia"),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "Consolidation": ("consolidation", "air bronchogram"),
    "Edema": ("pulmonary edema",),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("pulmonary fibrosis", "post radiotherapy changes", "asbestosis signs"),
    "Pleural_Thickening": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening"),
    "Hernia": ("hiatal hernia",),
}
"""Each NIH finding's exact PadChest terms (lower case); see the module docstring for the choices."""

VIEWS = {"AP_HORIZONTAL": "AP SUPINE", "L": "LATERAL"}
UNKNOWN_VIEWS = ("UNK",)


def metadata_file(root: Path) -> Path | None:
    """The PadChest CSV in `root` (plain or gzipped), or None."""
    return next((root / name for name in CSV_NAMES if (root / name).is_file()), None)


def detect(root: Path) -> bool:
    """Whether `root` holds the PadChest CSV."""
    return metadata_file(Path(root)) is not None


def read(root: Path, policy: LabelPolicy | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """The PadChest table and its N×14 labels (every finding labelled; `policy` has nothing to decide)."""
    root = Path(root)
    path = metadata_file(root)
    if path is None:
        raise DatasetError(f"{root} holds no PadChest metadata: expected {' or '.join(CSV_NAMES)}")
    names = find_columns(header(path), COLUMNS, path)
    raw = read_csv(path, usecols=list(names.values()), dtype=str, keep_default_na=False, na_values=[""])
    raw = raw.rename(columns={column: name for name, column in names.items()})
    raw = _unique_images(raw, path)
    terms = parse_labels(raw["Labels"])
    usable = (terms.notna() & raw["ImageID"].notna()).to_numpy()
    if not usable.all():
        blank = int(raw["Labels"].isna().sum())
        log.warning(
            "%s: %d rows dropped: Labels blank (%d), not a list of terms (%d) or no ImageID",
            path,
            int((~usable).sum()),
            blank,
            int(terms.isna().sum()) - blank,
        )
    raw, terms = raw[usable].reset_index(drop=True), terms[usable].reset_index(drop=True)
    study_year = pd.to_numeric(raw["StudyDate_DICOM"].str.strip().str[:4], errors="coerce")
    table = image_table(
        len(raw),
        image_id=_image_paths(root, raw["ImageID"].str.strip(), raw["ImageDir"]),
        patient_id=raw["PatientID"].str.strip(),
        study_id=raw["StudyID"].str.strip(),
        view=_views(raw["Projection"]),
        age=years(study_year - pd.to_numeric(raw["PatientBirth"], errors="coerce"), str(path)),
        sex=sexes(raw["PatientSex_DICOM"]),
    )
    return table, encode_terms(terms)


def parse_labels(cells: pd.Series) -> pd.Series:
    """Each `Labels` cell as a tuple of stripped, lower-cased, non-blank terms; None where the cell is blank
    or not a list of strings. Each distinct cell is parsed once."""
    codes, distinct = pd.factorize(cells)
    parsed = pd.Series([*(_terms(text) for text in distinct), None], dtype=object).to_numpy()
    return pd.Series(parsed[codes], index=cells.index, dtype=object)  # a blank cell's code, -1: the None


def _terms(text: str) -> tuple[str, ...] | None:
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        return None
    return tuple(term for term in (item.strip().lower() for item in value) if term)


def encode_terms(terms: pd.Series) -> np.ndarray:
    """An N×14 float32 array: 1 where a row's terms include one of the finding's `TERMS`, else 0."""
    pairs = pd.DataFrame(
        [(term, FINDINGS.index(finding)) for finding, names in TERMS.items() for term in names],
        columns=["term", "finding"],
    )
    exploded = terms.reset_index(drop=True).explode().rename("term").rename_axis("row").reset_index()
    hits = exploded.merge(pairs, on="term")
    labels = np.zeros((len(terms), NUM_FINDINGS), dtype=np.float32)
    labels[hits["row"].to_numpy(dtype=np.int64), hits["finding"].to_numpy(dtype=np.int64)] = 1.0
    return labels


def _unique_images(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    repeated = raw["ImageID"].duplicated()
    if repeated.any():
        log.warning("%s: %d rows repeat an ImageID; the first of each is kept", path, int(repeated.sum()))
        raw = raw[~repeated].reset_index(drop=True)
    return raw


def _image_paths(root: Path, image_ids: pd.Series, folders: pd.Series) -> pd.Series:
    """Each image's path relative to `root`: flat if that file exists, else in its `ImageDir` folder if that
    one exists, else flat (missing)."""
    present = _files_two_levels(root)
    folder = folders.astype("string").str.strip().str.replace(r"\.0+$", "", regex=True)  # "12.0": 12
    nested = folder + "/" + image_ids
    use_nested = ~image_ids.isin(present) & nested.isin(present).fillna(False).astype(bool)
    return image_ids.where(~use_nested, nested)


def _files_two_levels(root: Path) -> set[str]:
    """Relative POSIX paths of the files in `root` and in its immediate folders: one listing per folder."""
    present: set[str] = set()
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_file():
                present.add(entry.name)
            elif entry.is_dir():
                with os.scandir(entry.path) as inner:
                    present.update(f"{entry.name}/{item.name}" for item in inner if item.is_file())
    return present


def _views(projection: pd.Series) -> pd.Series:
    views = upper_or_missing(projection)
    views = views.replace(VIEWS)
    return views.where(~views.isin(UNKNOWN_VIEWS))
