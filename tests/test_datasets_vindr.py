"""VinDr-CXR adapter on a fixture in the PhysioNet 1.0.0 layout: `annotations/image_labels_{train,test}.csv`
with the published headers (three reader rows per train image, one consensus row per test image, `Other
diseases` in train and `Other disease` in test), and real NIH images as DICOMs written with pydicom
(12-bit values in 16-bit words, MONOCHROME2 and MONOCHROME1) under `train/` and `test/`. The DICOM
decoding that `decode_xray` shares with the server is tested here too."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cxr.data import datasets
from cxr.data.datasets import DatasetError, LabelPolicy, vindr
from cxr.data.images import ImageDecodeError, decode_xray
from cxr.serve.decoder import DICOM, decode_one

from .serving_support import dicom_bytes, dicom_dataset, saved

LABELS = (
    "Aortic enlargement,Atelectasis,Calcification,Cardiomegaly,Clavicle fracture,Consolidation,Edema,"
    "Emphysema,Enlarged PA,ILD,Infiltration,Lung Opacity,Lung cavity,Lung cyst,Mediastinal shift,Nodule/Mass,"
    "Pleural effusion,Pleural thickening,Pneumothorax,Pulmonary fibrosis,Rib fracture,Other lesion,COPD,"
    "Lung tumor,Pneumonia,Tuberculosis,{other},No finding"
)
TRAIN_HEADER = "image_id,{reader}," + LABELS.format(other="Other diseases")
TEST_HEADER = "image_id," + LABELS.format(other="Other disease")
LABEL_NAMES = LABELS.format(other="Other diseases").split(",")

# train: image → (reader, its marks); the first image's pixels are MONOCHROME2, the second's MONOCHROME1
TRAIN = {
    "9a5094b2563a1ef3ff50dc5c7ff71345": [
        ("R8", {"Cardiomegaly", "Pleural effusion", "Aortic enlargement"}),
        ("R9", {"Cardiomegaly", "Aortic enlargement"}),
        ("R10", {"No finding"}),
    ],
    "50a418190bc3fb1ef1633bf9678929b3": [
        ("R2", {"Nodule/Mass", "Other diseases"}),
        ("R3", {"Nodule/Mass", "Atelectasis", "Lung Opacity"}),
        ("R5", {"Pleural thickening"}),
    ],
    "0005e8e3701dfb1dd93d53e2ff537b6e": [
        ("R11", {"No finding"}),
        ("R12", {"No finding"}),
        ("R13", {"No finding"}),
    ],
}
TEST = {
    "002a34c58c5b758217ed1f584ccbcfe9": {
        "Pneumonia",
        "Consolidation",
        "Edema",
        "Emphysema",
        "Pulmonary fibrosis",
        "Infiltration",
        "Pneumothorax",
        "Other diseases",
    },
    "004f33259ee4aef671c2b95d54e4be68": {"No finding"},
}
N = np.nan
# NIH order: Atel Card Effu Infi Mass Nodu Pneu Pnth Cons Edem Emph Fibr PlTh Hern
MAJORITY = [
    [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, N],  # Cardiomegaly 2 of 3, effusion 1 of 3
    [0, 0, 0, 0, N, N, 0, 0, 0, 0, 0, 0, 0, N],  # Nodule/Mass 2 of 3: which of the two is unknown
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, N],
]
ANY = [
    [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, N],
    [1, 0, 0, 0, N, N, 0, 0, 0, 0, 0, 0, 1, N],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, N],
]
TEST_LABELS = [
    [0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, N],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, N],
]


def label_row(marks: set[str]) -> str:
    return ",".join("1" if name in marks else "0" for name in LABEL_NAMES)


def write_vindr(root: Path, nih_root: Path, reader: str = "rad_id") -> dict[str, np.ndarray]:
    """The fixture in `root`; returns each image's original 8-bit pixels by image id."""
    paths = sorted((nih_root / "images_001" / "images").glob("*.png"))
    ids = [*TRAIN, *TEST]
    pixels = {image_id: decode_xray(path.read_bytes()) for image_id, path in zip(ids, paths, strict=False)}
    (root / "annotations").mkdir(parents=True)
    train = [TRAIN_HEADER.format(reader=reader)]
    train += [
        f"{image_id},{rad},{label_row(marks)}" for image_id, rows in TRAIN.items() for rad, marks in rows
    ]
    (root / vindr.LABEL_FILES["train"]).write_text("\n".join(train) + "\n")
    test = [TEST_HEADER] + [f"{image_id},{label_row(marks)}" for image_id, marks in TEST.items()]
    (root / vindr.LABEL_FILES["test"]).write_text("\n".join(test) + "\n")
    for split, images in (("train", TRAIN), ("test", TEST)):
        (root / split).mkdir()
        for image_id in images:
            monochrome1 = image_id == "50a418190bc3fb1ef1633bf9678929b3"
            data = dicom_bytes(pixels[image_id], monochrome1=monochrome1)
            (root / split / f"{image_id}.dicom").write_bytes(data)
    return pixels


@pytest.fixture(scope="module")
def vindr_root(
    nih_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("vindr")
    return root, write_vindr(root, nih_root)


def test_table_and_majority_labels(vindr_root):
    root, _ = vindr_root
    table, labels = vindr.read(root, LabelPolicy())
    assert list(table.columns) == list(datasets.TABLE_COLUMNS)
    ids = [*TRAIN, *TEST]
    assert table["image_id"].tolist() == [f"train/{i}.dicom" for i in TRAIN] + [
        f"test/{i}.dicom" for i in TEST
    ]
    assert table["patient_id"].tolist() == ids
    assert table["official_split"].tolist() == ["train"] * 3 + ["test"] * 2
    assert table["view"].tolist() == ["PA"] * 5
    assert table[["study_id", "sex", "age"]].isna().all().all()
    assert labels.dtype == np.float32
    np.testing.assert_array_equal(labels, np.array(MAJORITY + TEST_LABELS, dtype=np.float32))


def test_any_reader_rule(vindr_root):
    root, _ = vindr_root
    _, labels = vindr.read(root, readers="any")
    np.testing.assert_array_equal(labels, np.array(ANY + TEST_LABELS, dtype=np.float32))
    with pytest.raises(ValueError, match="readers must be one of"):
        vindr.read(root, readers="all")


def test_reader_column_spelt_rad_ID(nih_root, tmp_path):
    write_vindr(tmp_path, nih_root, reader="rad_ID")
    assert (
        (tmp_path / vindr.LABEL_FILES["train"]).read_text().startswith("image_id,rad_ID,Aortic enlargement")
    )
    _, labels = vindr.read(tmp_path)
    np.testing.assert_array_equal(labels, np.array(MAJORITY + TEST_LABELS, dtype=np.float32))


def test_dicoms_decode_as_the_server_renders_them(vindr_root):
    """MONOCHROME2 and MONOCHROME1 files both come back as the original gray values (±1 from 12 bits)."""
    root, pixels = vindr_root
    table, _ = vindr.read(root)
    for image_id, patient in zip(table["image_id"], table["patient_id"], strict=True):
        data = (root / image_id).read_bytes()
        assert data[128:132] == b"DICM"
        decoded = decode_xray(data)
        assert decoded.dtype == np.uint8 and decoded.shape == (1024, 1024)
        assert np.abs(decoded.astype(int) - pixels[patient]).max() <= 1
        np.testing.assert_array_equal(decoded, decode_one(data, DICOM).pixels)  # what the server scores


def test_the_monochrome1_file_holds_inverted_values(vindr_root):
    import pydicom

    root, pixels = vindr_root
    dataset = pydicom.dcmread(root / "train" / "50a418190bc3fb1ef1633bf9678929b3.dicom")
    assert dataset.PhotometricInterpretation == "MONOCHROME1"
    stored = dataset.pixel_array.astype(int)
    assert np.corrcoef(stored.ravel(), pixels["50a418190bc3fb1ef1633bf9678929b3"].ravel())[0, 1] < -0.99


def test_broken_dicoms_are_decode_errors():
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    with pytest.raises(ImageDecodeError, match="DICOM: DICOM file has no pixel data"):
        decode_xray(dicom_bytes(pixels, with_pixels=False))
    with pytest.raises(ImageDecodeError, match="DICOM: DICOM file has no pixel data"):
        decode_xray(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    with pytest.raises(ImageDecodeError, match="DICOM: cannot decode DICOM pixel data"):
        decode_xray(dicom_bytes(pixels)[:-40])  # truncated
    huge = dicom_dataset(10_000, 10_000)
    huge.PixelData = b"\0\0" * 64
    with pytest.raises(ImageDecodeError, match="max_image_pixels"):  # refused from the header
        decode_xray(saved(huge))


def test_one_split_alone_is_read(vindr_root, tmp_path, caplog):
    root, _ = vindr_root
    (tmp_path / "annotations").mkdir()
    (tmp_path / vindr.LABEL_FILES["test"]).write_bytes((root / vindr.LABEL_FILES["test"]).read_bytes())
    assert vindr.detect(tmp_path)
    with caplog.at_level(logging.WARNING):
        table, labels = vindr.read(tmp_path)
    assert "image_labels_train.csv; its train split is left out" in caplog.text
    assert table["official_split"].tolist() == ["test", "test"]
    np.testing.assert_array_equal(labels, np.array(TEST_LABELS, dtype=np.float32))


def test_detect(vindr_root, tmp_path):
    root, _ = vindr_root
    assert vindr.detect(root)
    assert datasets.detect(root) == "vindr"
    assert not vindr.detect(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "image_labels_train.csv").write_text(TRAIN_HEADER.format(reader="rad_id") + "\n")
    assert not vindr.detect(tmp_path)  # not under annotations/


def test_errors_name_the_file_and_what_is_missing(vindr_root, tmp_path):
    with pytest.raises(
        DatasetError, match=r"no VinDr-CXR labels: expected .*annotations/image_labels_train\.csv"
    ):
        vindr.read(tmp_path)
    root, _ = vindr_root
    (tmp_path / "annotations").mkdir()
    text = (root / vindr.LABEL_FILES["train"]).read_text().replace(",Pleural effusion,", ",Pleural_effusion,")
    (tmp_path / vindr.LABEL_FILES["train"]).write_text(text)
    with pytest.raises(DatasetError, match=r"image_labels_train\.csv lacks the column\(s\) Pleural effusion"):
        vindr.read(tmp_path)
