"""Which model directories to serve: explicit packages, the SageMaker model dir, or the registry."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cxr.config import cxr_home
from cxr.package import unpack
from cxr.registry import DEFAULT_GROUP, Registry, RegistryError

SAGEMAKER_MODEL_DIR = "/opt/ml/model"


def model_dir(source: str | Path) -> Path:
    """A package `.tar.gz` (unpacked once into $CXR_HOME/serving/<digest>) or an unpacked directory."""
    path = Path(source)
    if path.is_dir():
        if not (path / "metadata.json").is_file():
            raise FileNotFoundError(f"{path} is not an unpacked cxr model package (no metadata.json)")
        return path
    if not path.is_file():
        raise FileNotFoundError(f"model package {path} does not exist")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    target = cxr_home() / "serving" / digest
    if not (target / "metadata.json").is_file():
        unpack(path, target)
    return target


def resolve_models(
    model: str | None = None,
    challenger: str | None = None,
    group: str = DEFAULT_GROUP,
    registry_root: str | None = None,
) -> dict[str, Path]:
    """Variant A (and B when there is a challenger) → model directory.

    A: `model`, else SM_MODEL_DIR / /opt/ml/model in a container, else the registry's production version.
    B: `challenger`, else the newest `approved` version in the registry, if any.
    """
    models: dict[str, Path] = {}
    container_dir = os.environ.get("SM_MODEL_DIR") or (
        SAGEMAKER_MODEL_DIR if Path(SAGEMAKER_MODEL_DIR).is_dir() else None
    )
    registry = None
    if model:
        models["A"] = model_dir(model)
    elif container_dir:
        models["A"] = model_dir(container_dir)
    else:
        registry = Registry(registry_root, group)
        production = registry.production()
        if production is None:
            raise RegistryError(
                f"no production model in registry group {group!r}; train one (python flows/train_flow.py run)"
                " or pass --model PACKAGE"
            )
        models["A"] = model_dir(production.package)
    if challenger:
        models["B"] = model_dir(challenger)
    elif registry is not None:
        approved = [v for v in registry.versions() if v.status == "approved"]
        if approved:
            models["B"] = model_dir(approved[0].package)
    return models
