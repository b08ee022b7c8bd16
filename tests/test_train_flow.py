"""The real train flow through Metaflow's local runtime, read back with the Metaflow client."""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from metaflow import Runner
from metaflow.cards import get_cards
from sklearn.metrics import roc_auc_score

from cxr.data import cache_store
from cxr.data.cache import ShardCache
from cxr.data.findings import FINDINGS
from cxr.registry import Registry

REPO = Path(__file__).resolve().parent.parent
FLOW = REPO / "flows" / "train_flow.py"

TINY = """
data:
  root: demo
  demo: {n_patients: 40, max_images_per_patient: 4, size: 64, seed: 0}
split: {ratios: [0.6, 0.2, 0.2], seed: 0, use_official: true}
preprocess: {size: 48, shard_size: 30, remote: %(remote)s, tasks: 3}
train: {epochs: %(epochs)s, batch_size: 16, crop: 40, pretrained: false, workers: 0, lr: 0.003}
evaluate:
  n_boot: 50
  operating_points: {high_sensitivity: {sensitivity: 0.9}}
  input_gate: {fit_images: 40, films: 6}
registry: {group: auto, min_improvement: 0.0, max_finding_drop: 0.02, manual_approval: false}
"""


def write_config(tmp_path, remote="none", epochs=2, n_patients=40):
    config = tmp_path / "tiny.yaml"
    text = TINY % {"remote": remote, "epochs": epochs}
    config.write_text(text.replace("n_patients: 40", f"n_patients: {n_patients}"))
    return config


def flow_env(tmp_path):
    """The documented local profile (config/metaflow/config_local.json), its datastore in tmp_path/metaflow,
    away from the working directory (tmp_path); local metadata, as no metadata service runs in tests."""
    home = tmp_path / "metaflowconfig"
    home.mkdir(exist_ok=True)
    profile = (REPO / "config" / "metaflow" / "config_local.json").read_text()
    (home / "config_local.json").write_text(profile.replace("YOUR-DIRECTORY", str(tmp_path)))
    outside = {k: v for k, v in os.environ.items() if k not in json.loads(profile)}  # the profile decides
    return {
        **outside,
        "METAFLOW_HOME": str(home),
        "METAFLOW_PROFILE": "local",
        "METAFLOW_DEFAULT_METADATA": "local",
    }


def card_contents(task) -> list[str]:
    """Each card's components (JSON) of a task, found as the client and the UI backend find them."""
    pages = [card.get() for card in get_cards(task)]
    payloads = [re.search(r'__MF_DATA__\[[^]]+\] = "([^"]+)"', page) for page in pages]
    return [base64.b64decode(match.group(1)).decode() for match in payloads if match]


def run_flow(tmp_path, config=None, **params):
    config = config or write_config(tmp_path)
    runner = Runner(str(FLOW), show_output=False, env=flow_env(tmp_path), cwd=str(tmp_path))
    with runner.run(config_file=str(config), **params) as running:
        assert running.status == "successful", running.stderr
        return running.run


@pytest.mark.slow
def test_whole_pipeline_on_demo_data(tmp_path):
    run = run_flow(tmp_path)
    end = run["end"].task
    assert not (tmp_path / ".metaflow").exists()  # everything in the profile's datastore, none in the cwd
    for step, title in (
        ("split", "## Split ("),
        ("train", "## Training on"),
        ("evaluate", "## Test: mean AUROC"),
    ):
        (content,) = card_contents(run[step].task)  # where get_cards and the UI backend look
        assert title in content and '"type": "vegaChart"' in content
    metrics, (lo, hi) = end["metrics"].data, end["metrics"].data["mean_auroc_ci"]
    names = ("headline", "mean_auroc", "mean_auroc_ci", "model_version", "model_status", "model_group")
    headline = {name: end[name] for name in names}  # small, plain artifacts for the UI's artifact table
    assert end["metrics"].size > 4096 and all(a.size < 4096 for a in headline.values())  # its default limit
    assert json.dumps([a.data for a in headline.values()], allow_nan=False)  # as the UI backend sends them
    assert (headline["mean_auroc"].data, headline["mean_auroc_ci"].data) == (metrics["mean_auroc"], [lo, hi])
    assert headline["headline"].data == (
        f"demo version {headline['model_version'].data} (production): test mean AUROC "
        f"{metrics['mean_auroc']:.4f} (95% CI {lo:.4f}-{hi:.4f}) on {metrics['n_images']} images"
    )
    train_log = run["train"].task.stdout  # one plain line per epoch in the task's log (the UI's log view)
    epochs = re.findall(r"^epoch (\d): loss [\d.]+, val loss [\d.]+, val mean AUROC [\d.]+, lr [\d.e-]+, "
                        r"[\d.]+ img/s, [\d.]+ s$", train_log, re.MULTILINE)  # fmt: skip
    assert epochs == ["0", "1"]
    history = run["train"].task["history"].data
    assert run["train"].task["train_data_path"].data == "loader"  # auto, without CUDA
    assert all(h["val_loss"] > 0 and h["seconds"] > 0 for h in history)
    cache = ShardCache(end["data_cache"].data["local_dir"])
    assert (
        end["config"].data["preprocess"]["size"] == 48 and cache.manifest["key"] == end["data_cache_key"].data
    )
    summary = {row["split"]: row for row in run["split"].task["split_summary"].data}
    assert sum(row["images"] for row in summary.values()) == len(cache)
    groups = run["plan_preprocess"].task["shard_groups"].data  # 4 shards dealt to 3 tasks
    assert len(groups) == 3 and sorted(np.concatenate(groups)) == list(range(len(cache.manifest["shards"])))
    val_rows = end["cache_rows"].data["val"]  # evaluate takes thresholds from training's best epoch
    assert run["train"].task["val_probabilities"].data.shape == (len(val_rows), 14)
    evaluate = run["evaluate"].task
    assert evaluate["scoring"].data["backend"] == "torch"  # too few test images to repay an ONNX export
    assert re.search(r"test: \d+/\d+ images \(100%\)", evaluate.stderr)  # progress reaches the run's log
    split, patients = end["split_rows"].data, run["ingest"].task["catalog"].data.meta["patient_id"].to_numpy()
    assert not set(patients[split.train]) & set(patients[split.test])
    assert len(list(run["preprocess"])) == len(groups) < len(cache.manifest["shards"])

    assert [h["epoch"] for h in end["history"].data] == [0, 1]
    predictions = end["test_predictions"].data
    labels = cache.labels[cache.rows_for(predictions["Image Index"])]
    for k, finding in enumerate(FINDINGS):  # recomputed here from the stored predictions
        column = predictions[f"prob_{finding}"].to_numpy()
        if 0 < labels[:, k].sum() < len(labels):
            assert metrics["auroc"][finding] == pytest.approx(roc_auc_score(labels[:, k], column))
    assert metrics["mean_auroc"] == pytest.approx(np.nanmean(list(metrics["auroc"].values())))

    version = Registry(group="demo").get(end["model_version"].data)
    assert version.status == "production" and Path(end["model_package"].data) == version.package
    assert version.lineage["data cache key"] == cache.key and "Mean AUROC" in version.card.read_text()
    openvino = run["register"].task["openvino_checks"].data  # INT8 calibrated on the training images
    assert {"fp32", "int8"} <= set(openvino) and openvino["int8"]["calibration_images"] == len(
        end["cache_rows"].data["train"]
    )
    summary = metrics["calibration"]  # fitted on validation, shipped, reported before/after in the card
    assert set(summary["per_finding"]) == set(FINDINGS) and summary["ece_after"] >= 0
    with tarfile.open(version.package) as tar:
        shipped = json.load(tar.extractfile("metadata.json"))["calibration"]
    assert shipped == run["evaluate"].task["calibration"].data and "test ECE" in version.card.read_text()
    assert list(metrics["operating_points"]) == ["youden", "high_sensitivity"]
    gate_report = metrics["input_gate"]  # fitted at evaluate, shipped in the package, reported in the card
    assert gate_report["real_images"] == len(predictions) and 0 <= gate_report["auroc"] <= 1
    assert {"photographs", "rotated_90", "inverted"} <= set(gate_report["groups"])
    with tarfile.open(version.package) as tar:
        assert "input_gate.npz" in tar.getnames()
        assert json.load(tar.extractfile("metadata.json"))["operating_points"]["high_sensitivity"]
    assert "## Input gate" in version.card.read_text() and "## Operating points" in version.card.read_text()
    baseline = run["evaluate"].task["baseline"].data
    assert baseline.gate_scores is not None and baseline.uncertainty.shape == (
        len(baseline.probabilities),
        14,
    )

    again = run_flow(tmp_path)  # same data: the cache is reused and the gate compares with production
    assert again["plan_preprocess"].task["cache_complete"].data
    assert all(task["shard_results"].data == [] for task in again["preprocess"])
    gate = again["register"].task["gate"].data
    production_auroc = again["register"].task["production_auroc"].data
    assert production_auroc["Atelectasis"] == pytest.approx(metrics["auroc"]["Atelectasis"])  # same model
    assert gate["promote"] is False and "does not beat" in " ".join(gate["reasons"])  # identical, no gain
    assert Registry(group="demo").get(again["end"].task["model_version"].data).status == "candidate"
    assert (gate["images"], gate["excluded"]) == (len(predictions), 0)
    at_production = gate["at_production_thresholds"]  # the same model at production's thresholds
    sensitivities = np.array(
        [[np.nan if row[k] is None else row[k] for k in ("candidate_sensitivity", "production_sensitivity")]
         for row in at_production], dtype=float,
    )  # fmt: skip
    assert len(at_production) and np.array_equal(sensitivities[:, 0], sensitivities[:, 1], equal_nan=True)

    quick = write_config(tmp_path, epochs=1)
    moved = run_flow(tmp_path, quick, seed=1)  # another split: some of its test images trained production
    gate, tested = moved["register"].task["gate"].data, len(moved["end"].task["test_predictions"].data)
    assert gate["excluded"] > 0 and gate["images"] + gate["excluded"] == tested  # compared on the others
    assert moved["register"].task["production_auroc"].data is not None

    quick.write_text(quick.read_text().replace("ratios: [0.6, 0.2, 0.2]", "ratios: [0.2, 0.2, 0.6]"))
    grown = run_flow(tmp_path, quick)  # most of this test split trained production: no fair comparison
    gate = grown["register"].task["gate"].data
    assert gate["promote"] is False and gate["excluded"] > gate["images"]
    assert "no fair comparison" in gate["reasons"][0] and "test_list.txt" in gate["reasons"][0]
    assert grown["register"].task["production_auroc"].data is None  # production was not scored


@pytest.mark.slow
def test_killed_training_resumes_from_last_epoch(tmp_path):
    config = write_config(tmp_path, epochs=3, n_patients=100)
    command = [sys.executable, str(FLOW), "--no-pylint", "run", "--config_file", str(config)]
    process = subprocess.Popen(command, env=flow_env(tmp_path), cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoints = Path(os.environ["CXR_HOME"]) / "checkpoints" / "CXRTrainFlow"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            found = list(checkpoints.glob("*/train/last.pt"))
            if found and torch.load(found[0], weights_only=False)["epoch"] == 0:
                break  # epoch 1 is saved: training is now inside epoch 2
            assert process.poll() is None, "the flow ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 300 s")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    origin = found[0].parents[1].name
    runner = Runner(str(FLOW), show_output=False, env=flow_env(tmp_path), cwd=str(tmp_path))
    with runner.resume(origin_run_id=origin) as running:
        assert running.status == "successful", running.stderr
        resumed = running.run
    task = resumed["train"].task
    assert task["resumed_from_epoch"].data == 1  # continued after the saved epoch, not from scratch
    assert [h["epoch"] for h in task["history"].data] == [0, 1, 2]
    assert np.isfinite(resumed["end"].task["metrics"].data["mean_auroc"])


@pytest.mark.slow
def test_real_nih_partial_download(tmp_path, nih_root):
    run = run_flow(tmp_path, data=str(nih_root))
    report = run["ingest"].task["ingest_report"].data
    assert report["matched"] == 120 and report["missing_images"] == 112_000
    manifest = ShardCache(run["end"].task["data_cache"].data["local_dir"]).manifest
    assert manifest["images"] == 120 and manifest["failures"] == []
    assert run["end"].task["metrics"].data["n_images"] == len(run["end"].task["split_rows"].data.test)
    experts = run["end"].task["metrics"].data["expert_labels"]  # the Google 2019 file is in the root
    tested = run["end"].task["test_predictions"].data["Image Index"]
    adjudicated = pd.read_csv(nih_root / "google2019_nih-chest-xray-labels.csv.gz")["Image Index"]
    assert experts["n_images"] == tested.isin(adjudicated).sum()


@pytest.mark.slow
def test_cache_is_shared_through_s3(tmp_path, s3):
    s3.create_bucket(Bucket="cxr-flow")
    run = run_flow(tmp_path, write_config(tmp_path, remote="s3://cxr-flow/cache", epochs=1))
    data_cache = run["end"].task["data_cache"].data
    assert data_cache["uri"] == f"s3://cxr-flow/cache/{data_cache['key']}"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="cxr-flow")["Contents"]}
    assert f"cache/{data_cache['key']}/manifest.json" in keys
    fetched = cache_store.fetch(data_cache["uri"], root=tmp_path / "elsewhere")
    local = ShardCache(data_cache["local_dir"])
    last = len(local) - 1
    assert len(fetched) == len(local) and np.array_equal(fetched.image(last), local.image(last))
    assert json.loads((local.directory / "manifest.json").read_text())["key"] == data_cache["key"]
