"""Run the lifecycle pipeline on this machine through ``kfp.local``.

The same pipeline definition that Kubeflow runs is executed here by KFP's
``SubprocessRunner``: every component runs as its own Python process in the current
environment. KFP's verbose output goes to ``<home>/runs/<run_id>/pipeline.log``; the
console shows stage starts and ends and the stages' own INFO lines.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from shopml.config import Settings

logger = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_LINE = re.compile(
    r"Task '([\w-]+)' (finished with status \w+|failed)|Executing task '([\w-]+)'"
)
_STAGE_LOG = re.compile(r" (INFO|WARNING|ERROR) (shopml|components|serving)[\w.]*: ")


@dataclass
class PipelineRun:
    """What a local run produced.

    Attributes:
        run_dir: the kfp.local folder holding every task's outputs.
        log_path: full log of the run.
        endpoint: URL of the model server the deploy stage started.
        evaluation: the evaluation table returned by the evaluate stage.
        seconds: wall time of the run.
    """

    run_dir: Path
    log_path: Path
    endpoint: str
    evaluation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def output(self, task: str, name: str) -> Path:
        """Path of one task output inside the run folder (``evaluate``/``report``...)."""
        return self.run_dir / task / name


class _ConsoleFilter(io.TextIOBase):
    """Writes every line to the log file and echoes the ones an operator follows."""

    def __init__(self, log: TextIO, console: TextIO) -> None:
        self._log = log
        self._console = console
        self._buffer = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._emit(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            self._emit(_ANSI.sub("", self._buffer))
            self._buffer = ""
        self._log.flush()
        self._console.flush()

    def _emit(self, line: str) -> None:
        self._log.write(line + "\n")
        task = _TASK_LINE.search(line)
        if task:
            if task.group(3):
                self._console.write(f"==> stage {task.group(3)}\n")
            else:
                self._console.write(f"    stage {task.group(1)} {task.group(2)}\n")
        elif _STAGE_LOG.search(line):
            self._console.write("    " + line.strip() + "\n")


def run_local_pipeline(settings: Settings, arguments: dict[str, Any]) -> PipelineRun:
    """Execute the lifecycle pipeline with ``kfp.local`` and collect its results.

    Args:
        settings: where runs are kept (``settings.home / "runs"``).
        arguments: pipeline parameters (see ``pipelines.lifecycle.lifecycle_pipeline``).

    Returns:
        The run folder, log, endpoint and evaluation table.

    Raises:
        RuntimeError: a stage failed; the message points at the log.
    """
    from kfp import local

    from pipelines.lifecycle import PIPELINE_NAME, lifecycle_pipeline

    runs = settings.home / "runs"
    pipeline_root = runs / "kfp"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    log_path = runs / run_id / "pipeline.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    # Components inherit the environment: no progress bars inside a pipeline run.
    os.environ["SHOPML_PROGRESS"] = "0"
    os.environ["SHOPML_HOME"] = str(settings.home)
    # Retries are for a cluster's passing failures; locally they only delay the error.
    os.environ["SHOPML_TASK_RETRIES"] = "0"
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root)
    )

    # kfp.local warns that our image is not a plain Python image; locally the
    # components run in this environment, which is exactly what the image holds.
    # Resources, GPUs and retries are cluster settings; kfp.local says it ignores them.
    warnings.filterwarnings(
        "ignore", message="You may be attemping to run a task", category=RuntimeWarning
    )
    warnings.filterwarnings(
        "ignore",
        message=".*have no effect in the current local runner",
        category=UserWarning,
    )
    started = time.monotonic()
    before = set(pipeline_root.glob(f"{PIPELINE_NAME}-*"))
    with log_path.open("w", encoding="utf-8") as log:
        console = _ConsoleFilter(log, sys.stderr)
        try:
            with contextlib.redirect_stdout(console):
                task = lifecycle_pipeline(**arguments)
        except Exception as err:
            console.flush()
            raise RuntimeError(
                f"the pipeline failed: {err}; full log: {log_path}"
            ) from err
        console.flush()

    new_dirs = sorted(set(pipeline_root.glob(f"{PIPELINE_NAME}-*")) - before)
    if not new_dirs:
        raise RuntimeError(f"kfp.local wrote no run folder under {pipeline_root}")
    evaluation = json.loads(task.outputs["evaluation"])
    run = PipelineRun(
        run_dir=new_dirs[-1],
        log_path=log_path,
        endpoint=str(task.outputs["endpoint"]),
        evaluation=evaluation,
        seconds=time.monotonic() - started,
    )
    logger.info("pipeline finished in %.0f s; run folder %s", run.seconds, run.run_dir)
    return run
