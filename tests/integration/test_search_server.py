"""The ``search`` model beside the recommender in one real KServe ModelServer.

The server runs as ``python -m serving.search`` on 127.0.0.1 without a feature store
(requests send histories); it is started once for the module and stopped by the
fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from serving.recommender import RecommenderModel
from serving.search import SearchModel, build_models
from shopml.artifact import save_model_artifact
from shopml.models.sasrec import SASRec, SASRecConfig
from shopml.search import TextEncoder, build_search_index, save_search_index
from tests.services import LOOPBACK, free_port
from tests.unit.test_search import CATALOG

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny SASRec artifact over the test catalog and its search index."""
    root = tmp_path_factory.mktemp("search-server")
    catalog = pd.DataFrame(CATALOG, columns=["item_id", "title", "category", "price"])
    torch.manual_seed(0)
    config = SASRecConfig(n_items=len(catalog), max_seq_len=8, hidden_size=16,
                          n_heads=2, n_layers=1)  # fmt: skip
    items = pd.DataFrame(
        {
            "index": np.arange(1, len(catalog) + 1),
            "item_id": catalog["item_id"],
            "title": catalog["title"],
        }
    )
    popularity = np.arange(len(catalog) + 1, dtype=np.float32)
    save_model_artifact(root / "model", SASRec(config), items, popularity)
    torch.set_num_threads(1)
    save_search_index(build_search_index(catalog, TextEncoder()), root / "index")
    return root / "model", root / "index"


@pytest.fixture(scope="module")
def server(
    dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    model_dir, index_dir = dirs
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOPML_")}
    env.update(
        {"SHOPML_HOME": str(tmp_path_factory.mktemp("home")), "HF_HUB_OFFLINE": "1"}
    )
    log = (tmp_path_factory.mktemp("log") / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.search", "--model-dir", str(model_dir),
         "--index-dir", str(index_dir), "--http-port", str(port), "--no-feature-store"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://{LOOPBACK}:{port}"
    try:
        _wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode} before ready")
        try:
            if httpx.get(f"{url}/v2/models/search/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the search model is not ready after {START_TIMEOUT_S} s")


def _v1(url: str, instances: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/models/search:predict", json={"instances": instances}, timeout=30
    )


def test_both_models_are_ready_on_one_server(server: str) -> None:
    for name in ("recommender", "search"):
        assert (
            httpx.get(f"{server}/v2/models/{name}/ready", timeout=5).status_code == 200
        )


def test_v1_exact_title_comes_first(server: str) -> None:
    response = _v1(server, [{"query": "Whole Wheat Spaghetti", "k": 5}])
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    assert prediction["item_ids"][0] == "i17"
    assert prediction["titles"][0] == "Whole Wheat Spaghetti"
    assert len(prediction["item_ids"]) == 5


def test_v1_misspelling_and_category_filter(server: str) -> None:
    response = _v1(
        server,
        [
            {"query": "grek yoghurt", "k": 10},
            {"query": "strawberries", "categories": ["frozen fruits"], "k": 10},
        ],
    )
    first, second = response.json()["predictions"]
    assert "i03" in first["item_ids"]
    assert first["corrected_query"] == "greek yogurt"
    assert second["item_ids"] and set(second["categories"]) == {"frozen fruits"}


def test_v1_empty_query_answers_with_recommendations(server: str) -> None:
    response = _v1(server, [{"query": "", "item_ids": ["i09"], "k": 3}])
    prediction = response.json()["predictions"][0]
    assert prediction["fallback"] == "recommendations"
    assert len(prediction["item_ids"]) == 3


def test_v1_overlong_query_is_cut_with_a_note(server: str) -> None:
    response = _v1(server, [{"query": "olive oil " * 100, "k": 3}])
    prediction = response.json()["predictions"][0]
    assert prediction["truncated"] is True
    assert "cut from" in prediction["notes"][0]
    assert prediction["item_ids"][0] == "i16"


@pytest.mark.parametrize(
    ("instance", "message"),
    [
        ({"query": 3}, "query must be a string"),
        ({"query": "milk", "k": 0}, "between 1 and"),
        ({"query": "milk", "min_price": 5, "max_price": 1}, "above max_price"),
        ({"query": "milk", "colour": "red"}, "unknown field"),
        ({"query": "milk", "user_id": "7"}, "without a feature store"),
    ],
    ids=["query-type", "k", "price-range", "unknown-field", "user-without-store"],
)
def test_v1_bad_rows_get_400_naming_the_problem(
    server: str, instance: dict[str, Any], message: str
) -> None:
    response = _v1(server, [instance])
    assert response.status_code == 400
    assert message in response.text


def test_v2_query_with_price_filter(server: str) -> None:
    body = {
        "id": "s-1",
        "inputs": [
            {"name": "query", "shape": [2], "datatype": "BYTES",
             "data": ["water", "yogurt"]},
            {"name": "k", "shape": [1], "datatype": "INT32", "data": [4]},
            {"name": "max_price", "shape": [1], "datatype": "FP32", "data": [2.0]},
        ],
    }  # fmt: skip
    response = httpx.post(f"{server}/v2/models/search/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["item_ids"]["shape"][0] == 2
    prices = {str(row[0]): row[3] for row in CATALOG}
    returned = [prices[i] for i in outputs["item_ids"]["data"] if i]
    assert returned and all(p is not None and p <= 2.0 for p in returned)
    assert outputs["truncated"]["data"] == [False, False]


def test_search_shares_the_recommenders_artifact(dirs: tuple[Path, Path]) -> None:
    model_dir, index_dir = dirs
    recommender, search = build_models(model_dir, index_dir, None, None)
    assert isinstance(recommender, RecommenderModel)
    assert isinstance(search, SearchModel)
    assert search.engine is not None and search.engine.personalizer is not None
    personalizer = search.engine.personalizer
    assert personalizer.artifact is recommender.artifact  # type: ignore[attr-defined]
