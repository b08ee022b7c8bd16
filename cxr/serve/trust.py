"""What an answer carries besides probabilities: the input gate's verdict on every image and, on request,
the uncertainty of every finding.

The gate combines the package's out-of-distribution score (`cxr.ood`, fitted at evaluation; absent in
packages made without one) with what a DICOM header says (modality, body part, view). Its policy either
refuses a request with an out-of-distribution image (422, with the reasons) or answers with the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr.data.findings import FINDINGS
from cxr.ood import GATE_FILE, InputGate
from cxr.serve.errors import RequestError
from cxr.uncertainty import HeadSampler

POLICIES = ("refuse", "flag")
IN, OUT, UNCHECKED = "in_distribution", "out_of_distribution", "unchecked"


class InputRefused(RequestError):
    """The input gate judged an image out of distribution and the policy is to refuse."""

    status_code = 422

    def __init__(self, message: str, checks: list[dict[str, Any]]):
        super().__init__(message)
        self.checks = checks


@dataclass
class Trust:
    """One served package's input gate (or None) and its head sampler (loaded on first use)."""

    model_dir: Path
    metadata: dict[str, Any]
    gate: InputGate | None = None
    _sampler: HeadSampler | None = field(default=None, repr=False)

    @classmethod
    def from_package(cls, model_dir: str | Path, metadata: dict[str, Any]) -> Trust:
        """The package's gate when it ships one (`input_gate.npz`)."""
        path = Path(model_dir) / GATE_FILE
        return cls(Path(model_dir), metadata, InputGate.load(path) if path.is_file() else None)

    def checks(
        self, crops: list[np.ndarray], embeddings: np.ndarray, problems: list[list[str]]
    ) -> list[dict[str, Any]]:
        """Per image: `score` (None without a gate; > 1 out of distribution), `verdict` and `reasons`."""
        verdicts = (self.gate.verdicts(embeddings, np.stack(crops)) if self.gate is not None
                    else [{"score": None, "verdict": UNCHECKED, "reasons": []} for _ in crops])  # fmt: skip
        out = []
        for verdict, header in zip(verdicts, problems, strict=True):
            reasons = list(header) + verdict["reasons"]
            judged = OUT if reasons else verdict["verdict"]
            out.append({"score": verdict["score"], "threshold": 1.0, "verdict": judged, "reasons": reasons})
        return out

    def uncertainty(self, embeddings: np.ndarray) -> list[dict[str, float]]:
        """MC-dropout standard deviation of each finding's calibrated probability, per image."""
        if self._sampler is None:
            self._sampler = HeadSampler.from_package(self.model_dir, self.metadata)
        spread = self._sampler.uncertainty(embeddings)
        return [{f: round(float(v), 5) for f, v in zip(FINDINGS, row, strict=True)} for row in spread]


def enforce(checks: list[dict[str, Any]], policy: str, batch: bool) -> None:
    """Raise InputRefused when the policy refuses and an image is out of distribution."""
    if policy != "refuse":
        return
    refused = [i for i, check in enumerate(checks) if check["verdict"] == OUT]
    if not refused:
        return
    parts = []
    for i in refused:
        where = f"instance {i}: " if batch else ""
        parts.append(where + "; ".join(checks[i]["reasons"]))
    message = "input refused, not a frontal chest radiograph like those the model was trained on: "
    raise InputRefused(message + " | ".join(parts), checks)


def wants_uncertainty(value: str | None) -> bool:
    """`?uncertainty=true` (or the X-Cxr-Uncertainty header): 1/true/yes; anything else but empty is 400."""
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise RequestError(f"uncertainty must be true or false, not {value!r}")
