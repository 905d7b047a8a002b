"""How ``shopml deploy``, ``shopml bundles prune`` and ``shopml serve --canary`` fail.

Each case is one a tester hit: an API server that accepts connections and never
answers, one that answers HTML or a refusal, kubeconfigs that are not files or not
YAML, options that are no Kubernetes name or storage URI, live objects shopml did not
create, a canary share out of range, and a local run that did not pass its log level
to the stages. The API servers here are fakes started on 127.0.0.1 that answer one
canned reply (or none); every failure must be one ``error:`` line naming the server,
file or option, never a traceback or a hang.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from shopml.cli_serving import _wait_splitter, bundles_app
from shopml.cli_serving import deploy as deploy_command
from shopml.config import load_settings
from shopml.kserve_objects import (
    ClusterTarget,
    live_rollout,
    plan_rollout,
    served_uris,
)
from shopml.local_serving import DeploymentError
from shopml.runner import _ConsoleFilter, stage_environment
from tests.unit.test_deploy_cli import no_cluster, write_kubeconfig  # noqa: F401

URI = "s3://shopml/models/recommender/aaaa"


class FakeApiServer:
    """A TCP server on 127.0.0.1 that reads each request and sends ``reply``.

    ``reply=None`` accepts connections and never answers.
    """

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.requests = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.requests += 1
            self._held.append(conn)
            if self.reply is not None:
                conn.recv(65536)
                conn.sendall(self.reply)
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self._sock.close()


def http_reply(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


@pytest.fixture
def fake_server(request: pytest.FixtureRequest) -> Iterator[FakeApiServer]:
    server = FakeApiServer(request.param)
    try:
        yield server
    finally:
        server.close()


def unboxed(output: str) -> str:
    """Typer's error panel as one line: borders dropped, whitespace collapsed."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", output).split())


def invoke(command: Any, args: list[str], sub: str | None = None) -> Any:
    app = typer.Typer()
    if sub is None:
        app.command()(command)
    else:
        app.add_typer(command, name=sub)
        args = [sub, *args]
    return CliRunner().invoke(app, args)


HANG = pytest.param(None, id="never-answers")
HTML = pytest.param(
    http_reply("200 OK", "text/html", b"<html><body>Sign in</body></html>"),
    id="html-200",
)
STATUS_403 = pytest.param(
    http_reply(
        "403 Forbidden",
        "application/json",
        json.dumps(
            {
                "kind": "Status",
                "status": "Failure",
                "reason": "Forbidden",
                "code": 403,
                "message": 'inferenceservices "recommender" is forbidden: user '
                "cannot get resource",
            }
        ).encode(),
    ),
    id="403-status",
)


# --- finding 1: a server that never answers -------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fake_server", [HANG], indirect=True)
def test_deploy_to_a_server_that_never_answers_fails_within_the_timeout(
    fake_server: FakeApiServer,
    no_cluster: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    kubeconfig = write_kubeconfig(no_cluster / "kubeconfig", fake_server.url)
    started = time.monotonic()

    result = invoke(
        deploy_command,
        ["--storage-uri", URI, "--kubeconfig", str(kubeconfig), "--timeout", "1"],
    )

    assert result.exit_code == 1, result.output
    assert time.monotonic() - started < 10
    assert f"{fake_server.url} did not answer within 1 s" in result.output
    assert fake_server.requests == 1  # not retried
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fake_server", [HANG], indirect=True)
def test_bundles_prune_against_a_server_that_never_answers_fails_in_time(
    fake_server: FakeApiServer,
    no_cluster: Path,  # noqa: F811
) -> None:
    kubeconfig = write_kubeconfig(no_cluster / "kubeconfig", fake_server.url)

    result = invoke(
        bundles_app,
        ["prune", "--dry-run", "--kubeconfig", str(kubeconfig), "--timeout", "1"],
        sub="bundles",
    )

    assert result.exit_code == 1, result.output
    assert "did not answer within 1 s" in result.output
    assert fake_server.url in result.output


# --- finding 2: answers that are no Kubernetes object ---------------------------


@pytest.mark.parametrize(
    ("fake_server", "expected"),
    [
        (HTML.values[0], "is not a Kubernetes object: '<html><body>Sign in"),
        (STATUS_403.values[0], "forbidden: user cannot get resource"),
    ],
    ids=["html-200", "403-status"],
    indirect=["fake_server"],
)
def test_an_unexpected_answer_is_one_error_line_naming_the_server(
    fake_server: FakeApiServer,
    expected: str,
    no_cluster: Path,  # noqa: F811
) -> None:
    kubeconfig = write_kubeconfig(no_cluster / "kubeconfig", fake_server.url)

    result = invoke(
        deploy_command,
        ["--storage-uri", URI, "--dry-run", "--kubeconfig", str(kubeconfig)],
    )

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # no traceback
    [line] = result.output.splitlines()
    assert line.startswith(f"error: the Kubernetes API server {fake_server.url}")
    assert expected in line


def test_a_kubeconfig_that_is_not_yaml_is_one_error_line(
    no_cluster: Path,  # noqa: F811
) -> None:
    kubeconfig = no_cluster / "kubeconfig"
    kubeconfig.write_text("clusters: [\n  - name: {broken\n")

    result = invoke(
        deploy_command,
        ["--storage-uri", URI, "--dry-run", "--kubeconfig", str(kubeconfig)],
    )

    assert result.exit_code == 1, result.output
    [line] = result.output.splitlines()
    assert line.startswith(f"error: kubeconfig {kubeconfig} (context current) is not")


def test_kubeconfig_naming_a_directory_is_an_error_not_no_cluster(
    no_cluster: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(no_cluster))

    result = invoke(deploy_command, ["--storage-uri", URI, "--dry-run"])

    assert result.exit_code == 1, result.output
    assert f"$KUBECONFIG names {no_cluster}, which is not a kubeconfig file" in (
        result.output
    )
    assert "would create" not in result.output


SKLEARN = {
    "metadata": {"name": "recommender", "namespace": "shopml"},
    "spec": {"predictor": {"sklearn": {"storageUri": "gs://b/sk/model"}}},
}
CONTAINERS = {
    "metadata": {"name": "recommender", "namespace": "shopml"},
    "spec": {"predictor": {"containers": [{"name": "c", "image": "x:1"}]}},
}


def test_a_live_object_without_a_model_predictor_is_read_as_stable() -> None:
    assert live_rollout(SKLEARN) == ("gs://b/sk/model", "", "initial")
    assert live_rollout(CONTAINERS) == ("", "", "initial")
    assert served_uris(SKLEARN) == {"gs://b/sk/model"}
    assert served_uris(CONTAINERS) == set()


@pytest.mark.parametrize("live", [SKLEARN, CONTAINERS], ids=["sklearn", "containers"])
def test_a_rollout_onto_a_predictor_that_is_no_model_spec_names_what_is_missing(
    live: dict[str, Any],
) -> None:
    with pytest.raises(ValueError, match=r"shopml/recommender has no spec\.predictor"):
        plan_rollout(ClusterTarget(), URI, live)


# --- finding 3: input validation ------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [
        ("--storage-uri", "", "storage_uri"),
        ("--storage-uri", "not a uri; rm -rf /", "storage_uri"),
        ("--storage-uri", "s3://shopml", "storage_uri"),
        ("--storage-uri", "ftp://host/models/v1", "storage_uri"),
        ("--name", "Bad_Name!", "name"),
        ("--namespace", "UPPER case", "namespace"),
    ],
    ids=["empty-uri", "shell-uri", "no-path", "ftp", "bad-name", "bad-namespace"],
)
def test_bad_names_and_storage_uris_are_refused_naming_field_and_value(
    option: str,
    value: str,
    field: str,
    no_cluster: Path,  # noqa: F811
) -> None:
    args = {"--storage-uri": URI, option: value}
    flat = [part for pair in args.items() for part in pair]

    result = invoke(deploy_command, [*flat, "--dry-run", "--offline"])

    assert result.exit_code == 2, result.output
    assert f"{field}={value!r}" in unboxed(result.output)
    assert "would create" not in result.output


def test_an_empty_uri_never_matches_an_empty_canary_annotation() -> None:
    live = {
        "metadata": {"annotations": {"shopml.io/stable-storage-uri": URI}},
        "spec": {"predictor": {"model": {"storageUri": URI}}},
    }
    with pytest.raises(ValueError, match="storage_uri=''"):
        plan_rollout(ClusterTarget(), "", live)


@pytest.mark.parametrize(
    "uri",
    [URI, "gs://b/m/1", "pvc://claim/models/1", "https://h/m.tar.gz", "hf://org/model"],
)
def test_storage_uris_kserve_downloads_are_accepted(uri: str) -> None:
    assert plan_rollout(ClusterTarget(), uri, None).canary_uri == ""


# --- finding 6: serve --canary share -------------------------------------------


def test_serve_canary_out_of_range_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    from shopml.cli import serve

    started = time.monotonic()
    result = invoke(
        serve,
        ["--model-dir", str(tmp_path), "--canary", "150",
         "--canary-model-dir", str(tmp_path)],
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    assert "'--canary': Input should be less than or equal to 100" in unboxed(
        result.output
    )
    assert time.monotonic() - started < 5


def test_the_splitter_refuses_a_bad_share_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serving.splitter", "--stable", "http://127.0.0.1:1",
         "--canary", "http://127.0.0.1:2", "--canary-percent", "150",
         "--impressions", "/dev/null", "--port", "1"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert " ERROR __main__: splitter not started: canary_percent=150 must be" in line


def test_a_splitter_that_exits_early_is_reported_by_its_last_error_line(
    tmp_path: Path,
) -> None:
    log = tmp_path / "splitter.log"
    log.write_text(
        "2026 INFO serving.splitter: starting\n"
        "2026 ERROR serving.splitter: splitter not started: port in use\n"
        "bye\n"
    )
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    with pytest.raises(DeploymentError) as raised:
        _wait_splitter(process, "http://127.0.0.1:1", log)

    message = str(raised.value)
    assert message.startswith("the splitter exited with status 3: 2026 ERROR")
    assert "port in use" in message


# --- finding 8: the stages get the CLI's log level ------------------------------


def test_a_verbose_run_passes_debug_to_the_stages() -> None:
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.DEBUG)
    try:
        environment = stage_environment(load_settings())
    finally:
        root.setLevel(before)

    assert environment["SHOPML_LOG_LEVEL"] == "DEBUG"
    stage = subprocess.run(
        [sys.executable, "-c",
         "import logging; from shopml.logs import configure_logging; "
         "configure_logging(); logging.getLogger('components.train').debug('epoch 1')"],
        env={**environment, "PATH": "/usr/bin:/bin"},
        check=False, capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert " DEBUG components.train: epoch 1" in stage.stderr

    console = io.StringIO()
    flt = _ConsoleFilter(io.StringIO(), console)
    flt.write("    " + stage.stderr.strip() + "\n")
    flt.flush()
    assert "DEBUG components.train: epoch 1" in console.getvalue()
