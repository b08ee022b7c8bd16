"""P9: what the input gate and the uncertainty add to serving, per image, against the model itself.

Real NIH films at the shipped size (256, crop 224) are scored in batches of 16 by the ONNX Runtime export
of the serving graph (the server's default backend); on the same batches, in the same run, the input
gate (`cxr.ood`, fitted on the films' own embeddings) and the MC-dropout uncertainty (`cxr.uncertainty`,
30 masks) are timed. Prints the ratio of each to the model's time.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import IMAGES

from cxr.data.images import resize_square
from cxr.data.loader import center_crop
from cxr.model import CXRNet
from cxr.ood import fit_input_gate
from cxr.scoring import OnnxNetPredictor
from cxr.serve.predictor import export_onnx
from cxr.uncertainty import HeadSampler

BATCH, ROUNDS = 16, 10


def seconds_per_batch(work, batches: list[np.ndarray]) -> float:
    """Best-of-3 mean seconds of `work` over every batch."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for batch in batches:
            work(batch)
        best = min(best, (time.perf_counter() - start) / len(batches))
    return best


def main() -> None:
    torch.manual_seed(0)
    model = CXRNet(pretrained=False).eval()
    films = [center_crop(resize_square(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), 256), 224) for p in IMAGES]
    crops = np.stack(films)[:, None]
    with tempfile.TemporaryDirectory() as work:
        predictor = OnnxNetPredictor(export_onnx(model, 224, Path(work) / "model.onnx"))
        embeddings = np.concatenate(
            [predictor.predict(crops[i : i + BATCH])[1] for i in range(0, len(crops), BATCH)]
        )
        half = len(crops) // 2
        gate = fit_input_gate(embeddings[:half], crops[:half], embeddings[half:], crops[half:])
        state = model.state_dict()
        sampler = HeadSampler.from_state(state, 0.3)
        batches = [crops[i : i + BATCH] for i in range(0, BATCH * ROUNDS, BATCH) if i + BATCH <= len(crops)]
        pairs = {id(b): predictor.predict(b)[1] for b in batches}
        model_s = seconds_per_batch(predictor.predict, batches)
        gate_s = seconds_per_batch(lambda b: gate.verdicts(pairs[id(b)], b), batches)
        spread_s = seconds_per_batch(lambda b: sampler.uncertainty(pairs[id(b)]), batches)
    per = 1000 / BATCH
    print(f"model {model_s * per:.2f} ms/image, gate {gate_s * per:.3f}, uncertainty {spread_s * per:.3f}")
    print(f"P9: {gate_s / model_s:.3f}x the model's time for the input gate (target <=0.05x)")
    print(f"P9: {spread_s / model_s:.3f}x the model's time for uncertainty (target <=0.05x)")


if __name__ == "__main__":
    main()
