"""The SASRec training loop: AdamW, warm-up + cosine decay, early stopping on NDCG@10.

Each user's training history becomes windows of ``max_seq_len`` next-item pairs with a
target at every position (inputs ``seq[:-1]``, targets ``seq[1:]``), as in the SASRec
paper. The newest window always ends at the last pair; older windows end at an offset
drawn anew every epoch (overlapping the newest one), so each pair sees varying context.
The loop evaluates on the validation targets every ``eval_every`` epochs, keeps the best
weights and stops after ``patience`` evaluations without improvement (once ``min_steps``
steps are done). CPU runs are seeded and deterministic; on CUDA the forward pass runs
under autocast (bf16, else fp16 with a gradient scaler).

With a :class:`Checkpointer` the loop saves everything it needs to continue (weights,
optimiser, schedule, random generators, best weights, history) to the object store at
the end of every epoch, and a new run with the same checkpointer resumes from there:
after a kill, the resumed run ends with the same weights as an uninterrupted one.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the loop trains with DistributedDataParallel:
every rank draws the same shuffled windows and takes its share of every batch, the
gradients are averaged, every rank evaluates the same weights (so they agree on early
stopping) and only rank 0 writes checkpoints.

The final fit (:func:`final_fit`) is the standard two-phase protocol: phase 1
(:func:`train_sasrec`) picks the epoch count on the validation targets, phase 2
(:func:`refit_sasrec`) retrains from scratch with the same seed and schedule on the
training histories plus every validation item, without validation, for that many
epochs. The refitted model has learned from the newest transitions, which the test
targets (and production traffic) follow; the only thing phase 2 takes from phase 1
is the epoch count, so the test targets stay unseen by every choice.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from shopml.config import load_settings
from shopml.evaluation import evaluate_scorer
from shopml.models.sasrec import SASRec, SASRecConfig, left_pad
from shopml.sequences import LeaveOneOutSplit
from shopml.storage import ObjectStore, check_key

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
        weight_decay: AdamW decoupled weight decay of the weight matrices of linear
            layers (biases and LayerNorms are never decayed).
        embedding_weight_decay: AdamW decoupled weight decay of the item and position
            embedding tables; 0 (the default) leaves them undecayed. Sparse data with
            few interactions per item (Amazon 5-core) gains from a little.
        warmup_ratio: fraction of all scheduled steps spent warming the learning rate
            up linearly from 0; the rest decays it along a cosine to 0.
        schedule_epochs: epochs the warm-up + cosine schedule spans; ``None`` spans
            all ``epochs``. Early stopping usually ends a run long before a generous
            ``epochs`` cap, when a schedule spanning the cap has barely decayed; past
            ``schedule_epochs`` the learning rate stays 0 (and early stopping ends the
            run).
        patience: evaluations without a better validation NDCG@10 before stopping.
        min_steps: early stopping waits for at least this many optimisation steps, so
            small data sets (a step or two per epoch) get enough updates.
        seed: seed of every random draw (weights, dropout, windows, negatives).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        eval_every: epochs between validation evaluations.
        show_progress: show a tqdm bar; ``None`` follows ``Settings.progress``.
        max_grad_norm: gradients are clipped to this global norm.
        validate: evaluate on the validation targets, keep the best weights and stop
            early; ``False`` trains exactly ``epochs`` epochs and keeps the last
            weights (the final fit on train + validation, :func:`refit_sasrec`).
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    embedding_weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule_epochs: int | None = None
    patience: int = 10
    min_steps: int = 200
    seed: int = 42
    device: str = "auto"
    eval_every: int = 1
    show_progress: bool | None = None
    max_grad_norm: float = 1.0
    validate: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(
                f"device={self.device!r} is not supported; use one of {DEVICES}"
            )
        for name in ("epochs", "batch_size", "patience", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.schedule_epochs is not None and self.schedule_epochs < 1:
            raise ValueError(
                f"schedule_epochs={self.schedule_epochs} must be at least 1 or None"
            )
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        for name in ("weight_decay", "embedding_weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more")
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
        model: the best model (by validation NDCG@10), in eval mode on the CPU; the
            last one when the run did not validate.
        best_epoch: the epoch whose weights were kept.
        best_valid: validation metrics of the kept weights; empty when the run did
            not validate.
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
    """AdamW: linear weights and embedding tables decayed as configured, no others."""
    params = list(model.named_parameters())
    embeddings = [p for n, p in params if "embedding" in n]
    decay = [p for n, p in params if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in params if p.dim() < 2 and "embedding" not in n]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": embeddings, "weight_decay": config.embedding_weight_decay},
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


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) training job.

    Attributes:
        rank: global rank, 0 for the process that logs and writes.
        world_size: number of processes.
        local_rank: rank on this node; picks the GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs, checkpoints and writes the artifact."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group ``torchrun`` describes in the environment.

    A plain run (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) starts no group. The backend
    is NCCL on CUDA, gloo on the CPU.

    Args:
        device: the device this process trains on.

    Returns:
        This process's rank, the world size and its local rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    context = DistContext(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info(
            "process group joined backend=%s rank=%d world_size=%d",
            backend,
            context.rank,
            world_size,
        )
    return context


def is_main_process() -> bool:
    """Whether this process is rank 0 (always, outside a distributed job)."""
    return not dist.is_initialized() or dist.get_rank() == 0


class _LossModule(nn.Module):
    """Routes the loss through ``forward`` so DistributedDataParallel can wrap it."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_seq: Tensor, pos_items: Tensor) -> Tensor:
        return self.model.calculate_loss(item_seq, pos_items)


class Checkpointer:
    """Saves and restores the training state under one key of an object store.

    Args:
        store: where checkpoints live (a local folder or MinIO/S3).
        key: the object key, e.g. ``checkpoints/recommender/last.pt``.

    Raises:
        ValueError: the key is not a valid object key.
    """

    def __init__(self, store: ObjectStore, key: str) -> None:
        self.store = store
        self.key = check_key(key)

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors, numbers, strings, dicts) atomically."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.store.put_bytes(self.key, buffer.getvalue())
        logger.debug("checkpoint saved key=%s epoch=%s", self.key, state.get("epoch"))

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is no checkpoint yet."""
        if not self.store.exists(self.key):
            return None
        data = self.store.get_bytes(self.key)
        state: dict[str, Any] = torch.load(
            io.BytesIO(data), map_location="cpu", weights_only=False
        )
        return state

    def delete(self) -> None:
        """Remove the checkpoint (after a finished run)."""
        if self.store.exists(self.key):
            self.store.delete(self.key)


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

    def to_state(self) -> dict[str, Any]:
        """A checkpointable copy."""
        return {
            "epoch": self.epoch,
            "valid": dict(self.valid),
            "state": self.state,
            "stale_evaluations": self.stale_evaluations,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _BestState:
        """Rebuild from :meth:`to_state` output."""
        best = cls()
        best.epoch, best.valid = state["epoch"], dict(state["valid"])
        best.state, best.stale_evaluations = state["state"], state["stale_evaluations"]
        return best


@dataclass
class _Loop:
    """Everything the epoch loop carries from one epoch to the next."""

    model: SASRec
    split: LeaveOneOutSplit
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    rng: np.random.Generator
    context: DistContext
    runner: nn.Module
    best: _BestState = field(default_factory=_BestState)
    history: list[EpochRecord] = field(default_factory=list)
    steps: int = 0
    epoch: int = 0


def _batches(n_windows: int, config: TrainConfig) -> int:
    return math.ceil(n_windows / config.batch_size)


def _train_epoch(
    loop: _Loop, windows: tuple[Tensor, Tensor], precision: _Precision
) -> float:
    """One pass over shuffled windows; returns this rank's mean training loss.

    Every rank draws the same permutation and takes every ``world_size``-th window of
    each batch, so ranks step together; a batch too small to give every rank a
    window is skipped by all of them.
    """
    loop.runner.train()
    config, context = loop.config, loop.context
    device = next(loop.model.parameters()).device
    item_seq, pos_items = windows
    order = torch.from_numpy(loop.rng.permutation(item_seq.size(0)))
    total, n_batches = 0.0, 0
    for start in range(0, len(order), config.batch_size):
        batch = order[start : start + config.batch_size]
        if len(batch) < context.world_size:
            continue
        batch = batch[context.rank :: context.world_size]
        with precision.autocast():
            loss = loop.runner(item_seq[batch].to(device), pos_items[batch].to(device))

        loop.optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:
            precision.scaler.scale(loss).backward()
            precision.scaler.unscale_(loop.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), config.max_grad_norm)
        if precision.scaler is not None:
            precision.scaler.step(loop.optimizer)
            precision.scaler.update()
        else:
            loop.optimizer.step()
        loop.scheduler.step()

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


EpochCallback = Callable[["EpochRecord"], None]


def train_sasrec(
    split: LeaveOneOutSplit,
    model_config: SASRecConfig,
    train_config: TrainConfig | None = None,
    *,
    item_text: Tensor | None = None,
    checkpointer: Checkpointer | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Train SASRec on the training histories, early-stopping on validation NDCG@10.

    Args:
        split: the leave-one-out split; only training histories feed the gradients.
        model_config: the architecture; ``n_items`` must equal ``split.n_items``.
        train_config: optimisation settings; defaults when ``None``.
        item_text: float [n_items + 1, text_dim] item text embeddings for a model with
            a text tower (``model_config.text_dim > 0``); ``None`` otherwise.
        checkpointer: saves the state every epoch and resumes from a saved state with
            the same configuration; ``None`` keeps nothing.
        on_epoch_end: called with each epoch's record after its checkpoint is saved.

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
    context = init_distributed(device)
    if device.type == "cuda" and context.is_distributed:
        device = torch.device("cuda", context.local_rank)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = SASRec(model_config, item_text=item_text)
    model.set_seen_items(split.train_seqs)
    model = model.to(device)

    windows = training_windows(split.train_seqs, model_config.max_seq_len, rng)
    if windows[0].size(0) == 0:
        raise ValueError("no user has 2 or more training items: nothing to learn from")
    loop = _make_loop(model, split, config, rng, context, windows[0].size(0))
    _log_start(loop, windows[0].size(0))
    if checkpointer is not None:
        _resume(loop, checkpointer)  # later epochs redraw windows from restored rng

    started = time.monotonic()
    _fit(loop, windows, checkpointer, on_epoch_end)
    return _finish(loop, started, device)


def _make_loop(
    model: SASRec,
    split: LeaveOneOutSplit,
    config: TrainConfig,
    rng: np.random.Generator,
    context: DistContext,
    n_windows: int,
) -> _Loop:
    """Optimiser, schedule and (under torchrun) the DDP wrapper around the loss."""
    optimizer = _optimizer(model, config)
    total_steps = _batches(n_windows, config) * (
        config.schedule_epochs or config.epochs
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, config.warmup_ratio)
    )
    runner: nn.Module = _LossModule(model)
    if context.is_distributed:
        device_ids = (
            [context.local_rank] if model.item_embedding.weight.is_cuda else None
        )
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=device_ids)
    return _Loop(model, split, optimizer, scheduler, config, rng, context, runner)


def _log_start(loop: _Loop, n_windows: int) -> None:
    logger.info(
        "training start device=%s windows=%d items=%d params=%d world_size=%d",
        next(loop.model.parameters()).device,
        n_windows,
        loop.split.n_items,
        sum(p.numel() for p in loop.model.parameters()),
        loop.context.world_size,
    )


def _fingerprint(loop: _Loop) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: both configs and the data size."""
    train = asdict(loop.config)
    train.pop("show_progress")
    return {
        "model": loop.model.config.to_dict(),
        "train": train,
        "n_train_interactions": sum(len(s) for s in loop.split.train_seqs),
        "world_size": loop.context.world_size,
    }


def _state(loop: _Loop) -> dict[str, Any]:
    """Everything needed to continue after ``loop.epoch``, on the CPU."""
    return {
        "fingerprint": _fingerprint(loop),
        "epoch": loop.epoch,
        "steps": loop.steps,
        "model": {k: v.detach().cpu() for k, v in loop.model.state_dict().items()},
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "numpy_rng": loop.rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "best": loop.best.to_state(),
        "history": [asdict(record) for record in loop.history],
    }


def _resume(loop: _Loop, checkpointer: Checkpointer) -> bool:
    """Restore the loop from the checkpoint; False when there is none to resume."""
    state = checkpointer.load()
    if state is None:
        return False
    if state.get("fingerprint") != _fingerprint(loop):
        logger.warning(
            "checkpoint key=%s is from another configuration or data; starting afresh",
            checkpointer.key,
        )
        return False
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    loop.rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    loop.best = _BestState.from_state(state["best"])
    loop.history = [EpochRecord(**record) for record in state["history"]]
    loop.epoch, loop.steps = state["epoch"], state["steps"]
    logger.info("resumed from checkpoint key=%s epoch=%d", checkpointer.key, loop.epoch)
    return True


def _fit(
    loop: _Loop,
    windows: tuple[Tensor, Tensor],
    checkpointer: Checkpointer | None,
    on_epoch_end: EpochCallback | None,
) -> None:
    """The epoch loop: train, evaluate, log, checkpoint, keep the best, stop early."""
    config = loop.config
    device = next(loop.model.parameters()).device
    precision = _Precision(device)
    show = _show(config) and loop.context.is_main
    bar = tqdm(
        range(loop.epoch + 1, config.epochs + 1),
        desc="train",
        disable=not show,
        initial=loop.epoch,
        total=config.epochs,
    )
    for epoch in bar:
        if _should_stop(loop):
            break
        epoch_start = time.monotonic()
        if epoch > 1:
            windows = training_windows(
                loop.split.train_seqs,
                loop.model.config.max_seq_len,
                loop.rng,
            )
        loop.steps += _batches(windows[0].size(0), config)
        loss = _train_epoch(loop, windows, precision)

        valid = None
        if config.validate and (
            epoch % config.eval_every == 0 or epoch == config.epochs
        ):
            valid = _evaluate_valid(loop.model, loop.split, device)
            loop.best.update(epoch, valid, loop.model)
        record = EpochRecord(epoch, loss, valid, time.monotonic() - epoch_start)
        loop.history.append(record)
        loop.epoch = epoch
        if loop.context.is_main:
            _log_epoch(record, bar)
            if checkpointer is not None:
                checkpointer.save(_state(loop))
        if on_epoch_end is not None:
            on_epoch_end(record)
    bar.close()


def _should_stop(loop: _Loop) -> bool:
    """Early stopping: ``patience`` stale evaluations once ``min_steps`` are done."""
    stop = (
        loop.best.stale_evaluations >= loop.config.patience
        and loop.steps >= loop.config.min_steps
    )
    if stop and loop.context.is_main:
        logger.info("early stop epoch=%d best_epoch=%d", loop.epoch, loop.best.epoch)
    return stop


def _show(config: TrainConfig) -> bool:
    """Whether to draw the progress bar: the config's choice, else the settings'."""
    if config.show_progress is None:
        return load_settings().progress
    return config.show_progress


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


def _finish(loop: _Loop, started: float, device: torch.device) -> TrainResult:
    """Restore the best weights on the CPU and summarise the run."""
    model, best = loop.model.cpu(), loop.best
    if not loop.config.validate:  # the last weights: the epoch count was chosen
        best.epoch = loop.epoch
    elif best.state is not None:
        model.load_state_dict(best.state)
    model.eval()
    seconds = time.monotonic() - started
    if loop.context.is_main:
        logger.info(
            "training done epochs=%d best_epoch=%d valid_ndcg_10=%.4f seconds=%.1f",
            len(loop.history),
            best.epoch,
            best.valid.get(SELECTION_METRIC, float("nan")),
            seconds,
        )
    return TrainResult(
        model=model,
        best_epoch=best.epoch,
        best_valid=copy.deepcopy(best.valid),
        epochs_run=len(loop.history),
        seconds=seconds,
        device=str(device),
        history=list(loop.history),
    )


def final_fit_split(split: LeaveOneOutSplit) -> LeaveOneOutSplit:
    """The split the final fit trains on: every validation item joins its history.

    Its training histories are ``split.histories("test")`` and it has no validation
    targets; the test targets are unchanged, and its ``histories("test")`` equal the
    original split's, so test figures of a refitted model compare directly.

    Args:
        split: the leave-one-out split phase 1 trained and validated on.

    Returns:
        A new split over the same vocabulary and users.
    """
    return LeaveOneOutSplit(
        split.vocab,
        list(split.user_ids),
        split.histories("test"),
        np.zeros_like(split.valid_items),
        split.test_items.copy(),
    )


def refit_sasrec(
    split: LeaveOneOutSplit,
    model_config: SASRecConfig,
    train_config: TrainConfig,
    epochs: int,
    *,
    item_text: Tensor | None = None,
    checkpointer: Checkpointer | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Phase 2 of the final fit: retrain from scratch on train + validation histories.

    Same architecture, seed and optimisation settings as phase 1, and the same
    learning-rate schedule (warm-up and cosine over phase 1's ``schedule_epochs`` or
    ``epochs``), stopped after ``epochs`` epochs with no validation.

    Args:
        split: the original leave-one-out split (not :func:`final_fit_split`'s).
        model_config: phase 1's architecture.
        train_config: phase 1's optimisation settings.
        epochs: how many epochs to train, phase 1's best epoch.
        item_text: the item text embeddings for a text tower, as in phase 1.
        checkpointer: saves and resumes this phase; use another key than phase 1's.
        on_epoch_end: called with each epoch's record (``valid`` is ``None``).

    Returns:
        The last model (``best_epoch == epochs``, ``best_valid`` empty).

    Raises:
        ValueError: ``epochs`` is below 1, or the configs disagree with the data.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be at least 1")
    config = replace(
        train_config,
        epochs=epochs,
        schedule_epochs=train_config.schedule_epochs or train_config.epochs,
        validate=False,
    )
    logger.info(
        "final fit on train + valid epochs=%d schedule_epochs=%d",
        epochs,
        config.schedule_epochs,
    )
    return train_sasrec(
        final_fit_split(split),
        model_config,
        config,
        item_text=item_text,
        checkpointer=checkpointer,
        on_epoch_end=on_epoch_end,
    )


@dataclass
class FinalFitResult:
    """Both phases of :func:`final_fit`.

    Attributes:
        selection: phase 1, trained on the training histories and early-stopped on
            validation; its ``best_epoch`` and ``best_valid`` are the selection.
        final: phase 2, the model to evaluate on test and to serve.
    """

    selection: TrainResult
    final: TrainResult

    @property
    def model(self) -> SASRec:
        """The final model."""
        return self.final.model


def final_fit(
    split: LeaveOneOutSplit,
    model_config: SASRecConfig,
    train_config: TrainConfig | None = None,
    *,
    item_text: Tensor | None = None,
    selection_checkpointer: Checkpointer | None = None,
    final_checkpointer: Checkpointer | None = None,
) -> FinalFitResult:
    """Select the epoch count on validation, then refit on train + validation.

    Args:
        split: the leave-one-out split.
        model_config: the architecture; ``n_items`` must equal ``split.n_items``.
        train_config: optimisation settings (``validate`` must be on); defaults when
            ``None``.
        item_text: item text embeddings for a text tower; ``None`` otherwise.
        selection_checkpointer: checkpoints phase 1.
        final_checkpointer: checkpoints phase 2; a different key than phase 1's.

    Returns:
        Both phases' results; ``.model`` is the refitted model.

    Raises:
        ValueError: ``train_config.validate`` is off, the two checkpointers share a
            key, or the configs disagree with the data.
    """
    config = train_config or TrainConfig()
    if not config.validate:
        raise ValueError("train_config.validate=False: phase 1 must validate")
    if (
        selection_checkpointer is not None
        and final_checkpointer is not None
        and selection_checkpointer.key == final_checkpointer.key
    ):
        raise ValueError(
            f"both phases checkpoint to key={final_checkpointer.key!r}; use two keys"
        )
    selection = train_sasrec(
        split,
        model_config,
        config,
        item_text=item_text,
        checkpointer=selection_checkpointer,
    )
    final = refit_sasrec(
        split,
        model_config,
        config,
        selection.best_epoch,
        item_text=item_text,
        checkpointer=final_checkpointer,
    )
    return FinalFitResult(selection, final)
