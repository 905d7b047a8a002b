"""Bucket encryption, versioning and policies on an S3 server (moto), and the audit log.

What moto's server supports through the ``minio`` SDK (checked here): default bucket
encryption (set/get, and objects report ``AES256``), versioning (set/get, object
versions listed and deleted by id), bucket policies (stored, returned, and a ``Deny``
on ``s3:DeleteObject`` is enforced with HTTP 403) and object-lock configuration. Not
supported: MinIO's admin API (``MinioAdmin``: IAM policies per role), so role
policies are only checked against real MinIO.
"""

from __future__ import annotations

import io
import json

import pytest
import typer
from minio import Minio
from minio.error import InvalidResponseError, S3Error
from minio.versioningconfig import SUSPENDED, VersioningConfig
from typer.testing import CliRunner

from shopml.access import ROLES, bucket_policy, check_bucket, role_policy, secure_bucket
from shopml.audit import AuditLog, event_key
from shopml.config import S3Settings
from shopml.erasure import purge_key
from shopml.storage import MinioStore
from tests.services import S3Server

pytestmark = pytest.mark.integration


def _client(server: S3Server) -> Minio:
    return Minio(
        server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key,
        secure=False,
    )


def _store(server: S3Server) -> MinioStore:
    return MinioStore(
        S3Settings(
            endpoint=server.endpoint,
            bucket=server.bucket,
            access_key=server.access_key,
            secret_key=server.secret_key,
        )
    )


def test_fresh_bucket_deviates_then_secure_bucket_fixes_it(s3_server: S3Server) -> None:
    client = _client(s3_server)
    before = {d.subject for d in check_bucket(client, s3_server.bucket)}
    assert before == {"encryption", "versioning", "bucket-policy"}

    secure_bucket(client, s3_server.bucket)

    assert check_bucket(client, s3_server.bucket) == []
    client.put_object(s3_server.bucket, "curated/x", io.BytesIO(b"1"), 1)
    stat = client.stat_object(s3_server.bucket, "curated/x")
    assert stat.metadata.get("x-amz-server-side-encryption") == "AES256"


def test_check_reports_every_drift(s3_server: S3Server) -> None:
    client, bucket = _client(s3_server), s3_server.bucket
    secure_bucket(client, bucket)
    client.set_bucket_versioning(bucket, VersioningConfig(SUSPENDED))
    client.set_bucket_policy(bucket, json.dumps(bucket_policy("another-bucket")))

    deviations = check_bucket(client, bucket, kms_key_id="shopml-key")

    assert {d.subject for d in deviations} == {
        "encryption",
        "versioning",
        "bucket-policy",
    }
    assert any("Suspended" in str(d) for d in deviations)


def test_audit_events_cannot_be_deleted(s3_server: S3Server) -> None:
    client = _client(s3_server)
    secure_bucket(client, s3_server.bucket)
    log = AuditLog(_store(s3_server), actor="user:tester")
    log.record(None, "asset.write", "events@aa", "success")
    log.record(None, "asset.read", "events@aa", "success")

    # MinIO answers 403 AccessDenied (S3Error); moto a bare 403 (InvalidResponseError).
    with pytest.raises((S3Error, InvalidResponseError)):
        client.remove_object(s3_server.bucket, event_key(0))
    assert log.verify().is_intact
    assert [e.seq for e in AuditLog(_store(s3_server)).events()] == [0, 1]


def test_overwritten_audit_event_is_detected_and_its_old_version_kept(
    s3_server: S3Server,
) -> None:
    client, bucket = _client(s3_server), s3_server.bucket
    secure_bucket(client, bucket)
    log = AuditLog(_store(s3_server), actor="user:tester")
    log.record(None, "asset.write", "events@aa", "success")
    log.record(None, "asset.read", "events@aa", "success")

    client.put_object(bucket, event_key(0), io.BytesIO(b"{}"), 2)

    assert not log.verify().is_intact
    listed = client.list_objects(bucket, prefix=event_key(0), include_version=True)
    assert len(list(listed)) == 2


def test_purge_key_removes_every_object_version(s3_server: S3Server) -> None:
    client, bucket = _client(s3_server), s3_server.bucket
    secure_bucket(client, bucket)
    for content in (b"v1", b"v2"):
        client.put_object(bucket, "curated/events/x", io.BytesIO(content), 2)

    purge_key(_store(s3_server), "curated/events/x")

    listed = client.list_objects(bucket, prefix="curated/", include_version=True)
    assert list(listed) == []


@pytest.mark.parametrize("role", ROLES)
def test_role_policies_stay_in_their_prefixes(role: str) -> None:
    policy = role_policy(role, "shopml")
    resources = [r for s in policy["Statement"] for r in s["Resource"]]
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert all(r.startswith("arn:aws:s3:::shopml") for r in resources)
    assert "s3:*" not in actions
    if role in ("serving", "auditor"):
        assert not actions & {"s3:PutObject", "s3:DeleteObject"}
    touches_audit = any(r.startswith("arn:aws:s3:::shopml/audit/") for r in resources)
    assert touches_audit == (role in ("pipeline", "auditor"))


def test_cli_security_check_and_setup(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shopml.cli_security import security_app

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    app = typer.Typer()
    app.add_typer(security_app, name="security")
    runner = CliRunner()

    failed = runner.invoke(app, ["security", "check"])
    assert failed.exit_code == 1
    assert "DEVIATION encryption" in failed.output

    assert runner.invoke(app, ["security", "setup"]).exit_code == 0
    passed = runner.invoke(app, ["security", "check"])
    assert passed.exit_code == 0, passed.output
    assert "0 deviation(s)" in passed.output
