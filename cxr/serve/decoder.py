"""Request bodies → 8-bit grayscale images, per content type, with limits against hostile input.

Accepted: `image/png`, `image/jpeg`, `application/dicom`, `application/x-npy` and `application/json`
(`{"instances": [{"b64": "...", "content_type": "image/png"}, ...]}` or a list of base64 strings). DICOM
is decoded with pydicom: modality LUT, VOI LUT / windowing, MONOCHROME1 inversion; no tag leaves this
module, only pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from cxr.data.images import ImageDecodeError, decode_xray
from cxr.serve.errors import PayloadTooLarge, RequestError, UnprocessableImage, UnsupportedMediaType

PNG, JPEG, DICOM, NPY, JSON = (
    "image/png",
    "image/jpeg",
    "application/dicom",
    "application/x-npy",
    "application/json",
)
IMAGE_TYPES = (PNG, JPEG, "image/jpg", "application/x-image")
ACCEPTED = (PNG, JPEG, DICOM, NPY, JSON)
MAX_PIXELS = 40_000_000  # larger than any radiograph (a 4k×4k detector is 16 MP)
MAX_BATCH = 64


@dataclass
class DecodedImage:
    """One image of a request: pixels plus what capture and monitoring may keep."""

    pixels: np.ndarray
    content_type: str
    original_shape: tuple[int, ...]
    raw: bytes = field(repr=False, default=b"")  # the payload safe to capture (never DICOM bytes)


def media_type(header: str | None) -> str:
    """`image/png; charset=x` → `image/png` (lower case); empty when missing."""
    return (header or "").split(";")[0].strip().lower()


def decode_request(body: bytes, content_type: str | None) -> list[DecodedImage]:
    """Decode a request body into one or more images; raise a RequestError subclass on bad input."""
    kind = media_type(content_type)
    if not kind:
        raise UnsupportedMediaType(f"missing Content-Type; send one of {', '.join(ACCEPTED)}")
    if not body:
        raise RequestError("empty request body")
    if kind == JSON:
        return _decode_json_batch(body)
    return [decode_one(body, kind)]


def decode_one(body: bytes, kind: str) -> DecodedImage:
    """Decode a single payload of a known media type."""
    if kind in IMAGE_TYPES:
        _check_image_header(body)
        try:
            pixels = decode_xray(body)
        except ImageDecodeError as error:
            raise UnprocessableImage(f"cannot decode {kind}: {error}") from error
        return DecodedImage(pixels, kind, pixels.shape, body)
    if kind == DICOM:
        pixels = decode_dicom(body)
        return DecodedImage(pixels, kind, pixels.shape, b"")
    if kind == NPY:
        pixels = _decode_npy(body)
        return DecodedImage(pixels, kind, pixels.shape, body)
    raise UnsupportedMediaType(f"unsupported Content-Type {kind!r}; send one of {', '.join(ACCEPTED)}")


def _check_image_header(body: bytes) -> None:
    """Refuse decompression bombs from the header alone, before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(body)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as error:
        raise PayloadTooLarge(f"image exceeds the pixel limit: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise UnprocessableImage(f"not a readable image: {str(error)[:200]}") from error
    if width * height > MAX_PIXELS:
        raise PayloadTooLarge(f"image of {width}×{height} pixels exceeds the limit of {MAX_PIXELS:,}")


def _decode_npy(body: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UnprocessableImage(f"not a .npy array: {error}") from error
    if array.ndim != 2 or array.size == 0:
        raise UnprocessableImage(f"expected a 2-D grayscale array, got shape {array.shape}")
    if array.size > MAX_PIXELS:
        raise PayloadTooLarge(f"array of {array.size:,} pixels exceeds the limit of {MAX_PIXELS:,}")
    if not np.issubdtype(array.dtype, np.number):
        raise UnprocessableImage(f"array dtype {array.dtype} is not numeric")
    if array.dtype != np.uint8:
        array = _to_uint8(array.astype(np.float64))
    return np.ascontiguousarray(array)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise UnprocessableImage("array holds no finite values")
    low, high = float(finite.min()), float(finite.max())
    if low >= 0 and high <= 255:
        return np.nan_to_num(values, nan=0.0).round().astype(np.uint8)
    scaled = (np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12) * 255.0
    return scaled.round().astype(np.uint8)


def decode_dicom(body: bytes) -> np.ndarray:
    """DICOM bytes → 8-bit grayscale: modality LUT, VOI LUT or window, MONOCHROME1 inverted."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(body), force=False)
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError) as error:
        raise UnprocessableImage(f"not a readable DICOM file: {str(error)[:200]}") from error
    if "PixelData" not in dataset:
        raise UnprocessableImage("DICOM file has no pixel data")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    if rows * columns > MAX_PIXELS:
        raise PayloadTooLarge(f"DICOM image of {columns}×{rows} pixels exceeds the limit of {MAX_PIXELS:,}")
    try:
        pixels = dataset.pixel_array
        if pixels.ndim == 3:  # multi-frame or colour: the first frame / luminance
            pixels = pixels[0] if dataset.get("SamplesPerPixel", 1) == 1 else pixels.mean(axis=-1)
        values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
    except Exception as error:  # pydicom and its pixel handlers raise many types on corrupt data
        raise UnprocessableImage(f"cannot decode DICOM pixel data: {str(error)[:200]}") from error
    if "WindowCenter" in dataset or "VOILUTSequence" in dataset:
        low, high = _voi_output_range(dataset)  # the window maps onto this range: keep its meaning
        image = (np.clip((values - low) / max(high - low, 1e-12), 0, 1) * 255).round().astype(np.uint8)
    else:
        image = _to_uint8(values)  # no window in the file: stretch the image's own range
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        image = 255 - image
    return image


def _voi_output_range(dataset: Any) -> tuple[float, float]:
    """The value range a VOI LUT / window maps onto (as pydicom's apply_voi_lut uses it)."""
    bits = int(dataset.get("BitsStored", 8))
    if int(dataset.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = dataset.get("RescaleSlope"), dataset.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def _decode_json_batch(body: bytes) -> list[DecodedImage]:
    try:
        payload: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"malformed JSON: {error}") from error
    items = payload.get("instances") if isinstance(payload, dict) else payload
    if not isinstance(items, list) or not items:
        raise RequestError('JSON body must be {"instances": [...]} or a non-empty list of base64 images')
    if len(items) > MAX_BATCH:
        raise PayloadTooLarge(f"{len(items)} images in one request; the limit is {MAX_BATCH}")
    images = []
    for index, item in enumerate(items):
        text, kind = (
            (item, PNG) if isinstance(item, str) else (_field(item, "b64"), _field(item, "content_type", PNG))
        )
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError, TypeError) as error:
            raise RequestError(f"instance {index}: invalid base64: {error}") from error
        if not data:
            raise RequestError(f"instance {index}: empty image")
        try:
            images.append(decode_one(data, media_type(kind)))
        except RequestError as error:
            raise type(error)(f"instance {index}: {error}") from error
    return images


def _field(item: Any, name: str, default: str | None = None) -> str:
    if not isinstance(item, dict):
        raise RequestError("each instance must be a base64 string or an object with 'b64'")
    value = item.get(name, default)
    if not isinstance(value, str):
        raise RequestError(f"instance field {name!r} must be a string")
    return value
