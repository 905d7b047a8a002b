"""Synthetic e-commerce logs in canonical form, with faults injected on request.

:func:`write_synthetic` writes ``events``, ``catalog`` and ``users`` files that look like
a shop's logs: item popularity follows a Zipf law, events come in sessions (seconds
apart, sessions hours or days apart), the catalog has titles, categories and prices,
and user profiles carry PII-like fields (email, phone, zip code). Every fault kind the
clean stage knows can be injected at a chosen rate (:data:`EVENT_FAULTS`,
:data:`CATALOG_FAULTS`), so each check can be exercised and the benchmark fed.

Events are generated and written in chunks of ``chunk_events``; memory stays flat
whatever ``n_events`` is. Run ``shopml data synth --events 1000000 --out DIR``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("parquet", "csv")

#: Event faults and what each does to a row (the clean stage's reason in brackets).
EVENT_FAULTS: dict[str, str] = {
    "null_user_id": "user_id blank [null_user_id]",
    "null_item_id": "item_id blank [null_item_id]",
    "null_timestamp": "timestamp blank [null_timestamp]",
    "bad_timestamp": "timestamp is text like 'yesterday' [bad_timestamp]",
    "bad_value": "value is text like 'n/a' on a rate event [bad_value]",
    "bad_event_type": "event_type outside the vocabulary [bad_event_type]",
    "future_timestamp": "timestamp a year ahead [future_timestamp]",
    "early_timestamp": "timestamp in 1980 [early_timestamp]",
    "unknown_item": "item not in the catalog [unknown_item]",
    "duplicate": "an exact copy of another event [duplicate]",
    "near_duplicate": "a copy one second later [near_duplicate]",
    "bot_user": "events of a bot user, many per second [bot_user]",
    "event_type_case": "event_type in upper case with spaces (repaired)",
    "whitespace": "user_id padded with spaces (repaired)",
}
#: Catalog faults.
CATALOG_FAULTS: dict[str, str] = {
    "null_title": "title blank [null_title]",
    "negative_price": "price below zero [negative_price]",
    "bad_price": "price is text [bad_price]",
    "duplicate_id": "an item id repeated with another title [duplicate_id]",
    "html_entities": "title with HTML entities (repaired)",
    "control_chars": "title with control characters (repaired)",
}
# Faults that need text in typed columns; files get string columns when any is on.
_TEXT_FAULTS = frozenset({"bad_timestamp", "bad_value", "bad_price"})

_EVENT_TYPES = np.array(["view", "click", "cart", "purchase", "search", "rate"])
_EVENT_P = np.array([0.58, 0.2, 0.08, 0.04, 0.05, 0.05])
_CATEGORIES = np.array(
    ["shoes", "shirts", "kitchen", "garden", "toys", "books", "audio", "beauty"]
)
_ADJECTIVES = np.array(
    ["Classic", "Light", "Pro", "Eco", "Compact", "Deluxe", "Smart", "Soft", "Urban"]
)
_NOUNS = np.array(
    ["Runner", "Tee", "Pan", "Hose", "Robot", "Novel", "Speaker", "Cream", "Lamp"]
)
_START_S = 1_672_531_200  # 2023-01-01T00:00:00Z
_SPAN_S = 365 * 86_400


@dataclass(frozen=True)
class SynthConfig:
    """Shape of the synthetic data.

    Attributes:
        n_events: events to write (before injected extra rows such as duplicates).
        n_users: users; activity per user is skewed (lognormal).
        n_items: catalog items; popularity is Zipf with exponent ``zipf_a``.
        zipf_a: Zipf exponent of item popularity (1.0-1.3 is typical of shops).
        mean_session_events: mean events per session.
        faults: fault kind -> share of rows to corrupt (events and catalog kinds).
        seed: random seed; the same config writes the same files.
        chunk_events: events generated and written at a time.
        file_format: ``parquet`` or ``csv``.
    """

    n_events: int = 100_000
    n_users: int = 0
    n_items: int = 0
    zipf_a: float = 1.1
    mean_session_events: float = 8.0
    faults: Mapping[str, float] = field(default_factory=dict)
    seed: int = 7
    chunk_events: int = 1_000_000
    file_format: str = "parquet"

    def __post_init__(self) -> None:
        known = set(EVENT_FAULTS) | set(CATALOG_FAULTS)
        unknown = sorted(set(self.faults) - known)
        if unknown:
            raise ValueError(f"fault kinds {unknown} are unknown; use {sorted(known)}")
        bad = {k: r for k, r in self.faults.items() if not 0.0 <= r <= 1.0}
        if bad:
            raise ValueError(f"fault rates {bad} must lie between 0 and 1")
        if self.file_format not in FORMATS:
            raise ValueError(
                f"file_format {self.file_format!r} is unknown; use one of {FORMATS}"
            )
        if self.n_events < 1:
            raise ValueError(f"n_events={self.n_events} must be at least 1")

    @property
    def users(self) -> int:
        """Users: as set, or one per 50 events (at least 10)."""
        return self.n_users or max(10, self.n_events // 50)

    @property
    def items(self) -> int:
        """Items: as set, or one per 100 events (at least 20)."""
        return self.n_items or max(20, self.n_events // 100)


@dataclass(frozen=True)
class SynthFiles:
    """Files written by :func:`write_synthetic` and their row counts."""

    events: Path
    catalog: Path
    users: Path
    rows: dict[str, int]


def write_synthetic(out_dir: Path, config: SynthConfig | None = None) -> SynthFiles:
    """Write synthetic events, catalog and users files into ``out_dir``.

    Args:
        out_dir: destination folder (created).
        config: shape, faults and format; defaults to :class:`SynthConfig`.

    Returns:
        The three file paths and their row counts.
    """
    config = config or SynthConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    suffix = config.file_format
    paths = {k: out_dir / f"{k}.{suffix}" for k in ("events", "catalog", "users")}

    rows = {
        "catalog": _write(paths["catalog"], iter([_catalog(config, rng)]), config),
        "users": _write(paths["users"], iter([_users(config, rng)]), config),
        "events": _write(paths["events"], _event_chunks(config, rng), config),
    }
    logger.info("synthetic data in %s: rows=%s faults=%s", out_dir, rows, config.faults)
    return SynthFiles(paths["events"], paths["catalog"], paths["users"], rows)


def _write(path: Path, chunks: Iterator[pa.Table], config: SynthConfig) -> int:
    """Write chunks to one Parquet or CSV file; returns the row count."""
    total = 0
    writer: pq.ParquetWriter | pacsv.CSVWriter | None = None
    try:
        for chunk in chunks:
            if writer is None:
                writer = (
                    pq.ParquetWriter(path, chunk.schema, compression="zstd")
                    if config.file_format == "parquet"
                    else pacsv.CSVWriter(path, chunk.schema)
                )
            writer.write_table(chunk)
            total += chunk.num_rows
    finally:
        if writer is not None:
            writer.close()
    return total


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    text = pc.cast(pa.array(numbers, pa.int64()), pa.string())
    return pc.binary_join_element_wise(prefix, text, "")


def _rate(config: SynthConfig, kind: str) -> float:
    return float(config.faults.get(kind, 0.0))


def _pick(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Row positions to corrupt: each row independently with probability ``rate``."""
    if rate <= 0:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(rng.random(n) < rate)


def _catalog(config: SynthConfig, rng: np.random.Generator) -> pa.Table:
    n = config.items
    titles = np.char.add(
        np.char.add(rng.choice(_ADJECTIVES, n), " "), rng.choice(_NOUNS, n)
    )
    titles = np.char.add(np.char.add(titles, " "), np.arange(n).astype(str))
    prices = np.round(rng.lognormal(3.0, 0.8, n), 2).astype(object)
    title_list = titles.astype(object)
    for i in _pick(rng, n, _rate(config, "null_title")):
        title_list[i] = " "
    for i in _pick(rng, n, _rate(config, "html_entities")):
        title_list[i] = str(title_list[i]).replace(" ", " &amp; ", 1)
    for i in _pick(rng, n, _rate(config, "control_chars")):
        title_list[i] = str(title_list[i]) + "\x07"
    for i in _pick(rng, n, _rate(config, "negative_price")):
        prices[i] = -abs(float(prices[i]))
    has_text = _rate(config, "bad_price") > 0
    if has_text:
        prices = np.array([f"{p}" for p in prices], dtype=object)
        for i in _pick(rng, n, _rate(config, "bad_price")):
            prices[i] = "call us"
    table = pa.table(
        {
            "item_id": _ids("i", np.arange(n)),
            "title": pa.array(title_list, pa.string()),
            "category": pa.array(rng.choice(_CATEGORIES, n), pa.string()),
            "price": pa.array(prices, pa.string() if has_text else pa.float64()),
            "brand": pa.array(rng.choice(["acme", "zenit", "nordo"], n), pa.string()),
        }
    )
    repeats = _pick(rng, n, _rate(config, "duplicate_id"))
    if len(repeats):
        copies = table.take(pa.array(repeats)).set_column(
            1, "title", pa.array(["Other " + str(i) for i in repeats], pa.string())
        )
        table = pa.concat_tables([table, copies])
    return table


def _users(config: SynthConfig, rng: np.random.Generator) -> pa.Table:
    n = config.users
    numbers = np.arange(n)
    return pa.table(
        {
            "user_id": _ids("u", numbers),
            "age": pa.array(rng.integers(18, 80, n).astype(str), pa.string()),
            "gender": pa.array(rng.choice(["F", "M", "X"], n), pa.string()),
            "occupation": pa.array(rng.choice(["engineer", "artist", "nurse"], n)),
            "zip_code": pa.array(rng.integers(10000, 99999, n).astype(str)),
            "email": pc.binary_join_element_wise(
                _ids("user", numbers), "example.com", "@"
            ),
            "phone": pa.array(
                np.char.add("+4915", rng.integers(10**7, 10**8, n).astype(str))
            ),
        }
    )


def _event_chunks(config: SynthConfig, rng: np.random.Generator) -> Iterator[pa.Table]:
    ranks = np.arange(1, config.items + 1, dtype=np.float64)
    item_cdf = np.cumsum(ranks**-config.zipf_a)
    item_cdf /= item_cdf[-1]
    activity = rng.lognormal(0.0, 1.0, config.users)
    user_cdf = np.cumsum(activity) / activity.sum()
    remaining, session_base = config.n_events, 0
    while remaining > 0:
        n = min(config.chunk_events, remaining)
        chunk, n_sessions = _sessions(n, config, rng, item_cdf, user_cdf, session_base)
        yield _inject_event_faults(chunk, config, rng)
        remaining -= n
        session_base += n_sessions


def _sessions(
    n: int,
    config: SynthConfig,
    rng: np.random.Generator,
    item_cdf: np.ndarray,
    user_cdf: np.ndarray,
    session_base: int,
) -> tuple[pa.Table, int]:
    """``n`` events in sessions: users by activity, items by Zipf popularity."""
    lengths = rng.geometric(1.0 / config.mean_session_events, n)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n) + 1]
    lengths[-1] -= lengths.sum() - n
    session = np.repeat(np.arange(len(lengths)), lengths)
    users = np.searchsorted(user_cdf, rng.random(len(lengths)))[session]
    starts = _START_S + rng.integers(0, _SPAN_S, len(lengths))

    # Seconds since the session start: cumulative gaps of about 40 s.
    gaps = rng.exponential(40.0, n)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    cumulative = np.cumsum(gaps)
    offsets = cumulative - np.repeat(cumulative[first], lengths)
    millis = ((starts[session] + offsets) * 1000).astype(np.int64)

    types = rng.choice(_EVENT_TYPES, n, p=_EVENT_P)
    values = np.where(types == "rate", rng.integers(1, 6, n).astype(float), np.nan)
    table = pa.table(
        {
            "user_id": _ids("u", users),
            "item_id": _ids("i", np.searchsorted(item_cdf, rng.random(n))),
            "event_type": pa.array(types, pa.string()),
            "timestamp": pa.array(millis, pa.int64()),
            "value": pa.array(values, pa.float64(), from_pandas=True),
            "session_id": _ids("s", session + session_base),
        }
    )
    return table.sort_by([("timestamp", "ascending")]), len(lengths)


def _set(table: pa.Table, name: str, rows: np.ndarray, value: object) -> pa.Table:
    """Put ``value`` into column ``name`` at ``rows``."""
    if not len(rows):
        return table
    column = table.column(name).combine_chunks()
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[rows] = True
    replacement = pa.scalar(value, column.type) if value is not None else None
    if replacement is None:
        replacement = pa.scalar(None, column.type)
    updated = pc.if_else(pa.array(mask), replacement, column)
    return table.set_column(table.schema.get_field_index(name), name, updated)


def _inject_event_faults(
    table: pa.Table, config: SynthConfig, rng: np.random.Generator
) -> pa.Table:
    """Corrupt rows of one chunk at the configured rates."""
    n = table.num_rows
    if any(_rate(config, k) > 0 for k in _TEXT_FAULTS):
        for name in ("timestamp", "value"):
            column = pc.cast(table.column(name), pa.string())
            table = table.set_column(table.schema.get_field_index(name), name, column)
    year_ms = 365 * 86_400_000
    text_ts = pa.types.is_string(table.schema.field("timestamp").type)
    future = (_START_S * 1000 + 3 * year_ms) if not text_ts else "2099-01-01T00:00:00Z"
    early = 315_532_800_000 if not text_ts else "1980-01-01T00:00:00Z"
    simple: list[tuple[str, str, object]] = [
        ("null_user_id", "user_id", ""),
        ("null_item_id", "item_id", ""),
        ("null_timestamp", "timestamp", None),
        ("bad_timestamp", "timestamp", "yesterday"),
        ("bad_event_type", "event_type", "like"),
        ("future_timestamp", "timestamp", future),
        ("early_timestamp", "timestamp", early),
        ("unknown_item", "item_id", "i_missing"),
        ("event_type_case", "event_type", " VIEW "),
        ("whitespace", "user_id", " u0 "),
    ]
    for kind, name, value in simple:
        table = _set(table, name, _pick(rng, n, _rate(config, kind)), value)
    rows = _pick(rng, n, _rate(config, "bad_value"))
    table = _set(table, "event_type", rows, "rate")
    table = _set(table, "value", rows, "n/a")
    return _add_copies(table, config, rng)


def _add_copies(
    table: pa.Table, config: SynthConfig, rng: np.random.Generator
) -> pa.Table:
    """Append exact duplicates, near duplicates and a burst of bot events."""
    n = table.num_rows
    parts = [table]
    duplicates = _pick(rng, n, _rate(config, "duplicate"))
    if len(duplicates):
        parts.append(table.take(pa.array(duplicates)))
    near = _pick(rng, n, _rate(config, "near_duplicate"))
    if len(near):
        copies = table.take(pa.array(near))
        stamps = copies.column("timestamp")
        if pa.types.is_integer(stamps.type):
            shifted = pc.add(stamps, 1000)
            copies = copies.set_column(3, "timestamp", shifted)
        parts.append(copies)
    n_bot = round(n * _rate(config, "bot_user"))
    if n_bot:
        # Two events a second, each on another item: far beyond a person's pace.
        bot = table.slice(0, n_bot)
        stamps = _START_S * 1000 + 500 * np.arange(n_bot, dtype=np.int64)
        bot = bot.set_column(0, "user_id", pa.array(["bot0"] * n_bot, pa.string()))
        items = _ids("i", np.arange(n_bot) % config.items)
        bot = bot.set_column(1, "item_id", items)
        bot = bot.set_column(
            3, "timestamp", pa.array(stamps).cast(bot.schema.field("timestamp").type)
        )
        parts.append(bot)
    return pa.concat_tables(parts) if len(parts) > 1 else table
