"""Pseudonymization of user identifiers with a keyed hash (HMAC-SHA256).

The key comes from ``SHOPML_PSEUDONYMIZATION_KEY`` (a Kubernetes Secret on a cluster).
Local runs without that variable get a random key created once in
``$SHOPML_HOME/secrets/pseudonymization.key`` with mode 0600, outside the repository.
The key id (a short hash of the key, not the key) is recorded with every asset so keys
can rotate. Identifiers are normalized first (:func:`shopml.pii.normalize_identifier`:
emails trimmed and case-folded, phone numbers in E.164), so every notation of one
person's email or phone yields the same pseudonym.

:func:`scan_for_values` is the canary check: it searches files, folders and Redis for
planted personal data that must not have left the raw zone.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import secrets
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shopml.config import Settings
from shopml.pii import normalize_identifier

logger = logging.getLogger(__name__)

PSEUDONYM_PREFIX = "u_"
_PSEUDONYM_HEX_CHARS = 32
_PSEUDONYM_BYTES = _PSEUDONYM_HEX_CHARS // 2
# Ids that normalization leaves as they are: no "@", no whitespace, and either a letter
# (a phone number has none) or digits only (a bare digit run stays an opaque id).
_OPAQUE_ID = re.compile(r"[A-Za-z0-9_-]*[A-Za-z_][A-Za-z0-9_-]*|[0-9]+")


def pseudonym_texts(digests: Sequence[bytes]) -> list[str]:
    """Pseudonyms (``u_`` + hex) of digests from :meth:`Pseudonymizer.pseudonymize_many`.

    Args:
        digests: 16-byte digests.

    Returns:
        The pseudonyms, in order.
    """
    return [PSEUDONYM_PREFIX + digest.hex() for digest in digests]


@dataclass(frozen=True)
class Pseudonymizer:
    """Maps raw user identifiers to stable pseudonyms.

    Attributes:
        key: the HMAC secret.
    """

    key: bytes

    @property
    def key_id(self) -> str:
        """A short public fingerprint of the key, safe to store beside the data."""
        return hashlib.sha256(b"shopml-key-id:" + self.key).hexdigest()[:12]

    def pseudonymize(self, user_id: str) -> str:
        """Return the pseudonym of one raw identifier.

        Args:
            user_id: the raw identifier in any notation; it is normalized here.

        Returns:
            ``u_`` followed by 32 hex characters of HMAC-SHA256(key, normalized id).

        Raises:
            ValueError: the identifier is empty or blank.
        """
        normalized = normalize_identifier(user_id)
        if not normalized:
            raise ValueError(
                f"user_id is empty (got {len(user_id)} blank characters); a pseudonym "
                "needs a non-empty identifier"
            )
        digest = self._digest(b"", normalized)
        return PSEUDONYM_PREFIX + digest[:_PSEUDONYM_HEX_CHARS]

    def subject_ref(self, user_id: str) -> str:
        """A reference to a person for the audit log, unlike the pseudonym in the data.

        It is derived with the same key under another label, so the audit log of an
        erasure never holds the pseudonym that the erased data used, yet whoever holds
        the key and the raw id can find the erasure again.

        Args:
            user_id: the raw identifier in any notation.

        Returns:
            ``s_`` followed by 16 hex characters.

        Raises:
            ValueError: the identifier is empty or blank.
        """
        normalized = normalize_identifier(user_id)
        if not normalized:
            raise ValueError(
                "user_id is empty; a subject reference needs an identifier"
            )
        return "s_" + self._digest(b"shopml-subject-ref:", normalized)[:16]

    def pseudonymize_many(self, user_ids: Sequence[str]) -> list[bytes]:
        """Digests of many raw identifiers at once (the bulk path of the clean stage).

        Equal to ``pseudonymize`` per identifier, at a fraction of the cost: an id made
        only of ASCII letters, digits, ``_`` and ``-`` (with a letter, or only digits)
        is neither an email nor a phone number, so it skips normalization.

        Args:
            user_ids: raw identifiers, trimmed and non-blank.

        Returns:
            The 16 digest bytes of each pseudonym, in order; the pseudonym is ``u_``
            followed by their hex (see :func:`pseudonym_texts`).

        Raises:
            ValueError: an identifier is empty or blank.
        """
        key, opaque = self.key, _OPAQUE_ID.fullmatch
        digests = []
        for user_id in user_ids:
            normalized = user_id if opaque(user_id) else normalize_identifier(user_id)
            if not normalized:
                raise ValueError(
                    f"user_id is empty (got {len(user_id)} blank characters); a "
                    "pseudonym needs a non-empty identifier"
                )
            digest = hmac.digest(key, normalized.encode("utf-8"), "sha256")
            digests.append(digest[:_PSEUDONYM_BYTES])
        return digests

    def _digest(self, label: bytes, normalized: str) -> str:
        # hmac.digest runs in C (OpenSSL): a few times faster than hmac.new.
        return hmac.digest(self.key, label + normalized.encode("utf-8"), "sha256").hex()

    def is_pseudonym(self, value: str) -> bool:
        """Tell whether ``value`` has the shape of a pseudonym."""
        body = value[len(PSEUDONYM_PREFIX) :]
        return (
            value.startswith(PSEUDONYM_PREFIX)
            and len(body) == _PSEUDONYM_HEX_CHARS
            and all(c in "0123456789abcdef" for c in body)
        )


def load_pseudonymizer(settings: Settings) -> Pseudonymizer:
    """Build the pseudonymizer from the configured key, creating a local one if needed.

    Args:
        settings: process settings; ``pseudonymization_key`` wins over the key file.

    Returns:
        A pseudonymizer holding the key.
    """
    if settings.pseudonymization_key:
        return Pseudonymizer(settings.pseudonymization_key.encode("utf-8"))

    key_file = settings.home / "secrets" / "pseudonymization.key"
    if not key_file.exists():
        _create_key_file(key_file)
        logger.warning(
            "no SHOPML_PSEUDONYMIZATION_KEY set; created a local key at %s "
            "(set the variable from a Secret on a cluster)",
            key_file,
        )
    return Pseudonymizer(key_file.read_bytes().strip())


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_hex(32).encode("ascii"))
    os.replace(tmp, path)


@dataclass(frozen=True)
class ScanHit:
    """A planted value found where it must not be.

    Attributes:
        value_index: position of the value in the list scanned for.
        variant: which form matched: ``as-given``, ``normalized`` or ``digits``.
        location: the file (with ``!member`` for archives and Parquet) or
            ``redis://host:port/db#key``.
    """

    value_index: int
    variant: str
    location: str


def scan_for_values(
    paths: Iterable[Path],
    redis_urls: Iterable[str],
    values: Sequence[str],
    *,
    exclude: Iterable[Path] = (),
) -> list[ScanHit]:
    """Search files, folders and Redis databases for planted personal data (a canary).

    Every value is searched case-insensitively as given, in its normalized form
    (:func:`shopml.pii.normalize_identifier`) and, when it holds 9 or more digits, as
    digits only. Parquet files are decoded (their pages are compressed), zip archives
    such as ``model.pt`` are searched member by member, other files as raw bytes;
    Redis keys and values are read with ``SCAN`` (strings, hashes, lists, sets).

    Args:
        paths: files or folders (searched recursively).
        redis_urls: ``redis://host:port/db`` URLs to search.
        values: the planted values.
        exclude: files or folders to skip (the restricted raw zone, for instance).

    Returns:
        One hit per value, variant and location found.
    """
    needles = _needles(values)
    skipped = [Path(p).resolve() for p in exclude]
    hits: list[ScanHit] = []
    for path in _files(paths, skipped):
        for location, blob in _file_blobs(path):
            hits += _search(blob, needles, location)
    for url in redis_urls:
        for location, blob in _redis_blobs(url):
            hits += _search(blob, needles, location)
    logger.info("scanned for %d values: %d hit(s)", len(values), len(hits))
    return hits


def _needles(values: Sequence[str]) -> list[tuple[int, str, bytes]]:
    needles = []
    for index, value in enumerate(values):
        forms = {"as-given": value.strip(), "normalized": normalize_identifier(value)}
        digits = "".join(c for c in value if c.isdigit())
        if len(digits) >= 9:
            forms["digits"] = digits
        seen: set[bytes] = set()
        for variant, form in forms.items():
            needle = form.lower().encode("utf-8")
            if needle and needle not in seen:
                seen.add(needle)
                needles.append((index, variant, needle))
    return needles


def _search(
    blob: bytes, needles: list[tuple[int, str, bytes]], location: str
) -> list[ScanHit]:
    haystack = blob.lower()
    return [
        ScanHit(index, variant, location)
        for index, variant, needle in needles
        if needle in haystack
    ]


def _files(paths: Iterable[Path], skipped: list[Path]) -> Iterator[Path]:
    for root in paths:
        candidates = [root] if Path(root).is_file() else sorted(Path(root).rglob("*"))
        for path in candidates:
            resolved = path.resolve()
            if path.is_file() and not any(resolved.is_relative_to(s) for s in skipped):
                yield path


def _file_blobs(path: Path) -> Iterator[tuple[str, bytes]]:
    """The searchable content of one file, decoded where it is compressed."""
    data = path.read_bytes()
    yield str(path), data
    if data[:4] == b"PAR1":
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as err:
            logger.warning("cannot decode Parquet %s: %s", path, err)
            return
        for name in table.column_names:
            text = "\n".join(str(v) for v in table.column(name).to_pylist())
            yield f"{path}!{name}", text.encode("utf-8")
    elif zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                yield f"{path}!{member}", archive.read(member)


def _redis_blobs(url: str) -> Iterator[tuple[str, bytes]]:
    import redis

    client: Any = redis.Redis.from_url(url)  # sync client; redis-py types mix in async
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            parts: list[Any] = [key]
            if kind == b"string":
                parts.append(client.get(key))
            elif kind == b"hash":
                parts += [b for pair in client.hgetall(key).items() for b in pair]
            elif kind == b"list":
                parts += client.lrange(key, 0, -1)
            elif kind in (b"set", b"zset"):
                parts += list(
                    client.smembers(key)
                    if kind == b"set"
                    else client.zrange(key, 0, -1)
                )
            blob = b"\n".join(
                p if isinstance(p, bytes) else str(p).encode() for p in parts
            )
            yield f"{url}#{key!r}", blob
    finally:
        client.close()
