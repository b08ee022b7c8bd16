import subprocess
import sys

import pytest

from cxr.data.findings import FINDINGS
from cxr.gate import promotion_gate
from cxr.registry import Registry, RegistryError


def aurocs(value, **overrides):
    return {f: overrides.get(f, value) for f in FINDINGS}


def test_register_promote_and_archive(tmp_path):
    registry = Registry(tmp_path)
    first = registry.register(
        {"model.tar.gz": b"one"}, {"mean_auroc": 0.8}, {"run": "r1"}, status="production"
    )
    second = registry.register({"model.tar.gz": b"two"}, {"mean_auroc": 0.85}, {"run": "r2"})
    assert (first.status, second.status) == ("production", "candidate")
    assert registry.production().version == 1 and second.package.read_bytes() == b"two"
    registry.approve(2)
    assert registry.production().version == 2 and registry.get(1).status == "archived"
    assert [v.version for v in registry.versions()] == [2, 1]
    with pytest.raises(RegistryError, match="no model version 9"):
        registry.get(9)
    with pytest.raises(RegistryError, match="archived"):
        registry.approve(1)


def test_failed_registration_leaves_nothing(tmp_path):
    registry = Registry(tmp_path)
    with pytest.raises(FileNotFoundError):
        registry.register({"model.tar.gz": tmp_path / "missing.tar.gz"}, {"mean_auroc": 0.8}, {})
    assert registry.versions() == [] and [p.name for p in (registry.root / "models").iterdir()] == []


def test_gate_rules():
    assert promotion_gate(aurocs(0.8), None).promote
    better = promotion_gate(aurocs(0.82), aurocs(0.80), min_improvement=0.01)
    assert better.promote and better.mean_auroc_delta == pytest.approx(0.02)
    small = promotion_gate(aurocs(0.805), aurocs(0.80), min_improvement=0.01)
    assert not small.promote and "does not beat" in small.text()
    dropped = promotion_gate(aurocs(0.85, Hernia=0.70), aurocs(0.80), max_finding_drop=0.05)
    assert not dropped.promote and dropped.worst_finding == "Hernia" and "Hernia drops" in dropped.text()
    manual = promotion_gate(aurocs(0.99), aurocs(0.5), manual=True)
    assert not manual.promote and "cxr registry approve" in manual.text()


def test_groups_are_separate(tmp_path):
    Registry(tmp_path, "demo").register({"m": b"x"}, {"mean_auroc": 0.9}, {}, status="production")
    assert Registry(tmp_path).production() is None and Registry(tmp_path, "demo").production().version == 1
    for bad in ("../escape", "..", ".", "a/b", "-x", "x_y", "", "a" * 64):
        with pytest.raises(RegistryError, match="invalid model group"):
            Registry(tmp_path, bad)
    assert not (tmp_path.parent / "models").exists()


def test_cli_lists_and_approves(tmp_path):
    registry = Registry(tmp_path)
    registry.register({"model_card.md": b"# card"}, {"mean_auroc": 0.7}, {"run": "x"})

    def run(*args):
        command = [sys.executable, "-m", "cxr.cli", "registry", *args, "--root", str(tmp_path)]
        return subprocess.run(command, capture_output=True, text=True)

    listing = run("list")
    assert listing.returncode == 0 and "candidate" in listing.stdout and "0.7000" in listing.stdout
    assert run("approve", "1").stdout.strip() == "version 1 is now production"
    assert run("card", "1").stdout.strip() == "# card"
    missing = run("approve", "5")
    assert missing.returncode == 2 and "no model version 5" in missing.stderr
