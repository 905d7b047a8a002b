"""Logging set-up for entry points (CLI, component mains, model servers).

Library modules only call ``logging.getLogger(__name__)``; handlers and levels are set
here, once, by whoever owns the process.
"""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | int | None = None) -> None:
    """Send log records to stderr in one plain, searchable line each.

    Args:
        level: a level name or number; defaults to ``SHOPML_LOG_LEVEL`` or INFO.
    """
    chosen = level if level is not None else os.environ.get("SHOPML_LOG_LEVEL", "INFO")
    logging.basicConfig(level=chosen, format=_FORMAT, force=True)
    # Third-party libraries chatty at INFO are held to WARNING.
    for noisy in ("urllib3", "botocore", "s3fs", "fsspec", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
