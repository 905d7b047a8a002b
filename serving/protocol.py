"""The request vocabulary of the recommender server: v1/v2 parsing and responses.

One request holds a batch of rows; each row names a user (``user_id``, the raw id of the
application) or carries a history (``item_ids``), plus how many items to return (``k``).
:func:`parse_v1_body` and :func:`parse_v2_request` turn a body into
:class:`RecommendationQuery` rows, checking every field; :func:`v1_prediction` and
:func:`v2_response` write the answer in the protocol of the request.

v1 (``POST /v1/models/<name>:predict``)::

    {"instances": [{"user_id": "196", "k": 10}, {"item_ids": ["242", "302"], "k": 5}]}
    -> {"predictions": [{"item_ids": [...], "titles": [...], "scores": [...],
                         "unknown_item_ids": [...]}, ...]}

v2 (``POST /v2/models/<name>/infer``): input ``user_id`` (BYTES [B]) or ``item_ids``
(BYTES [B, L] or [L] for one row; ``""`` pads short rows) and optional ``k`` (INT32
or another integer datatype, [1] or [B]; every value must be an integer that fits the
datatype); outputs ``item_ids`` and ``titles`` (BYTES [B, K]), ``scores`` (FP32
[B, K]) and ``unknown_item_ids`` (BYTES [B, U]). Rows with fewer than K items are
padded with ``""`` and a NaN score (JSON ``null``); that happens only when a history
covers nearly the whole catalog.

Business filters: ``exclude_item_ids`` and ``exclude_categories`` (v1 fields; v2 BYTES
inputs of shape [E] that apply to every row). ``"explain": true`` on a v1 row asks for
explanations; v2 has no explanation outputs, so a v2 request with an ``explain``
parameter is rejected (400) rather than silently answered without them. Requests are
limited to ``MAX_ROWS`` rows and ``MAX_LIST_ITEMS`` ids per list. Error messages
never quote a raw user id or a value that may be personal data: KServe logs every
``InvalidInput`` message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import (
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
)

DEFAULT_K = 10
MAX_K = 100
# Request size limits: rows per request and ids per list (history or exclusions).
MAX_ROWS = 256
MAX_LIST_ITEMS = 1000
FILTER_FIELDS = ("exclude_item_ids", "exclude_categories")
QUERY_FIELDS = ("user_id", "item_ids", "k")
V1_FIELDS = (*QUERY_FIELDS, *FILTER_FIELDS, "explain")
V2_INPUTS = (*QUERY_FIELDS, *FILTER_FIELDS)

#: The integer datatypes of the v2 protocol and the values each can hold.
_INT_RANGES = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
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
    except (ValueError, TypeError, OverflowError) as err:
        # The numpy message may quote the data: it is not passed on.
        raise InvalidInput(
            f"input '{name}' data does not fit its shape {infer_input.shape}"
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


def _flat(data: Any) -> list[Any]:
    """The elements of JSON tensor data, nested lists flattened."""
    if not isinstance(data, list | tuple):
        return [data]
    return [element for part in data for element in _flat(part)]


def _check_v2_ints(infer_input: InferInput) -> None:
    """JSON data of an integer input must hold integers its datatype can represent.

    numpy would truncate ``2.7`` to 2 and raise ``OverflowError`` for 300 as UINT8;
    both are the client's mistake (400), checked here before numpy sees the data.
    """
    name, datatype = infer_input.name, infer_input.datatype
    low, high = _INT_RANGES[datatype]
    for position, value in enumerate(_flat(infer_input.data)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InvalidInput(
                f"input '{name}' ({datatype}) element {position}{shown_value(value)} "
                f"must be an integer, got {type(value).__name__}"
            )
        if not low <= int(value) <= high:
            raise InvalidInput(
                f"input '{name}' ({datatype}) element {position}={int(value)} does not "
                f"fit datatype {datatype} ({low}..{high})"
            )


def _v2_ks(infer_input: InferInput | None, n_rows: int) -> list[int]:
    """The ``k`` of every row: input ``k`` of shape [1] (all rows) or [B]."""
    if infer_input is None:
        return [DEFAULT_K] * n_rows
    if infer_input.datatype not in _INT_RANGES:
        raise InvalidInput(
            f"input 'k' has datatype {shown_datatype(infer_input.datatype)}; "
            "it must be INT32"
        )
    if isinstance(infer_input.data, list | tuple):
        _check_v2_ints(infer_input)
    try:
        values = infer_input.as_numpy().reshape(-1)
    except (ValueError, TypeError, OverflowError) as err:
        raise InvalidInput(
            f"input 'k' ({infer_input.datatype}) data does not fit its shape "
            f"{infer_input.shape}"
        ) from err
    if len(values) not in {1, n_rows}:
        allowed = "[1]" if n_rows == 1 else f"[1] or [{n_rows}]"
        raise InvalidInput(
            f"input 'k' has shape {infer_input.shape}; it must be {allowed}"
        )
    ks = [parse_k(value, f"k[{i}]") for i, value in enumerate(values)]
    return ks * n_rows if len(ks) == 1 else ks


def _check_v2_parameters(request: InferRequest) -> None:
    """Refuse request parameters the server would otherwise silently ignore."""
    parameters = request.parameters or {}
    if "explain" in parameters:
        raise InvalidInput(
            "parameter 'explain' is not supported on v2 (no explanation outputs); "
            'use the v1 :explain route or "explain": true on a v1 row'
        )


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
            user_id/item_ids, wrong datatypes or shapes, a bad ``k`` (not an integer,
            out of its datatype's range or of 1..``MAX_K``), or an ``explain``
            parameter (v2 has no explanation outputs: use v1 ``:explain``).
    """
    _check_v2_parameters(request)
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


def v1_prediction(rec: Recommendation) -> dict[str, Any]:
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


def v2_response(result: RecommendationResult, model_name: str) -> InferResponse:
    """Pack the recommendations into rectangular v2 output tensors.

    Args:
        result: the request and one recommendation per row.
        model_name: the model's name, echoed in the response.

    Returns:
        The response with outputs ``item_ids``, ``titles``, ``scores`` and
        ``unknown_item_ids``.
    """
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
        model_name=model_name,
        infer_outputs=outputs,
    )
