"""Data-parallel training on real NIH films: two CPU processes (gloo) train as one process does on the same
global batches, and a killed distributed run resumes from its checkpoint."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from cxr import distributed
from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.data.loader import GlobalBatchSampler, ShardDataset
from cxr.model import CXRNet
from cxr.train import LAST, TrainConfig, build_model, learning_rate, seed_everything, train

# As shipped (cosine schedule, loader workers, channels-last) but small: 35 training films make global
# batches of 16, 16 and 3, the last shared unevenly (2 + 1), at a 64 crop (the last dense block sees 2×2).
# Dropout masks are drawn per process, so the comparison runs without dropout. It runs SGD: AdamW turns
# float-level noise in a near-zero gradient into a full ±lr step, so a randomly initialised network's
# trajectory diverges within a few steps even between one process on 1 and on 2 threads (losses 4% apart by
# step 5); SGD's update is proportional to the gradient, so a mis-scaled gradient shows. Measured: per-step
# losses agree to 1.1e-5 (one process on 1 vs 2 threads: 5e-6) and the weights' updates to 1.1% of their
# norm (1 vs 2 threads: 2.1%); leaving the uneven last batch unweighted moves the updates by 12%, and
# reading the wrong share of each batch moves the first step's loss by 1.5e-3.
SETTINGS = dict(epochs=2, batch_size=16, crop=64, pretrained=False, dropout=0.0, workers=2, optimizer="sgd")
LOSS_TOLERANCE, UPDATE_TOLERANCE = 1e-4, 0.05


@pytest.fixture(scope="module")
def films(tmp_path_factory, nih_root):
    """A 72² cache of the real NIH films; 35 training rows and 20 validation rows."""
    catalog, _ = load_catalog(nih_root)
    cache = build_cache(
        catalog, PreprocessSettings(size=72), root=tmp_path_factory.mktemp("cache"), progress=False
    )
    order = np.random.default_rng(0).permutation(len(cache))
    return cache, np.sort(order[:35]), np.sort(order[35:55])


@pytest.fixture(scope="module")
def two_processes(films, tmp_path_factory):
    """A training run in two processes, straight through."""
    cache, train_rows, val_rows = films
    directory = tmp_path_factory.mktemp("two")
    handler, environment = signal.getsignal(signal.SIGINT), dict(os.environ)
    result = train(cache, train_rows, val_rows, TrainConfig(**SETTINGS, gpus=2), directory, progress=False)
    assert signal.getsignal(signal.SIGINT) is handler and dict(os.environ) == environment  # left as found
    return result, torch.load(directory / LAST, weights_only=True)


def test_two_processes_train_as_one(films, two_processes, tmp_path):
    cache, train_rows, val_rows = films
    one = train(cache, train_rows, val_rows, TrainConfig(**SETTINGS), tmp_path, progress=False)
    two, two_last = two_processes
    assert one.device == "cpu" and two.device == "cpu × 2"
    one_last = torch.load(tmp_path / LAST, weights_only=True)
    assert [len(epoch) for epoch in two_last["step_losses"]] == [3, 3]
    assert np.allclose(two_last["step_losses"], one_last["step_losses"], rtol=LOSS_TOLERANCE, atol=0)
    assert [h["train_loss"] for h in two.history] == pytest.approx(
        [h["train_loss"] for h in one.history], rel=LOSS_TOLERANCE
    )
    initial, one_weights, two_weights = (
        _weights(state) for state in (_initial_state(), one_last["model"], two_last["model"])
    )
    update = torch.linalg.vector_norm(one_weights - initial)
    assert torch.linalg.vector_norm(two_weights - one_weights) <= UPDATE_TOLERANCE * update
    CXRNet(pretrained=False).load_state_dict(two.best_state)  # the plain network takes the state as it is


def _initial_state() -> dict[str, torch.Tensor]:
    """The network every run starts from (training seeds torch with the run's seed before building it)."""
    seed_everything(TrainConfig().seed)
    return build_model(TrainConfig(**SETTINGS), torch.device("cpu")).state_dict()


def _weights(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every trained parameter of a state dict as one float64 vector."""
    names = sorted(k for k, v in state.items() if v.is_floating_point() and "running" not in k)
    return torch.cat([state[name].flatten().double() for name in names])


def kill_this_process(directory) -> None:
    """Checkpoint hook: rank 0 is killed once epoch 0's checkpoint is written."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_distributed_run_resumes_from_its_checkpoint(films, two_processes, tmp_path):
    cache, train_rows, val_rows = films
    config = TrainConfig(**SETTINGS, gpus=2)
    with pytest.raises(ChildFailedError):
        train(cache, train_rows, val_rows, config, tmp_path, progress=False, on_checkpoint=kill_this_process)
    assert torch.load(tmp_path / LAST, weights_only=True)["epoch"] == 0
    resumed = train(cache, train_rows, val_rows, config, tmp_path, progress=False)
    straight, straight_last = two_processes
    assert resumed.resumed_from_epoch == 1
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    resumed_last = torch.load(tmp_path / LAST, weights_only=True)
    assert resumed_last["step_losses"] == straight_last["step_losses"]
    for key, value in straight_last["model"].items():
        assert torch.equal(value, resumed_last["model"][key]), key


def test_torchrun_trains_the_sagemaker_entry_point_in_two_processes(films, tmp_path):
    """As SageMaker runs it with instance_count > 1: torchrun starts every process; rank 0 alone prints the
    epoch lines and writes the model."""
    cache, train_rows, val_rows = films
    (tmp_path / "split.json").write_text(json.dumps({"train": train_rows.tolist(), "val": val_rows.tolist()}))
    env = {
        **os.environ,
        "SM_CHANNEL_TRAINING": str(cache.directory),
        "SM_CHANNEL_SPLIT": str(tmp_path),
        "SM_MODEL_DIR": str(tmp_path / "model"),
        "CXR_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "SM_HPS": json.dumps({**SETTINGS, "epochs": 1}),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "cxr.train"]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("epoch 0: loss") == 1 and run.stdout.count("best_val_auroc=") == 1, run.stdout
    summary = json.loads((tmp_path / "model" / "history.json").read_text())
    assert summary["device"] == "cpu × 2" and len(summary["history"]) == 1
    CXRNet(pretrained=False).load_state_dict(torch.load(tmp_path / "model" / "model.pt", weights_only=True))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_process_reads_its_share_of_the_same_global_batches(films, world_size):
    cache, train_rows, _ = films
    dataset = ShardDataset(cache, train_rows, crop=64, train=True)
    dataset.set_epoch(3)
    one = list(GlobalBatchSampler(dataset, 16, shuffle=True, seed=0))
    shares = [list(GlobalBatchSampler(dataset, 16, True, 0, rank, world_size)) for rank in range(world_size)]
    assert [len(batch) for batch in one] == [16, 16, 3]
    kept = one if world_size <= 3 else one[:2]  # a last batch with fewer images than processes is left out
    assert all(len(share) == len(kept) for share in shares)
    for step, batch in enumerate(kept):
        parts = [share[step] for share in shares]
        assert list(itertools.chain(*parts)) == batch and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_global_batch_smaller_than_the_processes_is_refused(films):
    cache, train_rows, _ = films
    with pytest.raises(ValueError, match="cannot be shared"):
        GlobalBatchSampler(ShardDataset(cache, train_rows, crop=64), 2, False, 0, rank=0, world_size=4)


def test_learning_rate_scales_with_the_global_batch():
    assert learning_rate(TrainConfig(lr=1e-3, batch_size=256)) == 1e-3
    assert learning_rate(TrainConfig(lr=1e-3, batch_size=1024, lr_batch=256)) == pytest.approx(4e-3)


@pytest.mark.parametrize("node", [0, 1])
def test_a_batch_multinode_node_finds_its_place_as_metaflow_describes_it(node, monkeypatch):
    """On AWS Batch multi-node, Metaflow's @batch maps AWS_BATCH_JOB_* to MF_PARALLEL_* in each container;
    every node must then agree on the main node's address and know its own rank."""
    from metaflow.plugins.aws.batch.batch_decorator import _setup_multinode_environment

    monkeypatch.setenv("AWS_BATCH_JOB_NUM_NODES", "2")
    monkeypatch.setenv("AWS_BATCH_JOB_NODE_INDEX", str(node))
    for name in ("MF_PARALLEL_MAIN_IP", "MF_PARALLEL_NUM_NODES", "MF_PARALLEL_NODE_INDEX"):
        monkeypatch.setenv(name, "")  # what Metaflow writes into os.environ is undone after the test
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    main = socket.gethostbyname_ex(socket.gethostname())[-1][0]  # the main node finds its own address
    if node:  # Batch tells the other nodes where the main one is
        monkeypatch.setenv("AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS", main)
    else:
        monkeypatch.delenv("AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS", raising=False)
    _setup_multinode_environment()
    assert distributed.nodes_from_environment() == distributed.Nodes(2, node, main, 29500)


def test_sagemaker_hosts_give_each_node_its_place():
    hosts = json.dumps(["algo-1", "algo-2", "algo-3"])
    env = {"SM_HOSTS": hosts, "SM_CURRENT_HOST": "algo-3"}
    assert distributed.nodes_from_environment(env) == distributed.Nodes(3, 2, "algo-1", 29500)
    assert distributed.nodes_from_environment({**env, "MASTER_PORT": "7777"}).port == 7777
    assert (
        distributed.nodes_from_environment({"SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1"}).count == 1
    )
