"""The multi-node train flow through Metaflow's local runtime: @parallel starts the nodes, each launches
its processes, and together they train the model one process would."""

import pytest
from metaflow import Runner

from cxr.data.cache import ShardCache
from cxr.train import TrainConfig, train

from .conftest import free_port
from .test_train_flow import REPO, card_contents, flow_env, write_config

FLOW = REPO / "flows" / "train_multinode_flow.py"


@pytest.mark.slow
def test_two_nodes_train_the_model_one_process_trains(tmp_path):
    env = {**flow_env(tmp_path), "MASTER_PORT": str(free_port())}  # where the first node listens
    runner = Runner(str(FLOW), show_output=False, env=env, cwd=str(tmp_path))
    config = write_config(tmp_path, epochs=2)  # SGD without dropout: comparable step by step
    config.write_text(config.read_text().replace("lr: 0.003}", "lr: 0.003, dropout: 0.0, optimizer: sgd}"))
    with runner.run(config_file=str(config), nodes=2) as running:
        assert running.status == "successful", running.stderr
        run = running.run
    nodes = {task["node_index"].data: task for task in run["train"]}
    assert sorted(nodes) == [0, 1]
    first, second = nodes[0], nodes[1]
    assert first["train_device"].data == "cpu × 2" and "history" not in second  # the model comes from one
    assert "epoch 1: loss" in first.stdout and "epoch 1: loss" not in second.stdout
    (content,) = card_contents(first)
    assert "## Training on cpu \\u00d7 2" in content  # the card's JSON escapes the ×

    joined = run["join_train"].task
    assert (
        joined["train_nodes"].data == 2
        and joined["model_state"].data.keys() == first["model_state"].data.keys()
    )
    end = run["end"].task
    assert end["model_version"].data and end["metrics"].data["mean_auroc"] > 0

    config, rows = end["config"].data["train"], end["cache_rows"].data  # one process, the same global batches
    cache = ShardCache(end["data_cache"].data["local_dir"])
    alone = train(
        cache, rows["train"], rows["val"], TrainConfig.from_dict(config), tmp_path / "one", progress=False
    )
    together = joined["history"].data
    assert len(together) == len(alone.history) == 2
    for one, both in zip(alone.history, together, strict=True):
        assert abs(one["train_loss"] - both["train_loss"]) < 1e-4, (alone.history, together)
