"""Serving additions in-process: micro-batching, filters, explanations, request limits.

Uses the tiny seeded artifact of ``test_recommender``; requests go through KServe's
``Model.__call__`` as the server runs them.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest

from serving.admission import AdmissionMiddleware, is_inference_path
from serving.batching import BatchStats, MicroBatcher
from serving.recommender import (
    MAX_LIST_ITEMS,
    MAX_ROWS,
    RecommenderModel,
    explain_items,
    rank_items,
)
from tests.unit.test_recommender import item_id, write_tiny_artifact


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_artifact(tmp_path_factory.mktemp("artifact") / "model")


@pytest.fixture(scope="module")
def model(artifact_dir: Path) -> RecommenderModel:
    categories = {item_id(i): "even" if i % 2 == 0 else "odd" for i in range(1, 31)}
    recommender = RecommenderModel(
        "recommender", artifact_dir, None, None, item_categories=categories
    )
    assert recommender.load() is True
    return recommender


def call(model: RecommenderModel, body: Any, verb: str = "predict") -> Any:
    from kserve.model import InferenceVerb

    chosen = InferenceVerb.EXPLAIN if verb == "explain" else InferenceVerb.PREDICT
    response, _ = asyncio.run(model(body, headers={}, verb=chosen))
    return response


# --- micro-batching ---------------------------------------------------------------


def test_concurrent_requests_share_one_batch_in_order() -> None:
    calls: list[list[int]] = []
    stats: list[BatchStats] = []

    def double(rows: list[int]) -> list[int]:
        calls.append(rows)
        return [2 * row for row in rows]

    batcher = MicroBatcher(
        double, max_batch_size=64, max_wait_ms=50, on_batch=stats.append
    )

    async def burst() -> list[list[int]]:
        return await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(5)))

    results = asyncio.run(burst())

    assert results == [[2 * i, 2 * (i + 100)] for i in range(5)]
    assert len(calls) == 1
    assert stats[0].requests == 5
    assert stats[0].rows == 10


def test_a_failing_request_does_not_fail_its_batch_neighbours() -> None:
    def reject_negative(rows: list[int]) -> list[int]:
        if any(row < 0 for row in rows):
            raise ValueError(f"negative row in {rows}")
        return rows

    batcher = MicroBatcher(reject_negative, max_batch_size=64, max_wait_ms=50)

    async def burst() -> list[Any]:
        results = await asyncio.gather(
            batcher.submit([1]),
            batcher.submit([-1]),
            batcher.submit([3]),
            return_exceptions=True,
        )
        return list(results)

    first, failed, third = asyncio.run(burst())

    assert first == [1]
    assert third == [3]
    assert isinstance(failed, ValueError)
    assert "negative row in [-1]" in str(failed)


@pytest.mark.parametrize(
    ("inline_max_cost", "rows", "inline"),
    [(0, [1], False), (4, [1], True), (4, [1, 2, 3, 4], True), (4, [1] * 5, False)],
)
def test_batches_run_inline_only_up_to_their_cost_limit(
    inline_max_cost: float, rows: list[int], inline: bool
) -> None:
    threads: list[str] = []

    def record(batch: list[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        return batch

    batcher = MicroBatcher(record, max_wait_ms=0, inline_max_cost=inline_max_cost)
    asyncio.run(batcher.submit(rows))

    on_loop_thread = threads[0] == threading.current_thread().name
    assert on_loop_thread is inline


def test_row_cost_sends_one_costly_row_to_the_worker_thread() -> None:
    threads: list[str] = []

    def record(batch: list[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        return batch

    batcher = MicroBatcher(record, max_wait_ms=0, inline_max_cost=8, row_cost=float)

    async def one_by_one() -> None:
        await batcher.submit([2])
        await batcher.submit([9])

    asyncio.run(one_by_one())

    loop_thread = threading.current_thread().name
    assert [name == loop_thread for name in threads] == [True, False]


def test_inline_batcher_batches_requests_that_queue_together() -> None:
    calls: list[list[int]] = []

    def record(rows: list[int]) -> list[int]:
        calls.append(rows)
        return [-row for row in rows]

    batcher = MicroBatcher(record, max_wait_ms=0, inline_max_cost=8)

    async def burst() -> list[list[int]]:
        return await asyncio.gather(*(batcher.submit([i]) for i in range(4)))

    assert asyncio.run(burst()) == [[0], [-1], [-2], [-3]]
    assert calls == [[0, 1, 2, 3]]


def test_batcher_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_batch_size=0 must be at least 1"):
        MicroBatcher(list, max_batch_size=0)
    with pytest.raises(ValueError, match="inline_max_cost=-1 must be 0 or more"):
        MicroBatcher(list, inline_max_cost=-1)


def test_model_batches_rows_of_concurrent_requests(model: RecommenderModel) -> None:
    async def burst() -> list[Any]:
        bodies = [{"instances": [{"item_ids": [item_id(i)], "k": 3}]} for i in (1, 2)]
        return await asyncio.gather(*(model(body, headers={}) for body in bodies))

    (first, _), (second, _) = asyncio.run(burst())
    alone = call(model, {"instances": [{"item_ids": [item_id(2)], "k": 3}]})

    assert second["predictions"][0]["item_ids"] == alone["predictions"][0]["item_ids"]
    assert item_id(1) not in first["predictions"][0]["item_ids"]


# --- business filters ---------------------------------------------------------------


def test_excluded_items_and_categories_never_come_back(model: RecommenderModel) -> None:
    body = {
        "instances": [
            {"item_ids": [], "k": 5, "exclude_item_ids": [item_id(30), "nope"]},
            {"item_ids": [], "k": 5, "exclude_categories": ["even"]},
        ]
    }

    by_item, by_category = call(model, body)["predictions"]

    # Popularity equals the index: 30 is the best, so it is the one to miss.
    assert by_item["item_ids"] == [item_id(i) for i in (29, 28, 27, 26, 25)]
    assert by_category["item_ids"] == [item_id(i) for i in (29, 27, 25, 23, 21)]


def test_v2_filters_apply_to_every_row(model: RecommenderModel) -> None:
    request = InferRequest(
        "recommender",
        [
            InferInput("item_ids", [2, 1], "BYTES", ["", ""]),
            InferInput("k", [1], "INT32", [2]),
            InferInput("exclude_item_ids", [1], "BYTES", [item_id(30)]),
        ],
        request_id="r",
    )

    response = call(model, request)

    items = {output.name: output.as_numpy() for output in response.outputs}["item_ids"]
    assert items.tolist() == [[item_id(29), item_id(28)]] * 2


def test_rank_items_excludes_given_indices(artifact_dir: Path) -> None:
    from shopml.artifact import load_model_artifact

    artifact = load_model_artifact(artifact_dir)

    [(items, _)] = rank_items(artifact, [[]], [3], excluded=[[30, 28]])

    assert items == [29, 27, 26]


def test_rank_items_pads_to_the_longest_history_with_the_same_scores(
    artifact_dir: Path,
) -> None:
    import torch

    from shopml.artifact import load_model_artifact
    from shopml.models.sasrec import left_pad

    artifact = load_model_artifact(artifact_dir)
    histories = [[3, 7], [1, 4, 9, 12, 5], [8]]
    with torch.inference_mode():
        full = artifact.model.full_sort_scores(
            left_pad(histories, artifact.config.max_seq_len)  # [3, 20]
        )

    ranked = rank_items(artifact, histories, [5, 5, 5])

    for row, history in enumerate(histories):
        expected = full[row].clone()
        expected[[0, *history]] = float("-inf")
        top = torch.topk(expected, 5)
        items, scores = ranked[row]
        assert items == top.indices.tolist()
        assert scores == pytest.approx(top.values.tolist(), abs=1e-5)


def test_batched_rows_rank_as_each_row_alone(artifact_dir: Path) -> None:
    # One row is multiplied by torch, two or more by numpy: the answers must agree.
    from shopml.artifact import load_model_artifact

    artifact = load_model_artifact(artifact_dir)
    histories = [[3, 7], [], [1, 4, 9, 12, 5], [8]]
    ks = [4, 6, 5, 3]

    batched = rank_items(artifact, histories, ks, excluded=[[], [2], [], [30]])
    alone = [
        rank_items(artifact, [history], [k], excluded=[blocked])[0]
        for history, k, blocked in zip(histories, ks, [[], [2], [], [30]], strict=True)
    ]

    for (items, scores), (alone_items, alone_scores) in zip(
        batched, alone, strict=True
    ):
        assert items == alone_items
        assert scores == pytest.approx(alone_scores, abs=1e-5)
    assert [len(items) for items, _ in batched] == ks
    assert 2 not in batched[1][0] and 30 not in batched[3][0]


def test_item_scorer_is_built_once_per_artifact(artifact_dir: Path) -> None:
    from serving.ranking import item_scorer
    from shopml.artifact import load_model_artifact

    artifact = load_model_artifact(artifact_dir)
    other = load_model_artifact(artifact_dir)

    assert item_scorer(artifact) is item_scorer(artifact)
    assert item_scorer(other) is not item_scorer(artifact)
    assert item_scorer(artifact).table.shape == (31, 32)  # [N, H]


def test_empty_history_rows_rank_by_popularity_beside_model_rows(
    artifact_dir: Path,
) -> None:
    from shopml.artifact import load_model_artifact

    artifact = load_model_artifact(artifact_dir)
    expected = [int(i) for i in np.argsort(-artifact.popularity[1:], kind="stable")[:5]]

    [(_, _), (items, scores)] = rank_items(artifact, [[3], []], [5, 5])

    assert items == [index + 1 for index in expected]
    assert scores == pytest.approx(
        [float(artifact.popularity[i]) for i in items], abs=1e-6
    )


def test_category_filter_without_catalog_is_a_400(artifact_dir: Path) -> None:
    plain = RecommenderModel("recommender", artifact_dir, None, None)
    assert plain.load()

    with pytest.raises(InvalidInput, match="started without a catalog"):
        call(plain, {"instances": [{"item_ids": [], "exclude_categories": ["x"]}]})


# --- explanations -------------------------------------------------------------------


def test_explanations_are_the_most_similar_history_items(artifact_dir: Path) -> None:
    from shopml.artifact import load_model_artifact

    artifact = load_model_artifact(artifact_dir)
    history, items = [1, 2, 3, 4, 5], [10, 20]
    weight = artifact.model.item_embedding.weight.detach()

    explained = explain_items(artifact, history, items, top_n=2)

    for item, contributions in zip(items, explained, strict=True):
        expected = sorted(history, key=lambda h: float(weight[item] @ weight[h]))[::-1]
        assert [index for index, _ in contributions] == expected[:2]
        assert contributions[0][1] == pytest.approx(
            float(weight[item] @ weight[expected[0]]), rel=1e-5
        )
    assert explain_items(artifact, [], items) == [[], []]


def test_explain_verb_adds_explanations_predict_does_not(
    model: RecommenderModel,
) -> None:
    body = {"instances": [{"item_ids": [item_id(1), item_id(2)], "k": 2}]}

    [explained] = call(model, body, verb="explain")["predictions"]
    [predicted] = call(model, body)["predictions"]
    [asked] = call(model, {"instances": [{**body["instances"][0], "explain": True}]})[
        "predictions"
    ]

    assert "explanations" not in predicted
    assert explained["item_ids"] == predicted["item_ids"]
    assert asked["explanations"] == explained["explanations"]
    assert [len(c) for c in explained["explanations"]] == [2, 2]
    assert {c["item_id"] for c in explained["explanations"][0]} == {
        item_id(1),
        item_id(2),
    }


# --- request limits -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            {"instances": [{"item_ids": []}] * (MAX_ROWS + 1)},
            f"has {MAX_ROWS + 1} rows; at most {MAX_ROWS}",
            id="rows",
        ),
        pytest.param(
            {"instances": [{"item_ids": ["1"] * (MAX_LIST_ITEMS + 1)}]},
            rf"instances\[0\].item_ids has {MAX_LIST_ITEMS + 1} ids",
            id="history",
        ),
        pytest.param(
            {"instances": [{"item_ids": [], "explain": "yes"}]},
            r"instances\[0\].explain must be true or false",
            id="explain-type",
        ),
        pytest.param(
            {"instances": [{"item_ids": [], "exclude_item_ids": "101"}]},
            r"exclude_item_ids must be a list of item id strings",
            id="filter-type",
        ),
    ],
)
def test_oversized_or_malformed_rows_are_invalid_input(
    model: RecommenderModel, body: dict[str, Any], expected: str
) -> None:
    with pytest.raises(InvalidInput, match=expected):
        call(model, body)


def test_admission_knows_inference_routes() -> None:
    assert is_inference_path("/v1/models/recommender:predict")
    assert is_inference_path("/v1/models/recommender:explain")
    assert is_inference_path("/v2/models/recommender/infer")
    assert not is_inference_path("/v2/health/ready")
    assert not is_inference_path("/metrics")


def test_admission_sheds_beyond_its_limit_and_never_health() -> None:
    gate = asyncio.Event()
    sent: list[tuple[str, int]] = []

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await gate.wait()

    async def run() -> None:
        middleware = AdmissionMiddleware(slow_app, max_in_flight=1)

        async def send_for(path: str) -> Any:
            async def send(message: Any) -> None:
                if message["type"] == "http.response.start":
                    sent.append((path, message["status"]))

            return send

        async def request(path: str) -> None:
            scope = {"type": "http", "path": path, "headers": []}
            await middleware(scope, _no_body, await send_for(path))

        first = asyncio.create_task(request("/v1/models/m:predict"))
        await asyncio.sleep(0)
        await request("/v1/models/m:predict")  # shed at once
        health = asyncio.create_task(request("/v1/models/m"))
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, health)

    asyncio.run(run())

    assert sent == [("/v1/models/m:predict", 503)]


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def test_admission_slot_is_taken_only_after_the_body_and_a_stalled_body_gets_408() -> (
    None
):
    bodies: list[bytes] = []
    statuses: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        bodies.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def stalled() -> dict[str, Any]:
        await asyncio.sleep(3600)  # headers sent, the body never completes
        return {}

    async def run() -> None:
        middleware = AdmissionMiddleware(app, max_in_flight=1, body_timeout_s=0.2)
        scope = {"type": "http", "path": "/v1/models/m:predict", "headers": []}
        slow = asyncio.create_task(middleware(scope, stalled, send))
        await asyncio.sleep(0.05)
        assert middleware.in_flight == 0
        await middleware(scope, _chunks([b'{"a"', b": 1}"]), send)  # not shed
        await slow

    asyncio.run(run())

    assert statuses == [200, 408]
    assert bodies == [b'{"a": 1}']


def _chunks(parts: list[bytes]) -> Any:
    pending = list(parts)

    async def receive() -> dict[str, Any]:
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    return receive
