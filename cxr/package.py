"""The deployable package, in SageMaker's layout: `model.tar.gz` with

model.pt            the network's state dict
model.onnx          the serving graph for ONNX Runtime and OpenVINO FP32/BF16 (when exported and verified)
model_int8.xml/.bin the graph quantised to INT8 by NNCF, as an OpenVINO IR (when verified)
metadata.json       findings, image size, crop, dropout, thresholds, name, version, lineage, backend checks
model_card.md       the model card
input_gate.npz      the input gate's out-of-distribution detectors (when fitted; see cxr.ood)
code/inference.py   SageMaker handlers (re-exported from cxr.inference)
code/requirements.txt
code/cxr/...        the cxr library itself, so the handlers import it inside any PyTorch container
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cxr
from cxr.data.findings import FINDINGS

INFERENCE_SHIM = '''"""SageMaker entry point: the handlers live in the bundled cxr library."""
from cxr.inference import input_fn, model_fn, output_fn, predict_fn  # noqa: F401
'''
REQUIREMENTS = "opencv-python-headless>=4.8\nnumpy>=1.24\npandas>=2\npyyaml>=6\ntqdm>=4\nonnxruntime>=1.17\n"
ONNX_TOLERANCE = 1e-4  # max |probability difference| between ONNX Runtime (or OpenVINO FP32) and PyTorch
ONNX_MAX_AUROC_DELTA = 0.002  # max |mean AUROC difference| from PyTorch, every backend
LOW_PRECISION_TOLERANCE = 0.05  # max |probability difference| for BF16 and INT8: a bound on gross errors


def build_package(
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    out_path: str | Path,
    model_card: str = "",
    onnx_path: str | Path | None = None,
    files: dict[str, str | Path] | None = None,
) -> Path:
    """Write `model.tar.gz` (see module doc); `metadata` needs image_size, crop and dropout; `files` go in
    beside the model under their names (e.g. the input gate's `input_gate.npz`)."""
    missing = {"image_size", "crop", "dropout"} - set(metadata)
    if missing:
        raise ValueError(f"package metadata lacks {sorted(missing)}")
    metadata = {"findings": list(FINDINGS), "cxr_version": cxr.__version__, **metadata}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    weights = io.BytesIO()
    torch.save(state_dict, weights)
    with (
        tempfile.NamedTemporaryFile(dir=out_path.parent, suffix=".tmp", delete=False) as handle,
        tarfile.open(fileobj=handle, mode="w:gz") as tar,
    ):
        add_bytes(tar, "model.pt", weights.getvalue())
        if onnx_path is not None:
            tar.add(str(onnx_path), arcname="model.onnx")
        for name, path in sorted((files or {}).items()):
            add_bytes(tar, name, Path(path).read_bytes())
        add_bytes(tar, "metadata.json", json.dumps(metadata, indent=1).encode())
        add_bytes(tar, "model_card.md", model_card.encode())
        add_bytes(tar, "code/inference.py", INFERENCE_SHIM.encode())
        add_bytes(tar, "code/requirements.txt", REQUIREMENTS.encode())
        add_library(tar, "code/cxr")
    Path(handle.name).replace(out_path)
    return out_path


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add `data` as file `name` (mode 0644, time 0: the same content gives the same archive)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def add_library(tar: tarfile.TarFile, prefix: str) -> None:
    """Add the cxr library's source under `prefix` (e.g. `code/cxr`), so it imports without installing."""
    library = Path(cxr.__file__).resolve().parent
    for source in sorted(library.rglob("*.py")):
        add_bytes(tar, f"{prefix}/{source.relative_to(library).as_posix()}", source.read_bytes())


def unpack(package: str | Path, directory: str | Path) -> Path:
    """Extract a package (safely: no absolute paths or links) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(package, "r:gz") as tar:
        tar.extractall(directory, filter="data")  # "data" filter: no absolute paths or links
    return directory


def score_package(package: str | Path, cache: Any, rows: Any, batch_size: int = 64,
                  label: str = "scoring the package") -> Any:  # fmt: skip
    """Probabilities [N, 14] of a packaged model on cache rows, preprocessed as the package specifies, batch
    by batch with the fastest float32 backend it offers (the GPU; else its verified ONNX export; else
    PyTorch): models are compared here, not the precisions they may be served in."""
    from cxr.data.loader import NO_AUGMENTATION, ShardDataset
    from cxr.inference import load_model, prepare
    from cxr.progress import Progress
    from cxr.scoring import NetPredictor, score
    from cxr.serve.predictor import load_predictor, verified_backends

    rows = np.asarray(rows)
    with tempfile.TemporaryDirectory() as directory:
        unpacked = unpack(package, directory)
        if torch.cuda.is_available():
            model, metadata = load_model(unpacked)
            predictor: Any = NetPredictor(model)
        else:
            offered = verified_backends(unpacked, json.loads((unpacked / "metadata.json").read_text()))
            predictor = load_predictor(unpacked, "onnx" if "onnx" in offered else "torch")
            metadata = predictor.metadata
    if metadata["image_size"] == cache.size:
        dataset = ShardDataset(cache, rows, crop=metadata["crop"], augmentation=NO_AUGMENTATION)
        return score(predictor, dataset, label, batch_size=batch_size).probabilities
    # Cached at another size: prepare each cached image as serving would.
    outputs = []
    with Progress(label, len(rows)) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            crops = np.stack([prepare(np.asarray(cache.image(int(r))), metadata) for r in chunk])
            outputs.append(predictor.predict(crops)[0])
            bar.update(len(chunk))
    return np.concatenate(outputs) if outputs else np.zeros((0, len(FINDINGS)), np.float32)


VERIFY_IMAGES = 512  # rows the exports are checked on (spread evenly over the rows given)


@dataclass
class BackendChecks:
    """What registration verified: the ONNX Runtime check, OpenVINO's per precision, and the files the
    verified backends need in the package (by their names there)."""

    onnx: dict[str, Any]
    openvino: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def export_and_verify_onnx(
    model: Any, crop: int, cache: Any, rows: Any, out_path: str | Path, max_images: int = VERIFY_IMAGES
) -> dict[str, Any]:
    """Export the serving graph to `out_path` and check it under ONNX Runtime (`export_and_verify`, no
    OpenVINO). Returns the check (`verified` says whether the export may be served)."""
    out_path = Path(out_path)
    directory, name = out_path.parent, out_path.name
    return export_and_verify(
        model, crop, cache, rows, directory, max_images, openvino=False, onnx_name=name
    ).onnx


def export_and_verify(
    model: Any, crop: int, cache: Any, rows: Any, work_dir: str | Path, max_images: int = VERIFY_IMAGES,
    calibration_rows: Any = None, openvino: bool = True, onnx_name: str = "model.onnx",
    bounds: Bounds | None = None,
) -> BackendChecks:  # fmt: skip
    """Export the serving graph and check each CPU backend on (at most `max_images` of) the cache rows
    against PyTorch on the CPU in float32, within `bounds` (see `Bounds`). With `openvino`, BF16 is
    checked where this CPU has it natively, and INT8 is NNCF-quantised on (at most 300 of)
    `calibration_rows` first."""
    from cxr.data.loader import ShardDataset
    from cxr.scoring import NetPredictor, OnnxNetPredictor, score
    from cxr.serve.openvino_backend import INT8_FILE, OpenVinoPredictor
    from cxr.serve.predictor import ONNX_FILE, export_onnx

    work_dir = Path(work_dir)
    model = model.eval()
    onnx_path = export_onnx(model, crop, work_dir / onnx_name)
    dataset = ShardDataset(cache, _spread(rows, max_images), crop=crop)
    bounds = bounds or Bounds()
    reference = score(NetPredictor(model, "cpu"), dataset, "backend check: PyTorch", embeddings=True)

    def check(label: str, load: Any, low_precision: bool) -> dict[str, Any]:
        try:
            predictor = load()
        except ImportError as error:
            return {"verified": False, "reason": f"{error.name or error} is not installed"}
        scores = score(predictor, dataset, f"backend check: {label}", embeddings=True)
        return compare(reference, scores, dataset.labels, bounds, low_precision)

    checks = BackendChecks(check("ONNX Runtime", lambda: OnnxNetPredictor(onnx_path), False))
    if openvino:
        for precision in ("fp32", "bf16"):
            checks.openvino[precision] = _unless_unsupported(precision) or check(
                f"OpenVINO {precision.upper()}", lambda p=precision: OpenVinoPredictor(onnx_path, p),
                precision == "bf16",
            )  # fmt: skip
        checks.openvino["int8"] = _unless_unsupported("int8") or _int8_check(
            check, onnx_path, cache, calibration_rows, crop, work_dir / INT8_FILE
        )
    if checks.onnx["verified"] or any(checks.openvino.get(p, {}).get("verified") for p in ("fp32", "bf16")):
        checks.files[ONNX_FILE] = onnx_path
    if checks.openvino.get("int8", {}).get("verified"):
        int8 = work_dir / INT8_FILE
        checks.files.update({int8.name: int8, int8.with_suffix(".bin").name: int8.with_suffix(".bin")})
    return checks


def _monitor_alpha() -> float:
    from cxr.monitor.checks import FAMILIES, MonitorConfig

    return MonitorConfig().alpha / len(FAMILIES)


@dataclass(frozen=True)
class Bounds:
    """What a backend must meet against PyTorch on the check images: its mean AUROC within
    `max_auroc_delta`; every probability within `tolerance` (`low_precision_tolerance` for BF16 and INT8);
    and embeddings the monitor cannot tell apart from PyTorch's (its embedding-drift test, the MMD
    permutation test on the captured projections, at p above `min_embedding_p`, its per-family alpha),
    since the monitoring baseline, the input gate and the uncertainty were all made from PyTorch's."""

    max_auroc_delta: float = ONNX_MAX_AUROC_DELTA
    tolerance: float = ONNX_TOLERANCE
    low_precision_tolerance: float = LOW_PRECISION_TOLERANCE
    min_embedding_p: float = field(default_factory=_monitor_alpha)


def compare(reference: Any, scores: Any, labels: Any, bounds: Bounds, low_precision: bool) -> dict[str, Any]:
    """A backend's `cxr.scoring.Scores` against PyTorch's on the same images: max and mean |probability
    difference|, mean AUROC difference, the embedding-drift p-value, and `verified` within `bounds`."""
    from cxr.features import project_embedding
    from cxr.monitor.checks import MonitorConfig, mmd_test
    from cxr.train import mean_auroc

    if not len(reference.probabilities):
        return {"verified": True, "max_abs_diff": 0.0, "mean_abs_diff": 0.0, "auroc_delta": 0.0, "images": 0}
    diff = np.abs(np.asarray(scores.probabilities, np.float64) - reference.probabilities)
    delta = abs(mean_auroc(labels, scores.probabilities) - mean_auroc(labels, reference.probabilities))
    delta = 0.0 if delta != delta else delta
    monitor = MonitorConfig()
    x, y = (project_embedding(s.embeddings)[: monitor.max_samples] for s in (reference, scores))
    _, drift_p = mmd_test(x, y, monitor.permutations, monitor.seed)
    tolerance = bounds.low_precision_tolerance if low_precision else bounds.tolerance
    largest = float(diff.max())
    return {
        "verified": largest <= tolerance
        and delta <= bounds.max_auroc_delta
        and drift_p > bounds.min_embedding_p,
        "max_abs_diff": largest,
        "mean_abs_diff": float(diff.mean()),
        "auroc_delta": float(delta),
        "embedding_drift_p": drift_p,
        "images": len(reference.probabilities),
    }


def _spread(rows: Any, count: int) -> Any:
    """At most `count` of `rows`, spread evenly over them."""
    rows = np.asarray(rows)
    return rows[np.linspace(0, len(rows) - 1, count).round().astype(int)] if len(rows) > count else rows


def _unless_unsupported(precision: str) -> dict[str, Any] | None:
    """A refusal when this CPU (or its missing OpenVINO) cannot check `precision` natively, else None."""
    from cxr.serve.openvino_backend import cpu_supports

    try:
        supported = cpu_supports(precision)
    except ImportError:
        return {"verified": False, "reason": "openvino is not installed"}
    return None if supported else {"verified": False, "reason": f"this CPU has no native {precision.upper()}"}


def _int8_check(
    check: Any, onnx_path: Path, cache: Any, rows: Any, crop: int, out_path: Path
) -> dict[str, Any]:
    """`check` of the INT8 model NNCF makes from the ONNX graph, calibrated on center crops of (at most
    300 of) cache `rows`."""
    from cxr.data.loader import ShardDataset
    from cxr.serve.openvino_backend import CALIBRATION_IMAGES, OpenVinoPredictor, quantize_int8

    if rows is None or not len(rows):
        return {"verified": False, "reason": "no calibration images"}
    dataset = ShardDataset(cache, _spread(rows, CALIBRATION_IMAGES), crop=crop)
    images = [dataset[i][0].numpy() for i in range(len(dataset))]

    def load() -> Any:
        return OpenVinoPredictor(quantize_int8(onnx_path, images, out_path), "int8")

    return {**check("OpenVINO INT8", load, True), "calibration_images": len(images)}
