"""DICOM bytes → 8-bit grayscale, bounded before any pixel is decoded; no tag leaves this module.

Bounds, from the file's headers: deflated data (Deflated Explicit VR Little Endian) is inflated as a
stream and refused past a size cap before pydicom inflates it; `NumberOfFrames` and `Rows × Columns`
are checked before the pixel data is touched, and only the first frame is ever decoded.

Rendering follows the DICOM display pipeline: modality LUT or rescale, then the VOI LUT or window,
whose output range (from `BitsStored`, the rescale, or the LUT's entries) is mapped onto 0..255. A
file without a VOI LUT or window maps its full stored range (`BitsStored`, after the rescale), so 12-bit
data in 16-bit words keeps its brightness. MONOCHROME1 is inverted.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr.data.grayscale import window_to_uint8
from cxr.serve.errors import PayloadTooLarge, RequestError, UnprocessableImage
from cxr.serve.limits import Limits, exceeds

INFLATE_CHUNK = 1 << 20


@dataclass
class DicomHeader:
    """A parsed DICOM file whose pixel data is not decoded yet."""

    dataset: Any
    pixels: int  # Rows × Columns of the one frame that will be decoded
    inflated: int  # bytes the file's deflated data inflated to (0 when not deflated)


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
    return DicomHeader(dataset, rows * columns, inflated)


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
