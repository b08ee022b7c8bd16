"""The input gate of a training run: fitted on its images, evaluated on an out-of-distribution corpus
assembled from what installed packages ship (OOD AUROC per group, share of real test images refused).

Groups: photographs (scikit-image's sample images), DICOM images of other modalities (pydicom's bundled
CT, MR, ultrasound, nuclear medicine and secondary-capture test files), and transforms of held-out real
chest films: rotated by 90°, 180° and 270°, inverted, and a corner quarter zoomed to full size.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cxr.data.images import to_gray8
from cxr.inference import prepare
from cxr.ood import InputGate, fit_from_features

log = logging.getLogger(__name__)
RADIOGRAPHY = ("CR", "DX")  # DICOM modalities of projection radiographs
PHOTOGRAPHS = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins",
               "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo",
               "moon", "page", "retina", "rocket", "text")  # fmt: skip
TRANSFORMS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "rotated_90": lambda image, _: np.rot90(image, 1),
    "rotated_180": lambda image, _: np.rot90(image, 2),
    "rotated_270": lambda image, _: np.rot90(image, 3),
    "inverted": lambda image, _: 255 - image,
    "corner_crop": lambda image, i: _corner(image, i % 4),
}


def _corner(image: np.ndarray, which: int) -> np.ndarray:
    h, w = image.shape[0] // 2, image.shape[1] // 2
    return image[(which // 2) * h :][:h, (which % 2) * w :][:, :w]


def photographs() -> list[np.ndarray]:
    """scikit-image's bundled sample photographs, as 8-bit gray."""
    from skimage import data

    return [to_gray8(np.asarray(getattr(data, name)())) for name in PHOTOGRAPHS]


def other_modalities() -> dict[str, list[np.ndarray]]:
    """pydicom's bundled test images that are not projection radiographs, by modality, decoded as the
    server decodes DICOM."""
    import pydicom
    from pydicom.data import get_testdata_files

    from cxr.serve.decoder import DICOM, decode_one
    from cxr.serve.errors import RequestError

    groups: dict[str, list[np.ndarray]] = {}
    for path in sorted(get_testdata_files("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", "") or "")
                if modality in RADIOGRAPHY or not modality:
                    continue
                with open(path, "rb") as handle:
                    pixels = decode_one(handle.read(), DICOM).pixels
            except (RequestError, Exception) as error:  # many test files are deliberately odd
                log.debug("skipping %s: %s", path, error)
                continue
        if min(pixels.shape) >= 32:
            groups.setdefault(modality, []).append(pixels)
    return groups


def transformed(images: Sequence[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Each transform applied to every real chest film given."""
    return {name: [np.ascontiguousarray(f(image, i)) for i, image in enumerate(images)]
            for name, f in TRANSFORMS.items()}  # fmt: skip


def ood_corpus(chest_films: Sequence[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """All groups: photographs, other DICOM modalities (`dicom_CT`, `dicom_MR`, ...), transformed films."""
    corpus = {"photographs": photographs()}
    corpus.update({f"dicom_{m}": images for m, images in other_modalities().items()})
    corpus.update(transformed(chest_films))
    return corpus


def gate_scores(gate: InputGate, predictor: Any, metadata: dict[str, Any], images: Sequence[np.ndarray],
                batch: int = 32) -> np.ndarray:  # fmt: skip
    """The gate's score for decoded gray images, prepared and embedded as the server does."""
    scores = []
    for start in range(0, len(images), batch):
        crops = np.stack([prepare(image, metadata) for image in images[start : start + batch]])
        scores.append(gate.score(predictor.predict(crops)[1], crops))
    return np.concatenate(scores) if scores else np.zeros(0)


def gate_report(in_distribution: np.ndarray, corpus_scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """OOD AUROC (each group and all together against the real held-out images), the share of each group
    the gate catches, and the share of real images it refuses (score > 1)."""
    from sklearn.metrics import roc_auc_score

    def auroc(ood: np.ndarray) -> float:
        labels = np.r_[np.zeros(len(in_distribution)), np.ones(len(ood))]
        return float(roc_auc_score(labels, np.r_[in_distribution, ood]))

    groups = {name: {"images": len(s), "auroc": auroc(s), "caught": float((s > 1).mean())}
              for name, s in corpus_scores.items() if len(s)}  # fmt: skip
    everything = np.concatenate([s for s in corpus_scores.values() if len(s)])
    return {
        "auroc": auroc(everything),
        "caught": float((everything > 1).mean()),
        "ood_images": len(everything),
        "real_images": len(in_distribution),
        "real_refused": float((in_distribution > 1).mean()),
        "groups": groups,
    }


def fit_run_gate(
    predictor: Any, cache: Any, rows: dict[str, np.ndarray], crop: int, test: Any,
    fit_images: int = 5000, refuse_rate: float = 0.01, films: int = 200, seed: int = 0,
) -> tuple[InputGate, dict[str, Any]]:  # fmt: skip
    """The gate of a run and its report: Gaussians on up to `fit_images` training rows, thresholds on up
    to `fit_images` validation rows, refusals counted on every test row (`test`: its `cxr.scoring.Scores`
    with embeddings and appearances) and the corpus built from `films` test films."""
    from cxr.data.loader import ShardDataset
    from cxr.scoring import score

    rng = np.random.default_rng(seed)

    def sample(part: np.ndarray, limit: int) -> np.ndarray:
        return np.sort(rng.choice(part, min(len(part), limit), replace=False))

    fitted: dict[str, Any] = {
        split: score(predictor, ShardDataset(cache, sample(rows[split], fit_images), crop=crop),
                     f"input gate: {split} images", embeddings=True, appearances=True)
        for split in ("train", "val")
    }  # fmt: skip
    train, val = fitted["train"], fitted["val"]
    gate = fit_from_features(
        train.embeddings, train.appearances, val.embeddings, val.appearances, refuse_rate
    )
    held_out = gate.feature_score(test.embeddings, test.appearances)
    corpus = ood_corpus([cache.image(int(r)) for r in sample(rows["test"], films)])
    metadata = {"image_size": cache.size, "crop": crop}
    report = gate_report(
        held_out, {g: gate_scores(gate, predictor, metadata, images) for g, images in corpus.items()}
    )
    report.update(refuse_rate=refuse_rate, fitted_on=gate.fitted_on,
                  thresholds_from=len(val.probabilities))  # fmt: skip
    return gate, report
