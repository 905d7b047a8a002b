"""Append-only, hash-chained audit log of data access, kept in the object store.

Every event is one JSON object under ``audit/events/<seq>.json`` (``seq`` zero-padded
to 12 digits, starting at 0)::

    {"seq": 7, "time": "2026-05-01T10:00:00+00:00", "actor": "serviceaccount:...",
     "action": "asset.read", "asset": "events@0123456789abcdef", "outcome": "success",
     "details": {...}, "prev": "<hash of event 6>", "hash": "<sha256 of this event>"}

``hash`` is the sha256 of the event's canonical JSON without ``hash``; ``prev`` chains
each event to the one before (64 zeros for the first). :meth:`AuditLog.verify`
recomputes every hash and link, so a modified, deleted or inserted event breaks the
chain and is reported. Deleting the newest events leaves a shorter valid chain: compare
:attr:`VerifyReport.head` with a head recorded elsewhere (``expected_head``) to catch
that; on MinIO, bucket versioning and a Deny on deleting ``audit/*`` (see
:mod:`shopml.access`) keep every overwritten or deleted object recoverable.

The log never holds raw ids, personal data or secrets: :meth:`AuditLog.record` rejects
details whose keys name a secret or whose values contain an email address, phone number
or card number. Callers pass asset refs, pseudonyms or
:meth:`~shopml.security.Pseudonymizer.subject_ref` values, and counts.

One writer at a time is assumed per bucket: a new event is written only when its key is
free (an exclusive create on a local folder; check-then-put and a read-back on S3). Two
writers racing on S3 are detected by the read-back and the loser retries with the next
``seq``; a rare overwrite between another writer's check and put would leave a valid
chain without the lost event (recoverable from bucket versioning).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from shopml.config import Settings
from shopml.pii import find_pii
from shopml.storage import LocalStore, ObjectStore, open_store

logger = logging.getLogger(__name__)

PREFIX = "audit/events/"
GENESIS = "0" * 64
OUTCOMES: tuple[str, ...] = ("success", "unchanged", "failure", "denied")
_SEQ_DIGITS = 12
_KEY_PATTERN = re.compile(rf"{re.escape(PREFIX)}(\d{{{_SEQ_DIGITS}}})\.json")
_SECRET_WORDS = ("password", "secret", "token", "credential", "key")
_APPEND_ATTEMPTS = 5


class AuditError(RuntimeError):
    """The audit log could not be appended to (it is inconsistent or contended)."""


@dataclass(frozen=True)
class AuditEvent:
    """One entry of the audit log.

    Attributes:
        seq: position in the chain, from 0.
        time: ISO-8601 UTC time of the event.
        actor: who acted: ``serviceaccount:<namespace>:<name>`` or ``user:<name>``.
        action: what was done, e.g. ``asset.read``, ``asset.write``,
            ``features.materialize``, ``deploy.decision``, ``erasure.forget``.
        asset: the asset (``name@version``) or another object acted on.
        outcome: one of :data:`OUTCOMES`.
        details: counts and references; no raw ids, personal data or secrets.
        prev: hash of the previous event (:data:`GENESIS` for the first).
        hash: sha256 of this event's canonical JSON without ``hash``.
    """

    seq: int
    time: str
    actor: str
    action: str
    asset: str
    outcome: str
    details: dict[str, Any] = field(default_factory=dict)
    prev: str = GENESIS
    hash: str = ""

    def compute_hash(self) -> str:
        """The sha256 of the canonical JSON of every field but ``hash``."""
        body = asdict(self)
        body.pop("hash")
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        """One line of JSON, keys sorted."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def asset_name(self) -> str:
        """The asset without its version."""
        return self.asset.split("@", 1)[0]


@dataclass(frozen=True)
class VerifyReport:
    """Result of :meth:`AuditLog.verify`.

    Attributes:
        events: events read.
        head: hash of the newest valid event (:data:`GENESIS` for an empty log).
        problems: one sentence per break in the chain; empty when intact.
    """

    events: int
    head: str
    problems: list[str]

    @property
    def is_intact(self) -> bool:
        """Every hash and link checked out."""
        return not self.problems


def default_actor() -> str:
    """Who acts in this process: ``SHOPML_ACTOR``, else the local user.

    On a cluster the manifests set ``SHOPML_ACTOR`` to
    ``serviceaccount:<namespace>:<name>`` through the downward API.
    """
    actor = os.environ.get("SHOPML_ACTOR")
    if actor:
        return actor
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


class AuditLog:
    """The audit log in an object store.

    Args:
        store: where events are kept (the assets' store: one bucket, prefix ``audit/``).
        actor: default actor of events recorded through this instance.
    """

    def __init__(self, store: ObjectStore, *, actor: str | None = None) -> None:
        self.store = store
        self.actor = actor or default_actor()
        self._head: AuditEvent | None = None

    def record(
        self,
        actor: str | None,
        action: str,
        asset: str,
        outcome: str,
        **details: Any,
    ) -> AuditEvent:
        """Append one event to the log.

        Args:
            actor: who acted; None for this instance's actor.
            action: what was done (``asset.read``, ``deploy.decision``, ...).
            asset: the asset ref or object acted on.
            outcome: one of :data:`OUTCOMES`.
            **details: JSON-serializable counts and references.

        Returns:
            The stored event.

        Raises:
            ValueError: an unknown outcome, or details that would leak a secret or
                personal data.
            AuditError: no free position after several attempts (heavy contention).
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is unknown; use one of {OUTCOMES}")
        check_details(details)
        for _ in range(_APPEND_ATTEMPTS):
            head = self._current_head()
            event = _chained(head, actor or self.actor, action, asset, outcome, details)
            if self._write_new(event):
                self._head = event
                logger.debug(
                    "audit seq=%d action=%s asset=%s", event.seq, action, asset
                )
                return event
            self._head = None  # another writer took the position: read the head again
        raise AuditError(
            f"could not append audit event action={action!r} after "
            f"{_APPEND_ATTEMPTS} attempts; other writers keep taking the next position"
        )

    def events(self) -> list[AuditEvent]:
        """Every event, in ``seq`` order (no verification)."""
        return [self._read(key) for key in self._keys()]

    def query(
        self, asset: str | None = None, since: datetime | None = None
    ) -> list[AuditEvent]:
        """Events about one asset and/or from a time on.

        Args:
            asset: an asset name (every version) or ``name@version``; None for all.
            since: earliest event time (naive times are taken as UTC); None for all.

        Returns:
            Matching events in ``seq`` order.
        """
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        selected = []
        for event in self.events():
            if asset is not None and asset not in (event.asset, event.asset_name):
                continue
            if since is not None and datetime.fromisoformat(event.time) < since:
                continue
            selected.append(event)
        return selected

    def verify(self, expected_head: str | None = None) -> VerifyReport:
        """Check every event's hash, every link and the numbering.

        Args:
            expected_head: a head hash recorded earlier; when given, the log must still
                contain that event (catches deletion of the newest events).

        Returns:
            The report; ``problems`` names each break with its ``seq``.
        """
        problems: list[str] = []
        prev, head, count = GENESIS, GENESIS, 0
        seen_hashes: set[str] = set()
        for expected_seq, key in enumerate(self._keys()):
            count += 1
            event = self._load(key)
            problems += _check_event(event, key, expected_seq, prev)
            if isinstance(event, AuditEvent):
                prev = head = event.hash
                seen_hashes.add(event.hash)
        if expected_head is not None and expected_head not in seen_hashes | {GENESIS}:
            problems.append(
                f"expected head {expected_head} is not in the log: newer events were "
                "deleted or the log was replaced"
            )
        return VerifyReport(events=count, head=head, problems=problems)

    def _keys(self) -> list[str]:
        return sorted(k for k in self.store.list(PREFIX) if _KEY_PATTERN.fullmatch(k))

    def _read(self, key: str) -> AuditEvent:
        event = self._load(key)
        if isinstance(event, str):
            raise ValueError(f"audit object {key} is unreadable: {event}")
        return event

    def _load(self, key: str) -> AuditEvent | str:
        """The event under ``key``, or why it cannot be read."""
        try:
            return AuditEvent(**json.loads(self.store.get_bytes(key)))
        except (ValueError, TypeError) as err:
            return f"{type(err).__name__}: {err}"

    def _current_head(self) -> AuditEvent | None:
        if self._head is None:
            keys = self._keys()
            self._head = self._read(keys[-1]) if keys else None
        return self._head

    def _write_new(self, event: AuditEvent) -> bool:
        """Store ``event`` under its key unless that key is taken; True if stored."""
        key = event_key(event.seq)
        data = event.to_json().encode("utf-8")
        if isinstance(self.store, LocalStore):
            return _create_exclusive(self.store, key, data)
        if self.store.exists(key):
            return False
        self.store.put_bytes(key, data)
        return self.store.get_bytes(key) == data


def event_key(seq: int) -> str:
    """Object key of the event at position ``seq``."""
    return f"{PREFIX}{seq:0{_SEQ_DIGITS}d}.json"


def _chained(
    head: AuditEvent | None,
    actor: str,
    action: str,
    asset: str,
    outcome: str,
    details: dict[str, Any],
) -> AuditEvent:
    event = AuditEvent(
        seq=0 if head is None else head.seq + 1,
        time=datetime.now(UTC).isoformat(),
        actor=actor,
        action=action,
        asset=asset,
        outcome=outcome,
        details=json.loads(json.dumps(details, sort_keys=True, default=str)),
        prev=GENESIS if head is None else head.hash,
    )
    return AuditEvent(**{**asdict(event), "hash": event.compute_hash()})


def _check_event(
    event: AuditEvent | str, key: str, expected_seq: int, prev: str
) -> list[str]:
    if isinstance(event, str):
        return [f"{key} is not a valid audit event ({event})"]
    problems = []
    if event.seq != expected_seq or key != event_key(event.seq):
        problems.append(
            f"{key}: position {expected_seq} holds seq {event.seq}; an event was "
            "deleted or inserted before it"
        )
    if event.compute_hash() != event.hash:
        problems.append(f"seq {event.seq}: content does not match its hash (modified)")
    if event.prev != prev:
        problems.append(
            f"seq {event.seq}: prev {event.prev[:12]} does not link to the event "
            f"before it ({prev[:12]}); an event was deleted, replaced or inserted"
        )
    return problems


def _create_exclusive(store: LocalStore, key: str, data: bytes) -> bool:
    """Write a new file under ``key`` atomically; False when the key exists."""
    target = store.path(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.link(tmp, target)  # fails when the key is taken, unlike a rename
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def check_details(details: dict[str, Any]) -> None:
    """Refuse details that name a secret or hold personal data.

    Args:
        details: the event details.

    Raises:
        ValueError: a key names a secret (``password``, ``token``, ``key``, ...) or a
            value contains an email address, phone number or card number.
    """
    for name, value in details.items():
        lowered = name.lower()
        if any(word in lowered for word in _SECRET_WORDS) and lowered != "key_id":
            raise ValueError(
                f"audit detail {name!r} looks like a secret; record a key id or a "
                "fingerprint instead"
            )
        # Only text can hold contact data; numbers are counts, sizes and times.
        kinds = {span.kind for text in _strings(value) for span in find_pii(text)} - {
            "address"
        }
        if kinds:
            raise ValueError(
                f"audit detail {name!r} contains {sorted(kinds)}; record a pseudonym "
                "or a subject reference, never raw personal data"
            )


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON-like value (dict keys and values, list items)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *_strings(v)]]
    if isinstance(value, list | tuple | set):
        return [s for item in value for s in _strings(item)]
    return []


def audit_log_from_settings(
    settings: Settings, *, actor: str | None = None
) -> AuditLog:
    """The audit log in the object store that ``settings`` describe.

    Args:
        settings: process settings (MinIO/S3 or the local store folder).
        actor: default actor; None for :func:`default_actor`.

    Returns:
        The audit log.
    """
    return AuditLog(open_store(settings), actor=actor)
