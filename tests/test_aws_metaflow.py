"""The train flow on Metaflow's S3 datastore, against the S3 API on loopback: run, client, kill, resume."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from metaflow import Runner

from .test_train_flow import FLOW, card_contents, write_config

BUCKET = "cxr-metaflow"


def s3_env(tmp_path: Path) -> dict[str, str]:
    """Metaflow on S3 (AWS_ENDPOINT_URL, set by the `s3` fixture, points every client at loopback)."""
    return {
        **os.environ,
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{BUCKET}/metaflow",
        "METAFLOW_DATATOOLS_S3ROOT": f"s3://{BUCKET}/data",
        "METAFLOW_DEFAULT_METADATA": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path),
    }


@pytest.mark.slow
def test_s3_datastore_run_kill_and_resume_on_another_machine(tmp_path, s3):
    s3.create_bucket(Bucket=BUCKET)
    config = write_config(tmp_path, remote="auto", epochs=3, n_patients=100)
    command = [sys.executable, str(FLOW), "--no-pylint", "run", "--config_file", str(config)]
    process = subprocess.Popen(command, env=s3_env(tmp_path), cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    prefix, origin, deadline = "data/cxr-checkpoints/CXRTrainFlow/", None, time.monotonic() + 400
    try:
        while time.monotonic() < deadline and origin is None:
            assert process.poll() is None, "the flow ended before it could be killed"
            for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
                if item["Key"].endswith("/train/last.pt"):
                    body = s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
                    if torch.load(io.BytesIO(body), weights_only=False)["epoch"] == 0:
                        origin = item["Key"][len(prefix) :].split("/")[0]
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert origin, "no checkpoint reached S3 in time"
    shutil.rmtree(Path(os.environ["CXR_HOME"]) / "checkpoints")  # "another machine": only S3 has them

    runner = Runner(str(FLOW), show_output=False, env=s3_env(tmp_path), cwd=str(tmp_path))
    with runner.resume(origin_run_id=origin) as running:
        assert running.status == "successful", running.stderr
        run = running.run
    train = run["train"].task  # read back through the client, from S3
    assert train["resumed_from_epoch"].data == 1 and [h["epoch"] for h in train["history"].data] == [0, 1, 2]
    assert train["checkpoint_uri"].data.startswith(
        f"s3://{BUCKET}/data/cxr-checkpoints/CXRTrainFlow/{origin}/"
    )
    (content,) = card_contents(train)  # cards in S3 beside the datastore, where the UI backend reads them
    assert "## Training on" in content
    cache = run["end"].task["data_cache"].data
    assert cache["uri"] == f"s3://{BUCKET}/data/cxr-cache/{cache['key']}"
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"metaflow/CXRTrainFlow/{run.id}/")["Contents"]
    ]
    assert any("/end/" in key for key in keys)
    head = s3.head_object(Bucket=BUCKET, Key=f"data/cxr-cache/{cache['key']}/manifest.json")
    assert head["ServerSideEncryption"] == "AES256"
