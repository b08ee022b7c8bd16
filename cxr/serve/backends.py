"""The serving backends by name, and the package file each reads; light enough for the CLI to import."""

from __future__ import annotations

from cxr.serve.openvino_backend import INT8_FILE, PRECISIONS, backend_name

ONNX_FILE = "model.onnx"
OPENVINO = tuple(backend_name(precision) for precision in PRECISIONS)
BACKENDS = ("auto", "onnx", "torch", *OPENVINO)
# `auto` serves the first of these the package verified, fastest first as bench/bench_serve.py measures
# them (P3) on a 2-core AVX-512 CPU; eager PyTorch when none is there.
AUTO_ORDER = ("openvino-int8", "openvino-bf16", "openvino-fp32", "onnx")
SOURCES = {  # the package file each backend reads
    "onnx": ONNX_FILE,
    "openvino-fp32": ONNX_FILE,
    "openvino-bf16": ONNX_FILE,
    "openvino-int8": INT8_FILE,
}
