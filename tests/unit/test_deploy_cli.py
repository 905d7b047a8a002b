"""``shopml deploy --dry-run`` without a cluster, and how ``shopml run`` reads a failed
stage's output.

The dry-run tests need no API server: with no kubeconfig (or ``--offline``) the command
prints the full InferenceService it would create; with a kubeconfig whose server does
not answer it fails and names that server. The runner tests feed the console filter a
failed stage's output as ``kfp.local`` streams it (recorded from a real run; the whole
run is in tests/integration/test_deploy_cli.py) and check the one-line error and the
traceback kept for ``--verbose``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from components.deploy import ClusterTarget, build_inference_service
from shopml.cli_serving import deploy as deploy_command
from shopml.runner import _ConsoleFilter
from tests.services import free_port

URI = "s3://shopml/models/recommender/aaaa"


@pytest.fixture
def no_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No kubeconfig anywhere and not in a pod; returns the (empty) home folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    return home


def write_kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def deploy(*args: str) -> tuple[int, str]:
    # The command alone: the shopml app's callback would point logging at the
    # runner's temporary stderr, which later tests would then write to.
    app = typer.Typer()
    app.command()(deploy_command)
    result = CliRunner().invoke(app, ["--storage-uri", URI, *args])
    return result.exit_code, result.output


def test_dry_run_without_a_kubeconfig_prints_the_object_it_would_create(
    no_cluster: Path,
) -> None:
    code, output = deploy("--dry-run", "--name", "search", "--namespace", "ml")

    assert code == 0, output
    lines = output.splitlines()
    assert lines[0] == "# would create inferenceservice ml/search"
    assert lines[1].startswith("# could not read the live object (no kubeconfig")
    assert lines[1].endswith("showing a create")
    expected = build_inference_service(ClusterTarget("search", "ml"), URI)
    assert yaml.safe_load(output) == expected
    assert expected["spec"]["predictor"]["model"]["storageUri"] == URI


def test_offline_dry_run_never_contacts_the_configured_cluster(
    no_cluster: Path,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    kubeconfig = write_kubeconfig(no_cluster / ".kube" / "config", dead)

    code, output = deploy("--dry-run", "--offline", "--kubeconfig", str(kubeconfig))

    assert code == 0, output
    assert "# could not read the live object (--offline); showing a create" in output
    assert yaml.safe_load(output)["metadata"]["name"] == "recommender"


def test_dry_run_with_a_kubeconfig_whose_server_is_down_names_the_server(
    no_cluster: Path,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    write_kubeconfig(no_cluster / ".kube" / "config", dead)

    code, output = deploy("--dry-run")

    assert code == 1
    assert dead in output
    assert "recommender" in output
    assert "would create" not in output


def test_offline_without_dry_run_is_refused(no_cluster: Path) -> None:
    code, output = deploy("--offline")

    assert code == 2
    assert "--offline" in output and "--dry-run" in output


def test_deploy_without_a_kubeconfig_says_what_to_pass(no_cluster: Path) -> None:
    code, output = deploy()

    assert code == 1
    assert "no kubeconfig" in output
    assert "--kubeconfig" in output


# --- shopml run: what a failed stage printed becomes one message ----------------

# A failed evaluate stage as kfp.local streams it (ANSI colours included).
KFP_STREAM = """\
12:00:00.000 - INFO - Executing task \x1b[96m'evaluate'\x1b[0m
12:00:00.001 - INFO - Streamed logs:

    2026-12-04 12:00:01,000 INFO components.evaluate: gate failed: sasrec ndcg@10 0.1
    Traceback (most recent call last):
      File "/venv/kfp/dsl/executor.py", line 453, in execute
        result = self.func(**func_kwargs)
      File "/work/components/evaluate.py", line 344, in check_gate
        raise GateError(f"gate {decision.message}; the model is not deployed")
    components.evaluate.GateError: gate failed: sasrec ndcg@10 0.1000 <= threshold 0.2200

12:00:02.000 - ERROR - Task \x1b[96m'evaluate'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
"""


def filtered(stream: str) -> tuple[_ConsoleFilter, str, str]:
    log, console = io.StringIO(), io.StringIO()
    flt = _ConsoleFilter(log, console)
    flt.write(stream)
    flt.flush()
    return flt, log.getvalue(), console.getvalue()


def test_a_failed_stage_becomes_one_error_line_with_its_traceback_kept() -> None:
    flt, log, console = filtered(KFP_STREAM)

    failure = flt.failure(RuntimeError("Inner task failed"), Path("/runs/p.log"))

    assert failure.stage == "evaluate"
    assert failure.summary == (
        "stage evaluate failed: GateError: gate failed: sasrec ndcg@10 0.1000 <= "
        "threshold 0.2200"
    )
    assert str(failure) == failure.summary + "; full log: /runs/p.log"
    assert failure.traceback.startswith("Traceback (most recent call last):\n  File")
    assert failure.traceback.endswith(
        "components.evaluate.GateError: gate failed: "
        "sasrec ndcg@10 0.1000 <= threshold 0.2200"
    )
    assert "Traceback" not in console
    assert "stage evaluate finished with status FAILURE" in console
    assert "Traceback" in log


def test_a_chained_traceback_keeps_the_last_error() -> None:
    chained = KFP_STREAM.replace(
        "threshold 0.2200\n",
        "threshold 0.2200\n\n"
        "    The above exception was the direct cause of the following exception:\n\n"
        "    Traceback (most recent call last):\n"
        '      File "/work/components/deploy.py", line 9, in deploy\n'
        "    shopml.kserve_api.ClusterAccessError: the API server http://x answered 503\n",
    )
    flt, _, _ = filtered(chained)

    failure = flt.failure(RuntimeError("Inner task failed"), Path("p.log"))

    assert failure.summary == (
        "stage evaluate failed: ClusterAccessError: the API server http://x answered 503"
    )
    assert failure.traceback.count("Traceback") == 1


def test_a_failure_outside_any_stage_keeps_kfps_message_without_colours() -> None:
    flt, _, _ = filtered("12:00:00.000 - INFO - Running pipeline\n")

    failure = flt.failure(
        RuntimeError("Pipeline \x1b[95m'p'\x1b[0m finished"), Path("p.log")
    )

    assert failure.stage is None
    assert failure.summary == "the pipeline failed: Pipeline 'p' finished"
    assert failure.traceback == ""
