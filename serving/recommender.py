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

Business filters: ``exclude_item_ids`` and ``exclude_categories`` (v1 fields; v2 BYTES
inputs of shape [E] that apply to every row) remove items from the ranking; categories
come from the catalog given to the server. ``"explain": true`` on a v1 row, or the v1
``:explain`` route, adds ``explanations``: for each recommended item, the history items
whose embeddings are most similar to it (the dot product the model's scores are built
from). Requests are limited to ``MAX_ROWS`` rows and ``MAX_LIST_ITEMS`` ids per list.

Rows of concurrent requests are ranked together (:class:`serving.batching.MicroBatcher`)
on a worker thread. The online-store lookup has a deadline (``lookup_timeout_s``); when
the store is down or late, the user's row is ranked by popularity, marked
``"degraded": true`` (v1), counted in ``shopml_recommender_fallbacks_total`` and logged
as a warning. Latency per stage, fallbacks and errors are Prometheus metrics on
``/metrics``.

The module runs past 500 lines because the v1/v2 parsing, the ranking rules and the
KServe model class share one request vocabulary; batching and admission control live
in :mod:`serving.batching` and :mod:`serving.admission`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
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
from prometheus_client import Counter, Histogram

from serving.batching import DEFAULT_MAX_WAIT_MS, BatchStats, MicroBatcher
from shopml.artifact import ArtifactError, ModelArtifact, load_model_artifact
from shopml.features import FeatureStoreUnavailable, OnlineFeatureClient, UserFeatures
from shopml.models.sasrec import left_pad
from shopml.security import Pseudonymizer

logger = logging.getLogger(__name__)

DEFAULT_K = 10
MAX_K = 100
# Request size limits: rows per request and ids per list (history or exclusions).
MAX_ROWS = 256
MAX_LIST_ITEMS = 1000
# History items named per recommended item in an explanation.
EXPLAIN_TOP_N = 3
# Seconds a user-history lookup may take before the row falls back to popularity.
DEFAULT_LOOKUP_TIMEOUT_S = 0.25
FILTER_FIELDS = ("exclude_item_ids", "exclude_categories")
QUERY_FIELDS = ("user_id", "item_ids", "k")
V1_FIELDS = (*QUERY_FIELDS, *FILTER_FIELDS, "explain")
V2_INPUTS = (*QUERY_FIELDS, *FILTER_FIELDS)
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
        exclude_item_ids: items that must not be recommended (business filter).
        exclude_categories: categories whose items must not be recommended.
        explain: add the history items behind each recommendation.
    """

    user_id: str | None
    item_ids: tuple[str, ...] | None
    k: int = DEFAULT_K
    exclude_item_ids: tuple[str, ...] = ()
    exclude_categories: tuple[str, ...] = ()
    explain: bool = False


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
        degraded: the user's history could not be read in time, so the items are the
            popularity ranking.
        explanations: when asked for, per recommended item the history items most
            similar to it, ``{"item_id", "title", "similarity"}``, strongest first.
    """

    item_ids: list[str]
    titles: list[str]
    scores: list[float]
    unknown_item_ids: list[str]
    degraded: bool = False
    explanations: list[list[dict[str, Any]]] | None = field(default=None)


@dataclass(frozen=True)
class RecommendationResult:
    """What ``predict`` hands to ``postprocess``: the request and one answer per row."""

    request: RecommendationRequest
    recommendations: list[Recommendation]


#: What a field or input name looks like; other names are not quoted in errors.
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def shown_names(names: Iterable[Any]) -> list[str]:
    """Names sent by a client, fit to quote in an error message (KServe logs it).

    A name that is not shaped like a field name may be personal data sent by mistake
    (an email as a JSON key), so it is replaced by ``<not a field name>``.

    Args:
        names: the names as sent.

    Returns:
        The names, sorted, with the ones that are not field-shaped replaced.
    """
    return sorted(
        name
        if isinstance(name, str) and _FIELD_NAME.fullmatch(name)
        else "<not a field name>"
        for name in names
    )


def shown_value(value: Any) -> str:
    """A client's value, fit to quote in an error message (KServe logs it).

    Numbers, booleans and null are quoted (``=2.5``); text is not, since a wrong
    field may carry personal data (an email in ``k``): only its type shows.

    Args:
        value: the value as sent.

    Returns:
        ``"=<repr>"`` for a non-text scalar, an empty string otherwise.
    """
    if value is None or isinstance(value, bool | int | float | np.integer):
        return f"={value!r}"
    return ""


#: The tensor datatypes of the v2 protocol; anything else is not quoted in errors.
V2_DATATYPES = frozenset(
    [
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
    ]
)


def shown_datatype(datatype: Any) -> str:
    """A v2 datatype fit to quote in an error: a known one, else a placeholder."""
    return datatype if datatype in V2_DATATYPES else "<not a v2 datatype>"


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
            f"{field}{shown_value(value)} must be an integer between 1 and {MAX_K}, "
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
    if len(value) > MAX_LIST_ITEMS:
        raise InvalidInput(
            f"{field} has {len(value)} ids; at most {MAX_LIST_ITEMS} are accepted"
        )
    for position, item_id in enumerate(value):
        if not isinstance(item_id, str):
            raise InvalidInput(
                f"{field}[{position}]{shown_value(item_id)} must be a string item id, "
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
    unknown = shown_names(set(instance) - set(V1_FIELDS))
    if unknown:
        raise InvalidInput(
            f"{field} has unknown field(s) {unknown}; accepted: {list(V1_FIELDS)}"
        )
    if ("user_id" in instance) == ("item_ids" in instance):
        raise InvalidInput(
            f"{field} needs exactly one of user_id or item_ids, "
            f"got fields {shown_names(instance)}"
        )

    k = parse_k(instance.get("k", DEFAULT_K), f"{field}.k")
    explain = instance.get("explain", False)
    if not isinstance(explain, bool):
        raise InvalidInput(
            f"{field}.explain{shown_value(explain)} must be true or false, "
            f"got {type(explain).__name__}"
        )
    excluded_items, excluded_categories = (
        _parse_item_ids(instance.get(name, []), f"{field}.{name}")
        for name in FILTER_FIELDS
    )
    user_id, item_ids = None, None
    if "user_id" in instance:
        user_id = _parse_user_id(instance["user_id"], f"{field}.user_id")
    else:
        item_ids = _parse_item_ids(instance["item_ids"], f"{field}.item_ids")
    return RecommendationQuery(
        user_id, item_ids, k, excluded_items, excluded_categories, explain
    )


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
            f"'instances' is missing from the v1 body (fields {shown_names(body)}); "
            'send {"instances": [{"user_id": "..."}]}'
        )

    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        shown = "an empty list" if instances == [] else type(instances).__name__
        raise InvalidInput(f"'instances' must be a non-empty list of rows, got {shown}")
    if len(instances) > MAX_ROWS:
        raise InvalidInput(
            f"'instances' has {len(instances)} rows; at most {MAX_ROWS} are accepted "
            "per request"
        )
    return [_parse_instance(row, instance) for row, instance in enumerate(instances)]


def _v2_strings(infer_input: InferInput) -> np.ndarray:
    """The BYTES tensor of a v2 input as a str array of its declared shape."""
    name = infer_input.name
    if infer_input.datatype != "BYTES":
        raise InvalidInput(
            f"input '{name}' has datatype {shown_datatype(infer_input.datatype)}; "
            "it must be BYTES"
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
            f"input 'k' has datatype {shown_datatype(infer_input.datatype)}; "
            "it must be INT32"
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


def _check_v2_size(name: str, rows: int, width: int) -> None:
    if rows > MAX_ROWS or width > MAX_LIST_ITEMS:
        raise InvalidInput(
            f"input '{name}' is [{rows}, {width}]; at most {MAX_ROWS} rows of "
            f"{MAX_LIST_ITEMS} ids are accepted"
        )


def _v2_user_rows(infer_input: InferInput) -> list[str]:
    users = _v2_strings(infer_input)
    if users.ndim != 1 or users.size == 0:
        raise InvalidInput(
            f"input 'user_id' has shape {infer_input.shape}; it must be [B] with B >= 1"
        )
    _check_v2_size("user_id", users.size, 1)
    return [_parse_user_id(user, f"user_id[{row}]") for row, user in enumerate(users)]


def _v2_item_rows(infer_input: InferInput) -> list[tuple[str, ...]]:
    items = _v2_strings(infer_input)
    if items.ndim == 1:
        items = items.reshape(1, -1)  # [L] is one row
    if items.ndim != 2 or items.shape[0] == 0:
        raise InvalidInput(
            f"input 'item_ids' has shape {infer_input.shape}; it must be [B, L] or [L]"
        )
    _check_v2_size("item_ids", items.shape[0], items.shape[1])
    return [tuple(item for item in row if item) for row in items.tolist()]


def _v2_filter(infer_input: InferInput | None) -> tuple[str, ...]:
    """A filter input: BYTES [E], applied to every row."""
    if infer_input is None:
        return ()
    values = _v2_strings(infer_input)
    if values.ndim != 1:
        raise InvalidInput(
            f"input '{infer_input.name}' has shape {infer_input.shape}; it must be [E]"
        )
    _check_v2_size(infer_input.name, 1, values.size)
    return tuple(value for value in values.tolist() if value)


def parse_v2_request(request: InferRequest) -> list[RecommendationQuery]:
    """Parse a v2 inference request into rows.

    Args:
        request: the decoded request.

    Returns:
        One query per row of ``user_id`` or ``item_ids``.

    Raises:
        InvalidInput: unknown or repeated inputs, both or neither of
            user_id/item_ids, wrong datatypes or shapes, or a bad ``k``.
    """
    names = [infer_input.name for infer_input in request.inputs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidInput(f"input(s) {shown_names(repeated)} are sent more than once")
    for infer_input in request.inputs:
        if any(int(size) < 0 for size in infer_input.shape):
            raise InvalidInput(
                f"input '{shown_names([infer_input.name])[0]}' has a negative "
                f"dimension in shape {infer_input.shape}"
            )
    inputs = {infer_input.name: infer_input for infer_input in request.inputs}
    unknown = shown_names(set(inputs) - set(V2_INPUTS))
    if unknown:
        raise InvalidInput(
            f"unknown input(s) {unknown}; accepted inputs: {list(V2_INPUTS)}"
        )
    if ("user_id" in inputs) == ("item_ids" in inputs):
        raise InvalidInput(
            f"the request needs exactly one of the inputs user_id or item_ids, "
            f"got {sorted(inputs)}"
        )

    excluded_items = _v2_filter(inputs.get("exclude_item_ids"))
    excluded_categories = _v2_filter(inputs.get("exclude_categories"))
    if "user_id" in inputs:
        users = _v2_user_rows(inputs["user_id"])
        ks = _v2_ks(inputs.get("k"), len(users))
        return [
            RecommendationQuery(user, None, k, excluded_items, excluded_categories)
            for user, k in zip(users, ks, strict=True)
        ]
    histories = _v2_item_rows(inputs["item_ids"])
    ks = _v2_ks(inputs.get("k"), len(histories))
    return [
        RecommendationQuery(None, history, k, excluded_items, excluded_categories)
        for history, k in zip(histories, ks, strict=True)
    ]


def rank_items(
    artifact: ModelArtifact,
    histories: Sequence[Sequence[int]],
    ks: Sequence[int],
    excluded: Sequence[Sequence[int]] | None = None,
) -> list[tuple[list[int], list[float]]]:
    """Rank all items for each history, excluding padding and the history's own items.

    Rows with a history are scored together in one forward pass; an empty history is
    ranked by training popularity.

    Args:
        artifact: the loaded model artifact.
        histories: item indices per row (1..n_items), oldest first; may be empty.
        ks: items wanted per row.
        excluded: per row, further item indices that must not be recommended
            (business filters); ``None`` for none.

    Returns:
        Per row: item indices best first and their scores; fewer than ``k`` when the
        history and the filters leave fewer items.
    """
    n_columns = artifact.config.n_items + 1
    with torch.inference_mode():
        scores = _score_rows(artifact, histories)  # [B, N]

        # Padding, already-seen and filtered items can never be recommended.
        scores[:, 0] = float("-inf")
        for row, history in enumerate(histories):
            blocked = [*history, *(excluded[row] if excluded else ())]
            if blocked:
                scores[row, blocked] = float("-inf")

        top_scores, top_items = torch.topk(scores, k=min(max(ks), n_columns), dim=1)
    ranked = []
    for row, k in enumerate(ks):
        keep = torch.isfinite(top_scores[row, :k])
        ranked.append(
            (top_items[row, :k][keep].tolist(), top_scores[row, :k][keep].tolist())
        )
    return ranked


def _score_rows(
    artifact: ModelArtifact, histories: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Float [B, N] scores: the model's for rows with a history, popularity otherwise.

    Called under ``torch.inference_mode``. Histories are padded to the longest one
    of the batch, not to ``max_seq_len``: positions count from the newest item, so
    the scores are the same and short histories cost less attention.
    """
    max_seq_len = artifact.config.max_seq_len
    rows = [row for row, history in enumerate(histories) if history]
    popularity = torch.from_numpy(artifact.popularity)  # [N]
    if not rows:
        return popularity.unsqueeze(0).repeat(len(histories), 1)

    width = min(max_seq_len, max(len(histories[row]) for row in rows))
    item_seq = left_pad([histories[row] for row in rows], width)  # [B', L]
    model_scores = artifact.model.full_sort_scores(item_seq).float()  # [B', N]
    if len(rows) == len(histories):
        return model_scores
    scores = popularity.unsqueeze(0).repeat(len(histories), 1)  # [B, N]
    scores[rows] = model_scores
    return scores


def explain_items(
    artifact: ModelArtifact,
    history: Sequence[int],
    items: Sequence[int],
    top_n: int = EXPLAIN_TOP_N,
) -> list[list[tuple[int, float]]]:
    """The history items most similar to each recommended item.

    SASRec scores an item by the dot product of its embedding with the encoded history;
    the history items whose embeddings have the largest dot product with the
    recommended item's are the ones that pull it up.

    Args:
        artifact: the loaded model artifact.
        history: the row's history, item indices oldest first (newest
            ``max_seq_len`` are used, as in ranking).
        items: recommended item indices.
        top_n: history items named per recommended item.

    Returns:
        Per recommended item: ``(history index, similarity)``, strongest first; empty
        lists when the history is empty.
    """
    recent = list(history)[-artifact.config.max_seq_len :]
    if not recent or not items:
        return [[] for _ in items]
    weight = artifact.model.item_embedding.weight  # [N, H]
    with torch.inference_mode():
        similarity = weight[list(items)] @ weight[recent].T  # [K, L]
    n = min(top_n, len(recent))
    top_values, top_positions = torch.topk(similarity, k=n, dim=1)  # [K, n]
    return [
        [
            (recent[position], float(value))
            for position, value in zip(positions, values, strict=True)
        ]
        for positions, values in zip(
            top_positions.tolist(), top_values.tolist(), strict=True
        )
    ]


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
        self.batcher: MicroBatcher[RecommendationQuery, Recommendation] = MicroBatcher(
            self.recommend,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            on_batch=self._observe_batch,
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
            recommendations = await self.batcher.submit(payload.queries)
        except InferenceError:
            ERRORS.labels(model=self.name, kind="inference_error").inc()
            raise
        logger.debug(
            "model=%s request_id=%s rows=%d users=%d degraded=%d",
            self.name,
            payload.request_id,
            len(payload.queries),
            sum(query.user_id is not None for query in payload.queries),
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
            return self._v2_response(result)
        return {"predictions": [_v1_prediction(rec) for rec in result.recommendations]}

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
        started = time.perf_counter()
        rows = self._resolve_rows(artifact, queries)
        lookup_done = time.perf_counter()
        ranked = rank_items(
            artifact,
            [row.history for row in rows],
            [query.k for query in queries],
            [row.excluded for row in rows],
        )
        rank_done = time.perf_counter()
        recommendations = [
            self._recommendation(artifact, query, row, items, scores)
            for query, row, (items, scores) in zip(queries, rows, ranked, strict=True)
        ]

        STAGE_SECONDS.labels(self.name, "feature_lookup").observe(lookup_done - started)
        STAGE_SECONDS.labels(self.name, "rank").observe(rank_done - lookup_done)
        if any(query.explain for query in queries):
            explain_s = time.perf_counter() - rank_done
            STAGE_SECONDS.labels(self.name, "explain").observe(explain_s)
        return recommendations

    def _resolve_rows(
        self, artifact: ModelArtifact, queries: Sequence[RecommendationQuery]
    ) -> list[_RowInput]:
        """Histories (from the request or the store) and filters as model indices."""
        sequences, seen, degraded = self._item_sequences(queries)
        rows = []
        for query, sequence, seen_items, is_degraded in zip(
            queries, sequences, seen, degraded, strict=True
        ):
            indices = [artifact.index_of(item_id) for item_id in sequence]
            # Everything the user ever had stays out, not only the model's window.
            excluded = [
                index
                for index in map(
                    artifact.index_of, [*query.exclude_item_ids, *seen_items]
                )
                if index is not None
            ]
            for category in query.exclude_categories:
                excluded += self._category_items.get(category, [])
            rows.append(
                _RowInput(
                    history=[index for index in indices if index is not None],
                    unknown=[
                        i for i, x in zip(sequence, indices, strict=True) if x is None
                    ],
                    excluded=excluded,
                    degraded=is_degraded,
                )
            )
        return rows

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

    def _item_sequences(
        self, queries: Sequence[RecommendationQuery]
    ) -> tuple[list[list[str]], list[list[str]], list[bool]]:
        """Each row's history (request or online store), the user's older seen items
        beyond it, and which rows degraded."""
        user_rows = [
            row for row, query in enumerate(queries) if query.user_id is not None
        ]
        from_store, is_degraded = self.lookup_users(
            [queries[row].user_id or "" for row in user_rows]
        )
        by_row = dict(zip(user_rows, from_store, strict=True))
        sequences = [
            by_row[row].item_seq if query.item_ids is None else list(query.item_ids)
            for row, query in enumerate(queries)
        ]
        seen = [
            by_row[row].seen_items if row in by_row else []
            for row in range(len(queries))
        ]
        degraded = [is_degraded and row in by_row for row in range(len(queries))]
        return sequences, seen, degraded

    def lookup_users(self, raw_user_ids: list[str]) -> tuple[list[UserFeatures], bool]:
        """Pseudonymize raw ids and read their serving features in one online request.

        Returns:
            The users' recent sequences and seen items, and whether they are empty
            stand-ins because the store failed or missed its deadline (the rows are then
            ranked by popularity).
        """
        if not raw_user_ids:
            return [], False
        if self.feature_client is None or self.pseudonymizer is None:
            raise InferenceError(
                f"model {self.name} runs without a feature store (--no-feature-store), "
                "so it cannot look up user_id rows; send item_ids instead"
            )

        pseudonyms = [
            self.pseudonymizer.pseudonymize(user_id) for user_id in raw_user_ids
        ]
        lookup = self._lookups.submit(
            self.feature_client.serving_features_batch, pseudonyms
        )
        try:
            return lookup.result(timeout=self.lookup_timeout_s), False
        except FeatureStoreUnavailable as err:
            reason, detail = "store_unavailable", str(err)
        except FutureTimeout:
            lookup.cancel()
            reason = "store_timeout"
            detail = f"no answer within {self.lookup_timeout_s:.3f} s"

        # Degrade to the popularity ranking rather than fail the request.
        FALLBACKS.labels(model=self.name, reason=reason).inc(len(pseudonyms))
        logger.warning(
            "degraded model=%s reason=%s users=%d ranked by popularity: %s",
            self.name,
            reason,
            len(pseudonyms),
            detail,
        )
        return [UserFeatures([], {}) for _ in pseudonyms], True

    def _observe_batch(self, stats: BatchStats) -> None:
        BATCH_ROWS.labels(model=self.name).observe(stats.rows)
        STAGE_SECONDS.labels(self.name, "queue").observe(stats.queue_s)

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


def _v1_prediction(rec: Recommendation) -> dict[str, Any]:
    """One v1 prediction; ``explanations`` only when asked for."""
    prediction: dict[str, Any] = {
        "item_ids": rec.item_ids,
        "titles": rec.titles,
        "scores": rec.scores,
        "unknown_item_ids": rec.unknown_item_ids,
        "degraded": rec.degraded,
    }
    if rec.explanations is not None:
        prediction["explanations"] = rec.explanations
    return prediction
