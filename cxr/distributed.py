"""Data-parallel training over the processes of one machine (or more) with PyTorch DDP.

A run is launched either by `torchrun` (which sets RANK, WORLD_SIZE and LOCAL_RANK in each process) or by
`launch`, which starts N local processes the same way through torch's elastic launcher and hands back
rank 0's result. Across machines each one calls `launch` with its place among them (`Nodes`), read from
what the scheduler set: Metaflow's `@parallel` (locally and on AWS Batch multi-node) or SageMaker
(`instance_count` > 1); the nodes meet at the first one's address (torchrun's static rendezvous).

Inside each process `process_group` joins the group: NCCL on CUDA (one GPU a process),
gloo on the CPU. Batch-norm statistics are taken over the global batch (`sync_batchnorm`): torch's
`SyncBatchNorm` on CUDA; on the CPU, where torch's refuses CPU tensors, `CPUSyncBatchNorm` computes the
same statistics with differentiable all-reduces (in float64, as torch's CPU batch norm accumulates).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

TIMEOUT = timedelta(minutes=30)  # the other ranks wait this long for rank 0's validation and checkpoint
MAIN_PORT = 29500  # torchrun's default; MASTER_PORT overrides it


@dataclass(frozen=True)
class Nodes:
    """The machines of a run and this one's place among them; they meet at `main_address:port`."""

    count: int = 1
    rank: int = 0
    main_address: str = "127.0.0.1"
    port: int = MAIN_PORT


def nodes_from_environment(env: dict[str, str] | None = None) -> Nodes:
    """The nodes the scheduler describes: Metaflow's `@parallel` (MF_PARALLEL_NUM_NODES, _NODE_INDEX,
    _MAIN_IP; Metaflow sets them on AWS Batch multi-node too), SageMaker (SM_HOSTS, SM_CURRENT_HOST; the
    first host is the main one), else this machine alone. MASTER_ADDR and MASTER_PORT override the main
    node's address and port, as for torchrun."""
    env = dict(os.environ) if env is None else env
    if "MF_PARALLEL_NUM_NODES" in env:
        count, rank = int(env["MF_PARALLEL_NUM_NODES"]), int(env.get("MF_PARALLEL_NODE_INDEX", 0))
        address = env.get("MF_PARALLEL_MAIN_IP", "127.0.0.1")
    elif len(hosts := json.loads(env.get("SM_HOSTS", "[]"))) > 1:
        count, rank, address = len(hosts), hosts.index(env["SM_CURRENT_HOST"]), hosts[0]
    else:
        return Nodes()
    return Nodes(count, rank, env.get("MASTER_ADDR", address), int(env.get("MASTER_PORT", MAIN_PORT)))


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that validates, prints and writes checkpoints."""
        return self.rank == 0


def current_world() -> World:
    """The world a launcher (torchrun, `launch`) described in the environment; one process otherwise."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """Whether this process was started by a distributed launcher (WORLD_SIZE is set)."""
    return "WORLD_SIZE" in os.environ


def launch(function: Callable[..., Any], processes: int, *args: Any, nodes: Nodes | None = None) -> Any:
    """Run `function(*args)` in `processes` local processes, as `torchrun --nproc_per_node` would, and
    return rank 0's result (None on the other nodes). Alone (`nodes` None or one) the processes meet on a
    free loopback port, as with `torchrun --standalone`; across `nodes` at the main node's address.
    Arguments and the result travel pickled; a failing rank stops all."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nodes = nodes or Nodes()
    alone = nodes.count == 1
    level = logging.getLogger().getEffectiveLevel()  # the processes log as this one does
    with _kept_process_state(), tempfile.TemporaryDirectory(prefix="cxr-launch-") as errors:
        config = LaunchConfig(
            min_nodes=nodes.count,
            max_nodes=nodes.count,
            nproc_per_node=processes,
            run_id=f"cxr-{uuid.uuid4().hex[:12]}" if alone else "cxr",
            rdzv_backend="c10d" if alone else "static",
            rdzv_endpoint="127.0.0.1:0" if alone else f"{nodes.main_address}:{nodes.port}",
            rdzv_configs={} if alone else {"rank": nodes.rank},
            max_restarts=0,
            logs_specs=DefaultLogsSpecs(log_dir=errors),  # the ranks' error files, removed afterwards
        )
        results = elastic_launch(config, _main_result)(level, function, *args)  # by global rank, this node's
        return results.get(0)


@contextmanager
def _kept_process_state() -> Iterator[None]:
    """Undo what torch's launcher leaves behind in the calling process: its signal handlers (which turn a
    later Ctrl-C into its own exception) and the environment variables it sets."""
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    main = threading.current_thread() is threading.main_thread()
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in names} if main else {}
    environment = dict(os.environ)
    try:
        yield
    finally:
        for name, handler in handlers.items():
            if handler is not None:
                signal.signal(getattr(signal, name), handler)
        for key in set(os.environ) - set(environment):
            del os.environ[key]
        os.environ.update(environment)


def _main_result(level: int, function: Callable[..., Any], *args: Any) -> Any:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = function(*args)
    return result if current_world().main else None  # only rank 0's result travels back


def device_for(world: World) -> torch.device:
    """This process's device: GPU `LOCAL_RANK` when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if world.local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {world.local_rank} has no GPU: {torch.cuda.device_count()} visible")
    return torch.device("cuda", world.local_rank)


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the process group for `world` (NCCL on CUDA, gloo on the CPU) unless the caller already has;
    on the CPU each local process gets its share of the cores."""
    if world.size == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def active() -> bool:
    """Whether collectives are needed: a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every process (itself when training in one process)."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) in every process; the others wait here until rank 0 sends."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every process reaches this point."""
    if active():
        dist.barrier()


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """`BatchNorm2d` whose training statistics are those of the global batch over every process, as
    `nn.SyncBatchNorm` computes them on GPUs; gradients flow through the all-reduces. In evaluation, or in
    one process, it is plain `BatchNorm2d`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(input)
        x = input.double()  # float64, as torch accumulates batch norm on the CPU: the halves cancel exactly
        count = _global_sum(x.new_tensor([x.numel() / x.shape[1]]))
        mean = _global_sum(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        var = _global_sum(centred.square().sum(dim=(0, 2, 3))) / count
        self._track(mean.detach(), var.detach(), count.detach())
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        out = centred * scale[None, :, None, None]
        if self.affine:
            out = out + self.bias[None, :, None, None]
        return out.to(input.dtype)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """Update the running statistics as `BatchNorm2d` does (the variance unbiased)."""
        tracked = self.num_batches_tracked
        if self.running_mean is None or self.running_var is None or tracked is None:
            return
        tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def _global_sum(tensor: torch.Tensor) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", cast(dist.ProcessGroup, dist.group.WORLD)))


def sync_batchnorm(model: nn.Module, device: torch.device) -> None:
    """Take `model`'s batch-norm statistics over the global batch, in place: `nn.SyncBatchNorm` on CUDA,
    `CPUSyncBatchNorm` on the CPU; parameters and buffers stay as they are, so state dicts are unchanged."""
    if device.type == "cuda":
        for name, child in model.named_children():  # the root itself is never a batch norm here
            model.add_module(name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        return
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = CPUSyncBatchNorm


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` under DistributedDataParallel when training in more than one process, else itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
