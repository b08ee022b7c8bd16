"""Patient-level train/val/test split, stratified so that rare findings land in every split.

No patient appears in two splits. Stratification is iterative (Sechidis et al., 2011) over patients:
patients carrying the rarest finding are placed first: the first ones into splits that have none of it
(so a finding with at least three patients reaches every split), then each into the split that most lacks it;
images count by number, so a patient with many follow-ups weighs accordingly. When the official NIH
`test_list.txt` is given it defines the test split, and train/val are split by patient inside the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxr.data.findings import FINDINGS

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """Ratios or the official lists cannot produce a valid split."""


@dataclass
class Split:
    """Row positions of each split into a catalog (sorted)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def items(self) -> list[tuple[str, np.ndarray]]:
        """(name, rows) for train, val and test."""
        return [("train", self.train), ("val", self.val), ("test", self.test)]

    def assignment(self, n_rows: int) -> np.ndarray:
        """Split name per row (empty string for rows in no split)."""
        names = np.full(n_rows, "", dtype=object)
        for name, rows in self.items():
            names[rows] = name
        return names


def patient_split(
    patient_ids: Sequence[int] | np.ndarray,
    labels: np.ndarray,
    ratios: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> Split:
    """Split rows by patient into train/val/test with the given ratios, stratified on the 14 findings
    (their known positives: a NaN label, not labelled, counts as no positive)."""
    ratios_arr = _check_ratios(ratios, 3)
    codes, patient_labels, images_per_patient = _per_patient(np.asarray(patient_ids), labels)
    split_of_patient = _iterative_stratify(patient_labels, images_per_patient, ratios_arr, seed)
    split_of_row = split_of_patient[codes]
    return Split(*(np.flatnonzero(split_of_row == k) for k in range(3)))


def official_split(
    image_ids: Sequence[str],
    patient_ids: Sequence[int] | np.ndarray,
    labels: np.ndarray,
    test_list: Sequence[str],
    val_ratio: float = 0.1,
    seed: int = 0,
) -> Split:
    """Use NIH's `test_list.txt` as test; split the remaining rows by patient into train and val."""
    is_test = pd.Index(test_list).get_indexer(pd.Index(image_ids)) >= 0
    patients = np.asarray(patient_ids)
    leaked = set(patients[is_test]) & set(patients[~is_test])
    if leaked:
        raise SplitError(
            f"official test list shares {len(leaked)} patients with train/val, e.g. {min(leaked)}"
        )
    rest = np.flatnonzero(~is_test)
    if len(rest) == 0:
        raise SplitError("every image is in the official test list; nothing left to train on")
    inner = patient_split(patients[rest], labels[rest], (1.0 - val_ratio, val_ratio, 0.0), seed)
    return Split(np.sort(rest[inner.train]), np.sort(rest[inner.val]), np.flatnonzero(is_test))


def split_summary(split: Split, patient_ids: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Per split: images, patients, and the prevalence (fraction positive among the images that label it)
    and count of each finding."""
    rows = []
    for name, idx in split.items():
        row: dict[str, float | int | str] = {
            "split": name,
            "images": len(idx),
            "patients": len(np.unique(np.asarray(patient_ids)[idx])),
        }
        counts = (labels[idx] > 0.5).sum(axis=0)
        known = (~np.isnan(labels[idx])).sum(axis=0)
        for finding, count, n in zip(FINDINGS, counts, known, strict=True):
            row[f"n_{finding}"] = int(count)
            row[finding] = float(count / n) if n else 0.0
        rows.append(row)
    return pd.DataFrame(rows).set_index("split")


def _check_ratios(ratios: Sequence[float], n: int) -> np.ndarray:
    arr = np.asarray(ratios, dtype=np.float64)
    if arr.shape != (n,) or (arr < 0).any() or not np.isclose(arr.sum(), 1.0):
        raise SplitError(f"split ratios must be {n} non-negative numbers summing to 1, got {list(ratios)}")
    return arr


def _per_patient(patient_ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    uniques, codes = np.unique(patient_ids, return_inverse=True)
    patient_labels = np.zeros((len(uniques), labels.shape[1]), dtype=np.float64)
    np.add.at(patient_labels, codes, labels > 0.5)
    images = np.bincount(codes, minlength=len(uniques)).astype(np.float64)
    return codes, patient_labels, images


def _iterative_stratify(
    patient_labels: np.ndarray, images: np.ndarray, ratios: np.ndarray, seed: int
) -> np.ndarray:
    """Assign each patient a split index; `patient_labels` counts positive images per finding."""
    rng = np.random.default_rng(seed)
    n_patients, n_labels = patient_labels.shape
    order = rng.permutation(n_patients)
    want_label = ratios[:, None] * patient_labels.sum(axis=0)[None, :]  # splits × labels, in images
    want_total = ratios * images.sum()
    closed = ratios <= 0  # a split with ratio 0 never receives a patient
    want_label[closed] = -np.inf
    want_total[closed] = -np.inf
    assigned = np.full(n_patients, -1, dtype=np.int64)
    have = np.zeros((len(ratios), n_labels), dtype=np.int64)  # patients per split carrying each finding
    has = patient_labels[order] > 0
    for _ in range(n_labels):
        remaining = (patient_labels[order][assigned[order] < 0] > 0).sum(axis=0)
        if not remaining.any():
            break
        label = int(np.argmin(np.where(remaining > 0, remaining, np.iinfo(np.int64).max)))
        for patient in order[has[:, label] & (assigned[order] < 0)]:
            # An open split still without this finding comes first, so rare findings reach every split.
            lacking = (have[:, label] == 0) & ~closed
            deficit = (
                np.where(lacking, np.inf, want_label[:, label]) if lacking.any() else want_label[:, label]
            )
            best = np.flatnonzero(deficit == deficit.max())
            choice = best[np.argmax(want_total[best])] if len(best) > 1 else best[0]
            assigned[patient] = choice
            want_label[choice] -= patient_labels[patient]
            want_total[choice] -= images[patient]
            have[choice] += patient_labels[patient] > 0
    for patient in order[assigned[order] < 0]:
        choice = int(np.argmax(want_total))
        assigned[patient] = choice
        want_total[choice] -= images[patient]
    return assigned
