"""RSNA Pneumonia Detection Challenge (stage 2): 26,684 labelled frontal radiographs.

Layout: `<root>/stage_2_train_labels.csv`, `<root>/stage_2_detailed_class_info.csv` and the DICOMs in
`<root>/stage_2_train_images/<patientId>.dcm`, one image per patient. The labels file has one row per
box (a patient with three boxes has three rows): Pneumonia is the patient's `Target` (1 for the "Lung
Opacity" class, the opacities that suggest pneumonia; the maximum over the rows). Every other finding is
NaN: "No Lung Opacity / Not Normal" says nothing of which other finding is there, so it is no negative for
them. Labels are 0/1, so the label policy has nothing to decide. The detailed class info, when present,
must agree (Lung Opacity exactly where Target is 1), which catches files of different stages.

View, sex and age come from each DICOM's header (`ViewPosition`, `PatientSex`, `PatientAge`), read with
pydicom up to those tags only (`specific_tags`, `stop_before_pixels`) by a few threads: 0.2 to 0.4 s per
1,000 files from a warm page cache, whatever the pixel data's size, so 5 to 10 s for the 26,684 images (a
cold disk adds its seeks, which the threads overlap). A missing file leaves them missing, and the catalog
reports the image missing. RSNA writes ages as plain numbers ("51"); DICOM Age Strings ("051Y", "006M")
are read too, and ages over 120 (the release has a few, up to 155) are missing.

Split: all "train"; the stage 2 test images have no public labels and are not read.

RSNA's images are a subset of NIH ChestX-ray14, relabelled by radiologists: it is not an independent
external test set for a model trained on NIH, and any image that is also in NIH's training data leaks.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
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
    unlabelled,
    upper_or_missing,
    years,
)
from cxr.data.findings import FINDINGS

log = logging.getLogger(__name__)

NAME = "rsna"
LABELS_FILE = "stage_2_train_labels.csv"
CLASS_FILE = "stage_2_detailed_class_info.csv"
IMAGE_FOLDER = "stage_2_train_images"
IMAGE_SUFFIX = ".dcm"
OPACITY_CLASS = "Lung Opacity"
HEADER_TAGS = ("ViewPosition", "PatientSex", "PatientAge")
HEADER_THREADS = 8
AGE_UNITS = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}  # DICOM Age String: nnnD, nnnW, nnnM, nnnY
AGE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([DWMYdwmy]?)\s*$")


def detect(root: Path) -> bool:
    """Whether `root` holds the RSNA stage 2 training labels."""
    return (Path(root) / LABELS_FILE).is_file()


def read(root: Path, policy: LabelPolicy | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """The RSNA table (one row per patient) and its N×14 labels (Pneumonia only; the rest NaN)."""
    root = Path(root)
    targets = _targets(root / LABELS_FILE)
    if (root / CLASS_FILE).is_file():
        _check_classes(root / CLASS_FILE, targets)
    else:
        log.warning("%s: no %s to check the labels against", root, CLASS_FILE)
    patients = pd.Series(targets.index, dtype=object)
    paths = IMAGE_FOLDER + "/" + patients + IMAGE_SUFFIX
    headers = read_headers([root / path for path in paths])
    table = image_table(
        len(patients),
        image_id=paths,
        patient_id=patients,
        view=upper_or_missing(headers["ViewPosition"]),
        age=years(ages_in_years(headers["PatientAge"]), str(root / IMAGE_FOLDER)),
        sex=sexes(headers["PatientSex"]),
        official_split="train",
    )
    labels = unlabelled(len(patients))
    labels[:, FINDINGS.index("Pneumonia")] = targets.to_numpy(dtype=np.float32)
    return table, labels


def _targets(path: Path) -> pd.Series:
    """Each patient's Target (the largest of its rows), by patientId in first-seen order."""
    if not path.is_file():
        raise DatasetError(f"{path} not found: the RSNA stage 2 training labels")
    names = find_columns(header(path), ["patientId", "Target"], path)
    raw = read_csv(path, usecols=list(names.values()), dtype={names["patientId"]: str})
    patients = raw[names["patientId"]].str.strip()
    target = pd.to_numeric(raw[names["Target"]], errors="coerce")
    if target.isna().any() or not target.isin([0, 1]).all():
        bad = raw.loc[target.isna() | ~target.isin([0, 1]), names["Target"]].head(3).tolist()
        raise DatasetError(f"{path}: Target must be 0 or 1, found {bad}")
    return target.groupby(patients, sort=False).max().astype(np.int64)


def _check_classes(path: Path, targets: pd.Series) -> None:
    """DatasetError unless the detailed class info says Lung Opacity exactly where Target is 1."""
    names = find_columns(header(path), ["patientId", "class"], path)
    raw = read_csv(path, usecols=list(names.values()), dtype=str)
    opacity = (
        raw[names["class"]].str.strip().eq(OPACITY_CLASS).groupby(raw[names["patientId"]].str.strip()).max()
    )
    both = opacity.index.intersection(targets.index)
    disagree = both[opacity[both].to_numpy() != targets[both].astype(bool).to_numpy()]
    if len(disagree):
        raise DatasetError(
            f"{path} disagrees with {LABELS_FILE} (Lung Opacity where Target is not 1, or the reverse) "
            f"for {len(disagree):,} patients, e.g. {list(disagree[:3])}: are both from stage 2?"
        )


def read_headers(paths: list[Path]) -> pd.DataFrame:
    """`HEADER_TAGS` of each DICOM file as text (missing where the file or the tag is), one row per path;
    only those tags are parsed, and no pixel data is read. Files are read by a few threads, so a cold or
    network disk's latencies overlap."""
    with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
        values = list(pool.map(_header_tags, paths))
    unreadable = sum(row is None for row in values)
    if unreadable:
        log.warning("%d DICOM files have unreadable headers: their view, sex and age are missing", unreadable)
    empty = (None,) * len(HEADER_TAGS)
    return pd.DataFrame(
        [empty if row is None else row for row in values], columns=list(HEADER_TAGS), dtype=object
    )


def _header_tags(path: Path) -> tuple[str | None, ...] | None:
    """One file's `HEADER_TAGS` (all None when the file is absent), or None when it is no readable DICOM."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    except FileNotFoundError:
        return (None,) * len(HEADER_TAGS)
    except Exception as error:  # pydicom raises many types on malformed files: the tags stay missing
        log.debug("%s: unreadable DICOM header (%s)", path, error)
        return None
    return tuple(_text(dataset.get(tag)) for tag in HEADER_TAGS)


def _text(value: object) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def ages_in_years(texts: pd.Series) -> pd.Series:
    """DICOM Age Strings (`043Y`, `006M`, `010D`) or plain numbers of years, in years (float, NaN when
    unreadable)."""
    parts = texts.astype("string").str.extract(AGE_PATTERN)
    units = parts[1].fillna("").str.upper().replace("", "Y").map(AGE_UNITS).astype(float)
    return pd.to_numeric(parts[0], errors="coerce") / units
