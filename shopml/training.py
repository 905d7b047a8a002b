"""Training of the SASRec recommender: one import for the loop and everything around it.

The code lives in six modules, in dependency order:

* ``shopml.distributed``: the device and ``torchrun``'s process group
  (``resolve_device``, ``DistContext``, ``init_distributed``, ``is_main_process``).
* ``shopml.train_state``: ``TrainConfig``, ``EpochRecord``, ``TrainResult`` and the
  state the loop carries between epochs.
* ``shopml.optimization``: AdamW parameter groups, the warm-up + cosine learning-rate
  schedule and mixed precision on CUDA.
* ``shopml.checkpoints``: ``Checkpointer`` and the save / resume of the loop's state.
* ``shopml.train_loop``: the loop itself, ``train_sasrec`` and ``training_windows``.
* ``shopml.final_fit``: the two-phase final fit (``final_fit``, ``refit_sasrec``).

This module re-exports their public names, so imports written against it (KFP
component bodies, benchmarks, tests) keep working; new code imports a name from the
module that holds it.
"""

from shopml.checkpoints import Checkpointer
from shopml.distributed import (
    DEVICES,
    DistContext,
    init_distributed,
    is_main_process,
    resolve_device,
)
from shopml.final_fit import FinalFitResult, final_fit, final_fit_split, refit_sasrec
from shopml.train_loop import train_sasrec, training_windows
from shopml.train_state import (
    SELECTION_METRIC,
    EpochCallback,
    EpochRecord,
    TrainConfig,
    TrainResult,
)

__all__ = [
    "DEVICES",
    "SELECTION_METRIC",
    "Checkpointer",
    "DistContext",
    "EpochCallback",
    "EpochRecord",
    "FinalFitResult",
    "TrainConfig",
    "TrainResult",
    "final_fit",
    "final_fit_split",
    "init_distributed",
    "is_main_process",
    "refit_sasrec",
    "resolve_device",
    "train_sasrec",
    "training_windows",
]
