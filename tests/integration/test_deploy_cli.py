"""``shopml run`` when a stage fails: one message, the traceback only with
``--verbose``.

A one-stage stand-in for the lifecycle pipeline runs through ``kfp.local`` in a real
``shopml`` process; its evaluate stage calls the real ``check_gate`` and fails it. The
test reads what a person sees at the terminal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

GATE_PIPELINE = '''
"""A one-stage stand-in for the lifecycle pipeline whose evaluate stage fails."""

import sys

from kfp import dsl

import pipelines.lifecycle
from components.common import stage_component


@stage_component
def evaluate(min_lift: float = 0.0) -> str:
    from components.evaluate import EvaluationResult, check_gate
    from shopml.logs import configure_logging

    import logging

    configure_logging()
    logging.getLogger("components.evaluate").debug("gate inputs ready")
    models = {"sasrec": {"ndcg_10": 0.1}, "popularity": {"ndcg_10": 0.2}}
    return check_gate(EvaluationResult(models, 10, 5, 0.0), min_lift)


@dsl.pipeline(name="shopml-lifecycle")
def gate_pipeline(epochs: int = 1, min_lift: float = 0.0) -> str:
    return evaluate(min_lift=min_lift).output


pipelines.lifecycle.lifecycle_pipeline = gate_pipeline
from shopml.cli import app  # noqa: E402

sys.argv = ["shopml", *sys.argv[1:]]
app()
'''

GATE_MESSAGE = (
    "gate failed: sasrec ndcg@10 0.1000 <= threshold 0.2200 = popularity ndcg@10 "
    "0.2000 x (1 + min_lift 0.1)"
)


def run_gate_pipeline(
    tmp_path: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "gate_pipeline.py"
    script.write_text(GATE_PIPELINE)
    command = [sys.executable, str(script), *options, "run", "--min-lift", "0.1"]
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        command, cwd=root, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_failed_gate_prints_one_message_and_a_traceback_only_when_verbose(
    tmp_path: Path, verbose: bool
) -> None:
    done = run_gate_pipeline(tmp_path, *(["--verbose"] if verbose else []))
    output = done.stdout + done.stderr

    assert done.returncode == 1, output
    [error] = [line for line in output.splitlines() if line.startswith("error:")]
    assert error.startswith("error: stage evaluate failed: GateError: " + GATE_MESSAGE)
    assert "the model is not deployed" in error
    assert "\x1b[" not in output
    assert output.count("Traceback") == (1 if verbose else 0), output
    if verbose:
        assert "check_gate" in output  # the stage's own traceback, not the runner's
    # --verbose reaches the stage process: its DEBUG lines show, and only then.
    shown = "DEBUG components.evaluate: gate inputs ready" in output
    assert shown is verbose, output
    assert "full log: " in output
