"""The 14 ChestX-ray14 findings, in the NIH order: the one source of truth for label columns."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
NUM_FINDINGS = len(FINDINGS)
_INDEX = {name: i for i, name in enumerate(FINDINGS)}


class UnknownFindingError(ValueError):
    """A `Finding Labels` entry names something that is not one of the 14 findings."""


def encode_findings(finding_labels: Iterable[str]) -> np.ndarray:
    """Turn NIH `Finding Labels` strings ("A|B", "No Finding") into an N×14 float32 multi-hot array."""
    rows = list(finding_labels)
    labels = np.zeros((len(rows), NUM_FINDINGS), dtype=np.float32)
    for row, text in enumerate(rows):
        for name in str(text).split("|"):
            name = name.strip()
            if name == NO_FINDING or not name:
                continue
            if name not in _INDEX:
                raise UnknownFindingError(
                    f"row {row}: unknown finding {name!r} in {text!r}; expected one of {', '.join(FINDINGS)}"
                )
            labels[row, _INDEX[name]] = 1.0
    return labels


def decode_findings(row: np.ndarray) -> str:
    """Inverse of `encode_findings` for one row: the NIH `Finding Labels` string."""
    names = [FINDINGS[i] for i in np.flatnonzero(np.asarray(row) > 0.5)]
    return "|".join(names) if names else NO_FINDING


JOINT_FINDINGS: dict[str, tuple[str, ...]] = {
    "Nodule or mass": ("Mass", "Nodule"),
    "Airspace opacity": ("Consolidation", "Infiltration", "Pneumonia"),
}
"""Findings some reference labels name jointly, and the 14 findings each covers. A model is scored on a
joint finding by its highest probability among the members (the ranking AUROC needs)."""


def joint_scores(probs: np.ndarray, names: Iterable[str]) -> np.ndarray:
    """N×J scores for joint findings: per image, the highest of its members' N×14 probabilities."""
    columns = [[FINDINGS.index(m) for m in JOINT_FINDINGS[name]] for name in names]
    return np.stack([probs[:, c].max(axis=1) for c in columns], axis=1) if columns else probs[:, :0]
