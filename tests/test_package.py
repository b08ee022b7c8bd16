import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import torch

from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.data.images import decode_xray, resize_square
from cxr.data.loader import ShardDataset
from cxr.model import CXRNet
from cxr.package import build_package, score_package, unpack
from cxr.train import predict


def make_package(tmp_path, image_size=64, crop=56):
    torch.manual_seed(0)
    model = CXRNet(pretrained=False).eval()
    meta = {"image_size": image_size, "crop": crop, "dropout": 0.3, "lineage": {"run": "test"}}
    return model, build_package(model.state_dict(), meta, tmp_path / "model.tar.gz", "# card")


def test_sagemaker_layout_and_bundled_handlers(tmp_path, nih_root):
    model, package = make_package(tmp_path)
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
    assert {
        "model.pt",
        "metadata.json",
        "model_card.md",
        "code/inference.py",
        "code/requirements.txt",
    } <= names
    assert "code/cxr/inference.py" in names and "code/cxr/data/images.py" in names
    unpacked = unpack(package, tmp_path / "unpacked")
    image_path = sorted((nih_root / "images_001" / "images").glob("*.png"))[0]
    script = (
        "import json, sys, cxr, inference\n"
        "assert cxr.__file__.startswith(sys.argv[1]), cxr.__file__\n"
        "bundle = inference.model_fn(sys.argv[1])\n"
        "body, kind = inference.output_fn(inference.predict_fn("
        "inference.input_fn(open(sys.argv[2], 'rb').read(), 'image/png'), bundle), 'application/json')\n"
        "print(body)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(unpacked / "code")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(unpacked), str(image_path)],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)["predictions"]
    pixels = resize_square(decode_xray(image_path.read_bytes()), 64)[4:60, 4:60]
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(pixels.copy())[None, None]))[0].numpy()
    assert np.allclose([served[k] for k in served], expected, atol=1e-5) and len(served) == 14


def test_score_package_matches_direct_prediction(tmp_path, nih_root):
    catalog, _ = load_catalog(nih_root)
    cache = build_cache(catalog, PreprocessSettings(size=64), root=tmp_path / "c", workers=1, progress=False)
    model, package = make_package(tmp_path)
    rows = np.arange(10)
    direct = predict(model, ShardDataset(cache, rows, crop=56))
    assert np.allclose(score_package(package, cache, rows), direct, atol=1e-5)
    _, other = make_package(tmp_path / "other", image_size=48, crop=40)  # cached at another size: resized
    assert score_package(other, cache, rows).shape == (10, 14)
