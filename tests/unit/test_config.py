"""Settings come from SHOPML_* variables, with clear errors for unusable values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shopml.config import load_settings


def test_defaults_keep_everything_local(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHOPML_HOME", str(tmp_path / "h"))
    settings = load_settings()
    assert settings.s3 is None
    assert settings.redis_url is None
    assert settings.store_root == tmp_path / "h" / "store"
    assert settings.feast_dir == tmp_path / "h" / "feast"


def test_s3_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPML_S3_ENDPOINT", "127.0.0.1:9000")
    monkeypatch.setenv("SHOPML_S3_ACCESS_KEY", "a")
    monkeypatch.setenv("SHOPML_S3_SECRET_KEY", "b")
    monkeypatch.setenv("SHOPML_S3_SECURE", "yes")
    settings = load_settings()
    assert settings.s3 is not None
    assert settings.s3.bucket == "shopml"
    assert settings.s3.endpoint_url == "https://127.0.0.1:9000"


def test_endpoint_with_scheme_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPML_S3_ENDPOINT", "http://127.0.0.1:9000")
    with pytest.raises(
        ValueError, match=re.escape("SHOPML_S3_ENDPOINT='http://127.0.0.1:9000'")
    ):
        load_settings()


def test_s3_without_credentials_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPML_S3_ENDPOINT", "127.0.0.1:9000")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(ValueError, match="SHOPML_S3_ACCESS_KEY"):
        load_settings()


def test_bad_boolean_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPML_PROGRESS", "maybe")
    with pytest.raises(ValueError, match="SHOPML_PROGRESS='maybe'"):
        load_settings()
