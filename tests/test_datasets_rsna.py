"""RSNA Pneumonia (stage 2) adapter on a fixture in the Kaggle layout: `stage_2_train_labels.csv` with one
row per box (the first three rows are the release's own), `stage_2_detailed_class_info.csv` repeated to
match, the sample submission and a test image that are not read, and real NIH images as DICOMs in
`stage_2_train_images/<patientId>.dcm`: 8-bit MONOCHROME2, one JPEG Baseline, with the header tags the
adapter reads (ViewPosition, PatientSex, PatientAge)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr.data import datasets
from cxr.data.datasets import DatasetError, LabelPolicy, rsna
from cxr.data.findings import FINDINGS
from cxr.data.images import decode_xray

from .serving_support import dicom_dataset, saved

LABELS = """patientId,x,y,width,height,Target
0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0
00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1
00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1
00322d4d-1c29-4943-afc9-b6754be640eb,,,,,0
003d8fa0-6bf1-40ed-b54c-ac657f8495c5,,,,,0
00569f44-917d-4c86-a842-81832af98c30,,,,,0
"""
CLASSES = """patientId,class
0004cfab-14fd-4e49-80ba-63a80b6bddd6,No Lung Opacity / Not Normal
00436515-870c-4b36-a041-de91049b9ab4,Lung Opacity
00436515-870c-4b36-a041-de91049b9ab4,Lung Opacity
00322d4d-1c29-4943-afc9-b6754be640eb,Normal
003d8fa0-6bf1-40ed-b54c-ac657f8495c5,Normal
00569f44-917d-4c86-a842-81832af98c30,No Lung Opacity / Not Normal
"""
TEST_PATIENT = "000db696-cf54-4385-b10b-6b16fbb3f985"
# patient → (ViewPosition, PatientSex, PatientAge, how the file is written); None: the tag or file is absent
HEADERS = {
    "0004cfab-14fd-4e49-80ba-63a80b6bddd6": ("PA", "F", "51", "jpeg"),
    "00436515-870c-4b36-a041-de91049b9ab4": ("AP", "M", "48", "raw"),
    "00322d4d-1c29-4943-afc9-b6754be640eb": ("AP", "M", "155", "raw"),  # one of the release's impossible ages
    "003d8fa0-6bf1-40ed-b54c-ac657f8495c5": (None, None, None, None),  # not downloaded
    "00569f44-917d-4c86-a842-81832af98c30": ("PA", "F", None, "raw"),
}
PATIENTS = list(HEADERS)


def rsna_dicom(
    pixels: np.ndarray, patient: str, view: str | None, sex: str | None, age: str | None, jpeg: bool
):
    """An RSNA-like DICOM: 8-bit MONOCHROME2 CR, raw or JPEG Baseline, with its header tags."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

    ds = dicom_dataset(*pixels.shape, JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PatientID, ds.BodyPartExamined, ds.ConversionType = patient, "CHEST", "WSD"
    with warnings.catch_warnings():  # RSNA writes ages as plain numbers ("51"), not DICOM's "051Y"
        warnings.simplefilter("ignore")
        for keyword, value in (("ViewPosition", view), ("PatientSex", sex), ("PatientAge", age)):
            if value is not None:
                setattr(ds, keyword, value)
    if jpeg:
        ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        ds.PixelData = encapsulate([encoded.tobytes()])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.tobytes()
    return saved(ds)


def write_rsna(root: Path, nih_root: Path) -> dict[str, np.ndarray]:
    """The fixture in `root`; returns each written image's original pixels by patient id."""
    paths = sorted((nih_root / "images_001" / "images").glob("*.png"))
    pixels = {patient: decode_xray(path.read_bytes()) for patient, path in zip(HEADERS, paths, strict=False)}
    (root / rsna.LABELS_FILE).write_text(LABELS)
    (root / rsna.CLASS_FILE).write_text(CLASSES)
    (root / "stage_2_sample_submission.csv").write_text(f"patientId,PredictionString\n{TEST_PATIENT},\n")
    for folder in (rsna.IMAGE_FOLDER, "stage_2_test_images"):
        (root / folder).mkdir()
    for patient, (view, sex, age, kind) in HEADERS.items():
        if kind is not None:
            data = rsna_dicom(pixels[patient], patient, view, sex, age, jpeg=kind == "jpeg")
            (root / rsna.IMAGE_FOLDER / f"{patient}.dcm").write_bytes(data)
    test_image = rsna_dicom(pixels[PATIENTS[0]], TEST_PATIENT, "PA", "M", "30", jpeg=False)
    (root / "stage_2_test_images" / f"{TEST_PATIENT}.dcm").write_bytes(test_image)
    return pixels


@pytest.fixture(scope="module")
def rsna_root(nih_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("rsna")
    return root, write_rsna(root, nih_root)


def test_table_and_labels(rsna_root, caplog):
    root, _ = rsna_root
    with caplog.at_level(logging.WARNING):
        table, labels = rsna.read(root, LabelPolicy())
    assert list(table.columns) == list(datasets.TABLE_COLUMNS)
    assert table["patient_id"].tolist() == PATIENTS  # one row per patient, the two boxes' rows as one
    assert table["image_id"].tolist() == [f"stage_2_train_images/{p}.dcm" for p in PATIENTS]
    assert table["view"].tolist() == ["PA", "AP", "AP", None, "PA"]
    assert table["sex"].tolist() == ["F", "M", "M", None, "F"]
    assert str(table["age"].dtype) == "Int64"
    assert table["age"].tolist() == [51, 48, pd.NA, pd.NA, pd.NA]
    assert "1 implausible ages set to missing" in caplog.text
    assert table["official_split"].tolist() == ["train"] * 5
    assert table["study_id"].isna().all()
    expected = np.full((5, len(FINDINGS)), np.nan, dtype=np.float32)
    expected[:, FINDINGS.index("Pneumonia")] = [0, 1, 0, 0, 0]  # Not Normal is no negative for the rest
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == np.float32


def test_images_decode(rsna_root):
    root, pixels = rsna_root
    table, _ = rsna.read(root)
    for image_id, patient in zip(table["image_id"], table["patient_id"], strict=True):
        if HEADERS[patient][3] is None:
            assert not (root / image_id).exists()
            continue
        decoded = decode_xray((root / image_id).read_bytes())
        assert decoded.shape == (1024, 1024)
        error = np.abs(decoded.astype(int) - pixels[patient])
        if HEADERS[patient][3] == "raw":
            assert error.max() == 0
        else:
            assert error.mean() < 2 and error.max() < 32  # JPEG Baseline's loss at quality 95


def test_header_ages():
    ages = rsna.ages_in_years(
        pd.Series(["43", "043Y", "006M", "026W", "010D", " 7 ", None, "", "x"], dtype=object)
    )
    assert ages.round(2).tolist()[:6] == [43.0, 43.0, 0.5, 0.5, 0.03, 7.0]
    assert ages[6:].isna().all()


def test_class_info_must_agree_with_the_labels(tmp_path):
    (tmp_path / rsna.LABELS_FILE).write_text(LABELS)
    (tmp_path / rsna.CLASS_FILE).write_text(CLASSES.replace("Lung Opacity\n", "Normal\n"))
    with pytest.raises(DatasetError, match=r"stage_2_detailed_class_info\.csv disagrees .* for 1 patients"):
        rsna.read(tmp_path)


def test_detect(rsna_root, tmp_path):
    root, _ = rsna_root
    assert rsna.detect(root)
    assert datasets.detect(root) == "rsna"
    assert not rsna.detect(tmp_path)
    (tmp_path / "stage_2_detailed_class_info.csv").write_text(CLASSES)
    assert not rsna.detect(tmp_path)


def test_errors_name_the_file_and_what_is_missing(tmp_path):
    with pytest.raises(DatasetError, match=r"stage_2_train_labels\.csv not found"):
        rsna.read(tmp_path)
    (tmp_path / rsna.LABELS_FILE).write_text(LABELS.replace("Target", "Label"))
    with pytest.raises(DatasetError, match=r"stage_2_train_labels\.csv lacks the column\(s\) Target"):
        rsna.read(tmp_path)
    (tmp_path / rsna.LABELS_FILE).write_text(LABELS.replace(",0\n", ",yes\n"))
    with pytest.raises(
        DatasetError, match=r"stage_2_train_labels\.csv: Target must be 0 or 1, found \['yes'"
    ):
        rsna.read(tmp_path)


def test_an_unreadable_header_leaves_view_sex_and_age_missing(rsna_root, tmp_path, caplog):
    root, _ = rsna_root
    for name in (rsna.LABELS_FILE, rsna.CLASS_FILE):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    (tmp_path / rsna.IMAGE_FOLDER).mkdir()
    first, second = PATIENTS[:2]
    (tmp_path / rsna.IMAGE_FOLDER / f"{first}.dcm").write_bytes(b"not a DICOM file at all")
    (tmp_path / rsna.IMAGE_FOLDER / f"{second}.dcm").write_bytes(
        (root / rsna.IMAGE_FOLDER / f"{second}.dcm").read_bytes()
    )
    with caplog.at_level(logging.WARNING):
        table, _ = rsna.read(tmp_path)
    assert "1 DICOM files have unreadable headers" in caplog.text
    assert table.loc[0, ["view", "sex", "age"]].isna().all()
    assert table.loc[1, ["view", "sex"]].tolist() == ["AP", "M"] and table.loc[1, "age"] == 48
