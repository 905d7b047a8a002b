"""Object storage for assets: a local folder or an S3-compatible bucket (MinIO).

Both stores speak the :class:`ObjectStore` protocol over ``/``-separated keys such as
``curated/events/0123456789abcdef/data.parquet``. A reader never sees half an object:
the local store writes a temporary file and renames it, and an S3 PUT is atomic.
:func:`open_store` picks the store the settings describe.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from minio import Minio
from minio.error import S3Error

from shopml.config import S3Settings, Settings

logger = logging.getLogger(__name__)

_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"}
_TMP_MARKER = ".tmp-"


def check_key(key: str) -> str:
    """Validate an object key and return it.

    Args:
        key: ``/``-separated relative key.

    Returns:
        The key unchanged.

    Raises:
        ValueError: the key is empty, absolute, has empty or ``.``/``..`` segments, or
            a backslash.
    """
    if not key or key.startswith("/") or "\\" in key:
        raise ValueError(
            f"object key {key!r} must be a non-empty relative path with '/'"
        )
    if any(part in {"", ".", ".."} for part in key.split("/")):
        raise ValueError(f"object key {key!r} has an empty, '.' or '..' segment")
    return key


def _check_prefix(prefix: str) -> str:
    if prefix:
        check_key(prefix.rstrip("/") or "/")
    return prefix


class ObjectStore(Protocol):
    """What the asset layer needs from an object store."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key``, replacing any object there."""
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Upload the file at ``path`` under ``key``."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """Read the whole object; FileNotFoundError when absent."""
        ...

    def get_file(self, key: str, path: Path) -> None:
        """Download the object to ``path``; FileNotFoundError when absent."""
        ...

    def exists(self, key: str) -> bool:
        """Tell whether an object is stored under ``key``."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix``, sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; removing an absent key does nothing."""
        ...

    def uri(self, key: str) -> str:
        """Where the object lives, for people and readers such as pyarrow or Feast."""
        ...


class LocalStore:
    """Objects as files under a root folder (local runs without S3).

    Args:
        root: the folder; created on first write.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        """The file that holds ``key``."""
        return self.root / check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` via a temporary file and an atomic rename."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}{_TMP_MARKER}"
        )
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        """Copy the file at ``path`` under ``key`` via a temporary file and a rename."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}{_TMP_MARKER}"
        )
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        """Read the object under ``key``."""
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"no object {key!r} in {self.root}") from err

    def get_file(self, key: str, path: Path) -> None:
        """Copy the object under ``key`` to ``path``."""
        source = self.path(key)
        if not source.is_file():
            raise FileNotFoundError(f"no object {key!r} in {self.root}")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def exists(self, key: str) -> bool:
        """Tell whether ``key`` is stored."""
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        """Every stored key starting with ``prefix`` (no temporary files), sorted."""
        _check_prefix(prefix)
        # Walk only the folder the prefix names, not the whole store.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for path in base.rglob("*"):
            if path.is_file() and _TMP_MARKER not in path.name:
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove ``key`` if stored."""
        self.path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        """The absolute file path of ``key`` (pyarrow, pandas and Feast read it)."""
        return str(self.path(key))


class MinioStore:
    """Objects in one bucket of an S3-compatible server, through the ``minio`` SDK.

    Args:
        settings: endpoint, bucket and credentials.
        create_bucket: create the bucket when it does not exist yet.
    """

    def __init__(self, settings: S3Settings, *, create_bucket: bool = True) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.client = Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            secure=settings.secure,
            region=settings.region,
        )
        if create_bucket and not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)
            logger.info("created bucket=%s on %s", self.bucket, settings.endpoint)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Upload ``data`` under ``key`` in one PUT."""
        self.client.put_object(self.bucket, check_key(key), io.BytesIO(data), len(data))

    def put_file(self, key: str, path: Path) -> None:
        """Upload the file at ``path`` under ``key``."""
        self.client.fput_object(self.bucket, check_key(key), str(path))

    def get_bytes(self, key: str) -> bytes:
        """Read the object under ``key``."""
        try:
            response = self.client.get_object(self.bucket, check_key(key))
        except S3Error as err:
            raise self._not_found(key, err) from err
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    def get_file(self, key: str, path: Path) -> None:
        """Download the object under ``key`` to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.fget_object(self.bucket, check_key(key), str(path))
        except S3Error as err:
            raise self._not_found(key, err) from err

    def exists(self, key: str) -> bool:
        """Tell whether ``key`` is stored."""
        try:
            self.client.stat_object(self.bucket, check_key(key))
        except S3Error as err:
            if err.code in _MISSING_CODES:
                return False
            raise
        return True

    def list(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix``, sorted."""
        objects = self.client.list_objects(
            self.bucket, prefix=_check_prefix(prefix) or None, recursive=True
        )
        return sorted(str(obj.object_name) for obj in objects if obj.object_name)

    def delete(self, key: str) -> None:
        """Remove ``key``; S3 treats an absent key as removed."""
        self.client.remove_object(self.bucket, check_key(key))

    def uri(self, key: str) -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{check_key(key)}"

    def _not_found(self, key: str, err: S3Error) -> Exception:
        if err.code in _MISSING_CODES:
            return FileNotFoundError(f"no object {key!r} in {self.uri(key)}")
        return err


def open_store(settings: Settings) -> ObjectStore:
    """Open the object store the settings describe.

    Args:
        settings: ``settings.s3`` selects MinIO/S3; otherwise ``settings.store_root``.

    Returns:
        A :class:`MinioStore` or a :class:`LocalStore`.
    """
    if settings.s3 is not None:
        return MinioStore(settings.s3)
    return LocalStore(settings.store_root)


def download_uri(uri: str, dest: Path, settings: Settings) -> Path:
    """Fetch a user-supplied file (local path, ``file://`` or ``s3://``) into ``dest``.

    Args:
        uri: the file; ``s3://bucket/key`` uses the S3 endpoint and credentials of
            ``settings``.
        dest: folder for the copy.

    Returns:
        The path of the copy (a local path is copied too, so sources stay untouched).

    Raises:
        ValueError: the scheme is not supported, or ``s3://`` without S3 settings.
        FileNotFoundError: the file does not exist.
    """
    parsed = urlparse(uri)
    dest.mkdir(parents=True, exist_ok=True)
    if parsed.scheme in {"", "file"}:
        source = Path(parsed.path if parsed.scheme else uri).expanduser()
        if not source.is_file():
            raise FileNotFoundError(f"input file {uri!r} does not exist")
        target = dest / source.name
        shutil.copyfile(source, target)
        return target
    if parsed.scheme == "s3":
        if settings.s3 is None:
            raise ValueError(f"{uri!r} is on S3 but SHOPML_S3_ENDPOINT is not set")
        store = MinioStore(
            replace(settings.s3, bucket=parsed.netloc), create_bucket=False
        )
        target = dest / Path(parsed.path).name
        store.get_file(parsed.path.lstrip("/"), target)
        return target
    raise ValueError(
        f"input URI {uri!r} has scheme {parsed.scheme!r}; use a path, file:// or s3://"
    )
