"""The train flow with its train step on several machines at once (Metaflow's @parallel).

python flows/train_multinode_flow.py run --nodes 2                  # two nodes on this machine (gloo)
python flows/train_multinode_flow.py --with batch run --nodes 4     # AWS Batch multi-node (NCCL)
python flows/train_multinode_flow.py resume                         # continue a failed run
"""

from __future__ import annotations

from metaflow import Parameter, card, current, parallel, resources, retry, step
from train_flow import CXRTrainFlow


class CXRTrainMultiNodeFlow(CXRTrainFlow):
    """NIH ChestX-ray14 → classifier, trained on `nodes` machines.

    The stages of CXRTrainFlow, with training in three steps:
    - launch_train: start the train step on `nodes` machines.
    - train (on every node): each node starts `train.gpus` processes and they train one model with
      DistributedDataParallel, meeting at the first node's address; checkpoints and resume as before.
    - join_train: the first node's model, history and card go on to evaluate.

    AWS Step Functions refuses @parallel steps, so this flow runs from the command line (locally or with
    `--with batch`, an AWS Batch multi-node job); schedule CXRTrainFlow there.
    """

    nodes = Parameter("nodes", default=2, type=int, help="machines the train step runs on")

    @step
    def join_preprocess(self, inputs):
        """Finalize the cache (table, labels, manifest over all shards) and record where it lives."""
        self._finish_cache(inputs)
        self.next(self.launch_train)

    @step
    def launch_train(self):
        """Start the train step on `nodes` machines."""
        if self.nodes < 1:
            raise ValueError(f"--nodes must be at least 1, not {self.nodes}")
        self.next(self.train, num_parallel=self.nodes)

    @card(type="blank")
    @resources(gpu=1, cpu=8, memory=32000)
    @retry(times=1)
    @parallel
    @step
    def train(self):
        """Train one model on every node together (the world is `nodes` × `train.gpus` processes)."""
        self.node_index = current.parallel.node_index
        self._train_and_record()
        self.next(self.join_train)

    @step
    def join_train(self, inputs):
        """Keep what the first node trained; every node shares everything else."""
        self.merge_artifacts(inputs, exclude=["node_index"])
        self.train_nodes = len(list(inputs))
        self.next(self.evaluate)


if __name__ == "__main__":
    CXRTrainMultiNodeFlow()
