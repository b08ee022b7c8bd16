"""CheXpert adapter on fixtures in the published layout: `train.csv` and `valid.csv` with CheXpert's header,
rows as the real files write them (the first three are real train.csv rows), and real NIH images re-encoded
as 8-bit JPEGs under `train/patientN/studyN/viewN_{frontal,lateral}.jpg`."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr.data import datasets
from cxr.data.datasets import DatasetError, LabelPolicy, chexpert
from cxr.data.findings import FINDINGS
from cxr.data.images import decode_xray, resize_square

HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
TRAIN_ROWS = (
    "{p}train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
    "{p}train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
    "{p}train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,-1.0,,,,,,1.0,",
    "{p}train/patient00003/study1/view1_frontal.jpg,Male,0,Frontal,PA,,,1.0,,,0.0,,1.0,0.0,1.0,1.0,,,",
    "{p}train/patient00004/study1/view1_frontal.jpg,Unknown,45,Frontal,LL,1.0,,,,,,,,-1.0,,,,,1.0",
    "{p}train/patient00005/study3/view1_frontal.jpg,Male,90,Frontal,RL,,,,,,1.0,,,,,-1.0,,,",
)
VALID_ROWS = (
    "{p}valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0",
    "{p}valid/patient64542/study1/view1_frontal.jpg,Male,70,Frontal,PA,0.0,0.0,0.0,1.0,0.0,1.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,0.0",
    "{p}valid/patient64542/study1/view2_lateral.jpg,Male,70,Lateral,,0.0,0.0,0.0,1.0,0.0,1.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,0.0",
)
# (folder, Path prefix, image side): small release, full release, a mirror unpacked without the prefix
LAYOUTS = {
    "small": ("CheXpert-v1.0-small", "CheXpert-v1.0-small/", 320),
    "full": ("CheXpert-v1.0", "CheXpert-v1.0/", 1024),
    "no prefix": ("chexpert", "", 320),
}

N = np.nan
# Expected labels of the mapped findings, in this order, under each (uncertain, unmentioned) policy
MAPPED = ("Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax", "Consolidation", "Edema")
VALID_EXPECTED = [[0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0, 1]]
EXPECTED = {
    ("ignore", "negative"): [
        [0, 0, 0, 0, 0, 0, 0],
        [N, N, N, 0, 0, N, N],
        [0, 0, 0, 0, 0, N, 0],
        [0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, N, 0, 0, 0, 1],
    ],
    ("zeros", "negative"): [
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ],
    ("ones", "negative"): [
        [0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 1],
    ],
    ("ignore", "ignore"): [
        [0, 0, 0, 0, 0, 0, 0],
        [N, N, N, N, N, N, N],
        [N, N, N, N, N, N, N],
        [0, 1, 1, 1, 1, N, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [N, N, N, N, N, N, 1],
    ],
}


def nih_labels(mapped_rows: list[list[float]]) -> np.ndarray:
    """N×14 labels: the given values in the `MAPPED` columns, NaN in the seven findings CheXpert lacks."""
    labels = np.full((len(mapped_rows), len(FINDINGS)), np.nan, dtype=np.float32)
    labels[:, [FINDINGS.index(name) for name in MAPPED]] = mapped_rows
    return labels


def nih_jpegs(nih_root: Path, count: int, side: int) -> list[bytes]:
    """`count` real NIH images as 8-bit grayscale JPEGs of side×side pixels."""
    paths = sorted((nih_root / "images_001" / "images").glob("*.png"))[:count]
    jpegs = []
    for path in paths:
        ok, data = cv2.imencode(".jpg", resize_square(decode_xray(path.read_bytes()), side))
        assert ok
        jpegs.append(data.tobytes())
    return jpegs


def write_chexpert(base: Path, nih_root: Path, layout: str) -> Path:
    """A CheXpert root in the given layout; returns the folder holding train.csv and valid.csv."""
    folder, prefix, side = LAYOUTS[layout]
    root = base / folder
    root.mkdir(parents=True)
    for name, rows in (("train.csv", TRAIN_ROWS), ("valid.csv", VALID_ROWS)):
        lines = [HEADER, *(row.format(p=prefix) for row in rows)]
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths = [row.split(",")[0].format(p="") for row in TRAIN_ROWS + VALID_ROWS]
    for path, jpeg in zip(paths, nih_jpegs(nih_root, len(paths), side), strict=True):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(jpeg)
    return root


@pytest.fixture(params=list(LAYOUTS))
def chexpert_root(request: pytest.FixtureRequest, tmp_path: Path, nih_root: Path) -> Path:
    return write_chexpert(tmp_path, nih_root, request.param)


@pytest.fixture
def small_root(tmp_path: Path, nih_root: Path) -> Path:
    return write_chexpert(tmp_path, nih_root, "small")


def test_table_follows_the_contract(chexpert_root: Path) -> None:
    table, labels = chexpert.read(chexpert_root, LabelPolicy())
    assert tuple(table.columns) == datasets.TABLE_COLUMNS
    assert table["image_id"].tolist() == [row.split(",")[0].format(p="") for row in TRAIN_ROWS + VALID_ROWS]
    assert table["patient_id"].tolist() == [
        *("patient00001", "patient00002", "patient00002", "patient00003", "patient00004", "patient00005"),
        *("patient64541", "patient64542", "patient64542"),
    ]
    assert table["study_id"].tolist() == [
        *("patient00001/study1", "patient00002/study2", "patient00002/study1", "patient00003/study1"),
        *("patient00004/study1", "patient00005/study3", "patient64541/study1"),
        *("patient64542/study1", "patient64542/study1"),
    ]
    assert table["view"].tolist() == ["AP", "AP", "LATERAL", "PA", "LL", "RL", "AP", "PA", "LATERAL"]
    assert str(table["age"].dtype) == "Int64"
    assert [None if pd.isna(age) else int(age) for age in table["age"]] == [
        68,
        87,
        83,
        None,
        45,
        90,
        73,
        70,
        70,
    ]
    assert table["sex"].tolist() == ["F", "F", "F", "M", None, "M", "M", "M", "M"]
    assert table["official_split"].tolist() == ["train"] * 6 + ["val"] * 3
    assert labels.dtype == np.float32 and labels.shape == (9, len(FINDINGS))


@pytest.mark.parametrize("policy", list(EXPECTED), ids=["-".join(key) for key in EXPECTED])
def test_labels_under_each_policy(small_root: Path, policy: tuple[str, str]) -> None:
    _, labels = chexpert.read(small_root, LabelPolicy(*policy))
    np.testing.assert_array_equal(labels, nih_labels(EXPECTED[policy] + VALID_EXPECTED))


def test_findings_chexpert_lacks_are_never_labelled(small_root: Path) -> None:
    _, labels = chexpert.read(small_root, LabelPolicy("ones", "negative"))
    lacking = [FINDINGS.index(name) for name in FINDINGS if name not in MAPPED]
    assert len(lacking) == 7
    assert np.isnan(labels[:, lacking]).all()


def test_images_named_by_image_id_exist_and_decode(chexpert_root: Path) -> None:
    table, _ = chexpert.read(chexpert_root, LabelPolicy())
    side = {folder: size for folder, _, size in LAYOUTS.values()}[chexpert_root.name]
    for image_id in table["image_id"]:
        image = decode_xray((chexpert_root / image_id).read_bytes())
        assert image.dtype == np.uint8 and image.shape == (side, side)


def test_detect(chexpert_root: Path, tmp_path: Path, nih_root: Path) -> None:
    assert chexpert.detect(chexpert_root)
    assert datasets.detect(chexpert_root) == "chexpert"
    assert datasets.adapter("chexpert") is chexpert
    assert not chexpert.detect(tmp_path / "empty")
    assert not chexpert.detect(nih_root)
    (chexpert_root / "valid.csv").unlink()
    assert not chexpert.detect(chexpert_root)


def test_detect_wants_chexperts_header(small_root: Path) -> None:
    (small_root / "valid.csv").write_text("Path,Label\nvalid/a.jpg,1\n", encoding="utf-8")
    assert not chexpert.detect(small_root)


def test_missing_file_is_named(small_root: Path) -> None:
    (small_root / "valid.csv").unlink()
    with pytest.raises(DatasetError, match=r"valid\.csv"):
        chexpert.read(small_root, LabelPolicy())


def test_missing_column_is_named(small_root: Path) -> None:
    path = small_root / "train.csv"
    rows = [line.split(",") for line in path.read_text(encoding="utf-8").splitlines()]
    dropped = rows[0].index("Pleural Effusion")
    path.write_text(
        "\n".join(",".join(r[:dropped] + r[dropped + 1 :]) for r in rows) + "\n", encoding="utf-8"
    )
    with pytest.raises(DatasetError, match=r"train\.csv lacks the column\(s\) Pleural Effusion"):
        chexpert.read(small_root, LabelPolicy())


def test_unknown_label_value_is_refused(small_root: Path) -> None:
    path = small_root / "valid.csv"
    path.write_text(
        path.read_text(encoding="utf-8").replace(
            ",Male,73,Frontal,AP,0.0,1.0,1.0,", ",Male,73,Frontal,AP,0.0,1.0,2.0,"
        ),
        encoding="utf-8",
    )
    with pytest.raises(DatasetError, match=r"valid\.csv: Cardiomegaly hold values other than"):
        chexpert.read(small_root, LabelPolicy())


def test_path_without_patient_and_study_is_refused(small_root: Path) -> None:
    path = small_root / "valid.csv"
    path.write_text(path.read_text(encoding="utf-8").replace("patient64541/study1/", ""), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"valid\.csv: 1 Path values name no patientN/studyN"):
        chexpert.read(small_root, LabelPolicy())


def test_default_policy_masks_uncertain_and_reads_blank_as_negative(small_root: Path) -> None:
    _, labels = chexpert.read(small_root)
    np.testing.assert_array_equal(labels, nih_labels(EXPECTED[("ignore", "negative")] + VALID_EXPECTED))
