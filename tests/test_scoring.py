import logging

import numpy as np
import pytest
import torch

from cxr import scoring
from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.data.loader import ShardDataset
from cxr.model import CXRNet
from cxr.package import build_package, export_and_verify_onnx, score_package
from cxr.progress import Progress
from cxr.scoring import NetPredictor, fastest_predictor, score
from cxr.serve import predictor as serving
from cxr.train import predict

CROP = 56


@pytest.fixture(scope="module")
def real(nih_root, tmp_path_factory):
    """The real NIH images cached at 64 px, and a network with settled BatchNorm statistics."""
    catalog, _ = load_catalog(nih_root)
    root = tmp_path_factory.mktemp("c")
    cache = build_cache(catalog, PreprocessSettings(size=64), root=root, progress=False)
    torch.manual_seed(0)
    model = CXRNet(pretrained=False).eval()
    return cache, model, ShardDataset(cache, np.arange(len(cache)), crop=CROP)


def test_cpu_scoring_uses_a_verified_onnx_export_that_matches_pytorch(real, tmp_path):
    cache, model, dataset = real
    predictor, choice = fastest_predictor(model, dataset, tmp_path, min_images=0)
    assert choice["backend"] == "onnx" and choice["probe_max_abs_diff"] <= 1e-4
    fast = score(predictor, dataset, embeddings=True, progress=False)
    eager = score(NetPredictor(model, "cpu"), dataset, embeddings=True, progress=False)
    assert fast.probabilities.shape == (len(cache), 14) and fast.embeddings.shape == (len(cache), 512)
    assert np.abs(fast.probabilities - eager.probabilities).max() <= 1e-4
    assert np.allclose(fast.embeddings, eager.embeddings, atol=1e-3)
    assert np.allclose(eager.probabilities, predict(model, dataset), atol=1e-6)  # as evaluation always did


def test_an_export_that_disagrees_with_pytorch_is_not_used(real, tmp_path, monkeypatch):
    _, model, dataset = real
    monkeypatch.setattr(scoring, "ONNX_TOLERANCE", -1.0)  # nothing can agree
    predictor, choice = fastest_predictor(model, dataset, tmp_path, min_images=0)
    assert predictor.backend == "torch" and "differs" in choice["reason"]


def test_small_sets_are_scored_without_exporting(real, tmp_path):
    _, model, dataset = real
    predictor, _ = fastest_predictor(model, dataset, tmp_path)  # 120 images < ONNX_MIN_IMAGES
    assert predictor.backend == "torch" and not list(tmp_path.iterdir())


def test_package_is_scored_with_its_onnx_export(real, tmp_path, monkeypatch):
    cache, model, dataset = real
    check = export_and_verify_onnx(model, CROP, cache, np.arange(len(cache)), tmp_path / "model.onnx")
    assert check["verified"] and check["images"] == len(cache)
    meta = {"image_size": 64, "crop": CROP, "dropout": 0.3, "onnx": check}
    package = build_package(model.state_dict(), meta, tmp_path / "model.tar.gz", "", tmp_path / "model.onnx")
    calls, run = [], serving.OnnxPredictor.predict
    monkeypatch.setattr(serving.OnnxPredictor, "predict", lambda s, b: calls.append(len(b)) or run(s, b))
    probs = score_package(package, cache, np.arange(len(cache)), batch_size=32)
    assert calls == [32, 32, 32, 24]  # batch by batch, never all crops at once
    assert np.abs(probs - predict(model, dataset)).max() <= 1e-4


def test_export_check_uses_an_even_sample_of_large_sets(real, tmp_path):
    cache, model, _ = real
    rows = np.arange(len(cache))
    check = export_and_verify_onnx(model, CROP, cache, rows, tmp_path / "m.onnx", max_images=10)
    assert check["verified"] and check["images"] == 10


def test_progress_reaches_a_log_as_lines(caplog):
    caplog.set_level(logging.INFO, logger="cxr.progress")
    with Progress("test", 100, every=0, interactive=False) as bar:
        bar.update(50)
        bar.update(50, loss="0.3100")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "\r" not in "".join(lines)
    assert lines[0].startswith("test: 50/100 images (50%)") and "left" in lines[0]
    assert lines[-1].startswith("test: 100/100 images (100%)") and lines[-1].endswith("loss 0.3100")


def test_progress_is_quiet_when_disabled(caplog):
    caplog.set_level(logging.INFO, logger="cxr.progress")
    with Progress("test", 10, every=0, enabled=False, interactive=False) as bar:
        bar.update(10)
    assert not caplog.records
