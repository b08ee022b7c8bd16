"""Training: BCE-with-logits on the 14 findings (masked where a finding is not labelled); per-epoch
checkpoints, resume, early stopping on val AUROC.

`train(...)` is the one entry point. It runs locally, inside a Metaflow step, on AWS Batch, or inside a
SageMaker training container (`python -m cxr.train`, which reads the SM_* environment and checkpoints to
/opt/ml/checkpoints). Every epoch writes `last.pt` (model, optimizer, scheduler, epoch, history, per-step
losses) atomically; a restarted run with the same checkpoint directory continues from the epoch after it.
Randomness is a function of (seed, epoch): the loader's order and augmentation, and dropout's stream (per
process), so a resumed epoch is the epoch it replaces.

Past one GPU it trains data-parallel with PyTorch DDP (`cxr.distributed`): `batch_size` is the global batch,
which each process reads its share of, so the batches, their augmentation and (with batch-norm statistics
synchronised) the gradients are those of one process whatever the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from cxr import distributed
from cxr.config import cxr_home
from cxr.data.cache import ShardCache
from cxr.data.device_augment import DeviceCache, DeviceLoader, fits_on_device
from cxr.data.loader import GlobalBatchSampler, ShardDataset, make_loader
from cxr.model import CXRNet
from cxr.progress import Progress
from cxr.scoring import score_fast

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters and runtime settings of one training run."""

    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | plateau | none
    warmup_epochs: float = 0.0
    pos_weight: bool = False  # weight positives by negatives/positives per finding
    grad_clip: float = 1.0
    patience: int = 3  # early stopping on val mean AUROC
    crop: int = 224
    pretrained: bool = True
    dropout: float = 0.3
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True
    compile: bool = False
    workers: int = 2
    data_path: str = "auto"  # auto | loader | device: the CPU loader, or the cache resident on the device
    seed: int = 0
    gpus: int = 1  # data-parallel processes on this machine: one a GPU (without CUDA, CPU processes)
    sync_batchnorm: bool = True  # gpus > 1: batch-norm statistics of the global batch, as in one process
    lr_batch: int | None = None  # the batch size `lr` is for; when set, lr × batch_size / lr_batch is used
    max_batches_per_epoch: int | None = None  # for quick runs
    # dataset → weight: each epoch draws the datasets in these shares (empty: every image once, shuffled)
    dataset_weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TrainConfig:
        """Build from a config mapping, rejecting unknown keys with a clear message."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown train settings {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class TrainResult:
    """What training produced."""

    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    best_epoch: int
    best_val_auroc: float
    resumed_from_epoch: int | None
    device: str
    config: dict[str, Any] = field(default_factory=dict)
    val_probabilities: np.ndarray | None = None  # the best epoch's, row-aligned with the validation rows
    data_path: str = "loader"  # the data path training used: loader | device


def checkpoint_dir(flow_name: str, run_id: str, step: str = "train") -> Path:
    """Where a flow run's training checkpoints live: `$CXR_HOME/checkpoints/<flow>/<run>/<step>`.

    Resumed runs pass their origin run id, so they find the checkpoints of the run they continue.
    """
    return cxr_home() / "checkpoints" / flow_name / str(run_id) / step


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch for this process (loaders derive their own seeds from it)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: TrainConfig, device: torch.device) -> CXRNet:
    """The network on `device`, channels-last when asked."""
    model = CXRNet(pretrained=config.pretrained, dropout=config.dropout).to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def learning_rate(config: TrainConfig) -> float:
    """The peak learning rate: `lr`, scaled linearly with the global batch when `lr_batch` says which batch
    size `lr` was set for (lr × batch_size / lr_batch)."""
    return config.lr * config.batch_size / config.lr_batch if config.lr_batch else config.lr


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    lr = learning_rate(config)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}; use 'adamw' or 'sgd'")


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    if config.schedule == "cosine":
        total = max(1, config.epochs * steps_per_epoch)
        warmup = int(config.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=1)
    if config.schedule == "none":
        return None
    raise ValueError(f"unknown schedule {config.schedule!r}; use 'cosine', 'plateau' or 'none'")


def mean_auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean AUROC over findings whose labelled images (NaN: not labelled) hold both classes (NaN if none)."""
    scores = []
    for k in range(labels.shape[1]):
        known = ~np.isnan(labels[:, k])
        y = labels[known, k]
        if 0 < y.sum() < len(y):
            scores.append(roc_auc_score(y, probs[known, k]))
    return float(np.mean(scores)) if scores else float("nan")


class MaskedBCEWithLogitsLoss(nn.Module):
    """BCE-with-logits over the labelled entries: a NaN target (a finding the image's dataset does not
    label, or an uncertain label the policy masks) adds nothing. The sum is divided by all entries of the
    batch (images × findings), so a fully labelled batch gives exactly `nn.BCEWithLogitsLoss`, each
    labelled entry weighs the same whatever else is in the batch, and batch shares add up across
    processes as the mean loss does."""

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        losses = nn.functional.binary_cross_entropy_with_logits(
            logits, torch.where(known, targets, 0.0), pos_weight=self.pos_weight, reduction="none"
        )
        return torch.where(known, losses, 0.0).sum() / max(targets.numel(), 1)


@torch.no_grad()
def predict(
    model: nn.Module, dataset: ShardDataset, batch_size: int = 64, workers: int = 0, progress: bool = False
) -> np.ndarray:
    """Sigmoid probabilities [N, 14] for a dataset, in its order."""
    device = next(model.parameters()).device
    model.eval()
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=device.type == "cuda")
    outputs = []
    with Progress("predict", len(dataset), enabled=progress) as bar:
        for images, _ in loader:
            with _autocast(device, enabled=True):
                outputs.append(torch.sigmoid(model(images.to(device, non_blocking=True)).float()).cpu())
            bar.update(len(images))
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 14), dtype=np.float32)


def _autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )


def _save_atomic(payload: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The last checkpoint in a directory, or None.

    Checkpoints may come from shared storage (S3), so they load as tensors and plain values only: a file
    that needs arbitrary objects (code execution on unpickling) is refused.
    """
    path = Path(directory) / LAST
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def train(
    cache: ShardCache,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    config: TrainConfig,
    checkpoint_dir: str | Path,
    progress: bool = True,
    device: torch.device | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> TrainResult | None:
    """Train on cache rows `train_rows`, select on val mean AUROC; checkpoint every epoch and resume.

    With `config.gpus` > 1 it runs itself in that many local processes (`cxr.distributed.launch`) and
    returns rank 0's result; on one of several nodes (Metaflow's `@parallel`, SageMaker `instance_count`
    > 1) it does so on every node, and the other nodes return None. Started by torchrun, each process
    trains on its share of every global batch.
    """
    nodes = distributed.nodes_from_environment()
    if (config.gpus > 1 or nodes.count > 1) and not distributed.launched():
        _check_processes(config, device, nodes)
        arguments = (cache, train_rows, val_rows, config, checkpoint_dir, progress, device, on_checkpoint)
        return distributed.launch(train, config.gpus, *arguments, nodes=nodes)
    world = distributed.current_world()
    device = device or (distributed.device_for(world) if world.size > 1 else pick_device())
    with distributed.process_group(world, device):
        return _train(
            cache, train_rows, val_rows, config, Path(checkpoint_dir), progress and world.main, device,
            on_checkpoint, world,
        )  # fmt: skip


def _check_processes(config: TrainConfig, device: torch.device | None, nodes: distributed.Nodes) -> None:
    on_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    if on_cuda and torch.cuda.device_count() < config.gpus:
        raise ValueError(f"train.gpus is {config.gpus} but {torch.cuda.device_count()} GPUs are visible")
    if config.batch_size < config.gpus * nodes.count:
        raise ValueError(
            f"train.batch_size ({config.batch_size}, global) is smaller than the {config.gpus * nodes.count}"
            " training processes (train.gpus on each node)"
        )


@dataclass
class _Run:
    """Where training stands: the history so far, the best epoch, the epoch to start from."""

    history: list[dict[str, float]] = field(default_factory=list)
    step_losses: list[list[float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=lambda: {"auroc": -math.inf, "epoch": -1})
    start_epoch: int = 0
    resumed_from: int | None = None

    def add(self, record: dict[str, float], step_losses: list[float]) -> bool:
        """Record an epoch; whether its validation AUROC is the best so far."""
        self.history.append(record)
        self.step_losses.append(step_losses)
        improved = record["val_mean_auroc"] > self.best["auroc"] or self.best["epoch"] < 0
        if improved:
            self.best = {"auroc": record["val_mean_auroc"], "epoch": record["epoch"]}
        return improved


def _train(
    cache: ShardCache,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    config: TrainConfig,
    checkpoint_dir: Path,
    progress: bool,
    device: torch.device,
    on_checkpoint: Callable[[Path], None] | None,
    world: distributed.World,
) -> TrainResult:
    if world.main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    train_set = ShardDataset(cache, train_rows, crop=config.crop, train=True, seed=config.seed)
    val_set = ShardDataset(cache, val_rows, crop=config.crop, train=False)
    loader, data_path = train_loader(train_set, val_rows, config, device, world)
    log.info("training data path: %s", data_path)
    steps = min(len(loader), config.max_batches_per_epoch or len(loader))
    model = build_model(config, device)
    if world.size > 1 and config.sync_batchnorm:
        distributed.sync_batchnorm(model, device)
    optimizer = _optimizer(config, model)
    scheduler = _scheduler(config, optimizer, steps)
    criterion = MaskedBCEWithLogitsLoss(_pos_weight(train_set.labels, device) if config.pos_weight else None)
    run = _resume(checkpoint_dir, model, optimizer, scheduler, world)
    step_model: Any = distributed.wrap(model, device)
    if config.compile:
        step_model = torch.compile(step_model)

    for epoch in range(run.start_epoch, config.epochs):
        if epoch - run.best["epoch"] > config.patience and run.best["epoch"] >= 0:
            log.info("early stopping: no val AUROC gain for %d epochs", config.patience)
            break
        train_set.set_epoch(epoch)
        torch.manual_seed(epoch_seed(config.seed, epoch, world.rank))  # dropout: one stream per process
        started = time.perf_counter()
        step_losses, loss, rate = _train_epoch(
            step_model, loader, steps, optimizer, scheduler, criterion, config, device, epoch, progress, world
        )
        val_probs, val_auroc, val_loss = _validate(model, val_set, criterion, device, epoch, progress, world)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_auroc)
        record = {
            "epoch": epoch,
            "train_loss": loss,
            "val_loss": val_loss,
            "val_mean_auroc": val_auroc,
            "img_per_s": rate,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }
        improved = run.add(record, step_losses)
        if val_probs is not None:  # rank 0
            print(epoch_line(record), flush=True)  # stdout: the task log a run's viewers read
            if improved:
                _save_best(model, epoch, val_auroc, val_probs, checkpoint_dir)
            _save_last(model, optimizer, scheduler, epoch, run, config, checkpoint_dir)
            if on_checkpoint is not None:
                on_checkpoint(checkpoint_dir)  # e.g. copy the checkpoints to S3, so another machine resumes
    best_state, val_probabilities = distributed.broadcast_from_main(
        _best_checkpoint(checkpoint_dir) if world.main else None
    )
    return TrainResult(
        best_state,
        run.history,
        int(run.best["epoch"]),
        float(run.best["auroc"]),
        run.resumed_from,
        str(device) if world.size == 1 else f"{device.type} × {world.size}",
        asdict(config),
        val_probabilities,
        data_path,
    )


def train_loader(
    train_set: ShardDataset,
    val_rows: np.ndarray,
    config: TrainConfig,
    device: torch.device,
    world: distributed.World,
) -> tuple[Any, str]:
    """The training batches of this process and the data path that makes them, `loader` or `device`.

    `device` (or `auto` where the train and validation rows take at most half the free memory of every
    process's device, CUDA only) holds those rows on the device and augments there (`DeviceLoader`);
    `loader` reads them through `make_loader`'s workers. Both yield this process's share of the same
    global batches, drawn by `config.dataset_weights` when set.
    """
    if config.data_path not in ("auto", "loader", "device"):
        raise ValueError(f"unknown data_path {config.data_path!r}; use 'auto', 'loader' or 'device'")
    rows = np.concatenate([train_set.rows, np.asarray(val_rows, dtype=np.int64)])
    on_device = config.data_path == "device"
    if config.data_path == "auto":  # every process takes the same path
        short = torch.tensor([0 if fits_on_device(train_set.cache, rows, device) else 1], device=device)
        on_device = int(distributed.all_reduce_sum(short).item()) == 0
    if not on_device:
        loader = make_loader(
            train_set,
            config.batch_size,
            shuffle=True,
            workers=config.workers,
            seed=config.seed,
            pin_memory=device.type == "cuda",
            rank=world.rank,
            world_size=world.size,
            weights=config.dataset_weights,
        )
        return loader, "loader"
    batches = GlobalBatchSampler(
        train_set,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        rank=world.rank,
        world_size=world.size,
        weights=config.dataset_weights,
    )
    resident = DeviceCache(train_set.cache, rows, device)
    return DeviceLoader(train_set, resident, batch_sampler=batches), "device"


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one process's epoch (dropout), so a resumed epoch draws what it would have."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _validate(
    model: CXRNet,
    val_set: ShardDataset,
    criterion: nn.Module,
    device: torch.device,
    epoch: int,
    progress: bool,
    world: distributed.World,
) -> tuple[np.ndarray | None, float, float]:
    """Rank 0 scores the validation rows: its probabilities (None elsewhere), and in every process the mean
    AUROC and loss (the other processes wait for them)."""
    if not world.main:
        return (None, *distributed.broadcast_from_main(None))
    probs = score_fast(model, val_set, f"epoch {epoch} validation", progress=progress).probabilities
    figures = mean_auroc(val_set.labels, probs), probability_loss(criterion, probs, val_set.labels, device)
    return (probs, *distributed.broadcast_from_main(figures))


def _resume(
    checkpoint_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    world: distributed.World,
) -> _Run:
    """Load the last checkpoint, if any, into every process: rank 0 reads it and sends it to the others, so
    machines need not share the checkpoint directory."""
    checkpoint = distributed.broadcast_from_main(load_checkpoint(checkpoint_dir) if world.main else None)
    if checkpoint is None:
        return _Run()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint.get("scheduler"):
        scheduler.load_state_dict(checkpoint["scheduler"])
    log.info("resuming from %s after epoch %d", checkpoint_dir / LAST, checkpoint["epoch"])
    start = checkpoint["epoch"] + 1
    step_losses = checkpoint.get("step_losses") or [[] for _ in checkpoint["history"]]
    return _Run(checkpoint["history"], step_losses, checkpoint["best"], start, start)


def _save_best(
    model: nn.Module, epoch: int, val_auroc: float, val_probs: np.ndarray, checkpoint_dir: Path
) -> None:
    _save_atomic(
        {
            "model": model.state_dict(),
            "epoch": epoch,
            "val_mean_auroc": val_auroc,
            "val_probabilities": torch.from_numpy(val_probs),
        },
        checkpoint_dir / BEST,
    )


def _save_last(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    run: _Run,
    config: TrainConfig,
    checkpoint_dir: Path,
) -> None:
    _save_atomic(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch,
            "history": run.history,
            "step_losses": run.step_losses,
            "best": run.best,
            "config": asdict(config),
        },
        checkpoint_dir / LAST,
    )


def _best_checkpoint(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], np.ndarray | None]:
    best = torch.load(checkpoint_dir / BEST, map_location="cpu", weights_only=True)
    val_probabilities = best.get("val_probabilities")
    return best["model"], None if val_probabilities is None else val_probabilities.numpy()


def probability_loss(
    criterion: nn.Module, probs: np.ndarray, labels: np.ndarray, device: torch.device
) -> float:
    """The training criterion on probabilities (taken back to logits), e.g. the loss on validation."""
    logits = torch.logit(torch.from_numpy(np.asarray(probs, np.float32)), eps=1e-6)
    targets = torch.from_numpy(np.asarray(labels, np.float32))
    return float(criterion(logits.to(device), targets.to(device)))


def epoch_line(record: dict[str, float]) -> str:
    """One plain line per epoch: `epoch 0: loss …, val loss …, val mean AUROC …, lr …, … img/s, … s`
    (a training job's metric definitions read the loss, val mean AUROC and img/s from it)."""
    return (
        f"epoch {record['epoch']}: loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
        f"val mean AUROC {record['val_mean_auroc']:.4f}, lr {record['lr']:.3g}, "
        f"{record['img_per_s']:.1f} img/s, {record['seconds']:.1f} s"
    )


def _pos_weight(labels: np.ndarray, device: torch.device) -> torch.Tensor:
    """Negatives over positives per finding, among the images that label it."""
    positives, negatives = (labels > 0.5).sum(axis=0), (labels < 0.5).sum(axis=0)
    weights = negatives / np.maximum(positives, 1.0)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _train_epoch(
    model: Any,
    loader: Any,
    steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    criterion: nn.Module,
    config: TrainConfig,
    device: torch.device,
    epoch: int,
    progress: bool,
    world: distributed.World,
) -> tuple[list[float], float, float]:
    """One pass over `steps` global batches: each step's loss over its global batch, the epoch's loss and
    img/s (over every process). Losses stay on the device until the epoch ends: no step waits for the host.

    Each process's loss is its batch share's mean scaled by its share of the global batch, so the gradients
    DDP averages are those of the global batch's mean loss, however unevenly a last batch divides.
    """
    model.train()
    sizes = loader.batch_sampler.global_batch_sizes()[:steps]
    sums = torch.zeros(steps, dtype=torch.float64, device=device)
    start = time.perf_counter()
    bar = Progress(f"epoch {epoch}", steps, unit="batches", enabled=progress)
    for step, (images, labels) in zip(range(steps), loader, strict=False):
        images = images.to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, config.amp):
            loss = criterion(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        (loss * (len(images) * world.size / sizes[step]) if world.size > 1 else loss).backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()
        sums[step] = loss.detach() * len(images)
        bar.update(1)
    bar.close()
    totals = distributed.all_reduce_sum(sums).cpu()  # the epoch's one wait for the device
    counts = torch.tensor(sizes, dtype=torch.float64)
    elapsed = max(time.perf_counter() - start, 1e-9)
    return (totals / counts).tolist(), float(totals.sum() / counts.sum()), float(counts.sum()) / elapsed


def sagemaker_main() -> int:
    """Entry point inside a SageMaker training container: `python -m cxr.train`.

    Reads the shard cache from the `training` channel (SM_CHANNEL_TRAINING) and `split.json`
    ({"train": rows, "val": rows}) from the `split` channel (or the training channel), hyper-parameters
    from SM_HPS (TrainConfig fields), checkpoints to /opt/ml/checkpoints (synced to S3 by SageMaker's
    CheckpointConfig, so spot interruptions resume), and writes `model.pt` and `history.json` to SM_MODEL_DIR.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    channel = Path(os.environ.get("SM_CHANNEL_TRAINING", "/opt/ml/input/data/training"))
    model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    checkpoints = Path(os.environ.get("CXR_CHECKPOINT_DIR", "/opt/ml/checkpoints"))
    hyper = {k: _parse_hp(v) for k, v in json.loads(os.environ.get("SM_HPS", "{}")).items()}
    split_dir = Path(os.environ.get("SM_CHANNEL_SPLIT", channel))
    split = json.loads((split_dir / "split.json").read_text())
    result = train(
        ShardCache(channel),
        np.asarray(split["train"]),
        np.asarray(split["val"]),
        TrainConfig.from_dict(hyper),
        checkpoints,
        progress=False,
    )
    if result is None or not distributed.current_world().main:
        return 0  # rank 0 alone (on the first host) writes the model
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(result.best_state, model_dir / "model.pt")
    summary = {
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_auroc": result.best_val_auroc,
        "resumed_from_epoch": result.resumed_from_epoch,
        "device": result.device,
        "data_path": result.data_path,
    }
    (model_dir / "history.json").write_text(json.dumps(summary, indent=1))
    print(f"best_val_auroc={result.best_val_auroc:.6f}")  # scraped by the training job's metric definitions
    return 0


def _parse_hp(value: Any) -> Any:
    """SageMaker passes hyper-parameters as strings; decode JSON literals where possible."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


if __name__ == "__main__":
    raise SystemExit(sagemaker_main())
