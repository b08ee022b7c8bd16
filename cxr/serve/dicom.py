"""DICOM bytes → 8-bit grayscale, bounded before any pixel is decoded; of its tags, only an allow-list of
non-identifying acquisition attributes leaves this module.

Bounds, from the file's headers: deflated data (Deflated Explicit VR Little Endian) is inflated as a
stream and refused past a size cap before pydicom inflates it; `NumberOfFrames` and `Rows × Columns`
are checked before the pixel data is touched, and only the first frame is ever decoded.

Rendering follows the DICOM display pipeline: modality LUT or rescale, then the VOI LUT or window,
whose output range (from `BitsStored`, the rescale, or the LUT's entries) is mapped onto 0..255. A
file without a VOI LUT or window maps its full stored range (`BitsStored`, after the rescale), so 12-bit
data in 16-bit words keeps its brightness. MONOCHROME1 is inverted.

Acquisition (`describe_acquisition`, read with the header, before any pixel): the attributes named in
`ACQUISITION_ATTRIBUTES` — scanner, detector, protocol and image format, never a patient, study, series,
institution, operator, date, time or UID attribute — normalised for capture and drift monitoring, and
the reasons, if any, the file is not a frontal chest radiograph (`frontal_chest_problems`).
"""

from __future__ import annotations

import io
import itertools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr.data.grayscale import window_to_uint8
from cxr.serve.errors import PayloadTooLarge, RequestError, UnprocessableImage
from cxr.serve.limits import Limits, exceeds

INFLATE_CHUNK = 1 << 20

# The only attributes that leave this module: what was acquired and how, never who, where or when.
ACQUISITION_ATTRIBUTES = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DetectorType",
    "ImageType",
    "PresentationIntentType",
    "ConversionType",
    "BodyPartExamined",
    "ViewPosition",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "LossyImageCompression",
    "KVP",
    "Exposure",
    "ExposureTime",
    "XRayTubeCurrent",
    "ExposureIndex",
    "TargetExposureIndex",
    "DeviationIndex",
    "DistanceSourceToDetector",
    "Grid",
)
MAX_VALUE_CHARS = 64  # LO's limit; longer values are cut
MAX_VALUES = 16  # of a multi-valued attribute
NUMERIC_VRS = frozenset({"DS", "IS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})

# Projection radiography in DICOM's Modality defined terms (PS3.3 C.7.3.1.1.1): computed, digital and
# conventional film/screen radiography. "OT" (other), what secondary captures of digitised films often
# say, tells nothing and is treated as absent.
RADIOGRAPHY_MODALITIES = ("CR", "DX", "RG")
UNSPECIFIED_MODALITIES = ("OT",)
# Found anywhere in BodyPartExamined (upper case, separators removed): DICOM's CHEST, CHESTABDOMEN,
# CHESTABDPELVIS and LUNG, and the THORAX / TORAX that scanners write in practice.
CHEST_BODY_PARTS = ("CHEST", "THORAX", "TORAX", "LUNG")
# ViewPosition's first word: posteroanterior or anteroposterior ("AP SUPINE" is frontal; LL, RL, RLD,
# LLO, LATERAL... are not).
FRONTAL_VIEWS = ("PA", "AP")


@dataclass(frozen=True)
class Acquisition:
    """What a DICOM file says of its acquisition: allow-listed attributes (absent ones left out) and the
    reasons it may not be a frontal chest radiograph (empty when none)."""

    attributes: dict[str, str | float]
    problems: tuple[str, ...]


@dataclass
class DicomHeader:
    """A parsed DICOM file whose pixel data is not decoded yet."""

    dataset: Any
    pixels: int  # Rows × Columns of the one frame that will be decoded
    inflated: int  # bytes the file's deflated data inflated to (0 when not deflated)
    acquisition: Acquisition  # allow-listed attributes and frontal-chest problems, from the header


def read_dicom(body: bytes, limits: Limits, inflate_budget: int | None = None) -> DicomHeader:
    """Parse a DICOM file and check its limits; pixel data stays encoded."""
    import pydicom

    budget = limits.max_inflated_bytes if inflate_budget is None else inflate_budget
    try:
        inflated = _inflated_size(body, budget)
        dataset = pydicom.dcmread(io.BytesIO(body), force=False)
    except RequestError:
        raise
    except Exception as error:  # pydicom raises many types on malformed files
        raise UnprocessableImage(f"not a readable DICOM file: {str(error)[:200]}") from error
    if "PixelData" not in dataset:
        raise UnprocessableImage("DICOM file has no pixel data")
    try:
        rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as error:
        raise UnprocessableImage(f"DICOM image attributes are not numbers: {error}") from error
    if frames > limits.max_frames:
        raise PayloadTooLarge(exceeds(f"DICOM with {frames:,} frames", "max_frames", limits.max_frames))
    if rows * columns > limits.max_image_pixels:
        what = f"DICOM image of {columns}×{rows} = {rows * columns:,} pixels"
        raise PayloadTooLarge(exceeds(what, "max_image_pixels", limits.max_image_pixels))
    return DicomHeader(dataset, rows * columns, inflated, describe_acquisition(dataset))


def describe_acquisition(dataset: Any) -> Acquisition:
    """The allow-listed acquisition attributes of a data set and its frontal-chest problems."""
    attributes = acquisition_attributes(dataset)
    return Acquisition(attributes, tuple(_problems(attributes)))


def acquisition_attributes(dataset: Any) -> dict[str, str | float]:
    """`ACQUISITION_ATTRIBUTES` present in the data set's top level, normalised: numbers (numeric VRs) as
    floats, a multi-valued number as one float when its values agree; text stripped of blanks and
    control characters; multiple values joined by a backslash; at most `MAX_VALUE_CHARS`. Absent, empty,
    non-finite or unreadable values are left out. Nothing outside the allow-list can come out."""
    found: dict[str, str | float] = {}
    for keyword in ACQUISITION_ATTRIBUTES:
        try:
            element = dataset.data_element(keyword)
            value = None if element is None else _normalised(element.value, element.VR in NUMERIC_VRS)
        except Exception:  # pydicom raises many types on malformed values: the value is left out
            value = None
        if value is not None:
            found[keyword] = value
    return found


def frontal_chest_problems(dataset: Any) -> list[str]:
    """Why a data set's own attributes say it is not a frontal chest radiograph: Modality not projection
    radiography, BodyPartExamined not the chest, ViewPosition not PA or AP, or raw detector data
    (PresentationIntentType FOR PROCESSING). An absent attribute is no problem."""
    return _problems(acquisition_attributes(dataset))


def _problems(attributes: dict[str, str | float]) -> list[str]:
    modality, body, view, intent = (
        str(attributes.get(k, "")).upper()
        for k in ("Modality", "BodyPartExamined", "ViewPosition", "PresentationIntentType")
    )
    problems = []
    if modality and modality not in RADIOGRAPHY_MODALITIES + UNSPECIFIED_MODALITIES:
        problems.append(f"DICOM Modality {modality!r} is not a radiograph (CR, DX or RG)")
    if body and not any(part in "".join(c for c in body if c.isalnum()) for part in CHEST_BODY_PARTS):
        problems.append(f"DICOM BodyPartExamined {body!r} is not the chest")
    words = "".join(c if c.isalnum() else " " for c in view).split()
    if words and words[0] not in FRONTAL_VIEWS:
        problems.append(f"DICOM ViewPosition {view!r} is not a frontal view (PA or AP)")
    if intent == "FOR PROCESSING":
        problems.append("DICOM PresentationIntentType is FOR PROCESSING: raw detector data, not for display")
    return problems


def _normalised(value: Any, numeric: bool) -> str | float | None:
    """One attribute's value for capture: a float, bounded text, or None when empty or unusable."""
    many = isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))
    values = list(itertools.islice(value, MAX_VALUES)) if many else [value]
    if not values or any(isinstance(v, (bytes, bytearray)) or hasattr(v, "keys") for v in values):
        return None  # unknown VR (raw bytes) or a sequence item: not a value to capture
    if numeric:
        numbers = [float(v) for v in values if v is not None and str(v).strip()]
        if not numbers or not all(math.isfinite(n) for n in numbers):
            return None
        if len(set(numbers)) == 1:
            return numbers[0]
        values = [format(n, "g") for n in numbers]
    text = "\\".join("".join(c for c in str(v) if c.isprintable()).strip() for v in values if v is not None)
    text = text.strip("\\ ")[:MAX_VALUE_CHARS].strip()
    return text or None


def _inflated_size(body: bytes, budget: int) -> int:
    """Bytes a deflated file's data set inflates to, streamed and refused past `budget`; 0 if not deflated."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stream = io.BytesIO(body)
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return 0
    inflater, data, size = zlib.decompressobj(-zlib.MAX_WBITS), body[stream.tell() :], 0
    while data and not inflater.eof:
        size += len(inflater.decompress(data, INFLATE_CHUNK))
        data = inflater.unconsumed_tail
        if size > budget:
            what = f"deflated DICOM data inflating to over {size // 2**20:,} MB"
            raise PayloadTooLarge(exceeds(what, "max_inflated_mb", budget / 2**20))
    return size


def render(header: DicomHeader) -> np.ndarray:
    """The first frame as 8-bit gray: modality LUT, VOI LUT or window, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    dataset = header.dataset
    try:
        frame = pixel_array(dataset, index=0)
        colour = frame.ndim == 3  # samples per pixel > 1: their mean as luminance
        low, high = display_range(dataset)

        def transform(rows: np.ndarray) -> np.ndarray:
            values = rows.mean(axis=-1) if colour else rows
            return apply_voi_lut(apply_modality_lut(values, dataset), dataset)

        image = window_to_uint8(frame, low, high, transform)
    except Exception as error:  # pydicom and its pixel handlers raise many types on corrupt data
        raise UnprocessableImage(f"cannot decode DICOM pixel data: {str(error)[:200]}") from error
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        image = 255 - image
    return image


def display_range(dataset: Any) -> tuple[float, float]:
    """The value range the VOI stage outputs, which maps onto black..white.

    A VOI LUT outputs its entries' range: 0 .. 2**bits - 1, where bits is what its largest entry needs
    (at least 8, at most the descriptor's bits per entry, which files often overstate). A window, or no
    VOI stage at all, outputs the modality stage's range: a modality LUT's entries, else the stored
    range (`BitsStored`, signed or not) through the rescale slope and intercept.
    """
    from pydicom.pixels import apply_voi

    voi = dataset.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        entries, first, declared = (int(v) for v in voi[0].LUTDescriptor)
        inputs = np.arange(first, first + (entries or 2**16))
        largest = int(np.max(apply_voi(inputs, dataset)))
        return 0.0, float(2 ** min(declared, max(8, largest.bit_length())) - 1)
    modality = dataset.get("ModalityLUTSequence")
    if modality:
        return 0.0, float(2 ** int(modality[0].LUTDescriptor[2]) - 1)
    bits = int(dataset.get("BitsStored") or dataset.get("BitsAllocated") or 8)
    if int(dataset.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = dataset.get("RescaleSlope"), dataset.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = sorted((low * float(slope) + float(intercept), high * float(slope) + float(intercept)))
    return low, high
