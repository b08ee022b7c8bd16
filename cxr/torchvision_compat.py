"""Import torchvision reliably, also on installs where its compiled ops do not match torch.

On some installs (a torchvision wheel built for CUDA torch next to a CPU torch) torchvision's compiled
extension does not load, and `import torchvision` then fails while registering fake kernels with
``RuntimeError: operator torchvision::nms does not exist``. The models and transforms cxr uses do not need
those compiled ops, so in exactly that case the missing operator schemas are declared here and the import
is retried. A consistent install takes the normal path untouched.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types

import torch

log = logging.getLogger(__name__)

_MISSING_OP_ERROR = "operator torchvision::nms does not exist"

# Schemas of the operators torchvision registers Python fake kernels for at import time, as declared by
# torchvision's own C++ extension (torchvision/csrc/ops/nms.cpp).
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_fallback_library: torch.library.Library | None = None


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def _declare_missing_schemas() -> None:
    global _fallback_library
    if _fallback_library is None:
        _fallback_library = torch.library.Library("torchvision", "DEF")  # kept alive for the process
        for schema in _SCHEMAS:
            _fallback_library.define(schema)


def import_torchvision() -> types.ModuleType:
    """Return `torchvision`, declaring missing operator schemas only if that exact failure occurs."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if _MISSING_OP_ERROR not in str(error):
            raise
        log.info(
            "torchvision's compiled ops do not match torch %s; declaring their schemas", torch.__version__
        )
        _forget_partial_import()
        _declare_missing_schemas()
        return importlib.import_module("torchvision")


def compiled_ops_available() -> bool:
    """Whether torchvision's compiled extension (nms, roi_align, ...) loaded; cxr does not need it."""
    return bool(import_torchvision().extension._has_ops())
