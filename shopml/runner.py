"""Run the lifecycle pipeline on this machine through ``kfp.local``.

The same pipeline definition that Kubeflow runs is executed here by KFP's
``SubprocessRunner``: every component runs as its own Python process in the current
environment. KFP's verbose output goes to ``<home>/runs/<run_id>/pipeline.log``; the
console shows stage starts and ends and the stages' own INFO lines. When a stage fails,
:class:`PipelineFailedError` carries the stage's own error line and traceback (read
from its streamed output), so the CLI can print one message and keep the traceback
for ``--verbose``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import textwrap
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
_STAGE_LOG = re.compile(
    r" (DEBUG|INFO|WARNING|ERROR) (shopml|components|serving)[\w.]*: "
)
_TRACEBACK = "Traceback (most recent call last):"
_FAILED = re.compile(r"Task '([\w-]+)' (finished with status FAILURE|failed)")


class PipelineFailedError(RuntimeError):
    """A stage of a local run failed; the message is one line naming it and its error.

    Attributes:
        stage: the failed task (``evaluate``, ...), ``None`` when no task failed
            (the run broke before or between tasks).
        summary: ``stage <name> failed: <ExceptionType>: <message>``.
        traceback: the stage's own traceback as it printed it; ``""`` if none.
        log_path: the run's full log.
    """

    def __init__(
        self, stage: str | None, summary: str, traceback: str, log_path: Path
    ) -> None:
        super().__init__(f"{summary}; full log: {log_path}")
        self.stage = stage
        self.summary = summary
        self.traceback = traceback
        self.log_path = log_path


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
        self.failed_stage: str | None = None
        # The last complete traceback a stage printed: (its lines, the error line).
        self.traceback: list[str] = []
        self.error = ""
        self._block: list[str] | None = None
        self._indent = 0

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
        self._follow_traceback(line)
        failed = _FAILED.search(line)
        if failed and self.failed_stage is None:
            self.failed_stage = failed.group(1)
        task = _TASK_LINE.search(line)
        if task:
            if task.group(3):
                self._console.write(f"==> stage {task.group(3)}\n")
            else:
                self._console.write(f"    stage {task.group(1)} {task.group(2)}\n")
        elif _STAGE_LOG.search(line):
            self._console.write("    " + line.strip() + "\n")

    def _follow_traceback(self, line: str) -> None:
        """Collect a stage's traceback: frames are indented deeper than its header,
        and the first line back at the header's indentation is the error."""
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped == _TRACEBACK:
            self._block, self._indent = [line], indent
        elif self._block is not None and stripped:
            self._block.append(line)
            if indent <= self._indent:
                self.traceback, self.error = self._block, stripped
                self._block = None

    def failure(self, err: Exception, log_path: Path) -> PipelineFailedError:
        """The failure to raise for ``err``, from what the failed stage printed."""
        if self.failed_stage is None or not self.error:
            reason = _ANSI.sub("", str(err))
            return PipelineFailedError(
                None, f"the pipeline failed: {reason}", "", log_path
            )
        name, sep, message = self.error.partition(": ")
        error = f"{name.rsplit('.', 1)[-1]}: {message}" if sep else self.error
        return PipelineFailedError(
            self.failed_stage,
            f"stage {self.failed_stage} failed: {error}",
            textwrap.dedent("\n".join(self.traceback)),
            log_path,
        )


def stage_environment(settings: Settings) -> dict[str, str]:
    """The ``SHOPML_*`` variables the stage processes of a local run inherit.

    No progress bars, no task retries (a cluster's passing failures; locally they
    only delay the error), this home, and this process's log level, so that
    ``shopml --verbose run`` shows the stages' DEBUG lines too.
    """
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return {
        "SHOPML_PROGRESS": "0",
        "SHOPML_HOME": str(settings.home),
        "SHOPML_TASK_RETRIES": "0",
        "SHOPML_LOG_LEVEL": str(level),
    }


def run_local_pipeline(settings: Settings, arguments: dict[str, Any]) -> PipelineRun:
    """Execute the lifecycle pipeline with ``kfp.local`` and collect its results.

    Args:
        settings: where runs are kept (``settings.home / "runs"``).
        arguments: pipeline parameters (see ``pipelines.lifecycle.lifecycle_pipeline``).

    Returns:
        The run folder, log, endpoint and evaluation table.

    Raises:
        PipelineFailedError: a stage failed; the message names it and its error and
            points at the log.
        RuntimeError: kfp.local wrote no run folder.
    """
    from kfp import local

    from pipelines.lifecycle import PIPELINE_NAME, lifecycle_pipeline

    runs = settings.home / "runs"
    pipeline_root = runs / "kfp"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    log_path = runs / run_id / "pipeline.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    os.environ.update(stage_environment(settings))
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
            raise console.failure(err, log_path) from err
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
