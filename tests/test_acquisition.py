"""DICOM acquisition attributes (allow-list, normalisation, frontal-chest checks) and their drift check."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import DicomDictionary, dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from scipy import stats

from cxr.data.metadata import find_metadata_file
from cxr.monitor.acquisition import ABSENT, acquisition_drift
from cxr.monitor.checks import constraint_violations, violations
from cxr.serve.dicom import (
    ACQUISITION_ATTRIBUTES,
    MAX_VALUE_CHARS,
    acquisition_attributes,
    frontal_chest_problems,
    read_dicom,
    render,
)
from cxr.serve.limits import Limits
from tests.serving_support import dicom_dataset, saved, to_12_bit

# Identifying attributes by value representation: person names, dates, times, ages, UIDs.
IDENTIFYING_VRS = {"PN", "DA", "DT", "TM", "AS", "UI"}
IDENTIFYING_WORDS = ("Patient", "Study", "Series", "Institution", "Department", "Operator", "Physician",
                     "Performing", "Referring", "Requesting", "Station", "Serial", "Accession", "Date",
                     "UID", "Comment", "Description", "Address", "Telephone")  # fmt: skip
SAMPLE_VALUES = {"PN": "Doe^Jane", "DA": "20240131", "DT": "20240131120000", "TM": "120000", "AS": "042Y",
                 "UI": "1.2.826.0.1.3680043.2.1125.1", "CS": "SECRET", "AE": "SECRET"}  # fmt: skip
TEXT_VRS = {"PN", "DA", "DT", "TM", "AS", "UI", "CS", "AE", "LO", "SH", "LT", "ST", "UT", "UC"}


def dataset(**attributes) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


# -- the allow-list ---------------------------------------------------------------------------------------


def test_allow_list_is_a_fixed_tuple_of_non_identifying_dicom_keywords():
    assert isinstance(ACQUISITION_ATTRIBUTES, tuple)
    assert len(set(ACQUISITION_ATTRIBUTES)) == len(ACQUISITION_ATTRIBUTES)
    for keyword in ACQUISITION_ATTRIBUTES:
        assert dictionary_VR(keyword) not in IDENTIFYING_VRS, keyword
        assert not any(word in keyword for word in IDENTIFYING_WORDS), keyword


def test_no_attribute_outside_the_allow_list_ever_comes_out():
    """A file holding every text attribute of the DICOM dictionary (patient, study, institution,
    operator, dates, times, UIDs...) read through the server's parser yields the allow-listed ones only."""
    ds = dicom_dataset(4, 4)
    for tag, (vr, _vm, _name, retired, keyword) in DicomDictionary.items():
        if not keyword or retired or tag >> 16 in (0x0000, 0x0002, 0x7FE0) or vr not in TEXT_VRS:
            continue
        if keyword == "SpecificCharacterSet":
            continue
        ds.add_new(tag, vr, SAMPLE_VALUES.get(vr, "SECRET VALUE"))
    ds.PixelData = bytes(32)
    identifying = {"PatientName", "InstitutionName", "StudyDate", "StudyInstanceUID", "OperatorsName"}
    assert identifying <= set(ds.dir())
    header = read_dicom(saved(ds), Limits())
    found = header.acquisition.attributes
    assert set(found) <= set(ACQUISITION_ATTRIBUTES)
    image = {"Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation"}
    expected = {k for k in ACQUISITION_ATTRIBUTES if dictionary_VR(k) in TEXT_VRS} | image
    assert set(found) == expected
    assert "Doe^Jane" not in str(found) and "1.2.826" not in str(found) and "20240131" not in str(found)


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_jpeg.dcm", "examples_overlay.dcm"]
)
def test_bundled_files_yield_only_allow_listed_attributes(name):
    ds = pydicom.dcmread(get_testdata_file(name))
    found = acquisition_attributes(ds)
    assert found and set(found) <= set(ACQUISITION_ATTRIBUTES)
    identifying = {keyword_for_tag(e.tag) for e in ds if e.VR in IDENTIFYING_VRS}
    assert identifying and not identifying & set(found)


def test_values_are_normalised():
    long_name = "Acme Imaging " * 20
    ds = dataset(
        Manufacturer=f"  {long_name}  ",
        SoftwareVersions=["VA10A ", " SL51"],
        PixelSpacing=[0.143, 0.143],
        ImagerPixelSpacing=[0.1, 0.2],
        KVP="120",
        Exposure="5",
        Rows=2048,
        ViewPosition="",
        ManufacturerModelName="Model\x00X\n",
    )
    found = acquisition_attributes(ds)
    assert found["Manufacturer"] == long_name.strip()[:MAX_VALUE_CHARS].strip()
    assert found["SoftwareVersions"] == "VA10A\\SL51"
    assert found["PixelSpacing"] == 0.143 and found["ImagerPixelSpacing"] == "0.1\\0.2"
    assert found["KVP"] == 120.0 and found["Exposure"] == 5.0 and found["Rows"] == 2048.0
    assert found["ManufacturerModelName"] == "ModelX"
    assert "ViewPosition" not in found  # empty: absent
    assert all(isinstance(v, float | str) for v in found.values())


def test_unreadable_values_are_left_out():
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = dicom_dataset(4, 4)
    ds.PixelData = bytes(32)
    raw = {0x00180060: ("DS", b"abc "), 0x00181411: ("DS", b"nan "), 0x00081090: ("UN", b"\x01\x02")}
    for tag, (vr, value) in raw.items():
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    found = read_dicom(saved(ds), Limits()).acquisition.attributes
    assert {"KVP", "ExposureIndex"}.isdisjoint(found) and found["Modality"] == "CR"


# -- frontal chest ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attributes",
    [
        {},
        {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"},
        {"Modality": "DX", "BodyPartExamined": "Chest", "ViewPosition": "AP"},
        {"Modality": "RG", "BodyPartExamined": "THORAX", "ViewPosition": "AP SUPINE"},
        {"Modality": "OT", "BodyPartExamined": "PORT CHEST"},
        {"BodyPartExamined": "CHEST_ABDOMEN", "PresentationIntentType": "FOR PRESENTATION"},
        {"BodyPartExamined": "LUNG"},
    ],
)
def test_frontal_chest_radiographs_have_no_problem(attributes):
    assert frontal_chest_problems(dataset(**attributes)) == []


@pytest.mark.parametrize(
    ("attributes", "words"),
    [
        ({"Modality": "CT"}, ["Modality 'CT'"]),
        ({"Modality": "MG", "BodyPartExamined": "BREAST"}, ["Modality 'MG'", "BodyPartExamined 'BREAST'"]),
        ({"Modality": "DX", "BodyPartExamined": "HAND"}, ["BodyPartExamined 'HAND'"]),
        ({"ViewPosition": "LL"}, ["ViewPosition 'LL'"]),
        ({"ViewPosition": "RL", "BodyPartExamined": "CHEST"}, ["ViewPosition 'RL'"]),
        ({"ViewPosition": "LATERAL"}, ["ViewPosition 'LATERAL'"]),
        ({"PresentationIntentType": "FOR PROCESSING"}, ["FOR PROCESSING"]),
    ],
)
def test_other_images_are_named_with_the_reason(attributes, words):
    problems = frontal_chest_problems(dataset(**attributes))
    assert len(problems) == len(words)
    for problem, word in zip(problems, words, strict=True):
        assert word in problem


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_bundled_ct_and_mr_files_are_not_radiographs(name):
    with open(get_testdata_file(name), "rb") as file:
        header = read_dicom(file.read(), Limits())
    assert header.acquisition.problems and "not a radiograph" in header.acquisition.problems[0]
    assert header.acquisition.attributes["Modality"] == name[:2]


def nih_dicom(path, row, view: str | None = None) -> bytes:
    """A real NIH image as a DICOM carrying its recorded view, pixel spacing and patient tags."""
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    ds = dicom_dataset(*pixels.shape)
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.ViewPosition = view or row["View Position"]
    ds.ImagerPixelSpacing = [row["OriginalImagePixelSpacing[x"], row["y]"]]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = to_12_bit(pixels).tobytes()
    return saved(ds)


def nih_table(root) -> pd.DataFrame:
    return pd.read_csv(find_metadata_file(root)).set_index("Image Index")


def test_real_nih_images_as_dicom_pass_and_their_laterals_do_not(nih_root):
    table = nih_table(nih_root)
    paths = sorted((nih_root / "images_001" / "images").glob("*.png"))[:6]
    for path in paths:
        row = table.loc[path.name]
        header = read_dicom(nih_dicom(path, row), Limits())
        found = header.acquisition.attributes
        assert header.acquisition.problems == ()
        assert found["ViewPosition"] == row["View Position"] and found["Modality"] == "DX"
        assert found["ImagerPixelSpacing"] == pytest.approx(row["OriginalImagePixelSpacing[x"])
        assert (found["Rows"], found["Columns"]) == render(header).shape
        assert not {"PatientName", "PatientID", "SOPInstanceUID"} & set(found)
        lateral = read_dicom(nih_dicom(path, row, view="LL"), Limits()).acquisition.problems
        assert lateral == ("DICOM ViewPosition 'LL' is not a frontal view (PA or AP)",)


# -- drift ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nih_attributes(nih_root) -> list[dict]:
    """What capture would record for 3,000 real NIH images (recorded view, spacing and original size),
    each made into a DICOM header and read through the allow-list, in patient order."""
    table = nih_table(nih_root).sample(3000, random_state=0).sort_values("Patient ID")
    records = []
    for _, row in table.iterrows():
        ds = dataset(
            Modality="DX",
            ViewPosition=row["View Position"],
            ImagerPixelSpacing=[row["OriginalImagePixelSpacing[x"], row["y]"]],
            Rows=int(row["Height]"]),
            Columns=int(row["OriginalImage[Width"]),
        )
        records.append(acquisition_attributes(ds))
    return records


FLEET = [  # illustrative scanner profiles: (share, fixed attributes, kVp range, exposure index median)
    (0.5, {"Manufacturer": "Carestream Health", "ManufacturerModelName": "DRX-Evolution",
           "SoftwareVersions": "5.7.412", "DetectorType": "SCINTILLATOR", "Modality": "DX",
           "ImagerPixelSpacing": 0.139, "Rows": 3032.0, "Columns": 2520.0, "BitsStored": 12.0,
           "PhotometricInterpretation": "MONOCHROME1", "DistanceSourceToDetector": 1800.0}, (110, 125), 1500),
    (0.3, {"Manufacturer": "GE Healthcare", "ManufacturerModelName": "Definium 8000",
           "SoftwareVersions": "dm_Platform_release_2.0", "DetectorType": "SCINTILLATOR", "Modality": "DX",
           "ImagerPixelSpacing": 0.2, "Rows": 2022.0, "Columns": 2022.0, "BitsStored": 14.0,
           "PhotometricInterpretation": "MONOCHROME2", "DistanceSourceToDetector": 1800.0}, (110, 125), 400),
    (0.2, {"Manufacturer": "FUJIFILM Corporation", "ManufacturerModelName": "FCR Capsula",
           "SoftwareVersions": "A06", "DetectorType": "STORAGE", "Modality": "CR",
           "ImagerPixelSpacing": 0.1, "Rows": 3520.0, "Columns": 2428.0, "BitsStored": 10.0,
           "PhotometricInterpretation": "MONOCHROME1"}, (80, 95), None),
]  # fmt: skip


def fleet(n: int, rng: np.random.Generator, profiles=FLEET, png_share: float = 0.2) -> list[dict | None]:
    """Captured attributes of `n` requests: PNG requests (None) and DICOMs from the scanner profiles,
    with per-image view, kVp and exposure index; the CR reader writes no exposure index."""
    shares = np.array([p[0] for p in profiles])
    records: list[dict | None] = []
    for _ in range(n):
        if rng.random() < png_share:
            records.append(None)
            continue
        _, fixed, (low, high), index = profiles[rng.choice(len(profiles), p=shares / shares.sum())]
        record = {**fixed, "ViewPosition": "AP" if rng.random() < 0.3 else "PA"}
        record["KVP"] = float(rng.integers(low, high + 1))
        if index is not None:
            record["ExposureIndex"] = float(np.round(index * rng.lognormal(0, 0.3), 1))
        records.append(record)
    return records


def test_rows_have_the_checks_shape_and_feed_the_violation_outputs():
    rng = np.random.default_rng(0)
    changed = [(s, {**f, "SoftwareVersions": "5.8.100"} if i == 0 else f, k, e) for i, (s, f, k, e) in
               enumerate(FLEET)]  # fmt: skip
    rows = acquisition_drift(fleet(500, rng), fleet(300, rng, changed), alpha=0.01)
    assert {"check", "feature", "statistic", "threshold", "p_value", "adjusted_p_value", "alpha",
            "violation", "note"} <= set(rows[0])  # fmt: skip
    assert all(r["check"] == "acquisition_drift" and r["feature"].startswith("dicom.") for r in rows)
    found = violations(pd.DataFrame(rows).assign(variant="A"))
    assert [v["feature"] for v in found] == ["dicom.SoftwareVersions"]
    assert "'5.8.100'" in found[0]["note"]
    assert "dicom.SoftwareVersions" in constraint_violations(found)["violations"][0]["feature_name"]


def test_unchanged_fleet_windows_raise_no_more_alarms_than_alpha():
    alarms = []
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        size = (40, 30) if seed % 3 == 0 else (500, 250)  # small windows take the permutation test
        rows = acquisition_drift(fleet(size[0], rng), fleet(size[1], rng), alpha=0.05, seed=seed)
        alarms.append(any(r["violation"] for r in rows))
    print(f"\nacquisition false-alarm rate over 60 unchanged windows: {np.mean(alarms):.3f} (alpha 0.05)")
    assert stats.binomtest(sum(alarms), 60, 0.05, alternative="greater").pvalue > 0.01


def test_real_nih_attributes_split_at_random_raise_no_more_alarms_than_alpha(nih_attributes):
    alarms = []
    for seed in range(40):
        order = np.random.default_rng(seed).permutation(len(nih_attributes))
        reference = [nih_attributes[i] for i in order[:1000]]
        window = [nih_attributes[i] for i in order[1000:1500]]
        alarms.append(any(r["violation"] for r in acquisition_drift(reference, window, alpha=0.05)))
    print(f"\nNIH random splits, false-alarm rate over 40: {np.mean(alarms):.3f} (alpha 0.05)")
    assert stats.binomtest(sum(alarms), 40, 0.05, alternative="greater").pvalue > 0.01


def test_real_nih_pixel_spacing_drift_across_patients_is_flagged(nih_attributes):
    """NIH's own recorded acquisition drifts: the last quarter of patients has almost no 0.168 mm images."""
    quarter = len(nih_attributes) // 4
    rows = acquisition_drift(nih_attributes[:quarter], nih_attributes[-quarter:], alpha=0.05)
    flagged = {r["feature"]: r for r in rows if r["violation"]}
    assert "dicom.ImagerPixelSpacing" in flagged
    assert flagged["dicom.ImagerPixelSpacing"]["statistic"] >= 0.1
    assert "dicom.ViewPosition" not in flagged


def test_a_new_scanner_is_flagged_and_named():
    rng = np.random.default_rng(1)
    new = (0.4, {"Manufacturer": "Siemens Healthineers", "ManufacturerModelName": "Ysio Max",
                 "SoftwareVersions": "VF10", "DetectorType": "SCINTILLATOR", "Modality": "DX",
                 "ImagerPixelSpacing": 0.148, "Rows": 2880.0, "Columns": 2880.0, "BitsStored": 16.0,
                 "PhotometricInterpretation": "MONOCHROME2"}, (100, 120), 300)  # fmt: skip
    rows = acquisition_drift(fleet(600, rng), fleet(300, rng, [*FLEET, new]), alpha=0.05)
    flagged = {r["feature"]: r for r in rows if r["violation"]}
    for attribute in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "ImagerPixelSpacing"):
        assert f"dicom.{attribute}" in flagged
    assert "'Siemens Healthineers'" in flagged["dicom.Manufacturer"]["note"]
    assert flagged["dicom.Manufacturer"]["new_share"] > 0.2
    assert "dicom.ViewPosition" not in flagged


def test_a_changed_share_of_pixel_spacing_is_flagged_without_new_values():
    rng = np.random.default_rng(2)
    more_ge = [(s, f, k, e) for s, f, k, e in FLEET]
    more_ge[1] = (0.7, *FLEET[1][1:])
    rows = acquisition_drift(fleet(600, rng), fleet(300, rng, more_ge), alpha=0.05)
    flagged = {r["feature"]: r for r in rows if r["violation"]}
    assert "dicom.ImagerPixelSpacing" in flagged and flagged["dicom.ImagerPixelSpacing"]["new_share"] == 0


def test_numbers_beyond_the_reference_range_are_noted():
    rng = np.random.default_rng(3)
    high_dose = [(s, f, k, None if e is None else e * 4) for s, f, k, e in FLEET]
    rows = acquisition_drift(fleet(600, rng), fleet(300, rng, high_dose), alpha=0.05)
    index = next(r for r in rows if r["feature"] == "dicom.ExposureIndex")
    assert index["violation"] and "outside the reference range" in index["note"]


def test_png_traffic_and_small_windows():
    rng = np.random.default_rng(4)
    assert acquisition_drift(fleet(300, rng), [None, {}] * 50) == []
    rows = acquisition_drift(fleet(300, rng), fleet(300, rng)[:10] + [None] * 10)
    assert [(r["feature"], r["violation"]) for r in rows] == [("dicom.images", False)]
    assert "fewer than 20" in rows[0]["note"]
    rows = acquisition_drift([None] * 100, fleet(100, rng))
    assert rows[0]["feature"] == "dicom.images" and "0 reference" in rows[0]["note"]


def test_an_attribute_that_disappears_is_a_category():
    rng = np.random.default_rng(5)
    reference = fleet(400, rng)
    window = [None if r is None else {k: v for k, v in r.items() if k != "KVP"} for r in fleet(300, rng)]
    rows = {r["feature"]: r for r in acquisition_drift(reference, window)}
    assert rows["dicom.KVP"]["violation"] and f"'{ABSENT}' 100%" in rows["dicom.KVP"]["note"]


def test_a_scanner_change_captured_by_the_server_is_flagged_by_the_monitor(nih_root, tmp_path):
    """DICOMs of real NIH films sent to the live server from one scanner, then from another: the monitor
    reads the attributes back from capture and flags the change against the earlier traffic."""
    import datetime as dt
    import io
    import time

    from cxr.monitor.acquisition import acquisition_checks
    from cxr.monitor.checks import MonitorConfig
    from cxr.monitor.reader import read_traffic
    from tests.conftest import free_port
    from tests.serving_support import LiveServer, make_package

    package, _, _ = make_package(tmp_path / "package", nih_root)
    table = nih_table(nih_root)
    paths = sorted((nih_root / "images_001" / "images").glob("*.png"))[:24]
    films = [(path, table.loc[path.name]) for path in paths]

    def as_scanner(path, row, manufacturer: str) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(nih_dicom(path, row)))
        ds.Manufacturer, ds.PatientName = manufacturer, "Doe^Jane"
        return saved(ds)

    capture = tmp_path / "capture"
    live = LiveServer(free_port(), "--model", str(package), "--capture", str(capture), "--input-gate", "flag")
    try:
        start = dt.datetime.now(dt.UTC)
        for path, row in films:
            assert live.post(as_scanner(path, row, "Carestream Health"), "application/dicom")[0] == 200
        time.sleep(0.05)
        switch = dt.datetime.now(dt.UTC)
        for path, row in films:
            assert live.post(as_scanner(path, row, "Siemens Healthineers"), "application/dicom")[0] == 200
        end = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    finally:
        live.stop()
    before = read_traffic(str(capture), "cxr-endpoint", start - dt.timedelta(seconds=1), switch)["A"]
    after = read_traffic(str(capture), "cxr-endpoint", switch, end)["A"]
    assert len(before.acquisition) == len(after.acquisition) == len(films)
    assert not any("PatientName" in a or "PatientID" in a for a in before.acquisition + after.acquisition)
    rows = acquisition_checks(before, after, MonitorConfig())
    flagged = {r["feature"]: r for r in rows if r["violation"]}
    assert set(flagged) == {"dicom.Manufacturer"}, rows
    assert "'Siemens Healthineers'" in flagged["dicom.Manufacturer"]["note"]
    assert not any(r["violation"] for r in acquisition_checks(before, before, MonitorConfig()))
