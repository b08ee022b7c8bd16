"""Metaflow ships only the flow's folder to remote compute: `flows/cxr` (a link to the library) makes the
whole `cxr` package part of every flow's code package."""

import os
import subprocess
import sys

import pytest

from .conftest import REPO

LIBRARY = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "cxr").rglob("*.py"))


@pytest.mark.parametrize("flow", ["train_flow.py", "monitor_flow.py"])
def test_code_package_contains_the_library(flow):
    env = {**os.environ, "METAFLOW_DEFAULT_DATASTORE": "local"}
    result = subprocess.run(
        [sys.executable, str(REPO / "flows" / flow), "package", "list"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = (result.stdout + result.stderr).splitlines()  # the list may come on either stream
    packaged = {line.strip().split("/flows/", 1)[-1] for line in lines if "/flows/" in line}
    assert len(LIBRARY) > 40 and all(path in packaged for path in LIBRARY), sorted(set(LIBRARY) - packaged)
    assert flow in packaged
