"""What the Metaflow UI needs of cxr, short of running the metadata service: profiles that send runs to the
service, and a per-epoch log line. Cards found beside the datastore, the headline artifacts and the epoch
lines in a real run's task log are tested on the train flow (tests/test_train_flow.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from cxr.aws.training_job import METRIC_DEFINITIONS
from cxr.train import epoch_line

from .conftest import REPO

PROFILES = REPO / "config" / "metaflow"
READ_PROFILE = """
import json, sys
from metaflow import metaflow_config
names = json.load(open(sys.argv[1]))
print(json.dumps({n: getattr(metaflow_config, n.removeprefix("METAFLOW_"), "unknown") for n in names}))
"""


@pytest.mark.parametrize("name", ["local", "aws"])
def test_profile_sends_runs_to_the_metadata_service(tmp_path, name):
    shutil.copy(PROFILES / f"config_{name}.json", tmp_path)
    profile = json.loads((tmp_path / f"config_{name}.json").read_text())
    env = {k: v for k, v in os.environ.items() if k not in profile}
    env.update(METAFLOW_HOME=str(tmp_path), METAFLOW_PROFILE=name)
    result = subprocess.run([sys.executable, "-c", READ_PROFILE, str(tmp_path / f"config_{name}.json")],
                            env=env, capture_output=True, text=True, check=True)  # fmt: skip
    resolved = json.loads(result.stdout.strip().splitlines()[-1])
    assert resolved == profile  # Metaflow reads every setting of the profile (none misspelled)
    assert resolved["METAFLOW_DEFAULT_METADATA"] == "service" and resolved["METAFLOW_SERVICE_URL"]


def test_epoch_line_keeps_the_training_jobs_metrics():
    record = {"epoch": 3, "train_loss": 0.25, "val_loss": 0.3125, "val_mean_auroc": 0.8125,
              "img_per_s": 42.5, "lr": 1e-4, "seconds": 12.3}  # fmt: skip
    line = epoch_line(record)
    assert line == (
        "epoch 3: loss 0.2500, val loss 0.3125, val mean AUROC 0.8125, lr 0.0001, 42.5 img/s, 12.3 s"
    )
    scraped = {d["Name"]: re.search(d["Regex"], line) for d in METRIC_DEFINITIONS}  # as SageMaker reads logs
    values = {name: match.group(1) for name, match in scraped.items() if match}
    assert values == {
        "train:loss": "0.2500",
        "validation:mean_auroc": "0.8125",
        "train:images_per_second": "42.5",
    }
