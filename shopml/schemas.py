"""Canonical tables of shopml (events, catalog, users), declared once in pyarrow.

Every stage reads and writes these shapes (see ``docs/architecture.md``). The rules for
turning outside data into them live here too:

* Ids are opaque strings. They are never parsed as numbers; integer ids read from a
  typed file are written in decimal (``17`` -> ``"17"``, ``17.0`` -> ``"17"``).
* Timestamps are ``timestamp[us, tz=UTC]``. Accepted inputs:

  - epoch numbers: a magnitude above ``1e11`` is epoch **milliseconds**, anything else
    epoch **seconds** (1e11 s lies in the year 5138, 1e11 ms in 1973);
  - numeric strings follow the same rule (``"881250949"`` is seconds);
  - ISO-8601 strings (``2024-05-01``, ``2024-05-01T10:00:00Z``,
    ``2024-05-01 12:00:00+02:00``); a string without an offset is taken as UTC, an
    offset is converted to UTC;
  - timestamp values: naive ones are taken as UTC, zoned ones converted to UTC.

* A value that cannot be read is not dropped: the typed column gets a null and the
  original text goes to ``_unparsed_<column>`` so the clean stage can quarantine the
  row with a reason. Columns starting with ``_`` are bookkeeping of the raw zone
  (origin and unparsed text) and never reach curated tables.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")

#: Epoch numbers whose magnitude is above this are milliseconds, others seconds.
EPOCH_MS_THRESHOLD = 1e11

# Instants further than this from 1970 (about 1679-2261) are unreadable: pandas and
# most readers cannot represent them.
_MAX_ABS_MICROS = 9_200_000_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: The event vocabulary; MovieLens ratings are ``rate`` with the stars in ``value``.
EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase", "search", "rate")

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("timestamp", TIMESTAMP_TYPE, nullable=False),
        pa.field("value", pa.float64()),
        pa.field("session_id", pa.string()),
        pa.field("query", pa.string()),
    ]
)

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("price", pa.float64()),
    ]
)

USERS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("age", pa.string()),
        pa.field("gender", pa.string()),
        pa.field("occupation", pa.string()),
        pa.field("zip_code", pa.string()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "events": EVENTS_SCHEMA,
    "catalog": CATALOG_SCHEMA,
    "users": USERS_SCHEMA,
}

#: Data classes, from least to most restricted.
CLASSES: tuple[str, ...] = ("public", "internal", "pii", "sensitive")

#: Class of every canonical column. ``user_id`` is ``pii`` as a raw id; curated tables
#: hold its pseudonym, classed ``internal`` (see :func:`classify_columns`). Search
#: queries are free text typed by people, so they are ``sensitive``.
COLUMN_CLASSES: dict[str, dict[str, str]] = {
    "events": {
        "user_id": "pii",
        "item_id": "public",
        "event_type": "internal",
        "timestamp": "internal",
        "value": "internal",
        "session_id": "internal",
        "query": "sensitive",
    },
    "catalog": {
        "item_id": "public",
        "title": "public",
        "category": "public",
        "price": "public",
    },
    "users": {
        "user_id": "pii",
        "age": "pii",
        "gender": "pii",
        "occupation": "pii",
        "zip_code": "pii",
    },
}

#: Class of a column the canonical schema does not name (catalog extras are product
#: text; unknown user profile columns are personal data until someone says otherwise).
EXTRA_COLUMN_CLASS: dict[str, str] = {
    "events": "internal",
    "catalog": "public",
    "users": "pii",
}

#: Raw-zone bookkeeping: where each row came from.
SOURCE_FILE = "_source_file"
SOURCE_ROW = "_source_row"
#: Raw-zone bookkeeping: a whole record that could not be parsed (e.g. broken JSON).
UNPARSED_ROW = "_unparsed_row"
UNPARSED_PREFIX = "_unparsed_"


def schema_for(kind: str) -> pa.Schema:
    """Return the canonical schema of a table kind.

    Args:
        kind: ``events``, ``catalog`` or ``users``.

    Returns:
        The pyarrow schema.

    Raises:
        ValueError: ``kind`` is not a canonical table.
    """
    if kind not in SCHEMAS:
        raise ValueError(
            f"table kind {kind!r} is unknown; use one of {sorted(SCHEMAS)}"
        )
    return SCHEMAS[kind]


# Columns that cleaning pseudonymizes or masks, so their curated form is internal.
_CURATED_INTERNAL: dict[str, tuple[str, ...]] = {
    "events": ("user_id", "query"),
    "users": ("user_id",),
}


def classify_columns(
    kind: str, names: Sequence[str], *, curated: bool = False
) -> dict[str, str]:
    """Give every column of a table its data class.

    Args:
        kind: ``events``, ``catalog`` or ``users``.
        names: the columns of the table, canonical or not.
        curated: the table went through cleaning: ``user_id`` holds pseudonyms and
            free text is PII-masked, so both are ``internal``; any other ``pii`` or
            ``sensitive`` column left in a curated table keeps its class.

    Returns:
        Column name -> class; bookkeeping columns (``_...``) are ``internal``.
    """
    schema_for(kind)
    known = COLUMN_CLASSES[kind]
    classes: dict[str, str] = {}
    for name in names:
        if curated and name in _CURATED_INTERNAL.get(kind, ()):
            classes[name] = "internal"
        elif name in known:
            classes[name] = known[name]
        elif name.startswith("_"):
            classes[name] = "internal"
        else:
            classes[name] = EXTRA_COLUMN_CLASS[kind]
    return classes


def coerce_table(table: pa.Table, kind: str) -> pa.Table:
    """Bring a table read from outside into the canonical shape of ``kind``.

    Canonical columns come first in schema order (missing optional ones as nulls),
    extra columns follow as strings. Every non-string canonical column gets a string
    companion ``_unparsed_<name>`` holding the original text where it could not be
    read (null elsewhere). Columns already starting with ``_`` pass through.

    Args:
        table: the table as read; any column types.
        kind: ``events``, ``catalog`` or ``users``.

    Returns:
        The coerced table; row count and order unchanged.

    Raises:
        ValueError: a required column is missing.
    """
    schema = schema_for(kind)
    required = [f.name for f in schema if not f.nullable]
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise ValueError(
            f"{kind} table lacks required column(s) {missing}; "
            f"it has {table.column_names}"
        )

    columns: dict[str, pa.Array] = {}
    unparsed: dict[str, pa.Array] = {}
    for field in schema:
        if field.name not in table.column_names:
            columns[field.name] = pa.nulls(table.num_rows, field.type)
            if not pa.types.is_string(field.type):
                unparsed[UNPARSED_PREFIX + field.name] = pa.nulls(
                    table.num_rows, pa.string()
                )
            continue
        raw = _as_array(table.column(field.name))
        if pa.types.is_string(field.type):
            columns[field.name] = to_id_strings(raw)
        else:
            parse = (
                parse_timestamps if pa.types.is_timestamp(field.type) else parse_floats
            )
            columns[field.name], unparsed[UNPARSED_PREFIX + field.name] = parse(raw)

    for name in table.column_names:
        if name in columns or name in unparsed:
            continue
        raw = _as_array(table.column(name))
        columns[name] = raw if name.startswith("_") else to_id_strings(raw)
    columns.update(unparsed)
    return pa.table(columns)


def _as_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        # One chunk (a Parquet batch) is used as it is; combining would copy it.
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column


def to_id_strings(values: pa.Array) -> pa.Array:
    """Turn ids (or other text) into strings without reading numbers into them.

    Integers become their decimal text; floats that all hold whole numbers lose the
    ``.0`` (a pandas column of integer ids with nulls arrives as floats); timestamps
    become ISO-8601 text; strings pass unchanged.

    Args:
        values: any pyarrow array.

    Returns:
        A ``string`` array of the same length, nulls kept.
    """
    if pa.types.is_string(values.type):
        return values
    if pa.types.is_floating(values.type) and _holds_whole_numbers(values):
        return pc.cast(pc.cast(values, pa.int64()), pa.string())
    if pa.types.is_timestamp(values.type):
        fast = _iso_texts(values)
        if fast is not None:
            return fast
        texts = [None if v is None else v.isoformat() for v in values.to_pylist()]
        return pa.array(texts, pa.string())
    return values.cast(pa.string())


# Years Arrow's strftime writes as datetime.isoformat does (four digits).
_ISO_FIRST = datetime(1000, 1, 1, tzinfo=UTC)
_ISO_LAST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def _iso_texts(values: pa.Array) -> pa.Array | None:
    """``datetime.isoformat()`` of microsecond timestamps, UTC or naive, in Arrow.

    Returns None for other units, zones or years outside 1000-9999 (the caller
    formats those one by one).
    """
    kind = values.type
    if kind.unit != "us" or kind.tz not in (None, "UTC", "+00:00"):
        return None
    micros = values.cast(pa.int64())
    bounds = pc.min_max(micros).as_py()
    low = (_ISO_FIRST - _EPOCH) // timedelta(microseconds=1)
    high = (_ISO_LAST - _EPOCH) // timedelta(microseconds=1)
    if bounds["min"] is not None and (bounds["min"] < low or bounds["max"] > high):
        return None

    seconds = pc.floor_temporal(values, unit="second")
    text = pc.strftime(seconds.cast(pa.timestamp("s", tz=kind.tz)), "%Y-%m-%dT%H:%M:%S")
    # isoformat writes the microseconds only when there are some.
    fraction = pc.subtract(micros, seconds.cast(pa.int64()))
    digits = pc.utf8_lpad(fraction.cast(pa.string()), 6, "0")
    dotted = pc.if_else(
        pc.equal(fraction, 0), "", pc.binary_join_element_wise(".", digits, "")
    )
    zone = "+00:00" if kind.tz is not None else ""
    return pc.binary_join_element_wise(text, dotted, zone, "")


def _holds_whole_numbers(values: pa.Array) -> bool:
    array = values.to_numpy(zero_copy_only=False)
    present = array[~np.isnan(array)]
    return bool(
        len(present)
        and np.all(np.isfinite(present))
        and np.all(present == np.floor(present))
        and np.all(np.abs(present) < 2**53)
    )


def _blank_to_null(values: pa.Array) -> pd.Series:
    """Strings of ``values`` as an object Series, with blank text as missing."""
    text = pd.Series(to_id_strings(values).to_pylist(), dtype=object)
    return text.where(text.str.strip().fillna("") != "", None)


def parse_floats(values: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Read a numeric column (``value``, ``price``).

    Args:
        values: numbers or numeric text; blank text counts as missing.

    Returns:
        ``(float64 array, string array)``: the numbers (null where missing, unreadable
        or not finite) and the original text of every input that could not be read.
    """
    if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        numbers = pc.cast(values, pa.float64())
        is_nan = pc.fill_null(pc.is_nan(numbers), False)
        numbers = pc.if_else(is_nan, pa.scalar(None, pa.float64()), numbers)
        return numbers, pa.nulls(len(values), pa.string())

    text = _blank_to_null(values)
    parsed = pd.to_numeric(text.str.strip(), errors="coerce").astype("float64")
    parsed[~np.isfinite(parsed.to_numpy())] = np.nan
    is_bad = text.notna() & parsed.isna()
    numbers = pa.array(parsed, pa.float64(), from_pandas=True)
    return numbers, pa.array(text.where(is_bad, None), pa.string(), from_pandas=True)


def parse_timestamps(values: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Read a timestamp column under the rules in the module docstring.

    Args:
        values: timestamps, dates, epoch numbers, or text (ISO-8601 or epoch numbers);
            blank text counts as missing.

    Returns:
        ``(timestamp[us, UTC] array, string array)``: the instants (null where missing
        or unreadable) and the original text of every input that could not be read.
    """
    no_text = pa.nulls(len(values), pa.string())
    if pa.types.is_date(values.type):
        values = values.cast(pa.timestamp("us"))
    if pa.types.is_timestamp(values.type):
        # Zoned values are UTC instants already; naive ones are taken as UTC.
        values = values.cast(pa.timestamp("us", tz=values.type.tz), safe=False)
        return values.cast(TIMESTAMP_TYPE), no_text
    if pa.types.is_integer(values.type):
        exact = _exact_epoch_integers(values)
        if exact is not None:
            return exact, no_text
    if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        return _parse_epoch_numbers(values)

    text = _blank_to_null(values)
    stripped = text.str.strip()
    numbers = pd.to_numeric(stripped, errors="coerce").astype("float64")
    micros = epoch_to_micros(numbers.to_numpy())

    # Text that is not a number must be ISO-8601; each distinct text is parsed once.
    is_iso = (numbers.isna() & stripped.notna()).to_numpy()
    if is_iso.any():
        positions = np.flatnonzero(is_iso)
        cache: dict[str, int | None] = {}
        for position, value in zip(
            positions, stripped.to_numpy()[positions], strict=True
        ):
            if value not in cache:
                cache[value] = iso_to_micros(value)
            micros[position] = pd.NA if cache[value] is None else cache[value]

    instants = _micros_to_timestamps(micros)
    is_bad = text.notna().to_numpy() & pd.isna(micros)
    return instants, pa.array(text.where(is_bad, None), pa.string(), from_pandas=True)


# Largest magnitudes whose microseconds (x 1e3 for ms, x 1e6 for s) stay below 2**53,
# where float64 arithmetic is exact too.
_EXACT_MS = 2**53 // 1_000
_EXACT_S = 2**53 // 1_000_000


def _exact_epoch_integers(values: pa.Array) -> pa.Array | None:
    """:func:`parse_timestamps` of integer epochs in integer arithmetic (no copies
    through numpy), or None when some value is too large for it to equal the float
    path of :func:`_parse_epoch_numbers` (then that path runs)."""
    numbers = values.cast(pa.int64())
    magnitude = pc.abs(numbers)
    is_ms = pc.greater(magnitude, pa.scalar(int(EPOCH_MS_THRESHOLD), pa.int64()))
    bound = pc.if_else(is_ms, _EXACT_MS, _EXACT_S)
    if not pc.all(pc.less(magnitude, bound)).as_py():
        return None
    micros = pc.multiply(numbers, pc.if_else(is_ms, 1_000, 1_000_000))
    return micros.cast(TIMESTAMP_TYPE)


def _parse_epoch_numbers(values: pa.Array) -> tuple[pa.Array, pa.Array]:
    """:func:`parse_timestamps` of a numeric column, in numpy without pandas.

    The original text is built only for the rows that could not be read (NaN,
    infinite or out of range), usually none.
    """
    # Nulls become NaN (missing); integers become floats as the text branch reads them.
    array = values.to_numpy(zero_copy_only=False).astype(np.float64)
    scale = np.where(np.abs(array) > EPOCH_MS_THRESHOLD, 1e3, 1e6)
    with np.errstate(invalid="ignore", over="ignore"):
        micros = np.round(array * scale)
    is_usable = np.isfinite(micros) & (np.abs(micros) < _MAX_ABS_MICROS)
    whole = np.where(is_usable, micros, 0).astype(np.int64)
    instants = pa.array(whole, pa.int64(), mask=~is_usable).cast(TIMESTAMP_TYPE)

    no_text = pa.nulls(len(values), pa.string())
    is_bad = ~is_usable & np.asarray(values.is_valid().to_numpy(zero_copy_only=False))
    if not is_bad.any():
        return instants, no_text
    texts = pc.cast(values.filter(pa.array(is_bad)), pa.string())
    return instants, pc.replace_with_mask(no_text, pa.array(is_bad), texts)


def iso_to_micros(text: str) -> int | None:
    """Microseconds since 1970 of an ISO-8601 text, or None when it is not one.

    A text without an offset is taken as UTC; one with an offset is converted to UTC.
    Instants outside the range of :func:`epoch_to_micros` are None as well.
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    micros = (moment - _EPOCH) // timedelta(microseconds=1)
    return micros if abs(micros) < _MAX_ABS_MICROS else None


def _micros_to_timestamps(micros: pd.arrays.IntegerArray) -> pa.Array:
    return pa.array(micros, pa.int64(), from_pandas=True).cast(TIMESTAMP_TYPE)


def epoch_to_micros(numbers: np.ndarray) -> pd.arrays.IntegerArray:
    """Convert epoch numbers to microseconds (ms above ``1e11``, else seconds).

    Args:
        numbers: float64 array; NaN means missing.

    Returns:
        A nullable Int64 array; null where missing, not finite or out of range.
    """
    scale = np.where(np.abs(numbers) > EPOCH_MS_THRESHOLD, 1e3, 1e6)
    with np.errstate(invalid="ignore", over="ignore"):
        micros = np.round(numbers * scale)
    # Stay inside what pandas and every reader can represent (about 1679-2261).
    is_usable = np.isfinite(micros) & (np.abs(micros) < _MAX_ABS_MICROS)
    result = pd.array(np.where(is_usable, micros, 0).astype("int64"), dtype="Int64")
    result[~is_usable] = pd.NA
    return result
