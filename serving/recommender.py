"""The recommender predictor: a KServe ``Model`` ranking items with a SASRec artifact.

One request holds a batch of rows; each row names a user (``user_id``, the raw id of the
application) or carries a history (``item_ids``), plus how many items to return (``k``).
The request stages are KServe's: ``preprocess`` parses the v1 or v2 body into
:class:`RecommendationQuery` rows, ``predict`` reads user histories from the online
feature store and ranks every row in one forward pass, ``postprocess`` writes the v1 or
v2 response. Raw user ids are pseudonymized before the feature lookup and never logged.

v1 (``POST /v1/models/<name>:predict``)::

    {"instances": [{"user_id": "196", "k": 10}, {"item_ids": ["242", "302"], "k": 5}]}
    -> {"predictions": [{"item_ids": [...], "titles": [...], "scores": [...],
                         "unknown_item_ids": [...]}, ...]}

v2 (``POST /v2/models/<name>/infer``): input ``user_id`` (BYTES [B]) or ``item_ids``
(BYTES [B, L] or [L] for one row; ``""`` pads short rows) and optional ``k`` (INT32
[1] or [B]); outputs ``item_ids`` and ``titles`` (BYTES [B, K]), ``scores`` (FP32
[B, K]) and ``unknown_item_ids`` (BYTES [B, U]). Rows with fewer than K items are
padded with ``""`` and a NaN score (JSON ``null``); that happens only when a history
covers nearly the whole catalog.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kserve import Model
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import (
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
)

from shopml.artifact import ArtifactError, ModelArtifact, load_model_artifact
from shopml.features import FeatureStoreUnavailable, OnlineFeatureClient
from shopml.models.sasrec import left_pad
from shopml.security import Pseudonymizer

logger = logging.getLogger(__name__)

DEFAULT_K = 10
MAX_K = 100
QUERY_FIELDS = ("user_id", "item_ids", "k")
_INT_DATATYPES = {
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
}


@dataclass(frozen=True)
class RecommendationQuery:
    """One row of a request: whose recommendations, and how many.

    Attributes:
        user_id: raw user id from the application (history read from the online
            store); ``None`` when the row carries ``item_ids``. Never logged.
        item_ids: the history sent with the request, oldest first; ``None`` for a user.
        k: how many items to return, 1..``MAX_K``.
    """

    user_id: str | None
    item_ids: tuple[str, ...] | None
    k: int = DEFAULT_K


@dataclass(frozen=True)
class RecommendationRequest:
    """A parsed request, handed from ``preprocess`` to ``predict``.

    Attributes:
        protocol: ``"v1"`` or ``"v2"``: the response is written in the same protocol.
        request_id: the v2 request id (or the ``x-request-id`` header, or a new uuid).
        queries: the rows, in request order.
    """

    protocol: str
    request_id: str
    queries: list[RecommendationQuery]


@dataclass(frozen=True)
class Recommendation:
    """The ranked items of one row.

    Attributes:
        item_ids: recommended item ids, best first; never padding or a history item.
        titles: their titles, same order.
        scores: their scores: model logits, or training popularity for an empty history.
        unknown_item_ids: request ``item_ids`` the model does not know (ignored).
    """

    item_ids: list[str]
    titles: list[str]
    scores: list[float]
    unknown_item_ids: list[str]


@dataclass(frozen=True)
class RecommendationResult:
    """What ``predict`` hands to ``postprocess``: the request and one answer per row."""

    request: RecommendationRequest
    recommendations: list[Recommendation]


def parse_k(value: Any, field: str) -> int:
    """Check a requested list length.

    Args:
        value: the value sent (JSON number or numpy integer).
        field: where it came from, for the error message.

    Returns:
        ``value`` as an int.

    Raises:
        InvalidInput: not an integer, or outside 1..``MAX_K``.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidInput(
            f"{field}={value!r} must be an integer between 1 and {MAX_K}, "
            f"got {type(value).__name__}"
        )
    if not 1 <= int(value) <= MAX_K:
        raise InvalidInput(f"{field}={int(value)} must be between 1 and {MAX_K}")
    return int(value)


def _parse_user_id(value: Any, field: str) -> str:
    # The raw id is never echoed: KServe logs every InvalidInput message.
    if not isinstance(value, str) or not value:
        shown = "an empty string" if value == "" else f"a {type(value).__name__}"
        raise InvalidInput(
            f"{field} must be a non-empty string (the raw user id), got {shown}"
        )
    return value


def _parse_item_ids(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidInput(
            f"{field} must be a list of item id strings, got {type(value).__name__}"
        )
    for position, item_id in enumerate(value):
        if not isinstance(item_id, str):
            raise InvalidInput(
                f"{field}[{position}]={item_id!r} must be a string item id, "
                f"got {type(item_id).__name__}"
            )
    # An empty string is padding (v2 rows are rectangular) and carries no item.
    return tuple(item_id for item_id in value if item_id)


def _parse_instance(row: int, instance: Any) -> RecommendationQuery:
    field = f"instances[{row}]"
    if not isinstance(instance, dict):
        raise InvalidInput(
            f"{field} must be an object with user_id or item_ids, "
            f"got {type(instance).__name__}"
        )
    unknown = sorted(set(instance) - set(QUERY_FIELDS))
    if unknown:
        raise InvalidInput(
            f"{field} has unknown field(s) {unknown}; accepted: {list(QUERY_FIELDS)}"
        )
    if ("user_id" in instance) == ("item_ids" in instance):
        raise InvalidInput(
            f"{field} needs exactly one of user_id or item_ids, "
            f"got fields {sorted(instance)}"
        )

    k = parse_k(instance.get("k", DEFAULT_K), f"{field}.k")
    if "user_id" in instance:
        user_id = _parse_user_id(instance["user_id"], f"{field}.user_id")
        return RecommendationQuery(user_id=user_id, item_ids=None, k=k)
    item_ids = _parse_item_ids(instance["item_ids"], f"{field}.item_ids")
    return RecommendationQuery(user_id=None, item_ids=item_ids, k=k)


def parse_v1_body(
    body: Any, content_type: str | None = None
) -> list[RecommendationQuery]:
    """Parse a v1 ``predict`` body into rows.

    Args:
        body: the decoded JSON body (KServe passes ``bytes`` for non-JSON content).
        content_type: the request's content type, for the error message.

    Returns:
        One query per instance, in order.

    Raises:
        InvalidInput: the body is not ``{"instances": [...]}`` of valid rows.
    """
    if isinstance(body, bytes | bytearray):
        raise InvalidInput(
            f"the v1 body is not JSON (content-type {content_type!r}); "
            'send {"instances": [...]} with content-type application/json'
        )
    if not isinstance(body, dict):
        raise InvalidInput(
            f"the v1 body must be an object with 'instances', got {type(body).__name__}"
        )
    if "instances" not in body:
        if "inputs" in body:
            raise InvalidInput(
                "'instances' is missing: this is a v2 body ('inputs'); post it to "
                '/v2/models/<name>/infer, or send {"instances": [...]} here'
            )
        raise InvalidInput(
            f"'instances' is missing from the v1 body (fields {sorted(body)}); "
            'send {"instances": [{"user_id": "..."}]}'
        )

    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        shown = "an empty list" if instances == [] else type(instances).__name__
        raise InvalidInput(f"'instances' must be a non-empty list of rows, got {shown}")
    return [_parse_instance(row, instance) for row, instance in enumerate(instances)]


def _v2_strings(infer_input: InferInput) -> np.ndarray:
    """The BYTES tensor of a v2 input as a str array of its declared shape."""
    name = infer_input.name
    if infer_input.datatype != "BYTES":
        raise InvalidInput(
            f"input '{name}' has datatype {infer_input.datatype}; it must be BYTES"
        )
    try:
        array = infer_input.as_numpy()
    except (ValueError, TypeError) as err:
        raise InvalidInput(
            f"input '{name}' data does not fit its shape {infer_input.shape}: {err}"
        ) from err

    values = []
    for element in array.reshape(-1):
        value = element.decode("utf-8") if isinstance(element, bytes) else element
        if not isinstance(value, str):
            raise InvalidInput(
                f"input '{name}' holds a {type(value).__name__}; "
                "BYTES elements must be strings"
            )
        values.append(value)
    return np.array(values, dtype=object).reshape(array.shape)


def _v2_ks(infer_input: InferInput | None, n_rows: int) -> list[int]:
    """The ``k`` of every row: input ``k`` of shape [1] (all rows) or [B]."""
    if infer_input is None:
        return [DEFAULT_K] * n_rows
    if infer_input.datatype not in _INT_DATATYPES:
        raise InvalidInput(
            f"input 'k' has datatype {infer_input.datatype}; it must be INT32"
        )
    try:
        values = infer_input.as_numpy().reshape(-1)
    except (ValueError, TypeError) as err:
        raise InvalidInput(
            f"input 'k' data does not fit its shape {infer_input.shape}: {err}"
        ) from err
    if len(values) not in {1, n_rows}:
        raise InvalidInput(
            f"input 'k' has shape {infer_input.shape}; it must be [1] or [{n_rows}]"
        )
    ks = [parse_k(value, f"k[{i}]") for i, value in enumerate(values)]
    return ks * n_rows if len(ks) == 1 else ks


def _v2_user_rows(infer_input: InferInput) -> list[str]:
    users = _v2_strings(infer_input)
    if users.ndim != 1 or users.size == 0:
        raise InvalidInput(
            f"input 'user_id' has shape {infer_input.shape}; it must be [B] with B >= 1"
        )
    return [_parse_user_id(user, f"user_id[{row}]") for row, user in enumerate(users)]


def _v2_item_rows(infer_input: InferInput) -> list[tuple[str, ...]]:
    items = _v2_strings(infer_input)
    if items.ndim == 1:
        items = items.reshape(1, -1)  # [L] is one row
    if items.ndim != 2 or items.shape[0] == 0:
        raise InvalidInput(
            f"input 'item_ids' has shape {infer_input.shape}; it must be [B, L] or [L]"
        )
    return [tuple(item for item in row if item) for row in items.tolist()]


def parse_v2_request(request: InferRequest) -> list[RecommendationQuery]:
    """Parse a v2 inference request into rows.

    Args:
        request: the decoded request.

    Returns:
        One query per row of ``user_id`` or ``item_ids``.

    Raises:
        InvalidInput: unknown inputs, both or neither of user_id/item_ids, wrong
            datatypes or shapes, or a bad ``k``.
    """
    inputs = {infer_input.name: infer_input for infer_input in request.inputs}
    unknown = sorted(set(inputs) - set(QUERY_FIELDS))
    if unknown:
        raise InvalidInput(
            f"unknown input(s) {unknown}; accepted inputs: {list(QUERY_FIELDS)}"
        )
    if ("user_id" in inputs) == ("item_ids" in inputs):
        raise InvalidInput(
            f"the request needs exactly one of the inputs user_id or item_ids, "
            f"got {sorted(inputs)}"
        )

    if "user_id" in inputs:
        users = _v2_user_rows(inputs["user_id"])
        ks = _v2_ks(inputs.get("k"), len(users))
        return [
            RecommendationQuery(user_id=user, item_ids=None, k=k)
            for user, k in zip(users, ks, strict=True)
        ]
    histories = _v2_item_rows(inputs["item_ids"])
    ks = _v2_ks(inputs.get("k"), len(histories))
    return [
        RecommendationQuery(user_id=None, item_ids=history, k=k)
        for history, k in zip(histories, ks, strict=True)
    ]


def rank_items(
    artifact: ModelArtifact, histories: Sequence[Sequence[int]], ks: Sequence[int]
) -> list[tuple[list[int], list[float]]]:
    """Rank all items for each history, excluding padding and the history's own items.

    Rows with a history are scored together in one forward pass; an empty history is
    ranked by training popularity.

    Args:
        artifact: the loaded model artifact.
        histories: item indices per row (1..n_items), oldest first; may be empty.
        ks: items wanted per row.

    Returns:
        Per row: item indices best first and their scores; fewer than ``k`` when the
        history leaves fewer items.
    """
    n_rows, n_columns = len(histories), artifact.config.n_items + 1
    popularity = torch.from_numpy(artifact.popularity)  # [N]
    scores = popularity.unsqueeze(0).repeat(n_rows, 1)  # [B, N]

    # One forward pass over every row that has a history.
    rows = [row for row, history in enumerate(histories) if history]
    if rows:
        item_seq = left_pad(
            [histories[row] for row in rows], artifact.config.max_seq_len
        )
        with torch.inference_mode():
            scores[rows] = artifact.model.full_sort_scores(item_seq).float()  # [B', N]

    # Padding and already-seen items can never be recommended.
    scores[:, 0] = float("-inf")
    for row, history in enumerate(histories):
        if history:
            scores[row, list(history)] = float("-inf")

    top_scores, top_items = torch.topk(scores, k=min(max(ks), n_columns), dim=1)
    ranked = []
    for row, k in enumerate(ks):
        keep = torch.isfinite(top_scores[row, :k])
        ranked.append(
            (top_items[row, :k][keep].tolist(), top_scores[row, :k][keep].tolist())
        )
    return ranked


class RecommenderModel(Model):
    """Serves next-item recommendations from a SASRec model artifact.

    Args:
        name: the model name in the URL (``/v1/models/<name>:predict``).
        model_dir: the model artifact folder (see docs/architecture.md).
        feature_client: online store client for user histories; ``None`` serves only
            rows that carry ``item_ids``.
        pseudonymizer: maps raw user ids to the pseudonyms the online store is keyed
            by; required with a feature client.

    Raises:
        ValueError: a feature client without a pseudonymizer.
    """

    def __init__(
        self,
        name: str,
        model_dir: Path,
        feature_client: OnlineFeatureClient | None,
        pseudonymizer: Pseudonymizer | None,
    ) -> None:
        super().__init__(name)
        if feature_client is not None and pseudonymizer is None:
            raise ValueError(
                "a feature_client needs a pseudonymizer: the online store is keyed by "
                "pseudonyms; pass load_pseudonymizer(settings)"
            )
        self.model_dir = Path(model_dir)
        self.feature_client = feature_client
        self.pseudonymizer = pseudonymizer
        self.artifact: ModelArtifact | None = None

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

        self._warm_up_feature_store()
        self.ready = True
        logger.info(
            "model=%s loaded from %s n_items=%d max_seq_len=%d feature_store=%s",
            self.name,
            self.model_dir,
            self.artifact.config.n_items,
            self.artifact.config.max_seq_len,
            self.feature_client is not None,
        )
        return True

    def _warm_up_feature_store(self) -> None:
        """Read one unknown user so the registry loads now, not on the first request.

        A store that cannot be read is not fatal: requests degrade to popularity.
        """
        if self.feature_client is None:
            return
        started = time.monotonic()
        try:
            self.feature_client.user_sequences(["u_warmup"])
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
        if isinstance(payload, InferRequest):
            request_id = payload.id or headers.get("x-request-id") or uuid.uuid4().hex
            return RecommendationRequest("v2", request_id, parse_v2_request(payload))
        queries = parse_v1_body(payload, headers.get("content-type"))
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        return RecommendationRequest("v1", request_id, queries)

    def predict(
        self, payload: RecommendationRequest, headers: dict[str, str] | None = None
    ) -> RecommendationResult:
        """Rank items for every row of the request.

        Args:
            payload: the parsed request from ``preprocess``.
            headers: request headers (unused).

        Returns:
            One recommendation per row.

        Raises:
            InferenceError: the model is not loaded, or a ``user_id`` row reached a
                server that runs without a feature store.
        """
        recommendations = self.recommend(payload.queries)
        logger.debug(
            "model=%s request_id=%s rows=%d users=%d",
            self.name,
            payload.request_id,
            len(payload.queries),
            sum(query.user_id is not None for query in payload.queries),
        )
        return RecommendationResult(payload, recommendations)

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
            return self._v2_response(result)
        return {
            "predictions": [
                {
                    "item_ids": rec.item_ids,
                    "titles": rec.titles,
                    "scores": rec.scores,
                    "unknown_item_ids": rec.unknown_item_ids,
                }
                for rec in result.recommendations
            ]
        }

    def recommend(self, queries: Sequence[RecommendationQuery]) -> list[Recommendation]:
        """Rank items for each query; all rows are scored in one forward pass.

        Args:
            queries: the rows.

        Returns:
            One recommendation per query, in order.

        Raises:
            InferenceError: the model is not loaded, or a ``user_id`` row reached a
                server that runs without a feature store.
        """
        artifact = self.artifact
        if artifact is None:
            raise InferenceError(
                f"model {self.name} is not loaded from {self.model_dir}; "
                "call load() first"
            )
        sequences = self._item_sequences(queries)

        histories: list[list[int]] = []
        unknown: list[list[str]] = []
        for sequence in sequences:
            indices = [artifact.index_of(item_id) for item_id in sequence]
            histories.append([index for index in indices if index is not None])
            unknown.append(
                [i for i, x in zip(sequence, indices, strict=True) if x is None]
            )

        ranked = rank_items(artifact, histories, [query.k for query in queries])
        return [
            Recommendation(
                item_ids=[artifact.item_ids[index] for index in items],
                titles=[artifact.titles[index] for index in items],
                scores=scores,
                # Only ids the caller sent are reported back, never a user's history.
                unknown_item_ids=unknown_ids if query.item_ids is not None else [],
            )
            for query, (items, scores), unknown_ids in zip(
                queries, ranked, unknown, strict=True
            )
        ]

    def _item_sequences(
        self, queries: Sequence[RecommendationQuery]
    ) -> list[list[str]]:
        """The history of each row: from the request, or from the online store."""
        user_rows = [
            row for row, query in enumerate(queries) if query.user_id is not None
        ]
        from_store = self._user_sequences(
            [queries[row].user_id or "" for row in user_rows]
        )
        by_row = dict(zip(user_rows, from_store, strict=True))
        return [
            by_row[row] if query.item_ids is None else list(query.item_ids)
            for row, query in enumerate(queries)
        ]

    def _user_sequences(self, raw_user_ids: list[str]) -> list[list[str]]:
        """Pseudonymize raw ids and read their item sequences in one online request."""
        if not raw_user_ids:
            return []
        if self.feature_client is None or self.pseudonymizer is None:
            raise InferenceError(
                f"model {self.name} runs without a feature store (--no-feature-store), "
                "so it cannot look up user_id rows; send item_ids instead"
            )

        pseudonyms = [
            self.pseudonymizer.pseudonymize(user_id) for user_id in raw_user_ids
        ]
        try:
            return self.feature_client.user_sequences(pseudonyms)
        except FeatureStoreUnavailable as err:
            # Degrade to the popularity ranking rather than fail the request.
            logger.warning(
                "model=%s online store down, %d user(s) ranked by popularity: %s",
                self.name,
                len(pseudonyms),
                err,
            )
            return [[] for _ in pseudonyms]

    def _v2_response(self, result: RecommendationResult) -> InferResponse:
        """Pack the recommendations into rectangular v2 output tensors."""
        recs = result.recommendations
        width = max(len(rec.item_ids) for rec in recs)
        unknown_width = max(len(rec.unknown_item_ids) for rec in recs)

        item_ids = np.full((len(recs), width), "", dtype=object)  # [B, K]
        titles = np.full((len(recs), width), "", dtype=object)  # [B, K]
        scores = np.full((len(recs), width), np.nan, dtype=np.float32)  # [B, K]
        unknown = np.full((len(recs), unknown_width), "", dtype=object)  # [B, U]
        for row, rec in enumerate(recs):
            item_ids[row, : len(rec.item_ids)] = rec.item_ids
            titles[row, : len(rec.titles)] = rec.titles
            scores[row, : len(rec.scores)] = rec.scores
            unknown[row, : len(rec.unknown_item_ids)] = rec.unknown_item_ids

        outputs = [
            InferOutput("item_ids", list(item_ids.shape), "BYTES", item_ids),
            InferOutput("titles", list(titles.shape), "BYTES", titles),
            InferOutput("scores", list(scores.shape), "FP32", scores),
            InferOutput("unknown_item_ids", list(unknown.shape), "BYTES", unknown),
        ]
        return InferResponse(
            response_id=result.request.request_id,
            model_name=self.name,
            infer_outputs=outputs,
        )
