"""The SASRec training loop: AdamW, warm-up + cosine decay, early stopping on NDCG@10.

Each user's training history becomes windows of ``max_seq_len`` next-item pairs with a
target at every position (inputs ``seq[:-1]``, targets ``seq[1:]``), as in the SASRec
paper. The newest window always ends at the last pair; older windows end at an offset
drawn anew every epoch (overlapping the newest one), so each pair sees varying context.
The loop evaluates on the validation targets every ``eval_every`` epochs, keeps the best
weights and stops after ``patience`` evaluations without improvement (once ``min_steps``
steps are done); with ``ema_decay`` it evaluates and keeps a moving average of the
weights instead. CPU runs are seeded and deterministic; on CUDA the forward pass runs
under autocast (bf16, else fp16 with a gradient scaler, ``shopml.optimization``).

With a :class:`~shopml.checkpoints.Checkpointer` the loop saves everything it needs to
continue (weights, optimiser, schedule, random generators, best weights, history) to the
object store at the end of every epoch, and a new run with the same checkpointer
resumes from there: after a kill, the resumed run ends with the same weights as an
uninterrupted one.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the loop trains with DistributedDataParallel
(``shopml.distributed``): every rank draws the same shuffled windows and takes its
share of every batch, the gradients are averaged, every rank evaluates the same weights
(so they agree on early stopping) and only rank 0 writes checkpoints.

The configuration and the state carried between epochs are in ``shopml.train_state``;
the two-phase final fit built on :func:`train_sasrec` is in ``shopml.final_fit``.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from shopml.checkpoints import Checkpointer, checkpoint_state, restore_checkpoint
from shopml.config import load_settings
from shopml.distributed import (
    DistContext,
    LossModule,
    init_distributed,
    resolve_device,
)
from shopml.evaluation import evaluate_scorer
from shopml.models.sasrec import SASRec, SASRecConfig, left_pad
from shopml.optimization import Precision, build_optimizer, lr_lambda
from shopml.sequences import LeaveOneOutSplit
from shopml.train_state import (
    SELECTION_METRIC,
    EpochCallback,
    EpochRecord,
    TrainConfig,
    TrainingLoop,
    TrainResult,
)

logger = logging.getLogger(__name__)


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


def _batches(n_windows: int, config: TrainConfig) -> int:
    return math.ceil(n_windows / config.batch_size)


def _train_epoch(
    loop: TrainingLoop, windows: tuple[Tensor, Tensor], precision: Precision
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
        if loop.ema is not None:
            loop.ema.update_parameters(loop.model)

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
    if checkpointer is not None:  # later epochs redraw windows from the restored rng
        restore_checkpoint(loop, checkpointer)

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
) -> TrainingLoop:
    """Optimiser, schedule and (under torchrun) the DDP wrapper around the loss."""
    optimizer = build_optimizer(model, config)
    total_steps = _batches(n_windows, config) * (
        config.schedule_epochs or config.epochs
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, config.warmup_ratio)
    )
    runner: nn.Module = LossModule(model)
    if context.is_distributed:
        device_ids = (
            [context.local_rank] if model.item_embedding.weight.is_cuda else None
        )
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=device_ids)
    ema = None
    if config.ema_decay > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
    return TrainingLoop(
        model, split, optimizer, scheduler, config, rng, context, runner, ema
    )


def _log_start(loop: TrainingLoop, n_windows: int) -> None:
    logger.info(
        "training start device=%s windows=%d items=%d params=%d world_size=%d",
        next(loop.model.parameters()).device,
        n_windows,
        loop.split.n_items,
        sum(p.numel() for p in loop.model.parameters()),
        loop.context.world_size,
    )


def _fit(
    loop: TrainingLoop,
    windows: tuple[Tensor, Tensor],
    checkpointer: Checkpointer | None,
    on_epoch_end: EpochCallback | None,
) -> None:
    """The epoch loop: train, evaluate, log, checkpoint, keep the best, stop early."""
    config = loop.config
    device = next(loop.model.parameters()).device
    precision = Precision(device)
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
            valid = _evaluate_valid(loop.scored_model, loop.split, device)
            loop.best.update(epoch, valid, loop.scored_model)
        record = EpochRecord(epoch, loss, valid, time.monotonic() - epoch_start)
        loop.history.append(record)
        loop.epoch = epoch
        if loop.context.is_main:
            _log_epoch(record, bar)
            if checkpointer is not None:
                checkpointer.save(checkpoint_state(loop))
        if on_epoch_end is not None:
            on_epoch_end(record)
    bar.close()


def _should_stop(loop: TrainingLoop) -> bool:
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


def _finish(loop: TrainingLoop, started: float, device: torch.device) -> TrainResult:
    """Restore the best weights on the CPU and summarise the run."""
    model, best = loop.model.cpu(), loop.best
    if not loop.config.validate:  # the last weights: the epoch count was chosen
        best.epoch = loop.epoch
        if loop.ema is not None:
            model.load_state_dict(loop.ema.module.state_dict())
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
