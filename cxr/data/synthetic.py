"""A synthetic demo dataset in the NIH layout: small grayscale chest-like images with learnable findings.

Each finding leaves its own visual trace (an enlarged heart for Cardiomegaly, a fluid level at a lung base
for Effusion, bright dots for Nodule, …) on top of patient-specific anatomy and noise, so a CNN trained on
it reaches a mean AUROC well above 0.5. Patients have several follow-up images whose findings persist, and
prevalences follow NIH's (floored so the rarest finding still appears in every split of a small set).
The set is written as `images/*.png` plus `Data_Entry_2017_v2020.csv`, so it goes through the same ingest
path as real data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr.data.findings import FINDINGS, decode_findings

# Image-level prevalence in NIH ChestX-ray14 (v2020 labels), NIH order.
NIH_PREVALENCE = np.array(
    [0.103, 0.025, 0.119, 0.177, 0.052, 0.056, 0.013, 0.047, 0.042, 0.021, 0.022, 0.015, 0.030, 0.002]
)
DEMO_MIN_PREVALENCE = 0.02
PERSISTENCE = 0.6  # chance a finding carries over to a patient's next image
SPEC_FILE = "demo.json"

Grid = tuple[np.ndarray, np.ndarray]


def make_demo_dataset(
    root: str | Path,
    n_patients: int = 600,
    max_images_per_patient: int = 6,
    size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the demo dataset under `root` (reused when it already exists with the same settings)."""
    root = Path(root)
    spec = {"n_patients": n_patients, "max_images": max_images_per_patient, "size": size, "seed": seed}
    if _existing_spec(root) == spec:
        return root
    rng = np.random.default_rng(seed)
    table, labels = _demo_metadata(n_patients, max_images_per_patient, rng)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    grid = _grid(size)
    patients: dict[int, dict[str, float]] = {}
    rows = tqdm(range(len(table)), desc="demo images", unit="img", disable=not progress)
    for row in rows:
        patient = int(table.at[row, "Patient ID"])
        anatomy = patients.setdefault(patient, _anatomy(rng))
        pixels = render_xray(grid, anatomy, labels[row], rng)
        cv2.imwrite(str(images / table.at[row, "Image Index"]), pixels)
    table.to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    (root / SPEC_FILE).write_text(json.dumps(spec))
    return root


def _existing_spec(root: Path) -> dict | None:
    try:
        return json.loads((root / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None


def demo_prevalence() -> np.ndarray:
    """Per-finding prevalence the demo set draws from."""
    return np.maximum(NIH_PREVALENCE, DEMO_MIN_PREVALENCE)


def _demo_metadata(
    n_patients: int, max_images: int, rng: np.random.Generator
) -> tuple[pd.DataFrame, np.ndarray]:
    prevalence = demo_prevalence()
    rows, labels = [], []
    for patient in range(1, n_patients + 1):
        n_images = int(rng.integers(1, max_images + 1))
        age, sex = int(rng.integers(18, 88)), str(rng.choice(["M", "F"], p=[0.56, 0.44]))
        current = rng.random(len(FINDINGS)) < prevalence
        for follow_up in range(n_images):
            if follow_up:
                fresh = rng.random(len(FINDINGS)) < prevalence
                current = np.where(rng.random(len(FINDINGS)) < PERSISTENCE, current, fresh)
            label = current.astype(np.float32)
            view = "AP" if rng.random() < (0.55 if label.any() else 0.3) else "PA"
            rows.append(
                {
                    "Image Index": f"{patient:08d}_{follow_up:03d}.png",
                    "Finding Labels": decode_findings(label),
                    "Follow-up #": follow_up,
                    "Patient ID": patient,
                    "Patient Age": age + follow_up // 2,
                    "Patient Gender": sex,
                    "View Position": view,
                    "OriginalImage[Width": 2500,
                    "Height]": 2048,
                    "OriginalImagePixelSpacing[x": 0.143,
                    "y]": 0.143,
                }
            )
            labels.append(label)
    return pd.DataFrame(rows), np.stack(labels)


def _grid(size: int) -> Grid:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    return ys, xs


def _anatomy(rng: np.random.Generator) -> dict[str, float]:
    return {
        "lung_w": rng.uniform(0.15, 0.19),
        "lung_h": rng.uniform(0.28, 0.34),
        "heart": rng.uniform(0.11, 0.13),
        "body": rng.uniform(0.55, 0.7),
        "shift": rng.uniform(-0.03, 0.03),
    }


def _ellipse(grid: Grid, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    ys, xs = grid
    return ((((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2) <= 1.0).astype(np.float32)


def _blob(grid: Grid, cy: float, cx: float, radius: float) -> np.ndarray:
    ys, xs = grid
    return np.exp(-(((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))).astype(np.float32)


def render_xray(
    grid: Grid, anatomy: dict[str, float], label: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw one uint8 image: body, lungs, heart and spine, then the trace of each present finding."""
    ys, xs = grid
    a = dict(anatomy)
    if label[FINDINGS.index("Emphysema")]:
        a["lung_w"], a["lung_h"] = a["lung_w"] * 1.15, a["lung_h"] * 1.12
    cx = 0.5 + a["shift"] + rng.normal(0, 0.01)
    left, right = (cx - 0.2, 0.45), (cx + 0.2, 0.45)
    image: np.ndarray = a["body"] * _ellipse(grid, 0.5, cx, 0.62, 0.42)
    lungs = [_ellipse(grid, cy, x, a["lung_h"], a["lung_w"]) for x, cy in (left, right)]
    lung_mask = np.clip(lungs[0] + lungs[1], 0, 1)
    lung_level = 0.22 if label[FINDINGS.index("Emphysema")] else 0.35
    image = image * (1 - lung_mask) + lung_level * lung_mask
    heart_r = a["heart"] * (1.6 if label[FINDINGS.index("Cardiomegaly")] else 1.0)
    image = np.maximum(image, 0.75 * _ellipse(grid, 0.6, cx + 0.04, heart_r * 1.1, heart_r))
    image = np.maximum(image, 0.8 * (np.abs(xs - cx) < 0.025) * (ys > 0.1))
    for index in np.flatnonzero(label > 0.5):
        image = _FINDING_TRACES[FINDINGS[index]](image, grid, lung_mask, lungs, (left, right), a, rng)
    image = cv2.GaussianBlur(image, (0, 0), sigmaX=max(0.6, ys.shape[0] / 256))
    image = image + rng.normal(0, 0.04, image.shape).astype(np.float32)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


Trace = Callable[..., np.ndarray]


def _side(rng: np.random.Generator, centers: tuple, lungs: list) -> tuple[tuple[float, float], np.ndarray]:
    k = int(rng.integers(0, 2))
    return centers[k], lungs[k]


def _atelectasis(img, grid, mask, lungs, centers, a, rng):
    (_x, cy), lung = _side(rng, centers, lungs)
    ys, _ = grid
    band = (np.abs(ys - (cy + 0.12)) < 0.018) * lung
    return np.maximum(img, 0.8 * band)


def _effusion(img, grid, mask, lungs, centers, a, rng):
    (_x, cy), lung = _side(rng, centers, lungs)
    ys, _ = grid
    return np.maximum(img, 0.75 * (ys > cy + a["lung_h"] * 0.45) * lung)


def _infiltration(img, grid, mask, lungs, centers, a, rng):
    (x, cy), _ = _side(rng, centers, lungs)
    patches = sum(
        _blob(grid, cy + rng.uniform(-0.15, 0.15), x + rng.uniform(-0.08, 0.08), 0.025) for _ in range(5)
    )
    return img + 0.3 * np.clip(patches, 0, 1) * mask


def _mass(img, grid, mask, lungs, centers, a, rng):
    (x, cy), _ = _side(rng, centers, lungs)
    disc = _ellipse(grid, cy + rng.uniform(-0.1, 0.1), x + rng.uniform(-0.05, 0.05), 0.07, 0.07)
    return np.maximum(img, 0.85 * disc)


def _nodule(img, grid, mask, lungs, centers, a, rng):
    for _ in range(3):
        (x, cy), _ = _side(rng, centers, lungs)
        dot = _ellipse(grid, cy + rng.uniform(-0.2, 0.2), x + rng.uniform(-0.08, 0.08), 0.022, 0.022)
        img = np.maximum(img, 0.9 * dot)
    return img


def _pneumonia(img, grid, mask, lungs, centers, a, rng):
    (x, cy), lung = _side(rng, centers, lungs)
    return img + 0.35 * _blob(grid, cy + 0.08, x, 0.09) * lung


def _pneumothorax(img, grid, mask, lungs, centers, a, rng):
    (x, cy), lung = _side(rng, centers, lungs)
    ys, xs = grid
    outer = np.sign(x - 0.5) * (xs - x) > a["lung_w"] * 0.35
    return np.where((outer & (ys < cy)) * lung > 0, 0.05, img)


def _consolidation(img, grid, mask, lungs, centers, a, rng):
    (x, cy), lung = _side(rng, centers, lungs)
    ys, xs = grid
    block = (np.abs(ys - cy) < 0.08) & (np.abs(xs - x) < a["lung_w"] * 0.7)
    return np.maximum(img, 0.7 * block * lung)


def _edema(img, grid, mask, lungs, centers, a, rng):
    _ys, _xs = grid
    haze = _blob(grid, 0.48, centers[0][0] + 0.08, 0.07) + _blob(grid, 0.48, centers[1][0] - 0.08, 0.07)
    return img + 0.3 * haze * mask


def _drawn_with_anatomy(img, *args):
    """Cardiomegaly (larger heart) and Emphysema (larger, darker lungs) change the anatomy itself."""
    return img


def _fibrosis(img, grid, mask, lungs, centers, a, rng):
    ys, xs = grid
    lines = ((np.sin(xs * 90) > 0.9) | (np.sin(ys * 90) > 0.9)) * (ys < 0.45)
    return np.maximum(img, 0.6 * lines * mask)


def _pleural_thickening(img, grid, mask, lungs, centers, a, rng):
    edge = cv2.dilate(mask, np.ones((5, 5), np.uint8)) - cv2.erode(mask, np.ones((5, 5), np.uint8))
    return np.maximum(img, 0.85 * edge)


def _hernia(img, grid, mask, lungs, centers, a, rng):
    cx = (centers[0][0] + centers[1][0]) / 2
    return np.maximum(img, 0.2 + 0.7 * _ellipse(grid, 0.82, cx, 0.06, 0.09) * 0.9)


_FINDING_TRACES: dict[str, Trace] = {
    "Atelectasis": _atelectasis,
    "Cardiomegaly": _drawn_with_anatomy,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Emphysema": _drawn_with_anatomy,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}


def sample_xray(size: int = 256, seed: int = 0) -> np.ndarray:
    """One synthetic chest X-ray without findings (uint8), e.g. for smoke-testing an endpoint."""
    rng = np.random.default_rng(seed)
    return render_xray(_grid(size), _anatomy(rng), np.zeros(len(FINDINGS), bool), rng)
