import subprocess
import sys

import pytest

from cxr import torchvision_compat


def test_import_gives_working_models_in_a_fresh_interpreter():
    code = (
        "import torch\n"
        "from cxr.torchvision_compat import import_torchvision\n"
        "tv = import_torchvision()\n"
        "m = tv.models.densenet121(weights=None).eval()\n"
        "print(tuple(m(torch.zeros(1, 3, 64, 64)).shape))\n"
        "import torchvision.transforms.v2\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(1, 1000)"


def test_other_import_errors_are_not_swallowed(monkeypatch):
    def broken(name):
        raise RuntimeError("something else entirely")

    monkeypatch.setattr(torchvision_compat.importlib, "import_module", broken)
    with pytest.raises(RuntimeError, match="something else"):
        torchvision_compat.import_torchvision()


def test_fallback_declares_schemas_only_on_the_exact_failure(monkeypatch):
    calls = []

    def flaky(name):
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("operator torchvision::nms does not exist")
        return sys.modules[__name__]

    declared = []
    monkeypatch.setattr(torchvision_compat.importlib, "import_module", flaky)
    monkeypatch.setattr(torchvision_compat, "_declare_missing_schemas", lambda: declared.append(True))
    assert torchvision_compat.import_torchvision() is sys.modules[__name__]
    assert calls == ["torchvision", "torchvision"] and declared == [True]
