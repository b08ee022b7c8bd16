"""Helpers for serving tests: build packages, run the real server as a process, craft hostile inputs."""

from __future__ import annotations

import io
import os
import secrets
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.model import CXRNet
from cxr.package import build_package, export_and_verify_onnx

IMAGE_SIZE, CROP = 64, 56


def make_package(
    directory: Path, nih_root: Path, seed: int = 0, version: int = 1, calibration: dict | None = None
) -> tuple[Path, CXRNet, object]:
    """A package with a verified ONNX export, from a seeded random model; returns (package, model, cache)."""
    directory.mkdir(parents=True, exist_ok=True)
    catalog, _ = load_catalog(nih_root)
    cache = build_cache(
        catalog, PreprocessSettings(size=IMAGE_SIZE), root=directory / "cache", progress=False
    )
    torch.manual_seed(seed)
    model = CXRNet(pretrained=False).eval()
    onnx_path = directory / "model.onnx"
    check = export_and_verify_onnx(model, CROP, cache, np.arange(40), onnx_path)
    assert check["verified"], check
    thresholds = {"Effusion": 0.4}
    metadata = {"image_size": IMAGE_SIZE, "crop": CROP, "dropout": 0.3, "onnx": check, "version": version,
                "name": f"cxr-test-{seed}", "thresholds": thresholds, "calibration": calibration}  # fmt: skip
    package = build_package(model.state_dict(), metadata, directory / "model.tar.gz", "# card", onnx_path)
    return package, model, cache


class LiveServer:
    """`cxr serve` in its own process on a loopback port; stopped with SIGTERM like a container. Its admin
    token is a fresh `admin_token` given in $CXR_ADMIN_TOKEN, unless `env` says otherwise."""

    def __init__(self, port: int, *args: str, env: dict | None = None, verbose: bool = False):
        self.url = f"http://127.0.0.1:{port}"
        self.admin_token = secrets.token_urlsafe(24)
        command = [sys.executable, "-m", "cxr.cli", *(["-v"] if verbose else []), "serve",
                   "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
        env = {**os.environ, "CXR_ADMIN_TOKEN": self.admin_token, **(env or {})}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stdout.read().decode()[-3000:]}")
            try:
                if self.get("/ping")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not answer /ping in 120 s")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:  # loopback only
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)

    def get(self, path: str):
        return self.request("GET", path)

    def admin(self, method: str, path: str, body: bytes | None = None, token: str | None = None):
        """A request to an admin route with the bearer token (the server's own unless `token`)."""
        return self.request(method, path, body, {"Authorization": f"Bearer {token or self.admin_token}"})

    def post(
        self, body: bytes, content_type: str | None, path: str = "/invocations", headers: dict | None = None
    ):
        headers = dict(headers or {})
        if content_type is not None:
            headers["Content-Type"] = content_type
        return self.request("POST", path, body, headers)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.stdout.read().decode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def decompression_bomb() -> bytes:
    """A small valid PNG that declares 100,000 × 100,000 pixels."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")
    )


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def to_12_bit(pixels: np.ndarray) -> np.ndarray:
    """8-bit gray values as 12-bit values in a 16-bit array (0..255 → 0..4095)."""
    return np.round(pixels.astype(np.float64) * 4095 / 255).astype(np.uint16)


def dicom_dataset(rows: int, columns: int, transfer_syntax: str | None = None):
    """A secondary-capture dataset header (16-bit, BitsStored 12) with identifying patient tags."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-SECRET-4242"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def saved(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_bytes(
    pixels: np.ndarray, monochrome1: bool = False, with_pixels: bool = True, window: bool = True
) -> bytes:
    """A minimal DICOM file (secondary capture) holding 8-bit `pixels` as 12-bit values."""
    ds = dicom_dataset(*pixels.shape)
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    if window:
        ds.WindowCenter, ds.WindowWidth = 2048, 4096  # the full 12-bit range: windowing is linear here
    values = to_12_bit(pixels)
    if monochrome1:
        values = 4095 - values
    if with_pixels:
        ds.PixelData = values.tobytes()
    return saved(ds)


def _explicit_header(group: int, element: int, vr: bytes, length: int) -> bytes:
    return struct.pack("<HH2sHI", group, element, vr, 0, length)


def deflated_dicom(pixels: np.ndarray, frames: int = 1, padding: int = 0) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM: `frames` copies of `pixels` (8-bit), then `padding`
    zero bytes of Data Set Trailing Padding; streamed, so gigabytes inflated cost megabytes here."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dicom_dataset(*pixels.shape, DeflatedExplicitVRLittleEndian)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    if frames > 1:
        ds.NumberOfFrames = frames
    out = DicomBytesIO()
    out.write(ds.preamble + b"DICM")
    write_file_meta_info(out, ds.file_meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflate.compress(body.getvalue())]
    frame = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    size = len(frame) * frames
    parts.append(deflate.compress(_explicit_header(0x7FE0, 0x0010, b"OB", size + size % 2)))
    for _ in range(frames):
        parts.append(deflate.compress(frame))
    parts.append(deflate.compress(b"\0" * (size % 2)))
    if padding:
        parts.append(deflate.compress(_explicit_header(0xFFFC, 0xFFFC, b"OB", padding)))
        chunk = bytes(1 << 24)
        for start in range(0, padding, len(chunk)):
            parts.append(deflate.compress(chunk[: min(len(chunk), padding - start)]))
    parts.append(deflate.flush())
    return out.getvalue() + b"".join(parts)


def jpeg_multiframe_dicom(frames: int, side: int = 1024) -> bytes:
    """An encapsulated JPEG Baseline DICOM of `frames` black side×side frames (~13 kB each)."""
    import cv2
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    jpeg = cv2.imencode(".jpg", np.zeros((side, side), np.uint8))[1].tobytes()
    ds = dicom_dataset(side, side, JPEGBaseline8Bit)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([jpeg] * frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return saved(ds)


def black_png_batch(count: int = 64, side: int = 6000) -> bytes:
    """A JSON batch of `count` black side×side PNGs: ~35 kB each to send, 36 MP each to decode."""
    import base64
    import json

    import cv2

    png = cv2.imencode(".png", np.zeros((side, side), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]
    encoded = base64.b64encode(png.tobytes()).decode()
    return json.dumps({"instances": [encoded] * count}).encode()


def peak_rss_bytes(pid: int) -> int:
    """A process's peak resident set size (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def dicom_with_voi_lut(pixels: np.ndarray, declared_bits: int = 12) -> bytes:
    """16-bit stored values (BitsStored 16) whose VOI LUT maps them onto 12-bit output values; the LUT
    descriptor declares `declared_bits` bits per entry (files often say 16 for 12-bit entries)."""
    from pydicom.dataset import Dataset

    ds = dicom_dataset(*pixels.shape)
    ds.BitsStored, ds.HighBit = 16, 15
    item = Dataset()
    item.LUTDescriptor = [0, 0, declared_bits]  # 0 entries means 65,536
    item.LUTData = np.round(np.arange(65536) / 65535 * 4095).astype("<u2").tobytes()
    item["LUTData"].VR = "OW"
    ds.VOILUTSequence = [item]
    ds.PixelData = (pixels.astype(np.uint16) * 257).tobytes()  # 0..255 → 0..65535
    return saved(ds)
