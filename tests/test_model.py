import logging

import torch

from cxr.model import CXRNet


def test_architecture_and_input_handling():
    torch.manual_seed(0)
    model = CXRNet(pretrained=False).eval()
    linear = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(1024, 512), (512, 14)]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.head)
    gray = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(gray)
        same = model((gray.float() / 255).expand(-1, 3, -1, -1))
    assert logits.shape == (2, 14) and torch.allclose(logits, same, atol=1e-5)


def test_offline_falls_back_to_random_init_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache, and no network here
    with caplog.at_level(logging.WARNING, logger="cxr.model"):
        model = CXRNet(pretrained=True)
    relevant = [r for r in caplog.records if r.name == "cxr.model"]
    assert len(relevant) == 1 and "\n" not in relevant[0].getMessage()
    assert "random initialisation" in relevant[0].getMessage()
    assert model.eval()(torch.zeros(1, 1, 32, 32, dtype=torch.uint8)).shape == (1, 14)


def test_no_warning_without_pretrained(caplog):
    with caplog.at_level(logging.WARNING, logger="cxr.model"):
        CXRNet(pretrained=False)
    assert not caplog.records
