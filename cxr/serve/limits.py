"""Per-request work limits: what one request may make the server decode, inflate and explain.

Each is checked from headers before the work it bounds, and a request beyond one is refused with 413
and a message naming the limit and its value. The defaults fit a 64-image batch of NIH-sized
(1024×1024) radiographs or a few full-detector (4k×4k) ones, and keep one request's memory in the
hundreds of megabytes whatever its body holds.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may cost; every field has a `cxr serve` flag of the same name."""

    max_images: int = 64  # images in one JSON batch
    max_image_pixels: int = 40_000_000  # one image (a 4k×4k detector is 16 MP)
    max_request_pixels: int = 100_000_000  # all images of a request together (64 NIH images: 67 MP)
    max_frames: int = 16  # frames a DICOM may declare (only the first is scored)
    max_inflated_mb: float = 128.0  # deflated DICOM data, inflated, summed over the request
    max_explanations: int = 16  # Grad-CAM heatmaps (images × distinct findings) per request

    def __post_init__(self) -> None:
        for item in fields(self):
            if not getattr(self, item.name) > 0:
                raise ValueError(f"{item.name} must be positive, got {getattr(self, item.name)}")

    @property
    def max_inflated_bytes(self) -> int:
        """`max_inflated_mb` in bytes."""
        return int(self.max_inflated_mb * MB)


HELP = {
    "max_images": "most images in one JSON batch",
    "max_image_pixels": "most pixels in one image (from its header, before decoding)",
    "max_request_pixels": "most pixels of all images of one request together",
    "max_frames": "most frames a DICOM may declare (the first is scored)",
    "max_inflated_mb": "most MB that deflated DICOM data of one request may inflate to",
    "max_explanations": "most Grad-CAM heatmaps (images × distinct findings) per request",
}


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one `--max-…` flag per limit, defaulting to `Limits()`."""
    defaults = Limits()
    for item in fields(Limits):
        default = getattr(defaults, item.name)
        parser.add_argument(
            "--" + item.name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{HELP[item.name]} (default {default})",
        )


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The Limits given by `add_limit_arguments` flags."""
    return Limits(**{item.name: getattr(args, item.name) for item in fields(Limits)})


def exceeds(what: str, limit_name: str, value: float) -> str:
    """The message of a refusal: `what` exceeded which limit, with the limit's value and flag."""
    flag = "--" + limit_name.replace("_", "-")
    return f"{what} exceeds the limit {limit_name}={value:,} (set with cxr serve {flag})"
