"""The search predictor: a KServe ``Model`` named ``search`` beside the recommender.

It shares the recommender's state instead of loading its own: the SASRec model and item
embeddings come from the :class:`~serving.recommender.RecommenderModel`'s loaded
artifact (personalization and the empty-query fallback), user histories from its
online feature client and pseudonymizer. Only the search index (BM25, item vectors,
HNSW graph) and the MiniLM query encoder are its own. Both models are built in one
process and registered with one ``ModelServer``::

    recommender = RecommenderModel("recommender", model_dir, feature_client, pseudo)
    recommender.load()
    search = SearchModel("search", recommender, index_dir)
    search.load()
    server.start([recommender, search])

v1 (``POST /v1/models/search:predict``)::

    {"instances": [{"query": "greek yogurt 500ml", "k": 10, "user_id": "196",
                    "categories": ["yogurt"], "min_price": 1.0, "max_price": 5.0}]}
    -> {"predictions": [{"item_ids": [...], "titles": [...], "scores": [...],
                         "categories": [...], "prices": [...], "query": "...",
                         "corrected_query": null, "truncated": false, "notes": [],
                         "fallback": null, "personalized": true}]}

Optional row fields: ``user_id`` (raw id; history from the online store) or
``item_ids`` (the history itself), ``mode`` (hybrid, keyword, dense), ``personalize``.

v2 (``POST /v2/models/search/infer``): input ``query`` (BYTES [B]); optional
``user_id`` (BYTES [B]), ``k`` (INT32 [1] or [B]), ``category`` (BYTES [1] or [B],
``""`` for none), ``min_price`` and ``max_price`` (FP32/FP64 [1] or [B], NaN for none).
Outputs ``item_ids`` and ``titles`` (BYTES [B, K]), ``scores`` (FP32 [B, K]),
``corrected_query`` and ``fallback`` (BYTES [B]) and ``truncated`` (BOOL [B]).

Run both models in one server (what ``serving.__main__`` is expected to do)::

    python -m serving.search --model-dir DIR --index-dir DIR [--http-port 8080]
        [--host 127.0.0.1] [--no-feature-store]

Queries are logged only at DEBUG and only after :func:`shopml.pii.mask_text`, and are
answered back masked the same way; raw user ids are never logged.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kserve import Model
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import (
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
)

from serving.recommender import (
    RecommenderModel,
    parse_k,
    shown_datatype,
    shown_names,
)
from shopml.online_features import OnlineFeatureClient
from shopml.pii import mask_text
from shopml.search.encoder import TextEncoder
from shopml.search.engine import (
    MODES,
    SearchEngine,
    SearchFilters,
    SearchOptions,
    SearchResponse,
)
from shopml.search.index import SearchIndexError, load_search_index
from shopml.search.personal import SASRecPersonalizer
from shopml.security import Pseudonymizer

logger = logging.getLogger(__name__)

DEFAULT_K = 10
ROW_FIELDS = (
    "query",
    "k",
    "user_id",
    "item_ids",
    "categories",
    "min_price",
    "max_price",
    "mode",
    "personalize",
)
V2_INPUTS = ("query", "user_id", "k", "category", "min_price", "max_price")
_FLOAT_DATATYPES = {"FP16", "FP32", "FP64"}


@dataclass(frozen=True)
class SearchQuery:
    """One row of a search request.

    Attributes:
        query: the query as typed (may be empty: recommendations).
        k: results wanted.
        user_id: raw user id whose history personalizes the results; never logged.
        item_ids: a history sent with the request instead of ``user_id``.
        filters: category and price restrictions.
        mode: ``hybrid``, ``keyword`` or ``dense``.
        personalize: whether to re-rank with the history.
    """

    query: str
    k: int = DEFAULT_K
    user_id: str | None = None
    item_ids: tuple[str, ...] | None = None
    filters: SearchFilters = field(default_factory=SearchFilters)
    mode: str = "hybrid"
    personalize: bool = True


@dataclass(frozen=True)
class SearchRequest:
    """A parsed request: protocol of the answer, request id and rows."""

    protocol: str
    request_id: str
    rows: list[SearchQuery]


@dataclass(frozen=True)
class SearchResult:
    """What ``predict`` hands to ``postprocess``."""

    request: SearchRequest
    responses: list[SearchResponse]


def _price(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise InvalidInput(
            f"{name} must be a number (a price) or null, got {type(value).__name__}"
        )
    if math.isnan(float(value)):
        return None
    return float(value)


def _filters(
    categories: Any, min_price: Any, max_price: Any, where: str
) -> SearchFilters:
    if categories is None:
        categories = []
    if not isinstance(categories, list | tuple) or not all(
        isinstance(c, str) for c in categories
    ):
        raise InvalidInput(f"{where}.categories must be a list of strings")
    try:
        return SearchFilters(
            tuple(c for c in categories if c),
            _price(min_price, f"{where}.min_price"),
            _price(max_price, f"{where}.max_price"),
        )
    except ValueError as err:
        raise InvalidInput(f"{where}: {err}") from err


def _parse_row(row: int, instance: Any) -> SearchQuery:
    where = f"instances[{row}]"
    if not isinstance(instance, dict):
        raise InvalidInput(
            f"{where} must be an object with a query, got {type(instance).__name__}"
        )
    unknown = shown_names(set(instance) - set(ROW_FIELDS))
    if unknown:
        raise InvalidInput(
            f"{where} has unknown field(s) {unknown}; accepted: {ROW_FIELDS}"
        )
    query = instance.get("query", "")
    if not isinstance(query, str):
        raise InvalidInput(
            f"{where}.query must be a string, got {type(query).__name__}"
        )
    user_id = instance.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or not user_id):
        raise InvalidInput(f"{where}.user_id must be a non-empty string (raw user id)")
    item_ids = instance.get("item_ids")
    if item_ids is not None and (
        not isinstance(item_ids, list) or not all(isinstance(i, str) for i in item_ids)
    ):
        raise InvalidInput(f"{where}.item_ids must be a list of item id strings")
    if user_id is not None and item_ids is not None:
        raise InvalidInput(f"{where} has both user_id and item_ids; send one of them")
    mode = instance.get("mode", "hybrid")
    if mode not in MODES:
        raise InvalidInput(f"{where}.mode is not one of {list(MODES)}")
    personalize = instance.get("personalize", True)
    if not isinstance(personalize, bool):
        raise InvalidInput(f"{where}.personalize must be true or false")
    return SearchQuery(
        query=query,
        k=parse_k(instance.get("k", DEFAULT_K), f"{where}.k"),
        user_id=user_id,
        item_ids=tuple(i for i in item_ids if i) if item_ids is not None else None,
        filters=_filters(
            instance.get("categories"),
            instance.get("min_price"),
            instance.get("max_price"),
            where,
        ),
        mode=mode,
        personalize=personalize,
    )


def parse_v1_search(body: Any) -> list[SearchQuery]:
    """Parse a v1 body ``{"instances": [...]}`` into rows.

    Raises:
        InvalidInput: the body is not an object with a non-empty list of valid rows.
    """
    if not isinstance(body, dict) or "instances" not in body:
        shown = shown_names(body) if isinstance(body, dict) else type(body).__name__
        raise InvalidInput(
            f"the v1 body must be an object with 'instances', got {shown}; "
            'send {"instances": [{"query": "..."}]}'
        )
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("'instances' must be a non-empty list of rows")
    return [_parse_row(row, instance) for row, instance in enumerate(instances)]


def _v2_column(infer_input: InferInput | None, n_rows: int, kind: str) -> list[Any]:
    """Values of an optional v2 input of shape [1] (all rows) or [B]."""
    if infer_input is None:
        return [None] * n_rows
    name = infer_input.name
    allowed = {"BYTES"} if kind == "str" else _FLOAT_DATATYPES
    if infer_input.datatype not in allowed:
        raise InvalidInput(
            f"input '{name}' has datatype {shown_datatype(infer_input.datatype)}; "
            f"use {sorted(allowed)}"
        )
    try:
        values = infer_input.as_numpy().reshape(-1).tolist()
    except (ValueError, TypeError, OverflowError) as err:
        # numpy's message may quote the data (a client's text): not passed on.
        raise InvalidInput(
            f"input '{name}' ({shown_datatype(infer_input.datatype)}) data does not "
            f"fit its datatype and shape {infer_input.shape}"
        ) from err
    if len(values) not in {1, n_rows}:
        raise InvalidInput(
            f"input '{name}' has {len(values)} values; it must have 1 or {n_rows}"
        )
    if kind == "str":
        values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
    return values * n_rows if len(values) == 1 else values


def parse_v2_search(request: InferRequest) -> list[SearchQuery]:
    """Parse a v2 request into rows (see the module docstring).

    Raises:
        InvalidInput: unknown or missing inputs, wrong datatypes or shapes.
    """
    inputs = {i.name: i for i in request.inputs}
    unknown = shown_names(set(inputs) - set(V2_INPUTS))
    if unknown:
        raise InvalidInput(f"unknown input(s) {unknown}; accepted inputs: {V2_INPUTS}")
    if "query" not in inputs:
        raise InvalidInput(
            f"input 'query' (BYTES [B]) is missing; got {sorted(inputs)}"
        )
    try:
        n_rows = inputs["query"].as_numpy().size
    except (ValueError, TypeError, OverflowError) as err:
        raise InvalidInput(
            f"input 'query' data does not fit its shape {inputs['query'].shape}"
        ) from err
    if n_rows == 0:
        raise InvalidInput("input 'query' is empty; it must be BYTES [B] with B >= 1")
    queries = _v2_column(inputs["query"], n_rows, "str")
    users = _v2_column(inputs.get("user_id"), n_rows, "str")
    categories = _v2_column(inputs.get("category"), n_rows, "str")
    lows = _v2_column(inputs.get("min_price"), n_rows, "float")
    highs = _v2_column(inputs.get("max_price"), n_rows, "float")
    ks = _v2_ks(inputs.get("k"), n_rows)
    return [
        SearchQuery(
            query=str(queries[row]),
            k=ks[row],
            user_id=users[row] or None,
            filters=_filters(
                [categories[row]] if categories[row] else [],
                lows[row],
                highs[row],
                f"row {row}",
            ),
        )
        for row in range(n_rows)
    ]


def _v2_ks(infer_input: InferInput | None, n_rows: int) -> list[int]:
    if infer_input is None:
        return [DEFAULT_K] * n_rows
    values = infer_input.as_numpy().reshape(-1).tolist()
    if len(values) not in {1, n_rows}:
        raise InvalidInput(
            f"input 'k' must have 1 or {n_rows} values, got {len(values)}"
        )
    ks = [
        parse_k(int(v) if isinstance(v, float) and v.is_integer() else v, f"k[{i}]")
        for i, v in enumerate(values)
    ]
    return ks * n_rows if len(ks) == 1 else ks


class SearchModel(Model):
    """Serves product search, sharing model and features with the recommender.

    Args:
        name: the model name in the URL (``search``).
        recommender: the recommender model of the same server; its artifact, feature
            client and pseudonymizer are used, never copied.
        index_dir: the search index folder (see :mod:`shopml.search.index`).
        encoder: the query encoder; the bundled MiniLM is loaded by ``load`` when
            ``None``.
    """

    def __init__(
        self,
        name: str,
        recommender: RecommenderModel,
        index_dir: Path,
        encoder: TextEncoder | None = None,
    ) -> None:
        super().__init__(name)
        self.recommender = recommender
        self.index_dir = Path(index_dir)
        self.encoder = encoder
        self.engine: SearchEngine | None = None

    def load(self) -> bool:
        """Load the index and encoder; personalize with the recommender's artifact.

        Returns:
            Whether the model is ready (the index loaded and verified).
        """
        try:
            index = load_search_index(self.index_dir)
        except (SearchIndexError, OSError) as err:
            logger.error("model=%s not loaded, stays not ready: %s", self.name, err)
            self.ready = False
            return False
        if self.encoder is None:
            self.encoder = TextEncoder()

        artifact = self.recommender.artifact
        if artifact is None:
            logger.warning(
                "model=%s: recommender %s has no loaded artifact; search runs without "
                "personalization and answers empty queries with nothing",
                self.name,
                self.recommender.name,
            )
        personalizer = SASRecPersonalizer(artifact) if artifact is not None else None
        self.engine = SearchEngine(index, self.encoder, personalizer)
        self.ready = True
        logger.info(
            "model=%s loaded index=%s items=%d personalized=%s",
            self.name,
            self.index_dir,
            index.n_items,
            personalizer is not None,
        )
        return True

    def start(self) -> None:
        """Keep readiness as ``load`` left it (KServe's default sets it to True)."""

    def validate(self, payload: Any) -> Any:
        """Return the payload: ``preprocess`` validates while parsing."""
        return payload

    def preprocess(
        self,
        payload: dict[str, Any] | InferRequest | bytes,
        headers: dict[str, str] | None = None,
    ) -> SearchRequest:
        """Parse a v1 body or a v2 request into rows.

        Raises:
            InvalidInput: the body does not follow the protocol.
        """
        headers = headers or {}
        if isinstance(payload, InferRequest):
            request_id = payload.id or headers.get("x-request-id") or uuid.uuid4().hex
            return SearchRequest("v2", request_id, parse_v2_search(payload))
        if isinstance(payload, bytes | bytearray):
            raise InvalidInput("the v1 body is not JSON; send application/json")
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        return SearchRequest("v1", request_id, parse_v1_search(payload))

    def predict(
        self, payload: SearchRequest, headers: dict[str, str] | None = None
    ) -> SearchResult:
        """Answer every row.

        Raises:
            InferenceError: the model is not loaded.
        """
        engine = self.engine
        if engine is None:
            raise InferenceError(f"model {self.name} is not loaded; call load() first")
        histories = self._histories(payload.rows)
        responses = []
        for row, history in zip(payload.rows, histories, strict=True):
            options = SearchOptions(mode=row.mode, k=row.k, personalize=row.personalize)
            responses.append(engine.search(row.query, row.filters, options, history))
            logger.debug(
                "model=%s request_id=%s query=%r hits=%d",
                self.name,
                payload.request_id,
                mask_text(row.query),
                len(responses[-1].hits),
            )
        return SearchResult(payload, responses)

    def _histories(self, rows: Sequence[SearchQuery]) -> list[list[str]]:
        """Each row's history: sent with it, or read for its user from the store."""
        users = [row.user_id for row in rows if row.user_id is not None]
        from_store = dict(zip(users, self._user_sequences(users), strict=True))
        return [
            list(row.item_ids)
            if row.item_ids is not None
            else from_store.get(row.user_id or "", [])
            for row in rows
        ]

    def _user_sequences(self, raw_user_ids: list[str]) -> list[list[str]]:
        client = self.recommender.feature_client
        pseudonymizer = self.recommender.pseudonymizer
        if not raw_user_ids:
            return []
        if client is None or pseudonymizer is None:
            raise InvalidInput(
                f"model {self.name} runs without a feature store, so user_id cannot be "
                "looked up; send item_ids instead"
            )
        # The recommender's lookup: pseudonymized, under its deadline, and degraded to
        # no history (unpersonalized search) when the store fails, counted as a fallback.
        features, _ = self.recommender.lookup_users(raw_user_ids)
        return [user.item_seq for user in features]

    def postprocess(
        self,
        result: SearchResult,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        """Write the answer in the protocol of the request."""
        if result.request.protocol == "v2":
            return self._v2_response(result)
        return {"predictions": [_v1_prediction(r) for r in result.responses]}

    def _v2_response(self, result: SearchResult) -> InferResponse:
        responses = result.responses
        width = max(1, *(len(r.hits) for r in responses))
        item_ids = np.full((len(responses), width), "", dtype=object)  # [B, K]
        titles = np.full((len(responses), width), "", dtype=object)  # [B, K]
        scores = np.full((len(responses), width), np.nan, dtype=np.float32)  # [B, K]
        for row, response in enumerate(responses):
            for col, hit in enumerate(response.hits):
                item_ids[row, col], titles[row, col] = hit.item_id, hit.title
                scores[row, col] = hit.score
        corrected = np.array(
            [mask_text(r.corrected_query or "") for r in responses], dtype=object
        )
        fallback = np.array([r.fallback or "" for r in responses], dtype=object)
        truncated = np.array([r.truncated for r in responses], dtype=bool)
        outputs = [
            InferOutput("item_ids", list(item_ids.shape), "BYTES", item_ids),
            InferOutput("titles", list(titles.shape), "BYTES", titles),
            InferOutput("scores", list(scores.shape), "FP32", scores),
            InferOutput("corrected_query", [len(responses)], "BYTES", corrected),
            InferOutput("fallback", [len(responses)], "BYTES", fallback),
            InferOutput("truncated", [len(responses)], "BOOL", truncated),
        ]
        return InferResponse(
            response_id=result.request.request_id,
            model_name=self.name,
            infer_outputs=outputs,
        )


def _v1_prediction(response: SearchResponse) -> dict[str, Any]:
    return {
        "item_ids": [hit.item_id for hit in response.hits],
        "titles": [hit.title for hit in response.hits],
        "scores": [hit.score for hit in response.hits],
        "categories": [hit.category for hit in response.hits],
        "prices": [hit.price for hit in response.hits],
        # The query comes back masked: a response may be logged or cached downstream.
        "query": mask_text(response.query),
        "corrected_query": (
            mask_text(response.corrected_query) if response.corrected_query else None
        ),
        "truncated": response.truncated,
        "notes": response.notes,
        "fallback": response.fallback,
        "personalized": response.personalized,
    }


def build_models(
    model_dir: Path,
    index_dir: Path,
    feature_client: OnlineFeatureClient | None,
    pseudonymizer: Pseudonymizer | None,
) -> tuple[RecommenderModel, SearchModel]:
    """Build and load the recommender and the search model that shares its state.

    Args:
        model_dir: the recommender's model artifact folder.
        index_dir: the search index folder.
        feature_client: online store client (``None``: requests send histories).
        pseudonymizer: maps raw user ids to pseudonyms; required with a client.

    Returns:
        ``(recommender, search)``, both loaded; check ``.ready`` on each.
    """
    recommender = RecommenderModel(
        "recommender", model_dir, feature_client, pseudonymizer
    )
    recommender.load()
    search = SearchModel("search", recommender, index_dir)
    search.load()
    return recommender, search


def main(argv: Sequence[str] | None = None) -> int:
    """Serve ``recommender`` and ``search`` from one ``ModelServer`` until stopped.

    Returns:
        0 after a clean stop, 1 when a model never got ready.
    """
    from kserve.errors import NoModelReady

    from serving.__main__ import LOOPBACK, BoundModelServer
    from shopml.config import load_settings
    from shopml.logs import configure_logging
    from shopml.security import load_pseudonymizer

    configure_logging()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="python -m serving.search")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--index-dir", type=Path, required=True)
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--no-feature-store", action="store_true")
    args = parser.parse_args(argv)

    client, pseudonymizer = None, None
    if not args.no_feature_store:
        settings = load_settings()
        client = OnlineFeatureClient.from_settings(settings)
        pseudonymizer = load_pseudonymizer(settings)
    models = build_models(args.model_dir, args.index_dir, client, pseudonymizer)
    if not all(model.ready for model in models):
        logger.error("a model is not ready; the server does not start")
        return 1
    server = BoundModelServer(host=args.host, http_port=args.http_port)
    logger.info(
        "serving recommender and search on http://%s:%d", args.host, args.http_port
    )
    try:
        server.start(list(models))
    except NoModelReady:
        logger.error("a model is not ready; the server does not start")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
