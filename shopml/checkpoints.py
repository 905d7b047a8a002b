"""Checkpoints of the training loop: saved every epoch, resumed after a kill.

``Checkpointer`` writes a state under one key of an object store.
``checkpoint_state`` is everything the loop needs to continue (weights, optimiser,
schedule, random generators, best weights, history); ``restore_checkpoint`` restores
it when its ``_fingerprint`` (both configs, the data size and the world size) matches
the run, so a resumed run ends with the same weights as an uninterrupted one. Used by
``shopml.train_loop``.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict
from typing import Any

import torch

from shopml.storage import ObjectStore, check_key
from shopml.train_state import BestState, EpochRecord, TrainingLoop

logger = logging.getLogger(__name__)


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


def _fingerprint(loop: TrainingLoop) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: both configs and the data size."""
    train = asdict(loop.config)
    train.pop("show_progress")
    return {
        "model": loop.model.config.to_dict(),
        "train": train,
        "n_train_interactions": sum(len(s) for s in loop.split.train_seqs),
        "world_size": loop.context.world_size,
    }


def checkpoint_state(loop: TrainingLoop) -> dict[str, Any]:
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
        "ema": None
        if loop.ema is None
        else {k: v.detach().cpu() for k, v in loop.ema.state_dict().items()},
        "best": loop.best.to_state(),
        "history": [asdict(record) for record in loop.history],
    }


def restore_checkpoint(loop: TrainingLoop, checkpointer: Checkpointer) -> bool:
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
    if loop.ema is not None:
        loop.ema.load_state_dict(state["ema"])
    loop.best = BestState.from_state(state["best"])
    loop.history = [EpochRecord(**record) for record in state["history"]]
    loop.epoch, loop.steps = state["epoch"], state["steps"]
    logger.info("resumed from checkpoint key=%s epoch=%d", checkpointer.key, loop.epoch)
    return True
