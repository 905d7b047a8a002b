"""Feature store commands of the ``shopml`` command line.

shopml events push FILE [--max-seq-len 50]   # new events -> users' online sequences

``FILE`` holds canonical events (CSV, JSON lines or Parquet, as ``shopml run
--events``) with raw user ids; they are pseudonymized with the configured key before
anything reaches the feature store. ``shopml/cli.py`` mounts the group:
``app.add_typer(events_app, name="events")``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import pandas as pd
import pyarrow as pa
import typer

from shopml.config import Settings, load_settings

logger = logging.getLogger(__name__)

events_app = typer.Typer(
    help="Send live events to the online feature store.", no_args_is_help=True
)

_REQUIRED = ("user_id", "item_id", "timestamp")


@events_app.callback()
def events() -> None:
    """Send live events to the online feature store."""


def read_push_events(path: Path, settings: Settings) -> pd.DataFrame:
    """Read a canonical events file and pseudonymize its user ids.

    Args:
        path: CSV, JSON lines or Parquet file of canonical events with raw user ids.
        settings: settings holding (or locating) the pseudonymization key.

    Returns:
        ``user_id`` (pseudonym), ``item_id`` and ``timestamp`` (UTC) per event; events
        without an item (searches) are kept and skipped later by ``push_events``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, a missing column, or a row whose user id or
            timestamp is missing or unreadable (named by its row number, never by the
            raw user id).
    """
    from shopml.datasets import read_table_file
    from shopml.schemas import SOURCE_ROW, UNPARSED_PREFIX
    from shopml.security import load_pseudonymizer

    if not path.is_file():
        raise FileNotFoundError(f"events file {str(path)!r} does not exist")
    table = read_table_file(path, "events")
    _check_rows(table, path, SOURCE_ROW, UNPARSED_PREFIX + "timestamp")

    frame = table.select(list(_REQUIRED)).to_pandas()
    pseudonymizer = load_pseudonymizer(settings)
    frame["user_id"] = [pseudonymizer.pseudonymize(raw) for raw in frame["user_id"]]
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    return frame


def _check_rows(table: pa.Table, path: Path, row_column: str, unparsed: str) -> None:
    """Refuse the file when a row cannot be pushed, naming the first such row."""
    rows = table.column(row_column).to_pylist()
    for name in ("user_id", "timestamp"):
        values = table.column(name).to_pylist()
        bad = [i for i, value in enumerate(values) if value in (None, "")]
        if bad:
            text = (
                table.column(unparsed).to_pylist()[bad[0]]
                if name == "timestamp"
                else None
            )
            shown = f" (value {text!r})" if text is not None else ""
            raise ValueError(
                f"{path.name} row {rows[bad[0]]}: {name} is missing or unreadable"
                f"{shown}; {len(bad)} row(s) affected, nothing was pushed"
            )


@events_app.command("push")
def push(
    file: Annotated[
        Path, typer.Argument(help="Canonical events: .csv, .jsonl or .parquet.")
    ],
    max_seq_len: Annotated[
        int, typer.Option(help="Most recent items kept per user online.")
    ] = 50,
) -> None:
    """Append new events to the users' online sequences through the push source."""
    from shopml.feast_store import feature_store_from_settings
    from shopml.feature_push import push_events
    from shopml.online_features import FeatureStoreUnavailable

    settings = load_settings()
    try:
        events = read_push_events(file, settings)
    except (FileNotFoundError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="FILE") from err

    store = feature_store_from_settings(settings)
    try:
        n_users = push_events(store, events, max_seq_len=max_seq_len)
    except FeatureStoreUnavailable as err:
        typer.echo(f"error: {err}; run the features stage first", err=True)
        raise typer.Exit(code=1) from err
    logger.info("events push file=%s events=%d users=%d", file, len(events), n_users)
    typer.echo(f"pushed {len(events)} event(s): {n_users} user sequence(s) updated")
