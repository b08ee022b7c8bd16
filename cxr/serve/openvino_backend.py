"""OpenVINO on the CPU: the serving graph in FP32, in BF16, or quantised to INT8 by NNCF.

FP32 and BF16 compile the package's verified `model.onnx` itself (OpenVINO reads ONNX directly), so the
file served is the file checked; INT8 is an OpenVINO IR (`model_int8.xml` + `.bin`) that NNCF's
post-training quantisation makes from that graph at registration, calibrated on training images. The
precision is always stated: on a CPU with native BF16 OpenVINO would otherwise run "FP32" in BF16.
"""

from __future__ import annotations

import contextlib
import os
import queue
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "bf16", "int8")
INT8_FILE = "model_int8.xml"  # its weights beside it in model_int8.bin
CALIBRATION_IMAGES = 300  # NNCF's default subset size


def backend_name(precision: str) -> str:
    """The serving backend's name for an OpenVINO precision, e.g. `openvino-int8`."""
    return f"openvino-{precision}"


def cpu_supports(precision: str) -> bool:
    """Whether this CPU runs `precision` natively (BF16 needs AVX512_BF16 or AMX; INT8 any AVX2 CPU)."""
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return precision == "fp32" or precision.upper() in capabilities


def compile_model(model: Any, precision: str, threads: int | None = None) -> Any:
    """A read OpenVINO model compiled for the CPU: one stream of `threads` threads (default: all cores),
    arithmetic in BF16 for `bf16`, else in FP32 (INT8 layers stay INT8)."""
    import openvino as ov

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": threads or os.cpu_count() or 1,
    }
    return ov.Core().compile_model(model, "CPU", config)


class OpenVinoPredictor:
    """Uint8 [B,1,crop,crop] batches → (probabilities, embeddings) with `sessions` compiled copies of a
    model of `threads` threads each, so that many batches can be scored at once (as ONNX Runtime's
    sessions are)."""

    def __init__(self, path: str | Path, precision: str, threads: int | None = None, sessions: int = 1):
        import openvino as ov

        self.backend = backend_name(precision)
        self.metadata: dict[str, Any] = {}
        self.concurrency = max(1, sessions)
        self._free: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        model = ov.Core().read_model(str(path))
        for _ in range(self.concurrency):
            compiled = compile_model(model, precision, threads)
            outputs = (compiled.output("probabilities"), compiled.output("embedding"))
            self._free.put((compiled.create_infer_request(), outputs))

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request, outputs = self._free.get()
        try:  # outputs copied out of the request, whose buffers hold its next batch
            result = request.infer({"images": batch}, share_outputs=False)
        finally:
            self._free.put((request, outputs))
        return result[outputs[0]], result[outputs[1]]


def quantize_int8(onnx_path: str | Path, calibration: Sequence[np.ndarray], out_path: str | Path) -> Path:
    """NNCF post-training quantisation of the ONNX serving graph, calibrated on uint8 [1, crop, crop]
    images; written as an OpenVINO IR at `out_path` (.xml, weights in the .bin beside it)."""
    import openvino as ov

    nncf = _import_nncf()

    _no_telemetry()
    model = ov.Core().read_model(str(onnx_path))
    dataset = nncf.Dataset([np.ascontiguousarray(image[None]) for image in calibration])
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
    ov.save_model(quantized, str(out_path), compress_to_fp16=False)
    return Path(out_path)


def _import_nncf() -> Any:
    """nncf, imported under typing_extensions' own parameter check. Metaflow vendors an older
    typing_extensions that, imported after the real one, installs a check blind to the real one's
    defaults, and nncf's generics then fail to define (Netflix/metaflow#2462): a flow's register step
    has both loaded."""
    import typing

    import typing_extensions

    installed = typing._collect_parameters  # type: ignore[attr-defined]
    typing._collect_parameters = getattr(typing_extensions, "_collect_parameters", installed)  # type: ignore[attr-defined]
    try:
        import nncf
    finally:
        typing._collect_parameters = installed  # type: ignore[attr-defined]
    return nncf


def _no_telemetry() -> None:
    """NNCF reports usage unless a consent file says no; a hospital's registration step should not."""
    with contextlib.suppress(Exception):
        from openvino_telemetry import Telemetry

        Telemetry().consent = False
