"""The classifier: DenseNet121 (ImageNet) → GAP → FC 1024→512 + ReLU + Dropout(0.3) → FC 512→14.

The network returns logits (train with BCE-with-logits; apply a sigmoid at inference). It accepts the
loader's uint8 grayscale batches `[B, 1, H, W]` directly and normalises them on the device it runs on
(scale to [0, 1], repeat to 3 channels, ImageNet mean/std), so loaders move one byte per pixel.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from cxr.data.findings import NUM_FINDINGS
from cxr.torchvision_compat import import_torchvision

log = logging.getLogger(__name__)

# Imported now, not at first use: Metaflow's vendored typing_extensions, once its S3 client has loaded it,
# re-patches `typing` in a way that breaks importing torch._dynamo (which torchvision pulls in) later on.
import_torchvision()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURES = 1024


def densenet121_backbone(pretrained: bool = True) -> nn.Module:
    """DenseNet121 features: ImageNet weights when loadable, else random init and one warning line."""
    models = import_torchvision().models
    if pretrained:
        try:
            return models.densenet121(weights=models.DenseNet121_Weights.IMAGENET1K_V1).features
        except (OSError, RuntimeError, ValueError) as error:  # offline (URLError is an OSError), bad cache
            reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            log.warning(
                "ImageNet weights for DenseNet121 unavailable (%s); using random initialisation", reason
            )
    return models.densenet121(weights=None).features


class CXRNet(nn.Module):
    """DenseNet121 → GAP → FC 1024→512 + ReLU + Dropout → FC 512→num_classes (logits)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, num_classes: int = NUM_FINDINGS, pretrained: bool = True, dropout: float = 0.3):
        super().__init__()
        self.features = densenet121_backbone(pretrained)
        self.head = nn.Sequential(
            nn.Linear(FEATURES, 512), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(512, num_classes)
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,1,H,W] (or float in [0,1], 1 or 3 channels) → ImageNet-normalised float [B,3,H,W]."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        features = F.relu(self.features(self.prepare(images)))
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
        return self.head(pooled)
