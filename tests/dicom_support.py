"""Real NIH films as DICOM: a PNG of the test download wrapped as a digital X-ray (DX) image "For
Presentation", with the header a modality would write (patient, study, series, equipment, detector,
positioning) filled from the film's NIH metadata row."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from cxr.data.images import decode_xray
from cxr.data.metadata import find_metadata_file, read_metadata
from tests.serving_support import saved

STUDY_TIME = dt.datetime(2017, 9, 27, 9, 30)  # NIH films carry no dates: a fixed, plausible one
VIEWS = {"PA": codes.cid4010.PosteroAnterior, "AP": codes.cid4010.AnteroPosterior}  # DICOM CID 4010
SPACING_COLUMNS = {"Image Index": "image_id", "OriginalImage[Width": "width",
                   "OriginalImagePixelSpacing[x": "spacing"}  # fmt: skip


@dataclass(frozen=True)
class Film:
    """One NIH film: its 8-bit pixels and its metadata row."""

    image_id: str
    pixels: np.ndarray
    patient_id: int
    follow_up: int
    age: int | None
    sex: str
    view: str
    spacing_mm: float  # of the released PNG: the original detector spacing scaled by the resize


def nih_film(nih_root: Path, image_id: str) -> Film:
    """The film `image_id` (e.g. "00000442_000.png") of the NIH download at `nih_root`."""
    table, spacing = _tables(nih_root)
    row = table.loc[image_id]
    pixels = decode_xray((nih_root / "images_001" / "images" / image_id).read_bytes())
    original = spacing.loc[image_id]
    scaled = float(original["spacing"]) * float(original["width"]) / pixels.shape[1]
    age = None if pd.isna(row["age"]) else int(row["age"])
    return Film(image_id, pixels, int(row["patient_id"]), int(row["follow_up"]), age, str(row["sex"]),
                str(row["view"]), round(scaled, 6))  # fmt: skip


def nih_dx(
    nih_root: Path,
    image_id: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
    when: dt.datetime = STUDY_TIME,
    patient_of: Film | None = None,
) -> Dataset:
    """A DX For Presentation instance (MONOCHROME2, 8-bit, explicit VR little endian) of one NIH film.

    Patient ID, sex and age come from the film's metadata row (or `patient_of`'s, to file the film in
    another film's study); ViewPosition is the row's PA/AP; ImagerPixelSpacing the original detector
    spacing scaled to the released 1024-pixel PNG. Study, series and instance UIDs are new unless given.
    """
    film = nih_film(nih_root, image_id)
    patient = patient_of or film
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    _patient(ds, patient)
    _study(ds, patient, study_uid or generate_uid(), when)
    _series(ds, series_uid or generate_uid(), instance_number, when)
    _image(ds, film)
    return ds


def nih_study(nih_root: Path, image_ids: Sequence[str], study_uid: str | None = None) -> list[Dataset]:
    """Several films as the instances of one study and series, all filed under the first film's patient
    (NIH's first download holds one film per patient)."""
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    first = nih_film(nih_root, image_ids[0])
    return [nih_dx(nih_root, image_id, study_uid, series_uid, number, patient_of=first)
            for number, image_id in enumerate(image_ids, start=1)]  # fmt: skip


def dicom_file(ds: Dataset) -> bytes:
    """A data set as the bytes of a DICOM Part 10 file."""
    return saved(ds)


def dciodvfy_errors(data: bytes, directory: Path) -> list[str]:
    """The "Error" lines of dicom3tools' `dciodvfy` on a DICOM file's bytes (warnings are not errors).
    Without dciodvfy the test fails under CI (`$CI` set) and is skipped elsewhere."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        message = "dciodvfy (Debian package dicom3tools) is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    path = directory / "checked.dcm"
    path.write_bytes(data)
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _patient(ds: Dataset, film: Film) -> None:
    ds.PatientName = f"NIH^{film.patient_id:08d}"
    ds.PatientID = f"NIH{film.patient_id:08d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = film.sex if film.sex in ("M", "F") else "O"
    if film.age is not None:
        ds.PatientAge = f"{film.age:03d}Y"


def _study(ds: Dataset, film: Film, study_uid: str, when: dt.datetime) -> None:
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.StudyID = f"{film.follow_up:03d}"
    ds.AccessionNumber = f"{film.patient_id:08d}{film.follow_up:03d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST"


def _series(ds: Dataset, series_uid: str, instance_number: int, when: dt.datetime) -> None:
    ds.Modality = "DX"
    ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 1
    ds.SeriesDate, ds.SeriesTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.BodyPartExamined = "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "NIH Clinical Center (PNG release)"
    ds.InstanceNumber = instance_number
    ds.ContentDate, ds.ContentTime = ds.SeriesDate, ds.SeriesTime
    ds.AcquisitionContextSequence = []


def _image(ds: Dataset, film: Film) -> None:
    ds.ViewPosition = film.view
    ds.ImageLaterality = "U"  # the chest is unpaired
    ds.AnatomicRegionSequence = [CodedConcept.from_code(codes.SCT.Chest)]
    ds.ViewCodeSequence = [CodedConcept.from_code(VIEWS[film.view])]
    ds.PositionerType = ""  # not recorded in the NIH release
    ds.PatientOrientation = ["L", "F"]  # displayed as viewed from the front: rows to the left, columns down
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.DetectorType = ""
    ds.ImagerPixelSpacing = [film.spacing_mm, film.spacing_mm]
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter, ds.WindowWidth = 128, 256  # the full 8-bit range: the identity window
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.set_pixel_data(np.ascontiguousarray(film.pixels), "MONOCHROME2", 8)


@cache
def _tables(nih_root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The metadata table and the original width and pixel spacing, both indexed by image name."""
    path = find_metadata_file(nih_root)
    table, _ = read_metadata(path)
    spacing = pd.read_csv(path, usecols=list(SPACING_COLUMNS)).rename(columns=SPACING_COLUMNS)
    return table.set_index("image_id"), spacing.set_index("image_id")
