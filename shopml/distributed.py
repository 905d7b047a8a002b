"""The device and the processes of a training job, alone or under ``torchrun``.

``resolve_device`` turns the configured device name into a ``torch.device``. Under
``torchrun`` (``WORLD_SIZE`` > 1) ``init_distributed`` joins the process group and
returns this process's ``DistContext``; only rank 0 logs, checkpoints and writes
(``is_main_process``). ``LossModule`` puts SASRec's loss behind ``forward`` so
DistributedDataParallel can wrap it. Used by the loop in ``shopml.train_loop``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from shopml.models.sasrec import SASRec

logger = logging.getLogger(__name__)


DEVICES = ("auto", "cpu", "cuda")


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


class LossModule(nn.Module):
    """Routes the loss through ``forward`` so DistributedDataParallel can wrap it."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_seq: Tensor, pos_items: Tensor) -> Tensor:
        return self.model.calculate_loss(item_seq, pos_items)
