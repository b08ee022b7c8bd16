"""The real train flow through Metaflow's local runtime, read back with the Metaflow client."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from metaflow import Runner

from cxr.data import cache_store
from cxr.data.cache import ShardCache

REPO = Path(__file__).resolve().parent.parent
FLOW = REPO / "flows" / "train_flow.py"

TINY = """
data:
  root: demo
  demo: {n_patients: 40, max_images_per_patient: 4, size: 64, seed: 0}
split: {ratios: [0.6, 0.2, 0.2], seed: 0, use_official: true}
preprocess: {size: 48, shard_size: 30}
"""


def run_flow(tmp_path, extra_config="", **params):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY + extra_config)
    env = {
        **os.environ,
        "METAFLOW_DEFAULT_DATASTORE": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path),
    }
    with Runner(str(FLOW), show_output=False, env=env, cwd=str(tmp_path)).run(
        config_file=str(config), **params
    ) as running:
        assert running.status == "successful", running.stderr
        return running.run


@pytest.mark.slow
def test_data_stages_on_demo_data(tmp_path):
    run = run_flow(tmp_path)
    end = run["end"].task
    config, cache_dir = end["config"].data, Path(end["data_cache"].data["local_dir"])
    assert config["preprocess"]["size"] == 48
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["key"] == end["data_cache_key"].data and manifest["settings"]["size"] == 48
    summary = {row["split"]: row for row in run["split"].task["split_summary"].data}
    assert sum(row["images"] for row in summary.values()) == manifest["images"]
    split = end["split_rows"].data
    patients = run["ingest"].task["catalog"].data.meta["patient_id"].to_numpy()
    assert not set(patients[split.train]) & set(patients[split.test])
    assert len(list(run["preprocess"])) == len(manifest["shards"]) > 1
    labels = np.load(cache_dir / "labels.npy")
    assert labels.shape == (manifest["images"], 14)

    again = run_flow(tmp_path)
    assert again["end"].task["data_cache_key"].data == manifest["key"]
    assert again["plan_preprocess"].task["cache_complete"].data  # the cache is reused, nothing rebuilt
    assert all(task["shard_result"].data is None for task in again["preprocess"])


@pytest.mark.slow
def test_real_nih_partial_download(tmp_path, nih_root):
    run = run_flow(tmp_path, data=str(nih_root))
    report = run["ingest"].task["ingest_report"].data
    assert report["matched"] == 120 and report["missing_images"] == 112_000
    manifest = json.loads(
        (Path(run["end"].task["data_cache"].data["local_dir"]) / "manifest.json").read_text()
    )
    assert manifest["images"] == 120 and manifest["failures"] == []


@pytest.mark.slow
def test_cache_is_shared_through_s3(tmp_path, s3):
    s3.create_bucket(Bucket="cxr-flow")
    run = run_flow(
        tmp_path, extra_config="preprocess: {size: 48, shard_size: 30, remote: s3://cxr-flow/cache}\n"
    )
    data_cache = run["end"].task["data_cache"].data
    assert data_cache["uri"] == f"s3://cxr-flow/cache/{data_cache['key']}"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="cxr-flow")["Contents"]}
    assert f"cache/{data_cache['key']}/manifest.json" in keys
    fetched = cache_store.fetch(data_cache["uri"], root=tmp_path / "elsewhere")
    local = ShardCache(data_cache["local_dir"])
    assert len(fetched) == len(local) and np.array_equal(
        fetched.image(len(local) - 1), local.image(len(local) - 1)
    )
