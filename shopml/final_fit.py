"""The final fit: choose the epoch count on validation, then refit on train + validation.

The final fit (:func:`final_fit`) is the standard two-phase protocol: phase 1
(:func:`~shopml.train_loop.train_sasrec`) picks the epoch count on the validation
targets, phase 2 (:func:`refit_sasrec`) retrains from scratch with the same seed and
schedule on the training histories plus every validation item, without validation, for
that many epochs. The refitted model has learned from the newest transitions, which the
test targets (and production traffic) follow; the only thing phase 2 takes from phase 1
is the epoch count, so the test targets stay unseen by every choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from torch import Tensor

from shopml.checkpoints import Checkpointer
from shopml.models.sasrec import SASRec, SASRecConfig
from shopml.sequences import LeaveOneOutSplit
from shopml.train_loop import train_sasrec
from shopml.train_state import EpochCallback, TrainConfig, TrainResult

logger = logging.getLogger(__name__)


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
