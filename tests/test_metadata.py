import gzip

import numpy as np
import pandas as pd
import pytest

from cxr.data.findings import FINDINGS, UnknownFindingError, decode_findings, encode_findings
from cxr.data.metadata import MetadataError, find_metadata_file, read_metadata


def test_real_v2020_metadata(nih_root):
    table, labels = read_metadata(find_metadata_file(nih_root))
    raw = pd.read_csv(nih_root / "Data_Entry_2017_v2020.csv.gz")
    assert len(table) == 112_120 and labels.shape == (112_120, 14)
    assert table["patient_id"].nunique() == 30_805
    for i, finding in enumerate(FINDINGS):  # independent count from the raw strings
        expected = raw["Finding Labels"].str.split("|").apply(lambda names, f=finding: f in names).sum()
        assert labels[:, i].sum() == expected, finding
    no_finding = (raw["Finding Labels"] == "No Finding").to_numpy()
    assert (labels[no_finding].sum(axis=1) == 0).all() and (labels[~no_finding].sum(axis=1) > 0).all()
    assert set(table["sex"]) == {"M", "F"} and set(table["view"]) == {"PA", "AP"}
    assert table["age"].notna().all() and table["age"].max() <= 120


def test_2017_format_with_trailing_column_and_bad_ages(tmp_path):
    text = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
        "00000001_000.png,Cardiomegaly,0,1,058Y,M,PA,2682,2749,0.143,0.143,\n"
        "00000002_000.png,No Finding,0,2,414,F,AP,2500,2048,0.171,0.171,\n"
    )
    path = tmp_path / "Data_Entry_2017.csv.gz"
    path.write_bytes(gzip.compress(text.encode()))
    table, labels = read_metadata(path)
    assert table["age"].tolist()[0] == 58 and pd.isna(table["age"].tolist()[1])
    assert labels.sum() == 1 and labels[0, FINDINGS.index("Cardiomegaly")] == 1


def test_unknown_finding_and_missing_columns_are_clear_errors(tmp_path):
    with pytest.raises(UnknownFindingError, match="Pneumonitis"):
        encode_findings(["Mass|Pneumonitis"])
    bad = tmp_path / "Data_Entry_2017_v2020.csv"
    bad.write_text("Image Index,Finding Labels\na.png,Mass\n")
    with pytest.raises(MetadataError, match="missing NIH columns"):
        read_metadata(bad)
    with pytest.raises(MetadataError, match="no NIH metadata file"):
        find_metadata_file(tmp_path / "nowhere")


def test_encode_decode_roundtrip():
    texts = ["No Finding", "Atelectasis|Hernia", "Pleural_Thickening"]
    encoded = encode_findings(texts)
    assert [decode_findings(row) for row in encoded] == texts
    assert encoded.dtype == np.float32
