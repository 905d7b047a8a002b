"""The recommender predictor: a KServe ``Model`` ranking items with a SASRec artifact.

The request stages are KServe's: ``preprocess`` parses the v1 or v2 body into
:class:`~serving.protocol.RecommendationQuery` rows (:mod:`serving.protocol` describes
both protocols), ``predict`` reads user histories from the online feature store and
ranks every row (:mod:`serving.ranking`), ``postprocess`` writes the v1 or v2 response.
Raw user ids are pseudonymized before the feature lookup and never logged.

Business filters: ``exclude_item_ids`` and ``exclude_categories`` remove items from the
ranking; categories come from the catalog given to the server. ``"explain": true`` on a
v1 row, or the v1 ``:explain`` route, adds ``explanations``: for each recommended item,
the history items whose embeddings are most similar to it (the dot product the model's
scores are built from).

The online-store lookup has a deadline (``lookup_timeout_s``) and runs on a thread of its
own, awaited by the request; when the store is down or late, the user's row is ranked
by popularity, marked ``"degraded": true`` (v1), counted in
``shopml_recommender_fallbacks_total`` and logged as a warning. Ranking is then CPU work
alone: rows of concurrent requests are ranked together, inline on the event loop
while the batch is cheap (``INLINE_MAX_COST``, :func:`rank_cost`), on the batcher's
thread otherwise, so that health checks keep answering under heavy requests
(:class:`serving.batching.MicroBatcher` says why). Latency per stage, fallbacks and
errors are Prometheus metrics on ``/metrics``.

The names of :mod:`serving.protocol` and :mod:`serving.ranking` stay importable from
here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kserve import Model
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferRequest, InferResponse
from prometheus_client import Counter, Histogram

from serving.batching import DEFAULT_MAX_WAIT_MS, BatchStats, MicroBatcher
from serving.protocol import (
    DEFAULT_K,
    FILTER_FIELDS,
    MAX_K,
    MAX_LIST_ITEMS,
    MAX_ROWS,
    QUERY_FIELDS,
    V1_FIELDS,
    V2_DATATYPES,
    V2_INPUTS,
    Recommendation,
    RecommendationQuery,
    RecommendationRequest,
    RecommendationResult,
    parse_k,
    parse_v1_body,
    parse_v2_request,
    shown_datatype,
    shown_names,
    shown_value,
    v1_prediction,
    v2_response,
)
from serving.ranking import EXPLAIN_TOP_N, explain_items, item_scorer, rank_items
from shopml.artifact import ArtifactError, ModelArtifact, load_model_artifact
from shopml.online_features import (
    FeatureStoreUnavailable,
    OnlineFeatureClient,
    UserFeatures,
)
from shopml.security import Pseudonymizer

__all__ = [
    "DEFAULT_K",
    "DEFAULT_LOOKUP_TIMEOUT_S",
    "EXPLAIN_TOP_N",
    "FILTER_FIELDS",
    "MAX_K",
    "MAX_LIST_ITEMS",
    "MAX_ROWS",
    "QUERY_FIELDS",
    "V1_FIELDS",
    "V2_DATATYPES",
    "V2_INPUTS",
    "Recommendation",
    "RecommendationQuery",
    "RecommendationRequest",
    "RecommendationResult",
    "RecommenderModel",
    "explain_items",
    "parse_k",
    "parse_v1_body",
    "parse_v2_request",
    "rank_items",
    "shown_datatype",
    "shown_names",
    "shown_value",
]

logger = logging.getLogger(__name__)

# Seconds a user-history lookup may take before the row falls back to popularity.
DEFAULT_LOOKUP_TIMEOUT_S = 0.25
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
STAGE_SECONDS = Histogram(
    "shopml_recommender_stage_seconds",
    "Latency of each request stage (queue, feature_lookup, rank, explain).",
    ["model", "stage"],
    buckets=_STAGE_BUCKETS,
)
BATCH_ROWS = Histogram(
    "shopml_recommender_batch_rows",
    "Rows ranked together in one forward pass.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
FALLBACKS = Counter(
    "shopml_recommender_fallbacks_total",
    "User rows ranked by popularity because the online store failed or was late.",
    ["model", "reason"],
)
ERRORS = Counter(
    "shopml_recommender_errors_total",
    "Requests that failed, by kind (invalid_input: 400, inference_error: 500).",
    ["model", "kind"],
)


@dataclass(frozen=True)
class _RankRow:
    """A query with what the online store said about its user, ready to rank.

    Attributes:
        query: the row as requested.
        features: the user's serving features; ``None`` for an ``item_ids`` row.
        degraded: the user's features could not be read in time (empty stand-ins).
    """

    query: RecommendationQuery
    features: UserFeatures | None = None
    degraded: bool = False


#: Cost units a batch may take and still run on the event loop: one unit is about
#: one row's ranking of the catalog (see :func:`rank_cost`). Measured on the 100k-item
#: catalog, one thread, busy 2-core machine: 1 row 1.7 ms, 8 rows 4.9 ms, 32 rows
#: 19.7 ms, 256 rows 320 ms, 256 explained rows with k=100 555 ms. 32 keeps the usual
#: batches (``--max-batch-size`` 32 of one-row requests) inline, where they were as
#: fast as on the thread at 300 req/s; under wrk -c256 a limit of 8 sent saturated
#: batches to the thread and served 40% fewer requests (1.5-1.6k against 2.6-2.7k
#: in 5 s), the loop answering 503s while the thread fought it for the GIL.
INLINE_MAX_COST = 32.0
#: Cost of one explained (recommended item, history item) pair, in ranking rows.
_EXPLAIN_PAIR_COST = 1 / 500


def rank_cost(row: _RankRow) -> float:
    """The cost of ranking one row, in units of one plain row's ranking.

    A plain row scores the whole catalog once (~1-2 ms on the 100k-item catalog); an
    explained row also compares each of its ``k`` items with each history item and
    builds a dict per named item, which grows with ``k`` times the history.
    """
    query = row.query
    if not query.explain:
        return 1.0
    history = len(query.item_ids) if query.item_ids is not None else 50
    if row.features is not None:
        history = len(row.features.item_seq)
    return 1.0 + query.k * history * _EXPLAIN_PAIR_COST


@dataclass(frozen=True)
class _RowInput:
    """A query resolved against the model: indices, unknown ids, fallback flag."""

    history: list[int]
    unknown: list[str]
    excluded: list[int]
    degraded: bool


class RecommenderModel(Model):
    """Serves next-item recommendations from a SASRec model artifact.

    Args:
        name: the model name in the URL (``/v1/models/<name>:predict``).
        model_dir: the model artifact folder (see docs/architecture.md).
        feature_client: online store client for user histories; ``None`` serves only
            rows that carry ``item_ids``.
        pseudonymizer: maps raw user ids to the pseudonyms the online store is keyed
            by; required with a feature client.
        item_categories: item id -> category, for ``exclude_categories``; ``None``
            when the server has no catalog (such requests get 400).
        lookup_timeout_s: deadline of one online-store lookup; a late or failed
            lookup ranks the user's row by popularity.
        max_batch_size: rows that are ranked together at most (micro-batching).
        max_wait_ms: how long a request waits for others to share its batch.

    Raises:
        ValueError: a feature client without a pseudonymizer, or a timeout <= 0.
    """

    def __init__(
        self,
        name: str,
        model_dir: Path,
        feature_client: OnlineFeatureClient | None,
        pseudonymizer: Pseudonymizer | None,
        *,
        item_categories: Mapping[str, str] | None = None,
        lookup_timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S,
        max_batch_size: int = 32,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    ) -> None:
        super().__init__(name)
        if feature_client is not None and pseudonymizer is None:
            raise ValueError(
                "a feature_client needs a pseudonymizer: the online store is keyed by "
                "pseudonyms; pass load_pseudonymizer(settings)"
            )
        if lookup_timeout_s <= 0:
            raise ValueError(f"lookup_timeout_s={lookup_timeout_s} must be above 0")
        self.model_dir = Path(model_dir)
        self.feature_client = feature_client
        self.pseudonymizer = pseudonymizer
        self.item_categories = dict(item_categories) if item_categories else None
        self.lookup_timeout_s = lookup_timeout_s
        self.artifact: ModelArtifact | None = None
        self._category_items: dict[str, list[int]] = {}
        # Lookups run here so that a hung store costs a deadline, not a request.
        self._lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lookup")
        # Ranking waits on nothing: cheap batches run inline on the event loop, the
        # rest on the batcher's thread so that health checks keep answering.
        self.batcher: MicroBatcher[_RankRow, Recommendation] = MicroBatcher(
            self._rank_rows,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            on_batch=self._observe_batch,
            inline_max_cost=INLINE_MAX_COST,
            row_cost=rank_cost,
        )

    def load(self) -> bool:
        """Load and verify the artifact; the model is Ready only if that succeeds.

        Returns:
            Whether the model is ready.
        """
        try:
            self.artifact = load_model_artifact(self.model_dir)
        except (ArtifactError, OSError) as err:
            logger.error("model=%s not loaded, stays not ready: %s", self.name, err)
            self.artifact = None
            self.ready = False
            return False

        self._category_items = self._index_categories(self.artifact)
        self._warm_up_ranking(self.artifact)
        self._warm_up_feature_store()
        self.ready = True
        logger.info(
            "model=%s loaded from %s n_items=%d max_seq_len=%d feature_store=%s "
            "categories=%d",
            self.name,
            self.model_dir,
            self.artifact.config.n_items,
            self.artifact.config.max_seq_len,
            self.feature_client is not None,
            len(self._category_items),
        )
        return True

    def _index_categories(self, artifact: ModelArtifact) -> dict[str, list[int]]:
        """Category -> model indices of its items, for ``exclude_categories``."""
        by_category: dict[str, list[int]] = {}
        for item_id, category in (self.item_categories or {}).items():
            index = artifact.index_of(item_id)
            if index is not None and category:
                by_category.setdefault(category, []).append(index)
        return by_category

    def _warm_up_ranking(self, artifact: ModelArtifact) -> None:
        """Cache the item table and rank once, so the first request pays no set-up."""
        item_scorer(artifact)
        rank_items(artifact, [[1]], [1])

    def _warm_up_feature_store(self) -> None:
        """Read one unknown user so the registry loads now, not on the first request.

        A store that cannot be read is not fatal: requests degrade to popularity.
        """
        if self.feature_client is None:
            return
        started = time.monotonic()
        try:
            self.feature_client.serving_features_batch(["u_warmup"])
        except FeatureStoreUnavailable as err:
            logger.warning("model=%s online store not readable yet: %s", self.name, err)
            return
        logger.info(
            "model=%s online store reachable seconds=%.2f",
            self.name,
            time.monotonic() - started,
        )

    def start(self) -> None:
        """Keep readiness as ``load`` left it (KServe's default sets it to True)."""

    def validate(self, payload: Any) -> Any:
        """Return the payload: ``preprocess`` already validated it while parsing."""
        return payload

    def preprocess(
        self,
        payload: dict[str, Any] | InferRequest | bytes,
        headers: dict[str, str] | None = None,
    ) -> RecommendationRequest:
        """Parse a v1 body or a v2 request into rows.

        Args:
            payload: the decoded v1 JSON body, or the v2 ``InferRequest``.
            headers: request headers (lower-case names).

        Returns:
            The parsed request.

        Raises:
            InvalidInput: the body does not follow the protocol (see module docstring).
        """
        headers = headers or {}
        try:
            if isinstance(payload, InferRequest):
                request_id = (
                    payload.id or headers.get("x-request-id") or uuid.uuid4().hex
                )
                queries = parse_v2_request(payload)
                self._check_filters(queries)
                return RecommendationRequest("v2", request_id, queries)
            queries = parse_v1_body(payload, headers.get("content-type"))
            self._check_filters(queries)
        except InvalidInput:
            ERRORS.labels(model=self.name, kind="invalid_input").inc()
            raise
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        return RecommendationRequest("v1", request_id, queries)

    def _check_filters(self, queries: Sequence[RecommendationQuery]) -> None:
        if self.item_categories is None and any(q.exclude_categories for q in queries):
            raise InvalidInput(
                f"exclude_categories needs item categories, and model {self.name} was "
                "started without a catalog (python -m serving --catalog FILE)"
            )

    async def predict(
        self, payload: RecommendationRequest, headers: dict[str, str] | None = None
    ) -> RecommendationResult:
        """Rank items for every row; rows of concurrent requests share one pass.

        Args:
            payload: the parsed request from ``preprocess``.
            headers: request headers (unused).

        Returns:
            One recommendation per row.

        Raises:
            InferenceError: the model is not loaded, or a ``user_id`` row reached a
                server that runs without a feature store.
        """
        try:
            self._loaded_artifact()
            started = time.perf_counter()
            features, degraded = await self.lookup_users_async(
                _raw_user_ids(payload.queries)
            )
            self._observe_stage("feature_lookup", started)
            rows = _rank_rows_of(payload.queries, features, degraded)
            recommendations = await self.batcher.submit(rows)
        except InferenceError:
            ERRORS.labels(model=self.name, kind="inference_error").inc()
            raise
        logger.debug(
            "model=%s request_id=%s rows=%d users=%d degraded=%d",
            self.name,
            payload.request_id,
            len(payload.queries),
            len(features),
            sum(rec.degraded for rec in recommendations),
        )
        return RecommendationResult(payload, recommendations)

    async def explain(
        self, payload: RecommendationRequest, headers: dict[str, str] | None = None
    ) -> RecommendationResult:
        """KServe's v1 ``:explain`` route: predict with explanations on every row.

        Args:
            payload: the parsed request from ``preprocess``.
            headers: request headers (unused).

        Returns:
            One recommendation per row, each with its explanations.
        """
        queries = [replace(query, explain=True) for query in payload.queries]
        return await self.predict(replace(payload, queries=queries), headers)

    def postprocess(
        self,
        result: RecommendationResult,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        """Write the response in the protocol of the request.

        Args:
            result: the request and its recommendations.
            headers: request headers (unused).
            response_headers: response headers (unused).

        Returns:
            ``{"predictions": [...]}`` for v1, an ``InferResponse`` for v2.
        """
        if result.request.protocol == "v2":
            return v2_response(result, self.name)
        return {"predictions": [v1_prediction(rec) for rec in result.recommendations]}

    def recommend(self, queries: Sequence[RecommendationQuery]) -> list[Recommendation]:
        """Rank items for each query, reading user histories on the way (blocking).

        ``predict`` does the same without blocking the event loop on the store.

        Args:
            queries: the rows.

        Returns:
            One recommendation per query, in order.

        Raises:
            InferenceError: the model is not loaded, or a ``user_id`` row reached a
                server that runs without a feature store.
        """
        self._loaded_artifact()
        started = time.perf_counter()
        features, degraded = self.lookup_users(_raw_user_ids(queries))
        self._observe_stage("feature_lookup", started)
        return self._rank_rows(_rank_rows_of(queries, features, degraded))

    def _loaded_artifact(self) -> ModelArtifact:
        if self.artifact is None:
            raise InferenceError(
                f"model {self.name} is not loaded from {self.model_dir}; "
                "call load() first"
            )
        return self.artifact

    def _rank_rows(self, rows: Sequence[_RankRow]) -> list[Recommendation]:
        """Rank every row in one forward pass (the batch function)."""
        artifact = self._loaded_artifact()
        started = time.perf_counter()
        resolved = [self._resolve_row(artifact, row) for row in rows]
        ranked = rank_items(
            artifact,
            [row.history for row in resolved],
            [row.query.k for row in rows],
            [row.excluded for row in resolved],
        )
        self._observe_stage("rank", started)

        started = time.perf_counter()
        recommendations = [
            self._recommendation(artifact, row.query, inputs, items, scores)
            for row, inputs, (items, scores) in zip(rows, resolved, ranked, strict=True)
        ]
        if any(row.query.explain for row in rows):
            self._observe_stage("explain", started)
        return recommendations

    def _resolve_row(self, artifact: ModelArtifact, row: _RankRow) -> _RowInput:
        """History (from the request or the store) and filters as model indices."""
        query, features = row.query, row.features
        sequence = (
            features.item_seq if features is not None else list(query.item_ids or ())
        )
        seen_items = [] if features is None else features.seen_items
        indices = [artifact.index_of(item_id) for item_id in sequence]
        # Everything the user ever had stays out, not only the model's window.
        excluded = [
            index
            for index in map(artifact.index_of, [*query.exclude_item_ids, *seen_items])
            if index is not None
        ]
        for category in query.exclude_categories:
            excluded += self._category_items.get(category, [])
        return _RowInput(
            history=[index for index in indices if index is not None],
            unknown=[i for i, x in zip(sequence, indices, strict=True) if x is None],
            excluded=excluded,
            degraded=row.degraded,
        )

    def _recommendation(
        self,
        artifact: ModelArtifact,
        query: RecommendationQuery,
        row: _RowInput,
        items: list[int],
        scores: list[float],
    ) -> Recommendation:
        explanations = None
        if query.explain:
            explanations = [
                [
                    {
                        "item_id": artifact.item_ids[index],
                        "title": artifact.titles[index],
                        "similarity": similarity,
                    }
                    for index, similarity in contributions
                ]
                for contributions in explain_items(artifact, row.history, items)
            ]
        return Recommendation(
            item_ids=[artifact.item_ids[index] for index in items],
            titles=[artifact.titles[index] for index in items],
            scores=scores,
            # Only ids the caller sent are reported back, never a user's history.
            unknown_item_ids=row.unknown if query.item_ids is not None else [],
            degraded=row.degraded,
            explanations=explanations,
        )

    def lookup_users(self, raw_user_ids: list[str]) -> tuple[list[UserFeatures], bool]:
        """Pseudonymize raw ids and read their serving features in one online request.

        Blocks the caller until the store answers or ``lookup_timeout_s`` passes.

        Returns:
            The users' recent sequences and seen items, and whether they are empty
            stand-ins because the store failed or missed its deadline (the rows are then
            ranked by popularity).

        Raises:
            InferenceError: the server runs without a feature store.
        """
        if not raw_user_ids:
            return [], False
        client, pseudonyms = self._store_request(raw_user_ids)
        lookup = self._lookups.submit(client.serving_features_batch, pseudonyms)
        try:
            return lookup.result(timeout=self.lookup_timeout_s), False
        except FeatureStoreUnavailable as err:
            reason, detail = "store_unavailable", str(err)
        except FutureTimeout:
            lookup.cancel()
            reason = "store_timeout"
            detail = f"no answer within {self.lookup_timeout_s:.3f} s"
        return self._degrade(reason, detail, len(pseudonyms)), True

    async def lookup_users_async(
        self, raw_user_ids: list[str]
    ) -> tuple[list[UserFeatures], bool]:
        """:meth:`lookup_users` for the event loop: the request awaits the store.

        Raises:
            InferenceError: the server runs without a feature store.
        """
        if not raw_user_ids:
            return [], False
        client, pseudonyms = self._store_request(raw_user_ids)
        lookup = asyncio.get_running_loop().run_in_executor(
            self._lookups, client.serving_features_batch, pseudonyms
        )
        try:
            return await asyncio.wait_for(lookup, self.lookup_timeout_s), False
        except FeatureStoreUnavailable as err:
            reason, detail = "store_unavailable", str(err)
        except TimeoutError:
            reason = "store_timeout"
            detail = f"no answer within {self.lookup_timeout_s:.3f} s"
        return self._degrade(reason, detail, len(pseudonyms)), True

    def _store_request(
        self, raw_user_ids: list[str]
    ) -> tuple[OnlineFeatureClient, list[str]]:
        """The store client and the users' pseudonyms (raw ids never leave here)."""
        if self.feature_client is None or self.pseudonymizer is None:
            raise InferenceError(
                f"model {self.name} runs without a feature store (--no-feature-store), "
                "so it cannot look up user_id rows; send item_ids instead"
            )
        pseudonymize = self.pseudonymizer.pseudonymize
        return self.feature_client, [pseudonymize(user) for user in raw_user_ids]

    def _degrade(self, reason: str, detail: str, users: int) -> list[UserFeatures]:
        """Count and log a failed lookup; empty histories rank by popularity."""
        FALLBACKS.labels(model=self.name, reason=reason).inc(users)
        logger.warning(
            "degraded model=%s reason=%s users=%d ranked by popularity: %s",
            self.name,
            reason,
            users,
            detail,
        )
        return [UserFeatures([], {}) for _ in range(users)]

    def _observe_stage(self, stage: str, started: float) -> None:
        STAGE_SECONDS.labels(self.name, stage).observe(time.perf_counter() - started)

    def _observe_batch(self, stats: BatchStats) -> None:
        BATCH_ROWS.labels(model=self.name).observe(stats.rows)
        STAGE_SECONDS.labels(self.name, "queue").observe(stats.queue_s)


def _raw_user_ids(queries: Sequence[RecommendationQuery]) -> list[str]:
    """The raw user ids of the ``user_id`` rows, in row order."""
    return [query.user_id for query in queries if query.user_id is not None]


def _rank_rows_of(
    queries: Sequence[RecommendationQuery],
    features: Sequence[UserFeatures],
    degraded: bool,
) -> list[_RankRow]:
    """Pair each ``user_id`` row with its features (``features`` in row order)."""
    user_features = iter(features)
    return [
        _RankRow(query)
        if query.user_id is None
        else _RankRow(query, next(user_features), degraded)
        for query in queries
    ]
