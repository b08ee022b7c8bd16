"""PadChest adapter on a fixture in the published layout: the 36-column CSV written as the authors wrote it
(pandas `to_csv` with its index, so the header starts with a comma), plain and gzipped, and real NIH images
as 16-bit PNGs (12-bit values) both flat and under their `ImageDir` folder."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr.data import datasets
from cxr.data.datasets import DatasetError, LabelPolicy, padchest
from cxr.data.findings import FINDINGS
from cxr.data.images import decode_xray

from .serving_support import to_12_bit

HEADER = (  # the published header line, after its leading unnamed index column
    "ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,ViewPosition_DICOM,"
    "Projection,MethodProjection,Pediatric,Modality_DICOM,Manufacturer_DICOM,PhotometricInterpretation_DICOM,"
    "PixelRepresentation_DICOM,PixelAspectRatio_DICOM,SpatialResolution_DICOM,BitsStored_DICOM,"
    "WindowCenter_DICOM,WindowWidth_DICOM,Rows_DICOM,Columns_DICOM,XRayTubeCurrent_DICOM,Exposure_DICOM,"
    "ExposureInuAs_DICOM,ExposureTime,RelativeXRayExposure_DICOM,ReportID,Report,MethodLabel,Labels,"
    "Localizations,LabelsLocalizationsBySentence,labelCUIS,LocalizationsCUIS"
)
COLUMNS = HEADER.split(",")
# (ImageID, ImageDir, StudyDate, PatientBirth, Sex, Projection, Labels, where the file lies)
ROWS = (
    ("2168401113669640_04-014-084.png", 0, "20150622", 1993.0, "F", "PA",
     "['pleural effusion', ' cardiomegaly']", "flat"),
    ("1496801992455524_3r162a.png", 3, "20120101", 1950.0, "M", "L", "['normal']", "folder"),
    ("1188203371716290_a5ve1x.png", 3, "20130512", 1940.0, "M", "PA", np.nan, "folder"),
    ("2007113406253377_ya3vxk.png", 7, "20160310", 1962.0, "F", "AP_horizontal",
     "['pseudonodule', 'subcutaneous emphysema', 'pericardial effusion', 'COPD signs']", "folder"),
    ("1273041581232087_2kc1se.png", 7, "20140909", 1980.0, "M", "AP",
     "['interstitial pattern', 'unchanged', 'pneumonia']", "missing"),
    ("3067016924125366_kkdmrx.png", 12, "20170102", np.nan, np.nan, "UNK",
     "['hydropneumothorax', 'laminar atelectasis', 'nodule', 'hiatal hernia']", "flat"),
    ("1911043278201147_p3q7ee.png", 12, "20110704", 1931.0, "F", "PA",
     "['consolidation', 'air bronchogram', 'pulmonary mass', 'apical pleural thickening', "
     "'pulmonary edema', 'emphysema', 'pulmonary fibrosis']", "folder"),
    ("2522189018772398_b71nwl.png", 12, "20140101", 1970.0, "F", "PA", "pleural effusion", "flat"),
    ("2912209827111034_ql3hzc.png", 0, "20150101", 1945.0, "M", "COSTAL", "['']", "flat"),
)  # fmt: skip
KEPT = [0, 1, 3, 4, 5, 6, 8]  # the NaN row and the one that is not a list are dropped
EXPECTED = {  # row → its positive findings
    0: {"Effusion", "Cardiomegaly"},
    1: set(),
    3: set(),  # pseudonodule, subcutaneous emphysema, pericardial effusion: no NIH finding
    4: {"Infiltration", "Pneumonia"},
    5: {"Effusion", "Pneumothorax", "Atelectasis", "Nodule", "Hernia"},
    6: {"Consolidation", "Mass", "Pleural_Thickening", "Edema", "Emphysema", "Fibrosis"},
    8: set(),
}


def nih_pixels(nih_root: Path, count: int) -> list[np.ndarray]:
    paths = sorted((nih_root / "images_001" / "images").glob("*.png"))[:count]
    return [decode_xray(path.read_bytes()) for path in paths]


def write_padchest(root: Path, nih_root: Path, gzipped: bool = False) -> list[np.ndarray]:
    """The fixture in `root`; returns each row's original 8-bit pixels."""
    pixels = nih_pixels(nih_root, len(ROWS))
    records = []
    for index, (image_id, folder, date, birth, sex, projection, labels, where) in enumerate(ROWS):
        if where != "missing":
            directory = root / str(folder) if where == "folder" else root
            directory.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(directory / image_id), to_12_bit(pixels[index]))  # 16-bit gray PNG
        record = dict.fromkeys(COLUMNS, np.nan)
        record.update(
            ImageID=image_id,
            ImageDir=folder,
            StudyDate_DICOM=int(date),
            StudyID=image_id.split("_")[0],
            PatientID=f"3258801631404295217250068102276{index:04d}",
            PatientBirth=birth,
            PatientSex_DICOM=sex,
            Projection=projection,
            MethodProjection="Manual review of DICOM fields",
            Pediatric="No",
            Modality_DICOM="CR",
            PhotometricInterpretation_DICOM="MONOCHROME2",
            BitsStored_DICOM=12,
            Rows_DICOM=1024,
            Columns_DICOM=1024,
            ReportID=4_000_000 + index,
            Report="cardiomegalia. derrame pleural.",
            MethodLabel="Physician" if index % 2 else "RNN_model",
            Labels=labels,
            Localizations="['loc left']",
        )
        records.append(record)
    name = padchest.CSV_NAME + (".gz" if gzipped else "")
    pd.DataFrame(records, columns=COLUMNS).to_csv(root / name)  # with the index, as the authors wrote it
    return pixels


@pytest.fixture(scope="module")
def padchest_root(nih_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    root = tmp_path_factory.mktemp("padchest")
    return root, write_padchest(root, nih_root)


def expected_labels(rows: list[int]) -> np.ndarray:
    labels = np.zeros((len(rows), len(FINDINGS)), dtype=np.float32)
    for position, row in enumerate(rows):
        for finding in EXPECTED[row]:
            labels[position, FINDINGS.index(finding)] = 1.0
    return labels


def test_the_csv_is_written_as_published(padchest_root):
    root, _ = padchest_root
    first_line = (root / padchest.CSV_NAME).read_text().splitlines()[0]
    assert first_line == "," + HEADER
    assert len(first_line.split(",")) == 36


def test_table_and_labels(padchest_root, caplog):
    root, _ = padchest_root
    with caplog.at_level(logging.WARNING):
        table, labels = padchest.read(root, LabelPolicy())
    assert list(table.columns) == list(datasets.TABLE_COLUMNS)
    assert "2 rows dropped: Labels blank (1), not a list of terms (1)" in caplog.text
    rows = [ROWS[i] for i in KEPT]
    assert table["image_id"].tolist() == [
        image_id if where in ("flat", "missing") else f"{folder}/{image_id}"
        for image_id, folder, *_, where in rows
    ]
    assert table["study_id"].tolist() == [row[0].split("_")[0] for row in rows]
    assert table["patient_id"].tolist() == [f"3258801631404295217250068102276{i:04d}" for i in KEPT]
    assert table["view"].tolist() == ["PA", "LATERAL", "AP SUPINE", "AP", None, "PA", "COSTAL"]
    assert table["sex"].tolist() == ["F", "M", "F", "M", None, "F", "M"]
    assert str(table["age"].dtype) == "Int64"
    assert table["age"].tolist() == [22, 62, 54, 34, pd.NA, 80, 70]
    assert table["official_split"].isna().all()
    np.testing.assert_array_equal(labels, expected_labels(KEPT))
    assert labels.dtype == np.float32 and not np.isnan(labels).any()  # PadChest labels all 14


def test_substrings_of_other_terms_do_not_map():
    terms = padchest.parse_labels(
        pd.Series(
            ["['pseudonodule']", "['subcutaneous emphysema']", "['pericardial effusion']", "['masses']"]
        )
    )
    assert not padchest.encode_terms(terms).any()


def test_every_term_maps_to_its_finding_alone_or_as_documented():
    for finding, terms in padchest.TERMS.items():
        labels = padchest.encode_terms(padchest.parse_labels(pd.Series([str([term]) for term in terms])))
        assert labels[:, FINDINGS.index(finding)].all(), finding
        others = [FINDINGS[i] for i in np.flatnonzero(labels.any(axis=0)) if FINDINGS[i] != finding]
        assert others in ([], ["Effusion"], ["Pneumothorax"]), (finding, others)  # hydropneumothorax


def test_images_decode_from_both_layouts(padchest_root):
    root, pixels = padchest_root
    table, _ = padchest.read(root)
    for row, image_id in zip(KEPT, table["image_id"], strict=True):
        if ROWS[row][-1] == "missing":
            assert not (root / image_id).exists()
            continue
        data = (root / image_id).read_bytes()
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint16
        decoded = decode_xray(data)
        assert decoded.shape == (1024, 1024)
        assert np.abs(decoded.astype(int) - pixels[row]).max() <= 1  # 12-bit values keep their brightness


def test_gzipped_csv_reads_the_same(padchest_root, tmp_path):
    root, _ = padchest_root
    gz_root = tmp_path / "gz"
    gz_root.mkdir()
    pd.read_csv(root / padchest.CSV_NAME, index_col=0).to_csv(gz_root / (padchest.CSV_NAME + ".gz"))
    assert padchest.detect(gz_root)
    table, labels = padchest.read(gz_root)
    expected_table, expected = padchest.read(root)
    assert table["patient_id"].tolist() == expected_table["patient_id"].tolist()
    assert table["image_id"].tolist() == [row[0] for row in (ROWS[i] for i in KEPT)]  # no images: flat
    np.testing.assert_array_equal(labels, expected)


def test_detect(padchest_root, tmp_path):
    root, _ = padchest_root
    assert padchest.detect(root)
    assert datasets.detect(root) == "padchest"
    assert not padchest.detect(tmp_path)
    (tmp_path / "train.csv").write_text("Path\n")
    assert not padchest.detect(tmp_path)


def test_errors_name_the_file_and_what_is_missing(padchest_root, tmp_path):
    with pytest.raises(DatasetError, match=r"no PadChest metadata.*PADCHEST_chest_x_ray"):
        padchest.read(tmp_path)
    root, _ = padchest_root
    csv = pd.read_csv(root / padchest.CSV_NAME, index_col=0).drop(columns=["Labels", "Projection"])
    csv.to_csv(tmp_path / padchest.CSV_NAME)
    with pytest.raises(DatasetError, match=r"PADCHEST_chest.*\.csv lacks the column\(s\) Projection, Labels"):
        padchest.read(tmp_path)
    (tmp_path / padchest.CSV_NAME).write_bytes(b"\x00\xff\xfe garbage")
    with pytest.raises(DatasetError, match="PADCHEST_chest"):
        padchest.read(tmp_path)
