"""Training: BCE-with-logits on the 14 findings; per-epoch checkpoints, resume, early stopping on val AUROC.

`train(...)` is the one entry point. It runs locally, inside a Metaflow step, on AWS Batch, or inside a
SageMaker training container (`python -m cxr.train`, which reads the SM_* environment and checkpoints to
/opt/ml/checkpoints). Every epoch writes `last.pt` (model, optimizer, scheduler, epoch, history, RNG
state) atomically; a restarted run with the same checkpoint directory continues from the epoch after it.
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

from cxr.config import cxr_home
from cxr.data.cache import ShardCache
from cxr.data.loader import ShardDataset, make_loader
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
    seed: int = 0
    max_batches_per_epoch: int | None = None  # for quick runs

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


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
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
    """Mean AUROC over findings that have both classes present (NaN if none)."""
    scores = [
        roc_auc_score(labels[:, k], probs[:, k])
        for k in range(labels.shape[1])
        if 0 < labels[:, k].sum() < len(labels)
    ]
    return float(np.mean(scores)) if scores else float("nan")


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


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so checkpoints load with `weights_only=True`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy_state = [kind, torch.from_numpy(np.asarray(keys, np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
) -> TrainResult:
    """Train on cache rows `train_rows`, select on val mean AUROC; checkpoint every epoch and resume."""
    device = device or pick_device()
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    train_set = ShardDataset(cache, train_rows, crop=config.crop, train=True, seed=config.seed)
    val_set = ShardDataset(cache, val_rows, crop=config.crop, train=False)
    loader = make_loader(
        train_set,
        config.batch_size,
        shuffle=True,
        workers=config.workers,
        seed=config.seed,
        pin_memory=device.type == "cuda",
    )
    steps = min(len(loader), config.max_batches_per_epoch or len(loader))
    model = build_model(config, device)
    optimizer = _optimizer(config, model)
    scheduler = _scheduler(config, optimizer, steps)
    criterion = nn.BCEWithLogitsLoss(
        pos_weight=_pos_weight(train_set.labels, device) if config.pos_weight else None
    )
    step_model: Any = torch.compile(model) if config.compile else model

    history: list[dict[str, float]] = []
    best = {"auroc": -math.inf, "epoch": -1}
    start_epoch, resumed_from = 0, None
    checkpoint = load_checkpoint(checkpoint_dir)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint.get("scheduler"):
            scheduler.load_state_dict(checkpoint["scheduler"])
        history, best = checkpoint["history"], checkpoint["best"]
        start_epoch = resumed_from = checkpoint["epoch"] + 1
        _set_rng_state(checkpoint["rng"])
        log.info("resuming from %s after epoch %d", checkpoint_dir / LAST, checkpoint["epoch"])

    for epoch in range(start_epoch, config.epochs):
        if epoch - best["epoch"] > config.patience and best["epoch"] >= 0:
            log.info("early stopping: no val AUROC gain for %d epochs", config.patience)
            break
        train_set.set_epoch(epoch)
        started = time.perf_counter()
        loss, rate = _train_epoch(
            step_model, loader, steps, optimizer, scheduler, criterion, config, device, epoch, progress
        )
        val_probs = score_fast(model, val_set, f"epoch {epoch} validation", progress=progress).probabilities
        val_auroc = mean_auroc(val_set.labels, val_probs)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_auroc)
        record = {
            "epoch": epoch,
            "train_loss": loss,
            "val_loss": probability_loss(criterion, val_probs, val_set.labels, device),
            "val_mean_auroc": val_auroc,
            "img_per_s": rate,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        print(epoch_line(record), flush=True)  # stdout: the task log a run's viewers read
        if val_auroc > best["auroc"] or best["epoch"] < 0:
            best = {"auroc": val_auroc, "epoch": epoch}
            _save_atomic(
                {
                    "model": model.state_dict(),
                    "epoch": epoch,
                    "val_mean_auroc": val_auroc,
                    "val_probabilities": torch.from_numpy(val_probs),
                },
                checkpoint_dir / BEST,
            )
        _save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch,
                "history": history,
                "best": best,
                "rng": _rng_state(),
                "config": asdict(config),
            },
            checkpoint_dir / LAST,
        )
        if on_checkpoint is not None:
            on_checkpoint(checkpoint_dir)  # e.g. copy the checkpoints to S3, so another machine can resume
    best_checkpoint = torch.load(checkpoint_dir / BEST, map_location="cpu", weights_only=True)
    val_probabilities = best_checkpoint.get("val_probabilities")
    return TrainResult(
        best_checkpoint["model"],
        history,
        int(best["epoch"]),
        float(best["auroc"]),
        resumed_from,
        str(device),
        asdict(config),
        None if val_probabilities is None else val_probabilities.numpy(),
    )


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
    positives = labels.sum(axis=0)
    weights = (len(labels) - positives) / np.maximum(positives, 1.0)
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
) -> tuple[float, float]:
    model.train()
    total, seen, start = 0.0, 0, time.perf_counter()
    bar = Progress(f"epoch {epoch}", steps, unit="batches", enabled=progress)
    for step, (images, labels) in enumerate(loader):
        if step >= steps:
            break
        images = images.to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, config.amp):
            loss = criterion(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()
        total += float(loss.detach()) * len(images)
        seen += len(images)
        bar.update(1, loss=f"{total / seen:.4f}", img_s=f"{seen / (time.perf_counter() - start):.1f}")
    bar.close()
    return total / max(seen, 1), seen / max(time.perf_counter() - start, 1e-9)


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
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(result.best_state, model_dir / "model.pt")
    summary = {
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_auroc": result.best_val_auroc,
        "resumed_from_epoch": result.resumed_from_epoch,
        "device": result.device,
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
