"""Each served model version's baseline and package come from that version's registry folder; a version
without one is reported with the reason, never replaced by another version's."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.data.findings import FINDINGS
from cxr.monitor.baseline import Baseline
from cxr.monitor.references import References
from cxr.registry import Registry


def a_baseline(seed: int) -> Baseline:
    rng = np.random.default_rng(seed)
    return Baseline(rng.normal(size=(50, 7)), rng.normal(size=(50, 32)), rng.random((50, 14)),
                    dict.fromkeys(FINDINGS, 0.5), dict.fromkeys(FINDINGS, 0.8))  # fmt: skip


def test_each_version_gets_its_own_baseline_or_the_reason(tmp_path):
    registry = Registry(group="chest")
    first = registry.register({"model.tar.gz": b"package 1"}, {}, {}, status="production")
    second = registry.register({"model.tar.gz": b"package 2"}, {}, {})  # registered without a baseline
    a_baseline(1).save(first.directory)
    references = References(registry)

    found = references.baselines(["1", "2", "9", "None", "v1"])
    assert isinstance(found["1"], Baseline)
    assert np.array_equal(found["1"].embedding, a_baseline(1).embedding)
    assert found["2"] == "model version 2 has no monitoring baseline (baseline.npz) in the registry"
    assert found["9"] == "model version 9 is not in registry group 'chest'"
    assert "name no model version" in found["None"] and "variant_versions" in found["None"]
    assert "not a version number" in found["v1"]
    assert references.package("1") == first.package and references.package("2") == second.package
    assert references.package("9") is None and references.package("None") is None


def test_an_explicit_directory_serves_every_version(tmp_path):
    a_baseline(3).save(tmp_path / "chosen")
    references = References(directory=tmp_path / "chosen")
    found = references.baselines(["1", "None"])
    assert all(isinstance(b, Baseline) for b in found.values())
    assert references.package("1") is None  # no package in that directory
    assert "no monitoring baseline" in str(References(directory=tmp_path).baseline("1"))
    with pytest.raises(ValueError, match="either"):
        References()
