"""The deployable package, in SageMaker's layout: `model.tar.gz` with

model.pt            the network's state dict
model.onnx          the serving graph for ONNX Runtime (when exported and verified)
metadata.json       findings, image size, crop, dropout, thresholds, name, version, lineage, ONNX check
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
from pathlib import Path
from typing import Any

import torch

import cxr
from cxr.data.findings import FINDINGS

INFERENCE_SHIM = '''"""SageMaker entry point: the handlers live in the bundled cxr library."""
from cxr.inference import input_fn, model_fn, output_fn, predict_fn  # noqa: F401
'''
REQUIREMENTS = "opencv-python-headless>=4.8\nnumpy>=1.24\npandas>=2\npyyaml>=6\ntqdm>=4\nonnxruntime>=1.17\n"
ONNX_TOLERANCE = 1e-4  # max |probability difference| between ONNX Runtime and PyTorch
ONNX_MAX_AUROC_DELTA = 0.002


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
    by batch with the fastest backend it offers (the GPU; else its verified ONNX export; else PyTorch)."""
    import numpy as np

    from cxr.data.loader import NO_AUGMENTATION, ShardDataset
    from cxr.inference import load_model, prepare
    from cxr.progress import Progress
    from cxr.scoring import NetPredictor, score
    from cxr.serve.predictor import load_predictor

    rows = np.asarray(rows)
    with tempfile.TemporaryDirectory() as directory:
        unpacked = unpack(package, directory)
        if torch.cuda.is_available():
            model, metadata = load_model(unpacked)
            predictor: Any = NetPredictor(model)
        else:
            predictor = load_predictor(unpacked)
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


VERIFY_IMAGES = 512  # rows the ONNX export is checked on (spread evenly over the rows given)


def export_and_verify_onnx(
    model: Any, crop: int, cache: Any, rows: Any, out_path: str | Path, max_images: int = VERIFY_IMAGES
) -> dict[str, Any]:
    """Export the serving graph and check it on (at most `max_images` of) the cache rows against PyTorch
    on the CPU in float32: probabilities within 1e-4 and mean AUROC within 0.002. Returns the check
    (`verified` says whether the export may be served)."""
    import numpy as np

    from cxr.data.loader import ShardDataset
    from cxr.scoring import NetPredictor, OnnxNetPredictor, score
    from cxr.serve.predictor import export_onnx
    from cxr.train import mean_auroc

    rows = np.asarray(rows)
    if len(rows) > max_images:
        rows = rows[np.linspace(0, len(rows) - 1, max_images).round().astype(int)]
    model = model.eval()
    export_onnx(model, crop, out_path)
    try:
        session = OnnxNetPredictor(out_path)
    except ImportError:
        return {"verified": False, "reason": "onnxruntime is not installed"}
    dataset = ShardDataset(cache, rows, crop=crop)
    reference = score(NetPredictor(model, "cpu"), dataset, "ONNX check: PyTorch").probabilities
    onnx_probs = score(session, dataset, "ONNX check: ONNX Runtime").probabilities
    labels = dataset.labels
    diff = float(np.abs(onnx_probs - reference).max()) if len(reference) else 0.0
    delta = abs(mean_auroc(labels, onnx_probs) - mean_auroc(labels, reference)) if len(reference) else 0.0
    delta = 0.0 if delta != delta else delta
    verified = diff <= ONNX_TOLERANCE and delta <= ONNX_MAX_AUROC_DELTA
    return {"verified": verified, "max_abs_diff": diff, "auroc_delta": delta, "images": len(reference)}
