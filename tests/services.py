"""Real services for integration tests, started on 127.0.0.1 and stopped by fixtures.

* ``redis_server``: Debian's ``redis-server`` on a free port, no persistence.
* ``s3_server``: moto's threaded S3-compatible server (MinIO's server binary cannot be
  installed on our CI machines; clusters run real MinIO), with a ready bucket.
* :func:`run_kube_emulator`: kmock's Kubernetes API emulator (no real API server can be
  had here); the test plays the controllers.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Ask the kernel for a free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    """Block until something accepts connections on ``127.0.0.1:port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout_s} s")


@dataclass
class RedisServer:
    """A running redis-server process."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def connection_string(self) -> str:
        """The form Feast's Redis online store expects."""
        return f"{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def start_redis(port: int | None = None) -> RedisServer:
    """Start redis-server on 127.0.0.1 without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: `apt-get install -y redis-server`")
    port = port or free_port()
    process = subprocess.Popen(
        [
            binary,
            "--bind",
            LOOPBACK,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return RedisServer(port=port, process=process)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh Redis on 127.0.0.1 for one test."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server and the credentials for it."""

    endpoint: str  # host:port, no scheme
    bucket: str
    access_key: str = "testing-access-key"
    secret_key: str = "testing-secret-key"  # a throwaway local test credential

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.endpoint}"

    def env(self) -> dict[str, str]:
        """Environment variables that point shopml (and Feast/s3fs) at this server."""
        return {
            "SHOPML_S3_ENDPOINT": self.endpoint,
            "SHOPML_S3_BUCKET": self.bucket,
            "SHOPML_S3_ACCESS_KEY": self.access_key,
            "SHOPML_S3_SECRET_KEY": self.secret_key,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "FEAST_S3_ENDPOINT_URL": self.endpoint_url,
        }


@pytest.fixture(scope="session")
def _moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    wait_for_port(port)
    try:
        yield f"{LOOPBACK}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_server(_moto_server: str, request: pytest.FixtureRequest) -> S3Server:
    """An S3 server on 127.0.0.1 with an empty bucket of its own for this test."""
    from minio import Minio

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    bucket = "".join(c if c.isalnum() or c == "-" else "-" for c in name).strip("-")
    server = S3Server(endpoint=_moto_server, bucket=bucket)
    client = Minio(
        server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key,
        secure=False,
    )
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    return server


@pytest.fixture
def shopml_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private SHOPML_HOME for one test, with S3 and Redis unset."""
    home = tmp_path / "shopml-home"
    monkeypatch.setenv("SHOPML_HOME", str(home))
    monkeypatch.setenv("SHOPML_PROGRESS", "0")
    for name in (
        "SHOPML_S3_ENDPOINT",
        "SHOPML_REDIS_URL",
        "SHOPML_PSEUDONYMIZATION_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    return home


@dataclass
class KubeEmulator:
    """A running kmock Kubernetes API emulator: its URL and its request log."""

    url: str
    handler: Any
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event

    def requests(self, method: str) -> list[Any]:
        """Requests received with this HTTP method, in order."""
        return [r for r in list(self.handler) if str(r.method.value) == method]

    def calls(self) -> list[tuple[str, str]]:
        """(HTTP method, path) of every request received, in order."""
        return [(str(r.method.value), str(r.url.path)) for r in list(self.handler)]


@contextlib.contextmanager
def run_kube_emulator(resources: dict[str, Any]) -> Iterator[KubeEmulator]:
    """Serve kmock's emulator on 127.0.0.1 in a thread, knowing ``resources``.

    Args:
        resources: ``"group/version/plural"`` (``"v1/configmaps"`` for the core group)
            -> kmock resource info (a ``kmock.ResourceInfo`` or its fields as a dict).
    """
    import kmock

    started = threading.Event()
    box: dict[str, KubeEmulator] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with (
            kmock.KubernetesEmulator() as handler,
            kmock.Server(handler, host=LOOPBACK) as server,
        ):
            for key, info in resources.items():
                handler.resources[key] = info
            url = str(server.url).rstrip("/")
            box["emulator"] = KubeEmulator(
                url, handler, asyncio.get_running_loop(), stop
            )
            started.set()
            await stop.wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert started.wait(15), "the Kubernetes emulator did not start"
    emulator = box["emulator"]
    try:
        yield emulator
    finally:
        emulator.loop.call_soon_threadsafe(emulator.stop.set)
        thread.join(timeout=10)
