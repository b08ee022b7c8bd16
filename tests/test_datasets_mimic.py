"""MIMIC-CXR-JPG adapter on fixtures in the published layout: gzipped metadata (per image), chexpert and
negbio (per study) and split (per image) CSVs with their published headers, and real NIH images re-encoded as
8-bit JPEGs at `files/p{2 digits}/p{subject_id}/s{study_id}/{dicom_id}.jpg`."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.data import datasets
from cxr.data.datasets import DatasetError, LabelPolicy, chexpert, mimic
from cxr.data.findings import FINDINGS
from cxr.data.images import decode_xray
from tests.test_datasets_chexpert import MAPPED, nih_jpegs, nih_labels, write_chexpert

METADATA = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
    "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning",
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,1024,1024,21800506,"
    "213014.531,CHEST (PA AND LAT),postero-anterior,Erect",
    "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,CHEST (PA AND LAT),LATERAL,1024,1024,"
    "21800506,213014.531,CHEST (PA AND LAT),lateral,Erect",
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,CHEST (PORTABLE AP),AP,1024,1024,"
    "21800626,165500.312,CHEST (PORTABLE AP),antero-posterior,",
    "9c3d1a4e-5f6a7b8c-9d0e1f2a-3b4c5d6e-7f8a9b0c,11000011,53000001,CHEST (PORTABLE AP),AP,1024,1024,"
    "21530412,081232.000,CHEST (PORTABLE AP),antero-posterior,Recumbent",
    "e084de3b-be89b11e-20fe3f9f-9c8d8dfe-4cfd202c,19000099,58000002,,,1024,1024,21371109,130101.000,,,",
    "1c2d3e4f-5a6b7c8d-9e0f1a2b-3c4d5e6f-7a8b9c0d,12000012,56000003,CHEST (PA AND LAT),LL,1024,1024,21900101,"
    "091500.000,CHEST (PA AND LAT),left lateral,Erect",
)
LABELLER_HEADER = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
    "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,"
    "Support Devices"
)
CHEXPERT_ROWS = (  # study 56000003 has no label row
    "10000032,50414267,,,,,,,,,1.0,,,,,",
    "10000032,53189527,-1.0,1.0,,-1.0,,,,1.0,,1.0,,-1.0,0.0,1.0",
    "11000011,53000001,,,,,,,,,1.0,,,-1.0,,",
    "19000099,58000002,1.0,0.0,1.0,,,,,,,-1.0,,,1.0,",
)
NEGBIO_ROWS = (
    "10000032,50414267,,,,,,,,,1.0,,,,,",
    "10000032,53189527,1.0,1.0,,,,,,1.0,,1.0,,,0.0,1.0",
    "11000011,53000001,,,,,,,,,1.0,,,-1.0,,",
    "19000099,58000002,1.0,0.0,1.0,,,,,,,-1.0,,,1.0,",
)
SPLIT = (
    "dicom_id,study_id,subject_id,split",
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,50414267,10000032,train",
    "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,50414267,10000032,train",
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,53189527,10000032,train",
    "9c3d1a4e-5f6a7b8c-9d0e1f2a-3b4c5d6e-7f8a9b0c,53000001,11000011,validate",
    "e084de3b-be89b11e-20fe3f9f-9c8d8dfe-4cfd202c,58000002,19000099,test",
    "1c2d3e4f-5a6b7c8d-9e0f1a2b-3c4d5e6f-7a8b9c0d,56000003,12000012,train",
)
IMAGE_IDS = [
    "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg",
    "files/p10/p10000032/s50414267/174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962.jpg",
    "files/p10/p10000032/s53189527/2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab.jpg",
    "files/p11/p11000011/s53000001/9c3d1a4e-5f6a7b8c-9d0e1f2a-3b4c5d6e-7f8a9b0c.jpg",
    "files/p19/p19000099/s58000002/e084de3b-be89b11e-20fe3f9f-9c8d8dfe-4cfd202c.jpg",
    "files/p12/p12000012/s56000003/1c2d3e4f-5a6b7c8d-9e0f1a2b-3c4d5e6f-7a8b9c0d.jpg",
]

N = np.nan
UNLABELLED = [N] * len(MAPPED)
# Expected labels of the mapped findings (order of `MAPPED`), one row per image, under each policy
EXPECTED = {
    ("ignore", "negative"): [
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [N, 1, 1, N, 0, 0, N],
        [0, 0, 0, 0, 0, 0, 0],
        [1, 0, N, 0, 1, 1, 0],
        UNLABELLED,
    ],
    ("zeros", "negative"): [
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 1, 1, 0],
        UNLABELLED,
    ],
    ("ones", "negative"): [
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 1, 1, 0],
        UNLABELLED,
    ],
    ("ignore", "ignore"): [
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [N, 1, 1, N, 0, N, N],
        [0, 0, 0, 0, 0, 0, 0],
        [1, 0, N, N, 1, 1, N],
        UNLABELLED,
    ],
}


def write_gzip(path: Path, lines: tuple[str, ...] | list[str]) -> None:
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def write_mimic(root: Path, nih_root: Path) -> Path:
    """A MIMIC-CXR-JPG 2.0.0 root: the four gzipped CSVs and the images under files/."""
    root.mkdir(parents=True)
    write_gzip(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA)
    write_gzip(root / "mimic-cxr-2.0.0-chexpert.csv.gz", (LABELLER_HEADER, *CHEXPERT_ROWS))
    write_gzip(root / "mimic-cxr-2.0.0-negbio.csv.gz", (LABELLER_HEADER, *NEGBIO_ROWS))
    write_gzip(root / "mimic-cxr-2.0.0-split.csv.gz", SPLIT)
    for image_id, jpeg in zip(IMAGE_IDS, nih_jpegs(nih_root, len(IMAGE_IDS), 1024), strict=True):
        (root / image_id).parent.mkdir(parents=True, exist_ok=True)
        (root / image_id).write_bytes(jpeg)
    return root


@pytest.fixture
def mimic_root(tmp_path: Path, nih_root: Path) -> Path:
    return write_mimic(tmp_path / "mimic-cxr-jpg" / "2.0.0", nih_root)


def rewrite_gzip(path: Path, old: str, new: str) -> None:
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()).decode().replace(old, new).encode()))


def test_table_follows_the_contract(mimic_root: Path) -> None:
    table, labels = mimic.read(mimic_root, LabelPolicy())
    assert tuple(table.columns) == datasets.TABLE_COLUMNS
    assert table["image_id"].tolist() == IMAGE_IDS
    assert table["patient_id"].tolist() == ["10000032"] * 3 + ["11000011", "19000099", "12000012"]
    assert table["study_id"].tolist() == [
        "50414267",
        "50414267",
        "53189527",
        "53000001",
        "58000002",
        "56000003",
    ]
    assert table["view"].tolist() == ["PA", "LATERAL", "AP", "AP", None, "LL"]
    assert str(table["age"].dtype) == "Int64" and table["age"].isna().all()
    assert table["sex"].tolist() == [None] * 6
    assert table["official_split"].tolist() == ["train", "train", "train", "val", "test", "train"]
    assert labels.dtype == np.float32 and labels.shape == (6, len(FINDINGS))


@pytest.mark.parametrize("policy", list(EXPECTED), ids=["-".join(key) for key in EXPECTED])
def test_labels_under_each_policy(mimic_root: Path, policy: tuple[str, str]) -> None:
    _, labels = mimic.read(mimic_root, LabelPolicy(*policy))
    np.testing.assert_array_equal(labels, nih_labels(EXPECTED[policy]))


def test_images_of_one_study_share_its_labels(mimic_root: Path) -> None:
    table, labels = mimic.read(mimic_root, LabelPolicy("ones", "ignore"))
    study = (table["study_id"] == "50414267").to_numpy()
    assert study.sum() == 2 and set(table.loc[study, "view"]) == {"PA", "LATERAL"}
    np.testing.assert_array_equal(labels[study][0], labels[study][1])


def test_negbio_labels_on_request(mimic_root: Path) -> None:
    _, labels = mimic.read(mimic_root, labeller="negbio")
    expected = EXPECTED[("ignore", "negative")].copy()
    expected[2] = [1, 1, 1, 0, 0, 0, 0]
    np.testing.assert_array_equal(labels, nih_labels(expected))


def test_unknown_labeller_is_refused(mimic_root: Path) -> None:
    with pytest.raises(DatasetError, match="unknown MIMIC-CXR labeller 'chexbert'"):
        mimic.read(mimic_root, LabelPolicy(), labeller="chexbert")


def test_plain_csv_and_another_split_column_order(mimic_root: Path) -> None:
    for stem in ("metadata", "chexpert", "split"):
        packed = mimic_root / f"mimic-cxr-2.0.0-{stem}.csv.gz"
        text = gzip.decompress(packed.read_bytes()).decode()
        if stem == "split":
            frame = pd.read_csv(packed, dtype=str)
            text = frame[["subject_id", "split", "study_id", "dicom_id"]].to_csv(index=False)
        (mimic_root / f"mimic-cxr-2.0.0-{stem}.csv").write_text(text, encoding="utf-8")
        packed.unlink()
    table, labels = mimic.read(mimic_root, LabelPolicy())
    assert table["image_id"].tolist() == IMAGE_IDS
    assert table["official_split"].tolist() == ["train", "train", "train", "val", "test", "train"]
    np.testing.assert_array_equal(labels, nih_labels(EXPECTED[("ignore", "negative")]))


def test_images_named_by_image_id_exist_and_decode(mimic_root: Path) -> None:
    table, _ = mimic.read(mimic_root, LabelPolicy())
    for image_id in table["image_id"]:
        image = decode_xray((mimic_root / image_id).read_bytes())
        assert image.dtype == np.uint8 and image.shape == (1024, 1024)


def test_detect(mimic_root: Path, tmp_path: Path, nih_root: Path) -> None:
    assert mimic.detect(mimic_root)
    assert datasets.detect(mimic_root) == "mimic"
    assert not chexpert.detect(mimic_root)
    assert not mimic.detect(write_chexpert(tmp_path / "chexpert", nih_root, "small"))
    assert not mimic.detect(nih_root)
    assert not mimic.detect(tmp_path / "empty")
    (mimic_root / "files").rename(mimic_root / "elsewhere")
    assert not mimic.detect(mimic_root)


@pytest.mark.parametrize("stem", ["metadata", "chexpert", "split"])
def test_missing_file_is_named(mimic_root: Path, stem: str) -> None:
    (mimic_root / f"mimic-cxr-2.0.0-{stem}.csv.gz").unlink()
    with pytest.raises(DatasetError, match=rf"has no mimic-cxr-2\.0\.0-{stem}\.csv\.gz \(or \.csv\)"):
        mimic.read(mimic_root, LabelPolicy())


@pytest.mark.parametrize(
    ("stem", "column"), [("metadata", "ViewPosition"), ("chexpert", "Edema"), ("split", "split")]
)
def test_missing_column_is_named(mimic_root: Path, stem: str, column: str) -> None:
    path = mimic_root / f"mimic-cxr-2.0.0-{stem}.csv.gz"
    rewrite_gzip(path, column, "Renamed")
    with pytest.raises(
        DatasetError, match=rf"mimic-cxr-2\.0\.0-{stem}\.csv\.gz lacks the column\(s\) {column}"
    ):
        mimic.read(mimic_root, LabelPolicy())


def test_study_labelled_twice_is_refused(mimic_root: Path) -> None:
    write_gzip(
        mimic_root / "mimic-cxr-2.0.0-chexpert.csv.gz", (LABELLER_HEADER, *CHEXPERT_ROWS, CHEXPERT_ROWS[0])
    )
    with pytest.raises(DatasetError, match=r"chexpert\.csv\.gz lists a study more than once"):
        mimic.read(mimic_root, LabelPolicy())


def test_unknown_split_is_refused(mimic_root: Path) -> None:
    rewrite_gzip(mimic_root / "mimic-cxr-2.0.0-split.csv.gz", "validate", "holdout")
    with pytest.raises(DatasetError, match=r"split\.csv\.gz: unknown split values \['holdout'\]"):
        mimic.read(mimic_root, LabelPolicy())
