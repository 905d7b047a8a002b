"""Model servers on this machine: start ``python -m serving`` detached on 127.0.0.1,
wait until it is Ready, record it, and stop it.

``deploy_local`` starts the server in its own session (it outlives the pipeline task
that started it), waits until ``GET /v1/models/<name>`` reports the model ready, and
records the server in ``$SHOPML_HOME/runs/server.json`` (the local serve state that
``shopml run`` and ``shopml serve`` read); ``stop_local`` ends it. The deploy stage
(:mod:`components.deploy`) and the local canary stack (:mod:`shopml.cli_serving`)
both start their servers here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shopml.config import Settings, load_settings

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# The local serve state, under $SHOPML_HOME.
SERVER_RECORD = Path("runs") / "server.json"
# Lines of the server log quoted when it dies or never gets ready.
LOG_TAIL_LINES = 40
_POLL_S = 0.2


class DeploymentError(RuntimeError):
    """A model server (local or an InferenceService) exited or never became ready.

    The message quotes the server's log or the InferenceService's conditions.
    """


@dataclass(frozen=True)
class LocalDeployment:
    """A model server running on this machine.

    Attributes:
        url: the server's root URL, ``http://127.0.0.1:<port>``.
        port: its HTTP port.
        pid: its process id (leader of its own session).
        name: the model name in the URLs.
        log_path: the file that receives the server's stdout and stderr.
        process: the process handle when this process started it, for a clean wait.
    """

    url: str
    port: int
    pid: int
    name: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def endpoint(self) -> str:
        """The v1 model URL, ``<url>/v1/models/<name>`` (append ``:predict``)."""
        return f"{self.url}/v1/models/{self.name}"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _log_tail(log_path: Path, n_lines: int = LOG_TAIL_LINES) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError as err:
        return f"(log {log_path} unreadable: {err})"
    return "\n".join(lines[-n_lines:])


def _is_ready(url: str, name: str) -> bool:
    try:
        response = httpx.get(f"{url}/v1/models/{name}", timeout=2.0)
    except httpx.TransportError:
        return False
    return response.status_code == 200 and response.json().get("ready") is True


def _wait_ready(
    process: subprocess.Popen[bytes],
    url: str,
    name: str,
    log_path: Path,
    timeout_s: float,
) -> None:
    """Poll readiness until the model is ready, the process exits, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = process.poll()
        if status is not None:
            raise DeploymentError(
                f"model server for {name!r} exited with status {status} before it was "
                f"ready; last lines of {log_path}:\n{_log_tail(log_path)}"
            )
        if _is_ready(url, name):
            return
        time.sleep(_POLL_S)

    _terminate(process.pid, process, timeout_s=10.0)
    raise DeploymentError(
        f"model server for {name!r} at {url} was not ready after {timeout_s:.0f} s and "
        f"was stopped; last lines of {log_path}:\n{_log_tail(log_path)}"
    )


def _server_command(
    model_dir: Path,
    port: int,
    name: str,
    use_feature_store: bool,
    extra_args: Sequence[str] = (),
) -> list[str]:
    command = [
        sys.executable, "-m", "serving", "--model-dir", str(model_dir),
        "--model-name", name, "--http-port", str(port), "--host", LOOPBACK,
    ]  # fmt: skip
    if not use_feature_store:
        command.append("--no-feature-store")
    return [*command, *extra_args]


def deploy_local(
    model_dir: Path,
    *,
    port: int = 0,
    name: str = "recommender",
    log_path: Path | None = None,
    timeout_s: float = 60,
    use_feature_store: bool = True,
    extra_args: Sequence[str] = (),
) -> LocalDeployment:
    """Start the recommender server on 127.0.0.1 and wait until the model is Ready.

    The server runs detached (its own session), so it outlives the caller; stop it with
    :func:`stop_local`. It reads the same ``SHOPML_*`` settings as the caller.

    Args:
        model_dir: the model artifact folder.
        port: HTTP port; 0 picks a free one.
        name: the model name in the URLs.
        log_path: where the server logs go; default
            ``$SHOPML_HOME/logs/server-<name>-<port>.log``.
        timeout_s: how long to wait for readiness.
        use_feature_store: read user histories from the online store; ``False`` serves
            only requests that send ``item_ids``.
        extra_args: further ``python -m serving`` options (``--catalog``,
            ``--max-in-flight``, ...).

    Returns:
        The running deployment.

    Raises:
        DeploymentError: the server exited, or was not ready within ``timeout_s`` (it is
            stopped then); the message quotes the end of its log.
    """
    settings = load_settings()
    port = port or free_port()
    log_path = log_path or settings.home / "logs" / f"server-{name}-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{LOOPBACK}:{port}"

    started = time.monotonic()
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            _server_command(
                Path(model_dir).resolve(), port, name, use_feature_store, extra_args
            ),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(process, url, name, log_path, timeout_s)
    except BaseException:
        # Ctrl-C or SIGTERM while waiting: the detached server must not outlive us.
        _terminate(process.pid, process, timeout_s=10.0)
        raise

    deployment = LocalDeployment(url, port, process.pid, name, log_path, process)
    _write_server_record(settings.home / SERVER_RECORD, deployment, model_dir)
    logger.info(
        "model server ready model=%s url=%s pid=%d seconds=%.1f log=%s",
        name,
        deployment.endpoint,
        process.pid,
        time.monotonic() - started,
        log_path,
    )
    return deployment


def _write_server_record(
    path: Path, deployment: LocalDeployment, model_dir: Path
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "url": deployment.url,
        "endpoint": deployment.endpoint,
        "pid": deployment.pid,
        "port": deployment.port,
        "name": deployment.name,
        "model_dir": str(Path(model_dir).resolve()),
        "log_path": str(deployment.log_path),
    }
    path.write_text(json.dumps(record, indent=2))


def read_server_record(settings: Settings) -> dict[str, Any]:
    """The last server ``deploy_local`` started: url, endpoint, pid, model_dir, ...

    Raises:
        FileNotFoundError: no server was started under ``settings.home`` yet.
    """
    path = settings.home / SERVER_RECORD
    if not path.is_file():
        raise FileNotFoundError(
            f"no local model server recorded in {path}; start one with `shopml run` "
            "or `shopml serve`"
        )
    return dict(json.loads(path.read_text()))


def _is_model_server(pid: int) -> bool:
    """Whether ``pid`` runs ``python -m serving`` (guards against a recycled pid)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.parent.is_dir():
        return True  # no /proc on this system: trust the caller
    try:
        arguments = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serving" in arguments


def _has_exited(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == pid
    except ChildProcessError:
        pass  # not our child: it is reaped elsewhere, so ask whether it still exists
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_exit(
    pid: int, process: subprocess.Popen[bytes] | None, timeout_s: float
) -> bool:
    """Wait until the process has exited (and is reaped when it is our child)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return True
        if process is None and _has_exited(pid):
            return True
        time.sleep(0.05)
    return False


def _terminate(
    pid: int, process: subprocess.Popen[bytes] | None, timeout_s: float
) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL."""
    if process is not None and process.poll() is not None:
        return  # already exited, and now reaped
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _wait_exit(pid, process, timeout_s):
        return

    logger.warning(
        "model server pid=%d ignored SIGTERM for %.0f s; killing it", pid, timeout_s
    )
    os.kill(pid, signal.SIGKILL)
    _wait_exit(pid, process, 5.0)


def stop_local(deployment_or_pid: LocalDeployment | int, timeout_s: float = 15) -> None:
    """Stop a local model server: SIGTERM, wait, and SIGKILL if it does not exit.

    Args:
        deployment_or_pid: the deployment, or the pid recorded in ``server.json``.
        timeout_s: how long to wait after SIGTERM.
    """
    if isinstance(deployment_or_pid, LocalDeployment):
        pid, process = deployment_or_pid.pid, deployment_or_pid.process
    else:
        pid, process = int(deployment_or_pid), None

    if process is None and not _is_model_server(pid):
        logger.warning("pid=%d is not a running model server; nothing to stop", pid)
        return
    started = time.monotonic()
    _terminate(pid, process, timeout_s)
    logger.info(
        "model server stopped pid=%d seconds=%.1f", pid, time.monotonic() - started
    )
