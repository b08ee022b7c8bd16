"""Grad-CAM heatmaps for a finding, as a PNG overlay on the image the model saw."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from cxr.data.findings import FINDINGS
from cxr.data.images import encode_png
from cxr.model import CXRNet
from cxr.serve.errors import RequestError


def grad_cam(model: CXRNet, crop: np.ndarray, finding: str) -> np.ndarray:
    """Grad-CAM of `finding` for one uint8 [1, crop, crop] input: a [crop, crop] map in [0, 1]."""
    return grad_cams(model, crop, [finding])[0]


def grad_cams(model: CXRNet, crop: np.ndarray, findings: list[str]) -> list[np.ndarray]:
    """Grad-CAM maps of several findings for one input: one forward pass, one backward pass each."""
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise RequestError(f"unknown findings {unknown} to explain; one of {', '.join(FINDINGS)}")
    model.eval()
    images = torch.from_numpy(np.ascontiguousarray(crop))[None]
    size = (int(crop.shape[-2]), int(crop.shape[-1]))
    maps = []
    with torch.enable_grad():
        activations = F.relu(model.features(model.prepare(images)))
        logits = model.head(F.adaptive_avg_pool2d(activations, 1).flatten(1))
        for index, finding in enumerate(findings):
            last = index == len(findings) - 1
            (gradient,) = torch.autograd.grad(
                logits[0, FINDINGS.index(finding)], activations, retain_graph=not last
            )
            maps.append(_cam(activations.detach(), gradient, size))
    return maps


def _cam(activations: torch.Tensor, gradient: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True))
    heat: np.ndarray = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    peak = float(heat.max())
    return heat / peak if peak > 0 else heat


def overlay_png(crop: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> bytes:
    """The grayscale input with a JET-coloured heatmap blended over it, as PNG bytes."""
    gray = cv2.cvtColor(np.asarray(crop).reshape(heatmap.shape), cv2.COLOR_GRAY2BGR)
    colour = cv2.applyColorMap((heatmap * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return encode_png(cv2.addWeighted(colour, alpha, gray, 1 - alpha, 0))
