"""The recommender server against abusive or careless clients, over HTTP on 127.0.0.1.

A real ``python -m serving`` per module without a feature store, on a seeded untrained
SASRec over 20,000 items (big enough that a 256-row ``:explain`` costs real time):

* heavy valid requests must not stall health checks (probes time out at 1 s);
* clients that send headers and then withhold the body hold no in-flight slot and get
  408 at the body deadline;
* v2 ``k`` values outside their datatype are a 400 naming the input and datatype;
* error bodies and the server log never quote what the client sent (a planted email in
  ``k``, in the model name of the URL, and in a body that fails request validation).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from components.deploy import LocalDeployment, deploy_local, stop_local
from shopml.artifact import save_model_artifact
from shopml.models.sasrec import SASRec, SASRecConfig

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 90
N_ITEMS = 20_000
MAX_IN_FLIGHT = 8
BODY_TIMEOUT_S = 1.5
EMAIL = "alice@example.com"


def write_catalog_artifact(path: Path) -> Path:
    """A seeded, untrained SASRec over ``N_ITEMS`` items (item ids ``i<index>``)."""
    torch.manual_seed(0)
    config = SASRecConfig(
        n_items=N_ITEMS, max_seq_len=50, hidden_size=64, n_heads=2, n_layers=2
    )
    items = pd.DataFrame(
        {
            "index": np.arange(1, N_ITEMS + 1),
            "item_id": [f"i{i}" for i in range(1, N_ITEMS + 1)],
            "title": [f"Product {i}" for i in range(1, N_ITEMS + 1)],
        }
    )
    popularity = np.arange(N_ITEMS + 1, dtype=np.float32)
    save_model_artifact(path, SASRec(config), items, popularity)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """A server with a small in-flight limit and a short body deadline."""
    root = tmp_path_factory.mktemp("abuse-server")
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("SHOPML_")]:
            patch.delenv(name)
        patch.setenv("SHOPML_HOME", str(root / "home"))
        deployment = deploy_local(
            write_catalog_artifact(root / "model"),
            use_feature_store=False,
            timeout_s=START_TIMEOUT_S,
            extra_args=[
                "--max-in-flight", str(MAX_IN_FLIGHT),
                "--body-timeout-s", str(BODY_TIMEOUT_S),
                "--max-body-bytes", str(512 * 1024),
            ],
        )  # fmt: skip
    try:
        yield deployment
    finally:
        stop_local(deployment)


def heavy_explain_body(seed: int) -> dict[str, Any]:
    """256 rows of 130 history ids, k=100: about 330 KB, a heavy valid request."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, N_ITEMS + 1, size=(256, 130))
    return {
        "instances": [{"item_ids": [f"i{i}" for i in row], "k": 100} for row in rows]
    }


def health_latencies(url: str, stop: threading.Event) -> list[float]:
    """Seconds each readiness probe took, polled every 50 ms until ``stop``."""
    latencies = []
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            started = time.monotonic()
            response = client.get(f"{url}/v2/health/ready")
            latencies.append(time.monotonic() - started)
            assert response.status_code == 200
            time.sleep(0.05)
    return latencies


@pytest.mark.timeout(180)
def test_heavy_explains_do_not_stall_health_checks(served: LocalDeployment) -> None:
    bodies = [heavy_explain_body(seed) for seed in range(MAX_IN_FLIGHT)]
    stop = threading.Event()

    def explain(body: dict[str, Any]) -> int:
        response = httpx.post(f"{served.endpoint}:explain", json=body, timeout=120)
        return response.status_code

    with ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT + 1) as pool:
        probes = pool.submit(health_latencies, served.url, stop)
        time.sleep(0.2)
        started = time.monotonic()
        statuses = list(pool.map(explain, bodies))
        explain_s = time.monotonic() - started
        stop.set()
        latencies = probes.result()

    assert statuses == [200] * MAX_IN_FLIGHT
    # The probes must have run while the explains did, and none may wait long.
    assert len(latencies) >= 5, (latencies, explain_s)
    assert max(latencies) < 0.5, (sorted(latencies)[-5:], explain_s)
    print(f"health max {max(latencies):.3f} s, explains {explain_s:.2f} s")


def slow_client(port: int, path: str) -> socket.socket:
    """A socket that sent headers announcing 1000 bytes of body, then only 6."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        '{"ins'.encode("ascii")
        + b"t"
    )
    return sock


@pytest.mark.timeout(60)
def test_clients_withholding_their_body_hold_no_slot_and_get_408(
    served: LocalDeployment,
) -> None:
    path = "/v1/models/recommender:predict"
    slow = [slow_client(served.port, path) for _ in range(4 * MAX_IN_FLIGHT)]
    try:
        time.sleep(0.3)  # every slow request reached the server and waits for bytes
        predicted = httpx.post(
            f"{served.endpoint}:predict",
            json={"instances": [{"item_ids": ["i1"], "k": 3}]},
            timeout=10,
        )
        started = time.monotonic()
        answers = [sock.recv(200) for sock in slow]
        waited_s = time.monotonic() - started
    finally:
        for sock in slow:
            sock.close()

    assert predicted.status_code == 200, predicted.text
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers), answers[0]
    assert waited_s < BODY_TIMEOUT_S + 2


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("UINT8", 300),
        ("INT8", -200),
        ("INT16", 70000),
        ("INT32", 2**40),
        ("UINT64", -1),
    ],
)
def test_v2_k_outside_its_datatype_is_a_400_naming_input_and_datatype(
    served: LocalDeployment, datatype: str, value: int
) -> None:
    body = {
        "inputs": [
            {"name": "item_ids", "shape": [1], "datatype": "BYTES", "data": ["i1"]},
            {"name": "k", "shape": [1], "datatype": datatype, "data": [value]},
        ]
    }

    response = httpx.post(f"{served.url}/v2/models/recommender/infer", json=body)

    assert response.status_code == 400, response.text
    assert f"input 'k' ({datatype})" in response.json()["error"]
    assert "Traceback" not in served.log_path.read_text()


def test_error_bodies_and_log_never_echo_client_text(served: LocalDeployment) -> None:
    v2_k_text = {
        "inputs": [
            {"name": "item_ids", "shape": [1], "datatype": "BYTES", "data": ["i1"]},
            {"name": "k", "shape": [1], "datatype": "INT32", "data": [EMAIL]},
        ]
    }
    invalid_v2 = {"inputs": [{"name": EMAIL, "datatype": "BYTES", "data": [EMAIL]}]}
    v1_body = {"instances": [{"item_ids": ["i1"]}]}

    responses = {
        "k": httpx.post(f"{served.url}/v2/models/recommender/infer", json=v2_k_text),
        "v1_name": httpx.post(f"{served.url}/v1/models/{EMAIL}:predict", json=v1_body),
        "v2_name": httpx.post(f"{served.url}/v2/models/{EMAIL}/infer", json=v2_k_text),
        "v2_meta": httpx.get(f"{served.url}/v2/models/{EMAIL}"),
        "422": httpx.post(f"{served.url}/v2/models/recommender/infer", json=invalid_v2),
    }

    statuses = {name: response.status_code for name, response in responses.items()}
    assert statuses == {
        "k": 400,
        "v1_name": 404,
        "v2_name": 404,
        "v2_meta": 404,
        "422": 422,
    }
    for name, response in responses.items():
        assert EMAIL not in response.text, (name, response.text)
        assert "alice" not in response.text, (name, response.text)
    assert "must be an integer, got str" in responses["k"].json()["error"]
    assert "no such model" in responses["v1_name"].json()["error"]
    detail = responses["422"].json()["detail"]
    assert {"loc", "type", "msg"} == set(detail[0]), detail
    assert ["body", "InferenceRequest", "inputs", 0, "shape"] in [
        error["loc"] for error in detail
    ]
    log = served.log_path.read_text()
    assert "alice" not in log
