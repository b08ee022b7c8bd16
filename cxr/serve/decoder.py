"""Request bodies → 8-bit grayscale images, per content type, bounded before any pixel is decoded.

Accepted: `image/png`, `image/jpeg`, `application/dicom`, `application/x-npy` and `application/json`
(`{"instances": [{"b64": "...", "content_type": "image/png"}, ...]}` or a list of base64 strings).

Every image's header is read and checked first (cxr.serve.limits: pixels per image and per request,
DICOM frames and inflated size); only then is anything decoded. 8-bit images are converted exactly as
training converts them. A 16-bit PNG says nothing of the bit depth its values were stored with (medical
exports often put 10-, 12- or 14-bit values unscaled in 16-bit words), so it is mapped from 0 to the
top of the smallest of 8, 10, 12, 14 or 16 bits that holds its brightest value: 12-bit data keep the
brightness they were stored with. .npy arrays outside 0..255 are stretched from their own range.
DICOM: cxr.serve.dicom.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image

from cxr.data.grayscale import stretch_to_uint8
from cxr.data.images import ImageDecodeError, decode_xray
from cxr.serve.dicom import DicomHeader, read_dicom, render
from cxr.serve.errors import PayloadTooLarge, RequestError, UnprocessableImage, UnsupportedMediaType
from cxr.serve.limits import Limits, exceeds

PNG, JPEG, DICOM, NPY, JSON = (
    "image/png",
    "image/jpeg",
    "application/dicom",
    "application/x-npy",
    "application/json",
)
IMAGE_TYPES = (PNG, JPEG, "image/jpg", "application/x-image")
ACCEPTED = (PNG, JPEG, DICOM, NPY, JSON)
DEFAULT_LIMITS = Limits()


@dataclass
class DecodedImage:
    """One image of a request: pixels plus what capture and monitoring may keep."""

    pixels: np.ndarray
    content_type: str
    original_shape: tuple[int, ...]
    raw: bytes = field(repr=False, default=b"")  # the payload safe to capture (never DICOM bytes)
    problems: list[str] = field(default_factory=list)  # why a DICOM header says it is no frontal chest film
    acquisition: dict[str, Any] = field(default_factory=dict)  # allow-listed DICOM acquisition attributes


@dataclass
class Probed:
    """An image whose header was read and checked; `decode()` makes its pixels."""

    pixels: int
    decode: Callable[[], DecodedImage]
    inflated: int = 0


def media_type(header: str | None) -> str:
    """`image/png; charset=x` → `image/png` (lower case); empty when missing."""
    return (header or "").split(";")[0].strip().lower()


def decode_request(
    body: bytes, content_type: str | None, limits: Limits = DEFAULT_LIMITS
) -> list[DecodedImage]:
    """Decode a request body into one or more images; raise a RequestError subclass on bad input."""
    kind = media_type(content_type)
    if not kind:
        raise UnsupportedMediaType(f"missing Content-Type; send one of {', '.join(ACCEPTED)}")
    if not body:
        raise RequestError("empty request body")
    batch = kind == JSON
    items = _json_items(body, limits) if batch else [(body, kind)]
    probed: list[Probed] = []
    for index, (data, item_kind) in enumerate(items):
        with _instance(index if batch else None):
            budget = limits.max_inflated_bytes - sum(p.inflated for p in probed)
            probed.append(probe(data, item_kind, limits, budget))
    total = sum(p.pixels for p in probed)
    if total > limits.max_request_pixels:
        what = f"{len(probed)} image(s) of {total:,} pixels in all"
        raise PayloadTooLarge(exceeds(what, "max_request_pixels", limits.max_request_pixels))
    images = []
    for index, item in enumerate(probed):
        with _instance(index if batch else None):
            images.append(item.decode())
    return images


def decode_one(body: bytes, kind: str, limits: Limits = DEFAULT_LIMITS) -> DecodedImage:
    """Decode a single payload of a known media type."""
    return probe(body, kind, limits).decode()


def probe(body: bytes, kind: str, limits: Limits, inflate_budget: int | None = None) -> Probed:
    """Read one payload's header and check its limits; nothing is decoded yet."""
    if kind in IMAGE_TYPES:
        width, height = _image_size(body, limits)
        _check_image_pixels(f"image of {width}×{height}", width * height, limits)
        return Probed(width * height, lambda: _decode_image(body, kind))
    if kind == DICOM:
        header = read_dicom(body, limits, inflate_budget)
        return Probed(header.pixels, lambda: _dicom_image(header), header.inflated)
    if kind == NPY:
        shape, dtype, offset = _npy_header(body)
        size = int(np.prod(shape, dtype=np.int64))
        _check_image_pixels(f"array of shape {shape}", size, limits)
        return Probed(size, lambda: _decoded(_npy_pixels(body, shape, dtype, offset), NPY, body))
    raise UnsupportedMediaType(f"unsupported Content-Type {kind!r}; send one of {', '.join(ACCEPTED)}")


def _decoded(pixels: np.ndarray, kind: str, raw: bytes) -> DecodedImage:
    return DecodedImage(pixels, kind, pixels.shape, raw)


def _dicom_image(header: DicomHeader) -> DecodedImage:
    """The rendered pixels with what the header says of the acquisition (allow-listed attributes only)."""
    image = _decoded(render(header), DICOM, b"")
    image.acquisition = dict(header.acquisition.attributes)
    image.problems = list(header.acquisition.problems)
    return image


def _check_image_pixels(what: str, pixels: int, limits: Limits) -> None:
    if pixels > limits.max_image_pixels:
        what = f"{what} = {pixels:,} pixels"
        raise PayloadTooLarge(exceeds(what, "max_image_pixels", limits.max_image_pixels))


@contextmanager
def _instance(index: int | None) -> Iterator[None]:
    """Prefix errors about one image of a batch with its index."""
    try:
        yield
    except RequestError as error:
        if index is None:
            raise
        raise type(error)(f"instance {index}: {error}") from error


def _image_size(body: bytes, limits: Limits) -> tuple[int, int]:
    """Width and height from the image header alone (decompression bombs are refused here)."""
    try:
        with Image.open(io.BytesIO(body)) as header:
            return header.size
    except Image.DecompressionBombError as error:
        what = f"image ({str(error)[:120]})"
        raise PayloadTooLarge(exceeds(what, "max_image_pixels", limits.max_image_pixels)) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise UnprocessableImage(f"not a readable image: {str(error)[:200]}") from error


def _decode_image(body: bytes, kind: str) -> DecodedImage:
    """PNG/JPEG → gray exactly as training decodes it (16-bit from the bit depth its values need)."""
    try:
        pixels = decode_xray(body)
    except (ImageDecodeError, cv2.error) as error:
        raise UnprocessableImage(f"cannot decode {kind}: {error}") from error
    return _decoded(pixels, kind, body)


def _npy_header(body: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a .npy payload, from its header alone."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}
        if version[0] not in read:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read[version[0]](stream)
    except (ValueError, OSError, EOFError, SyntaxError) as error:
        raise UnprocessableImage(f"not a .npy array: {error}") from error
    if len(shape) != 2 or 0 in shape:
        raise UnprocessableImage(f"expected a 2-D grayscale array, got shape {shape}")
    if dtype.hasobject or not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise UnprocessableImage(f"array dtype {dtype} is not a real number type")
    if fortran:
        raise UnprocessableImage("Fortran-ordered arrays are not accepted; send C order")
    return shape, dtype, stream.tell()


def _npy_pixels(body: bytes, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    if len(body) - offset < count * dtype.itemsize:
        raise UnprocessableImage(f"truncated .npy array: {len(body) - offset} bytes for {shape} {dtype}")
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
    if array.dtype == np.uint8:
        return array.copy()
    try:
        return stretch_to_uint8(array)
    except ValueError as error:
        raise UnprocessableImage(f"array holds no finite values: {error}") from error


def _json_items(body: bytes, limits: Limits) -> list[tuple[bytes, str]]:
    """The base64-decoded payloads of a JSON batch with their content types."""
    try:
        payload: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"malformed JSON: {error}") from error
    items = payload.get("instances") if isinstance(payload, dict) else payload
    if not isinstance(items, list) or not items:
        raise RequestError('JSON body must be {"instances": [...]} or a non-empty list of base64 images')
    if len(items) > limits.max_images:
        raise PayloadTooLarge(exceeds(f"{len(items)} images in one request", "max_images", limits.max_images))
    decoded = []
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
        decoded.append((data, media_type(kind)))
    return decoded


def _field(item: Any, name: str, default: str | None = None) -> str:
    if not isinstance(item, dict):
        raise RequestError("each instance must be a base64 string or an object with 'b64'")
    value = item.get(name, default)
    if not isinstance(value, str):
        raise RequestError(f"instance field {name!r} must be a string")
    return value
