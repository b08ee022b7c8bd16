"""The deployable package, in SageMaker's layout: `model.tar.gz` with

model.pt            the network's state dict
metadata.json       findings, image size, crop, dropout, version and lineage
model_card.md       the model card
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
REQUIREMENTS = "opencv-python-headless>=4.8\nnumpy>=1.24\npandas>=2\npyyaml>=6\ntqdm>=4\n"


def build_package(
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    out_path: str | Path,
    model_card: str = "",
) -> Path:
    """Write `model.tar.gz` (see module doc); `metadata` needs image_size, crop and dropout."""
    missing = {"image_size", "crop", "dropout"} - set(metadata)
    if missing:
        raise ValueError(f"package metadata lacks {sorted(missing)}")
    metadata = {"findings": list(FINDINGS), "cxr_version": cxr.__version__, **metadata}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    weights = io.BytesIO()
    torch.save(state_dict, weights)
    library = Path(cxr.__file__).parent
    with (
        tempfile.NamedTemporaryFile(dir=out_path.parent, suffix=".tmp", delete=False) as handle,
        tarfile.open(fileobj=handle, mode="w:gz") as tar,
    ):
        _add(tar, "model.pt", weights.getvalue())
        _add(tar, "metadata.json", json.dumps(metadata, indent=1).encode())
        _add(tar, "model_card.md", model_card.encode())
        _add(tar, "code/inference.py", INFERENCE_SHIM.encode())
        _add(tar, "code/requirements.txt", REQUIREMENTS.encode())
        for source in sorted(library.rglob("*.py")):
            tar.add(source, arcname=f"code/cxr/{source.relative_to(library)}")
    Path(handle.name).replace(out_path)
    return out_path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def unpack(package: str | Path, directory: str | Path) -> Path:
    """Extract a package (safely: no absolute paths or links) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(package, "r:gz") as tar:
        tar.extractall(directory, filter="data")  # "data" filter: no absolute paths or links
    return directory


def score_package(package: str | Path, cache: Any, rows: Any, batch_size: int = 64) -> Any:
    """Probabilities [N, 14] of a packaged model on cache rows, preprocessed as the package specifies."""
    import numpy as np

    from cxr.data.images import resize_square
    from cxr.data.loader import NO_AUGMENTATION, ShardDataset
    from cxr.inference import load_model
    from cxr.train import predict

    with tempfile.TemporaryDirectory() as directory:
        model, metadata = load_model(unpack(package, directory))
    if metadata["image_size"] == cache.size:
        return predict(
            model, ShardDataset(cache, rows, crop=metadata["crop"], augmentation=NO_AUGMENTATION), batch_size
        )
    # Cached at another size: resize each cached image to the package's size first, as serving would.
    images = np.stack([resize_square(np.asarray(cache.image(int(r))), metadata["image_size"]) for r in rows])
    top = (metadata["image_size"] - metadata["crop"]) // 2
    crops = torch.from_numpy(
        images[:, None, top : top + metadata["crop"], top : top + metadata["crop"]].copy()
    )
    with torch.no_grad():
        return torch.cat([torch.sigmoid(model(b)) for b in crops.split(batch_size)]).numpy()
