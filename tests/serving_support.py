"""Helpers for serving tests: build packages, run the real server as a process, craft hostile inputs."""

from __future__ import annotations

import io
import os
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
    directory: Path, nih_root: Path, seed: int = 0, version: int = 1
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
                "name": f"cxr-test-{seed}", "thresholds": thresholds}  # fmt: skip
    package = build_package(model.state_dict(), metadata, directory / "model.tar.gz", "# card", onnx_path)
    return package, model, cache


class LiveServer:
    """`cxr serve` in its own process on a loopback port; stopped with SIGTERM like a container."""

    def __init__(self, port: int, *args: str, env: dict | None = None):
        self.url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "cxr.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ]
        self.process = subprocess.Popen(
            command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
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


def dicom_bytes(pixels: np.ndarray, monochrome1: bool = False, with_pixels: bool = True) -> bytes:
    """A minimal DICOM file (secondary capture) holding `pixels` and identifying patient tags."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-SECRET-4242"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096  # the full 12-bit range: windowing is linear here
    values = np.round(pixels.astype(np.float64) * 4095 / 255).astype(np.uint16)  # 8-bit → 12-bit
    if monochrome1:
        values = 4095 - values
    if with_pixels:
        ds.PixelData = values.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
