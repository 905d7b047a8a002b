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


def test_batch_engine_and_ray_address_default_to_in_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings()
    assert settings.feast_batch_engine == "local"
    assert settings.ray_address is None
    monkeypatch.setenv("SHOPML_RAY_ADDRESS", "")  # the ConfigMap's empty default
    assert load_settings().ray_address is None


def test_ray_engine_on_a_ray_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPML_FEAST_BATCH_ENGINE", "ray")
    monkeypatch.setenv("SHOPML_RAY_ADDRESS", "ray://shopml-ray-head-svc:10001")
    settings = load_settings()
    assert settings.feast_batch_engine == "ray"
    assert settings.ray_address == "ray://shopml-ray-head-svc:10001"


def test_unknown_batch_engine_lists_the_choices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHOPML_FEAST_BATCH_ENGINE", "spark")
    with pytest.raises(
        ValueError, match=re.escape("SHOPML_FEAST_BATCH_ENGINE='spark' is not one of")
    ) as raised:
        load_settings()
    assert "local, k8s, ray" in str(raised.value)


@pytest.mark.parametrize(
    "address",
    ["shopml-ray-head-svc:6379", "http://shopml-ray-head-svc:8265"],
    ids=["gcs-address", "dashboard-url"],
)
def test_ray_address_must_be_a_ray_client_address(
    monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    monkeypatch.setenv("SHOPML_RAY_ADDRESS", address)
    with pytest.raises(ValueError, match=re.escape(f"SHOPML_RAY_ADDRESS={address!r}")):
        load_settings()


def test_dask_work_dir_is_a_shared_path_or_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert load_settings().dask_work_dir is None
    monkeypatch.setenv("SHOPML_DASK_WORK_DIR", str(tmp_path / "shared" / "dask"))
    assert load_settings().dask_work_dir == tmp_path / "shared" / "dask"
    monkeypatch.setenv("SHOPML_DASK_WORK_DIR", "")
    assert load_settings().dask_work_dir is None
