"""A Grad-CAM overlay, made by the serving code on a real NIH film, as a DICOM Secondary Capture."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch

from cxr.inference import prepare
from cxr.model import CXRNet
from cxr.serve.dicom import read_dicom, render
from cxr.serve.explain import grad_cams, overlay_png
from cxr.serve.limits import Limits
from cxr_dicom.overlay import OverlayError, build_overlay
from cxr_dicom.sr import ModelInfo
from tests.dicom_support import dciodvfy_errors, dicom_file, nih_dx

WHEN = dt.datetime(2024, 5, 6, 7, 8, 9)
MODEL = ModelInfo("cxr-demo", "3")


@pytest.fixture(scope="module")
def explained(nih_root: Path) -> tuple[pydicom.Dataset, bytes]:
    """A DX film and the server's Effusion overlay of it, from a seeded random model (64 px, 56 px crop)."""
    source = nih_dx(nih_root, "00000574_000.png")
    crop = prepare(render(read_dicom(dicom_file(source), Limits())), {"image_size": 64, "crop": 56})
    torch.manual_seed(0)
    (heatmap,) = grad_cams(CXRNet(pretrained=False).eval(), crop, ["Effusion"])
    return source, overlay_png(crop[0], heatmap)


def written(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_overlay_is_a_valid_secondary_capture_of_the_png_in_the_source_study(explained, tmp_path: Path):
    source, png = explained
    data = written(build_overlay(source, png, "Effusion", MODEL, when=WHEN))
    assert dciodvfy_errors(data, tmp_path) == []
    image = pydicom.dcmread(io.BytesIO(data))
    assert image.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert image.StudyInstanceUID == source.StudyInstanceUID
    assert image.SeriesInstanceUID != source.SeriesInstanceUID
    assert (image.PatientID, image.PatientName) == (source.PatientID, source.PatientName)
    (reference,) = image.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert image.PhotometricInterpretation == "RGB"
    assert np.array_equal(image.pixel_array, expected)
    assert (
        "Effusion" in image.DerivationDescription
        and "Not verified by a physician" in image.DerivationDescription
    )
    assert image.Manufacturer == "cxr" and image.PatientOrientation == source.PatientOrientation


def test_same_inputs_and_uids_give_the_same_bytes(explained):
    source, png = explained
    uids = {"series_uid": pydicom.uid.generate_uid(), "sop_uid": pydicom.uid.generate_uid(), "when": WHEN}
    first = written(build_overlay(source, png, "Effusion", MODEL, **uids))
    assert first == written(build_overlay(source, png, "Effusion", MODEL, **uids))


def test_a_source_without_orientation_or_body_part_leaves_them_empty_and_junk_is_refused(
    explained, tmp_path: Path
):
    source, png = explained
    bare = pydicom.dcmread(io.BytesIO(dicom_file(source)), stop_before_pixels=True)
    del bare.PatientOrientation, bare.BodyPartExamined
    data = written(build_overlay(bare, png, "Effusion", MODEL, when=WHEN))
    assert dciodvfy_errors(data, tmp_path) == []
    assert pydicom.dcmread(io.BytesIO(data)).PatientOrientation in ("", None, [])
    with pytest.raises(OverlayError):
        build_overlay(source, b"not a png", "Effusion", MODEL)
