"""How the training loop optimises: AdamW groups, the LR schedule, mixed precision.

``build_optimizer`` decays the linear weights and the embedding tables as
``TrainConfig`` says and nothing else; ``lr_lambda`` is the linear warm-up + cosine
decay of the learning rate; ``Precision`` runs the forward pass under autocast on CUDA
(bf16, else fp16 with a gradient scaler) and does nothing on the CPU. Used by
``shopml.train_loop``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from shopml.models.sasrec import SASRec
from shopml.train_state import TrainConfig


def lr_lambda(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1 over the first steps, then a cosine down to 0."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: SASRec, config: TrainConfig) -> torch.optim.AdamW:
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


class Precision:
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
