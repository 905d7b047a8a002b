"""The SASRec training loop: AdamW, warm-up + cosine decay, early stopping on NDCG@10.

Each user's training history becomes windows of ``max_seq_len`` next-item pairs with a
target at every position (inputs ``seq[:-1]``, targets ``seq[1:]``), as in the SASRec
paper. The newest window always ends at the last pair; older windows end at an offset
drawn anew every epoch (overlapping the newest one), so each pair sees varying context.
The loop evaluates on the validation targets every ``eval_every`` epochs, keeps the best
weights and stops after ``patience`` evaluations without improvement (once ``min_steps``
steps are done). CPU runs are seeded and deterministic; on CUDA the forward pass runs
under autocast (bf16, else fp16 with a gradient scaler).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from shopml.config import load_settings
from shopml.evaluation import evaluate_scorer
from shopml.models.sasrec import SASRec, SASRecConfig, left_pad
from shopml.sequences import LeaveOneOutSplit

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
SELECTION_METRIC = "ndcg_10"


@dataclass
class TrainConfig:
    """How to train; the architecture lives in :class:`SASRecConfig`.

    Attributes:
        epochs: maximum passes over the training windows.
        batch_size: windows per optimisation step.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW decoupled weight decay (biases, LayerNorms and embeddings
            are not decayed).
        warmup_ratio: fraction of all steps spent warming the learning rate up linearly
            from 0; the rest decays it along a cosine to 0.
        patience: evaluations without a better validation NDCG@10 before stopping.
        min_steps: early stopping waits for at least this many optimisation steps, so
            small data sets (a step or two per epoch) get enough updates.
        seed: seed of every random draw (weights, dropout, windows, negatives).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        eval_every: epochs between validation evaluations.
        show_progress: show a tqdm bar; ``None`` follows ``Settings.progress``.
        max_grad_norm: gradients are clipped to this global norm.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    patience: int = 10
    min_steps: int = 200
    seed: int = 42
    device: str = "auto"
    eval_every: int = 1
    show_progress: bool | None = None
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(
                f"device={self.device!r} is not supported; use one of {DEVICES}"
            )
        for name in ("epochs", "batch_size", "patience", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")


@dataclass
class EpochRecord:
    """One epoch: mean training loss, validation metrics (if evaluated), seconds."""

    epoch: int
    loss: float
    valid: dict[str, float] | None
    seconds: float


@dataclass
class TrainResult:
    """The outcome of :func:`train_sasrec`.

    Attributes:
        model: the best model (by validation NDCG@10), in eval mode on the CPU.
        best_epoch: the epoch whose weights were kept.
        best_valid: validation metrics of the kept weights.
        epochs_run: epochs actually run (fewer than configured after early stopping).
        seconds: wall time of the whole loop.
        device: the device trained on.
        history: per-epoch records.
    """

    model: SASRec
    best_epoch: int
    best_valid: dict[str, float]
    epochs_run: int
    seconds: float
    device: str
    history: list[EpochRecord] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    """Turn ``"auto"``/``"cpu"``/``"cuda"`` into a device.

    Raises:
        ValueError: the name is unknown, or ``"cuda"`` is asked for without a GPU.
    """
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not supported; use one of {DEVICES}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA GPU is available")
    return torch.device(device)


def training_windows(
    train_seqs: list[np.ndarray], max_seq_len: int, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Cut every history into left-padded (input, target) windows for one epoch.

    Args:
        train_seqs: per user, item indices oldest first.
        max_seq_len: window width L.
        rng: draws the cut offset of each user's older pairs.

    Returns:
        ``(item_seq, pos_items)``, both long [W, L]; ``pos_items`` is 0 where
        ``item_seq`` is padding.
    """
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for seq in train_seqs:
        n_pairs = len(seq) - 1
        if n_pairs < 1:
            continue
        # Window ends (exclusive, in pair positions): the newest L pairs, then windows
        # ending 1..L pairs earlier (drawn per epoch) and stepping back by L. The second
        # overlaps the first, so a short history also trains as a prefix of itself and
        # every pair is seen at varying distances from the last position.
        ends = [
            n_pairs,
            *range(n_pairs - int(rng.integers(1, max_seq_len + 1)), 0, -max_seq_len),
        ]
        for end in ends:
            begin = max(0, end - max_seq_len)
            inputs.append(seq[begin:end])
            targets.append(seq[begin + 1 : end + 1])
    return left_pad(inputs, max_seq_len), left_pad(targets, max_seq_len)


def _lr_lambda(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1 over the first steps, then a cosine down to 0."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _optimizer(model: SASRec, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays only the weight matrices of linear layers."""
    decay = [
        p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n
    ]
    no_decay = [
        p for n, p in model.named_parameters() if p.dim() < 2 or "embedding" in n
    ]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


class _Precision:
    """Autocast and gradient scaling for one device: a no-op on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        if device.type == "cuda":
            self.dtype = (
                torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            )
            if self.dtype == torch.float16:
                self.scaler = torch.amp.GradScaler("cuda")

    def autocast(self) -> AbstractContextManager[object]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)


def _train_epoch(
    model: SASRec,
    windows: tuple[Tensor, Tensor],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    precision: _Precision,
    rng: np.random.Generator,
) -> float:
    """One pass over shuffled windows; returns the mean training loss."""
    model.train()
    device = next(model.parameters()).device
    item_seq, pos_items = windows
    order = torch.from_numpy(rng.permutation(item_seq.size(0)))
    total, n_batches = 0.0, 0
    for start in range(0, len(order), config.batch_size):
        batch = order[start : start + config.batch_size]
        with precision.autocast():
            loss = model.calculate_loss(
                item_seq[batch].to(device), pos_items[batch].to(device)
            )

        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:
            precision.scaler.scale(loss).backward()
            precision.scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        if precision.scaler is not None:
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            optimizer.step()
        scheduler.step()

        total += float(loss.detach())
        n_batches += 1
        logger.debug("batch=%d loss=%.4f", n_batches, float(loss.detach()))
    return total / max(n_batches, 1)


def _evaluate_valid(
    model: SASRec, split: LeaveOneOutSplit, device: torch.device
) -> dict[str, float]:
    """Validation metrics of the model in eval mode."""
    model.eval()
    return evaluate_scorer(
        model.full_sort_scores,
        split,
        stage="valid",
        max_seq_len=model.config.max_seq_len,
        device=device,
    )


def train_sasrec(
    split: LeaveOneOutSplit,
    model_config: SASRecConfig,
    train_config: TrainConfig | None = None,
) -> TrainResult:
    """Train SASRec on the training histories, early-stopping on validation NDCG@10.

    Args:
        split: the leave-one-out split; only training histories feed the gradients.
        model_config: the architecture; ``n_items`` must equal ``split.n_items``.
        train_config: optimisation settings; defaults when ``None``.

    Returns:
        The best model on the CPU, with its validation metrics and the history.

    Raises:
        ValueError: the configs disagree with the data, or no user has two training
            items to learn a next-item pair from.
    """
    config = train_config or TrainConfig()
    if model_config.n_items != split.n_items:
        raise ValueError(
            f"model_config.n_items={model_config.n_items} but the split has "
            f"{split.n_items} items; build the config from split.n_items"
        )
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = SASRec(model_config).to(device)

    windows = training_windows(split.train_seqs, model_config.max_seq_len, rng)
    if windows[0].size(0) == 0:
        raise ValueError("no user has 2 or more training items: nothing to learn from")
    optimizer = _optimizer(model, config)
    total_steps = math.ceil(windows[0].size(0) / config.batch_size) * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, config.warmup_ratio)
    )
    logger.info(
        "training start device=%s windows=%d items=%d params=%d",
        device,
        windows[0].size(0),
        split.n_items,
        sum(p.numel() for p in model.parameters()),
    )

    started = time.monotonic()
    best, history = _fit(model, split, windows, optimizer, scheduler, config, rng)
    return _finish(model, best, history, started, device)


def _fit(
    model: SASRec,
    split: LeaveOneOutSplit,
    windows: tuple[Tensor, Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    rng: np.random.Generator,
) -> tuple[_BestState, list[EpochRecord]]:
    """The epoch loop: train, evaluate, log, keep the best weights, stop early."""
    device = next(model.parameters()).device
    precision = _Precision(device)
    best = _BestState()
    history: list[EpochRecord] = []
    steps = 0
    bar = tqdm(range(1, config.epochs + 1), desc="train", disable=not _show(config))
    for epoch in bar:
        epoch_start = time.monotonic()
        if epoch > 1:
            windows = training_windows(split.train_seqs, model.config.max_seq_len, rng)
        steps += math.ceil(windows[0].size(0) / config.batch_size)
        loss = _train_epoch(
            model,
            windows,
            optimizer=optimizer,
            scheduler=scheduler,
            config=config,
            precision=precision,
            rng=rng,
        )

        valid = None
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            valid = _evaluate_valid(model, split, device)
            best.update(epoch, valid, model)
        record = EpochRecord(epoch, loss, valid, time.monotonic() - epoch_start)
        history.append(record)
        _log_epoch(record, bar)
        if best.stale_evaluations >= config.patience and steps >= config.min_steps:
            logger.info("early stop epoch=%d best_epoch=%d", epoch, best.epoch)
            break
    bar.close()
    return best, history


def _show(config: TrainConfig) -> bool:
    """Whether to draw the progress bar: the config's choice, else the settings'."""
    if config.show_progress is None:
        return load_settings().progress
    return config.show_progress


class _BestState:
    """The best validation NDCG@10 so far, its epoch and a CPU copy of its weights."""

    def __init__(self) -> None:
        self.epoch = 0
        self.valid: dict[str, float] = {}
        self.state: dict[str, Tensor] | None = None
        self.stale_evaluations = 0

    def update(self, epoch: int, valid: dict[str, float], model: SASRec) -> None:
        if (
            self.state is not None
            and valid[SELECTION_METRIC] <= self.valid[SELECTION_METRIC]
        ):
            self.stale_evaluations += 1
            return
        self.epoch, self.valid, self.stale_evaluations = epoch, valid, 0
        self.state = {
            k: v.detach().cpu().clone() for k, v in model.state_dict().items()
        }


def _log_epoch(record: EpochRecord, bar: tqdm) -> None:
    """One INFO line per epoch, and the same figures on the progress bar."""
    ndcg = record.valid[SELECTION_METRIC] if record.valid else float("nan")
    logger.info(
        "epoch=%d loss=%.4f valid_ndcg_10=%.4f seconds=%.2f",
        record.epoch,
        record.loss,
        ndcg,
        record.seconds,
    )
    bar.set_postfix(loss=f"{record.loss:.4f}", ndcg_10=f"{ndcg:.4f}")


def _finish(
    model: SASRec,
    best: _BestState,
    history: list[EpochRecord],
    started: float,
    device: torch.device,
) -> TrainResult:
    """Restore the best weights on the CPU and summarise the run."""
    model = model.cpu()
    if best.state is not None:
        model.load_state_dict(best.state)
    model.eval()
    seconds = time.monotonic() - started
    logger.info(
        "training done epochs=%d best_epoch=%d valid_ndcg_10=%.4f seconds=%.1f",
        len(history),
        best.epoch,
        best.valid.get(SELECTION_METRIC, float("nan")),
        seconds,
    )
    return TrainResult(
        model=model,
        best_epoch=best.epoch,
        best_valid=copy.deepcopy(best.valid),
        epochs_run=len(history),
        seconds=seconds,
        device=str(device),
        history=history,
    )
