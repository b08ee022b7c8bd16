import numpy as np
import pytest

from cxr.data.findings import FINDINGS
from cxr.data.metadata import read_metadata
from cxr.data.split import SplitError, official_split, patient_split, split_summary


@pytest.fixture(scope="module")
def nih_table(nih_root):
    return read_metadata(nih_root / "Data_Entry_2017_v2020.csv.gz")


def test_real_metadata_split_has_no_patient_overlap_and_every_finding_everywhere(nih_table):
    table, labels = nih_table
    patients = table["patient_id"].to_numpy()
    split = patient_split(patients, labels, (0.7, 0.1, 0.2), seed=0)
    sets = {name: set(patients[rows]) for name, rows in split.items()}
    assert (
        not sets["train"] & sets["val"]
        and not sets["train"] & sets["test"]
        and not sets["val"] & sets["test"]
    )
    all_rows = np.concatenate([rows for _, rows in split.items()])
    assert np.array_equal(np.sort(all_rows), np.arange(len(table)))
    for (name, rows), target in zip(split.items(), (0.7, 0.1, 0.2), strict=True):
        assert abs(len(rows) / len(table) - target) < 0.01, name
        counts = labels[rows].sum(axis=0)
        assert (counts > 0).all(), (
            f"{name} lacks {[f for f, c in zip(FINDINGS, counts, strict=True) if not c]}"
        )
        prevalence = counts / len(rows)
        overall = labels.mean(axis=0)
        assert np.all(np.abs(prevalence - overall) <= 0.1 * overall + 0.001), name
    summary = split_summary(split, patients, labels)
    print("\n" + summary[["images", "patients", *FINDINGS]].round(4).T.to_string())
    assert summary.loc["val", "n_Hernia"] > 0 and summary["patients"].sum() == 30_805


def test_seed_is_respected(nih_table):
    table, labels = nih_table
    patients = table["patient_id"].to_numpy()
    a = patient_split(patients, labels, seed=1)
    b = patient_split(patients, labels, seed=1)
    c = patient_split(patients, labels, seed=2)
    assert np.array_equal(a.test, b.test) and not np.array_equal(a.test, c.test)


def test_tiny_set_still_spreads_rare_findings(nih_table):
    table, labels = nih_table
    hernia_rows = np.flatnonzero(labels[:, FINDINGS.index("Hernia")])
    _, first = np.unique(table["patient_id"].to_numpy()[hernia_rows], return_index=True)
    rare = hernia_rows[np.sort(first)[:3]]  # three Hernia patients
    common = np.flatnonzero(labels.sum(axis=1) == 0)[:27]
    rows = np.concatenate([rare, common])
    split = patient_split(table["patient_id"].to_numpy()[rows], labels[rows], seed=0)
    hernia = labels[rows, FINDINGS.index("Hernia")]
    assert all(hernia[idx].sum() >= 1 for _, idx in split.items())


def test_official_test_list_defines_test(nih_table):
    table, labels = nih_table
    patients = table["patient_id"].to_numpy()
    test_ids = table.loc[patients % 5 == 0, "image_id"].tolist()
    split = official_split(table["image_id"], patients, labels, test_ids, val_ratio=0.125, seed=0)
    assert set(table["image_id"].to_numpy()[split.test]) == set(test_ids)
    assert not set(patients[split.train]) & set(patients[split.val])
    assert abs(len(split.val) / (len(split.val) + len(split.train)) - 0.125) < 0.01
    with pytest.raises(SplitError, match="shares"):
        official_split(table["image_id"], patients, labels, [table["image_id"][0]], seed=0)


def test_bad_ratios_are_rejected(nih_table):
    table, labels = nih_table
    with pytest.raises(SplitError, match="summing to 1"):
        patient_split(table["patient_id"].to_numpy(), labels, (0.5, 0.2, 0.2))
