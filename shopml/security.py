"""Pseudonymization of user identifiers with a keyed hash (HMAC-SHA256).

The key comes from ``SHOPML_PSEUDONYMIZATION_KEY`` (a Kubernetes Secret on a cluster).
Local runs without that variable get a random key created once in
``$SHOPML_HOME/secrets/pseudonymization.key`` with mode 0600, outside the repository.
The key id (a short hash of the key, not the key) is recorded with every asset so keys
can rotate.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from shopml.config import Settings

logger = logging.getLogger(__name__)

PSEUDONYM_PREFIX = "u_"
_PSEUDONYM_HEX_CHARS = 32


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
            user_id: the raw identifier, already normalized by the caller.

        Returns:
            ``u_`` followed by 32 hex characters of HMAC-SHA256(key, user_id).

        Raises:
            ValueError: the identifier is empty.
        """
        if not user_id:
            raise ValueError(
                "user_id is empty; a pseudonym needs a non-empty identifier"
            )
        digest = hmac.new(self.key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()
        return PSEUDONYM_PREFIX + digest[:_PSEUDONYM_HEX_CHARS]

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
