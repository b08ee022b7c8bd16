"""Decode NIH chest X-ray files into 8-bit grayscale arrays, and resize them.

Real quirks of the release handled here: most PNGs are 8-bit grayscale, a few are RGBA (the gray value
repeated in R, G and B, opaque alpha). 16-bit files are scaled from the bit depth their values need (the
smallest of 8, 10, 12, 14 or 16 bits holding the brightest value), so 12-bit data stored in 16-bit words
keep their brightness. DICOM files (the `DICM` marker after the 128-byte preamble) are rendered exactly as
the server renders them (`cxr.serve.dicom`): modality LUT, VOI LUT or window, MONOCHROME1 inverted.
"""

from __future__ import annotations

import cv2
import numpy as np

from cxr.data.grayscale import stored_depth_to_uint8

DICOM_MAGIC, DICOM_MAGIC_OFFSET = b"DICM", 128

cv2.setNumThreads(1)  # parallelism is across images (processes), never inside one decode


class ImageDecodeError(ValueError):
    """A file could not be decoded as an image; the message says why."""


def decode_xray(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG/DICOM bytes into a 2-D uint8 grayscale array."""
    if not data:
        raise ImageDecodeError("empty file")
    if is_dicom(data):
        return decode_dicom(data)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageDecodeError(f"not a decodable image ({len(data)} bytes, starts {data[:8]!r})")
    return to_gray8(image)


def is_dicom(data: bytes) -> bool:
    """Whether the bytes are a DICOM file (Part 10: `DICM` after the 128-byte preamble)."""
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)] == DICOM_MAGIC


def decode_dicom(data: bytes) -> np.ndarray:
    """The first frame of a DICOM file as 8-bit gray, rendered by the server's own code under its default
    limits (`cxr.serve.limits.Limits`); its refusals become ImageDecodeError."""
    from cxr.serve.dicom import read_dicom, render
    from cxr.serve.errors import RequestError
    from cxr.serve.limits import Limits

    try:
        return render(read_dicom(data, Limits()))
    except RequestError as error:
        raise ImageDecodeError(f"DICOM: {error}") from error


def to_gray8(image: np.ndarray) -> np.ndarray:
    """Convert a decoded array (gray, BGR, BGRA; 8- or 16-bit) to 2-D uint8 grayscale."""
    if image.dtype == np.uint16:
        image = stored_depth_to_uint8(image[..., :3] if image.ndim == 3 else image)  # alpha: not depth
    elif image.dtype != np.uint8:
        raise ImageDecodeError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    raise ImageDecodeError(f"unsupported image shape {image.shape}")


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a grayscale image to size×size: area averaging when shrinking, bilinear when growing."""
    if image.shape == (size, size):
        return np.ascontiguousarray(image)
    shrinking = image.shape[0] >= size and image.shape[1] >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 grayscale array as PNG bytes."""
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ImageDecodeError("PNG encoding failed")
    return buffer.tobytes()
