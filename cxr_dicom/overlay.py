"""A Grad-CAM overlay of an answer (`?explain=FINDING`: a PNG of the heatmap blended over the image the
model saw, from `cxr.serve.explain.overlay_png`) as a DICOM Secondary Capture image in the source's study.

The overlay shows the model's input, the source resized and center-cropped, so its pixels are not
registered to the source's: the instance references its source (Source Image Sequence) and says so in
its Derivation Description, which also says that no physician has verified it.
"""

from __future__ import annotations

import datetime as dt

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, TM

from cxr_dicom.sr import MANUFACTURER, ModelInfo, source_header, stamp_time


class OverlayError(ValueError):
    """The overlay is not a decodable 8-bit colour or gray PNG."""


def build_overlay(
    source: Dataset,
    overlay_png: bytes,
    finding: str,
    model: ModelInfo,
    *,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    when: dt.datetime | None = None,
    series_number: int = 902,
    instance_number: int = 1,
) -> hd.sc.SCImage:
    """The overlay PNG of `finding` on `source` as an RGB Secondary Capture in the source's study and a new
    series. UIDs and the time are new unless given; given them, the output is the same byte for byte."""
    header = source_header(source)
    when = when or dt.datetime.now()
    orientation = _orientation(header)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=_rgb(overlay_png),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        laterality=header.get("Laterality") or None,
        patient_orientation=orientation or ("L", "F"),  # highdicom needs one; emptied below if unknown
        transfer_syntax_uid=ExplicitVRLittleEndian,
        manufacturer_model_name=model.name[:64],
        software_versions=f"{model.name} {model.version}"[:64],
        series_description=f"cxr Grad-CAM {finding} (unverified)"[:64],
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    if orientation is None:
        image.PatientOrientation = []  # type 2: empty, as the source gives none
    if header.get("BodyPartExamined"):
        image.BodyPartExamined = header.BodyPartExamined  # CHEST: unpaired, so no Laterality is due
    elif "Laterality" not in image:
        image.Laterality = ""  # type 2C: unknown body part, unknown laterality
    _describe(image, header, finding, model)
    image.DateOfSecondaryCapture, image.TimeOfSecondaryCapture = DA(when.date()), TM(when.time())
    stamp_time(image, when)
    return image


def _rgb(png: bytes) -> np.ndarray:
    """PNG bytes (BGR or gray, as OpenCV writes them) as an RGB uint8 array."""
    pixels = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise OverlayError("the overlay is not a decodable 8-bit PNG")
    if pixels.ndim == 2:
        return np.ascontiguousarray(cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB))
    code = cv2.COLOR_BGRA2RGB if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return np.ascontiguousarray(cv2.cvtColor(pixels, code))


def _orientation(header: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation (crop and resize keep it), or None when it has no usable one."""
    values = [str(v) for v in header.get("PatientOrientation") or []]
    return (values[0], values[1]) if len(values) == 2 and all(values) else None


def _describe(image: Dataset, header: Dataset, finding: str, model: ModelInfo) -> None:
    """What the image is and where it comes from."""
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = (
        header.SOPClassUID,
        header.SOPInstanceUID,
    )
    image.SourceImageSequence = [reference]
    image.ConversionType = "WSD"  # made by a workstation (software), not digitised
    image.BurnedInAnnotation = "NO"
    image.ImageComments = f"Grad-CAM heatmap of {finding}"[:10240]
    image.DerivationDescription = (
        f"Grad-CAM heatmap of {finding} by the machine-learning model {model.name} version {model.version}"
        " (cxr), blended over the image as the model saw it (resized and center-cropped): not registered to"
        " the source's pixels. Not verified by a physician."
    )[:1024]
